"""PedCLIP preprocessing: an X-ray aware image processor and a processor pairing it with a BERT tokenizer.

Numpy and PIL only (no torchvision). Torch tensors are accepted as inputs and are read through numpy.
"""

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_processing_utils import BatchFeature as ImageBatchFeature
from transformers.processing_utils import ImagesKwargs, ProcessingKwargs, ProcessorMixin
from transformers.utils import TensorType, is_torch_tensor

try:
    from .configuration_pedclip import DEFAULT_BODY_PARTS, DICOM_BODY_PART_TERMS
except ImportError:
    from configuration_pedclip import DEFAULT_BODY_PARTS, DICOM_BODY_PART_TERMS

# ITU-R BT.601 luma weights, used only for colour images whose channels differ.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
# PIL modes read as they are, and modes first converted to one of them.
PIL_DIRECT_MODES = ("L", "LA", "I", "F", "I;16", "I;16L", "I;16B", "I;16N", "RGB", "RGBA")
PIL_CONVERTED_MODES = {"1": "L", "P": "RGBA", "PA": "RGBA", "La": "LA", "RGBa": "RGBA", "RGBX": "RGB",
                       "CMYK": "RGB", "YCbCr": "RGB"}  # fmt: skip
PIL_FILTERS = tuple(int(f) for f in Image.Resampling)
IMAGE_CALL_OPTIONS = ("size", "resample", "intensity_percentiles", "do_normalize", "image_mean", "image_std")


class PedCLIPImageProcessorKwargs(ImagesKwargs, total=False):
    """`ImagesKwargs` plus the X-ray intensity window (see `PedCLIPImageProcessor`)."""

    intensity_percentiles: tuple[int | float, int | float] | list[int | float] | None


def _pil_to_array(image: Image.Image, index: int) -> np.ndarray:
    """PIL image -> [H, W] or [H, W, C] array in the image's own dtype (16-bit and float modes keep their range)."""
    mode = image.mode
    if mode in PIL_CONVERTED_MODES:
        image, mode = image.convert(PIL_CONVERTED_MODES[mode]), PIL_CONVERTED_MODES[mode]
    if mode not in PIL_DIRECT_MODES:
        raise ValueError(f"image {index}: unsupported PIL mode {mode!r}")
    array = np.asarray(image)
    return array[..., 0] if mode == "LA" else array  # drop the alpha of gray+alpha


def _channels_last(array: np.ndarray, index: int, prefer_first: bool) -> np.ndarray:
    """Check dtype/size/rank/channels and return [H, W] or [H, W, C]; `prefer_first` breaks [C, H, C] ties."""
    if array.dtype.kind not in "biuf":
        raise ValueError(f"image {index}: unsupported dtype {array.dtype}; expected integers, floats or bools")
    if array.size == 0:
        raise ValueError(f"image {index} is empty (shape {tuple(array.shape)})")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ValueError(f"image {index} contains NaN or infinite values")
    if array.ndim == 2:
        return array
    if array.ndim != 3:
        raise ValueError(
            f"image {index} has rank {array.ndim} (shape {tuple(array.shape)}); "
            "expected [H, W], [H, W, C] or [C, H, W]"
        )
    first, last = array.shape[0] in (1, 3, 4), array.shape[-1] in (1, 3, 4)
    if first and (prefer_first or not last):
        return np.moveaxis(array, 0, -1)
    if last:
        return array
    raise ValueError(
        f"image {index} has shape {tuple(array.shape)}: expected 1, 3 or 4 channels on the first or last axis"
    )


def _to_array(image: Any, index: int) -> np.ndarray:
    """Any accepted image -> validated [H, W] or [H, W, C] numpy array."""
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"image {index} is empty (size {image.size})")
        return _channels_last(_pil_to_array(image, index), index, prefer_first=False)
    if is_torch_tensor(image):
        tensor = image.detach().cpu()
        tensor = tensor.float() if tensor.is_floating_point() else tensor  # numpy has no bfloat16
        return _channels_last(tensor.numpy(), index, prefer_first=True)
    if isinstance(image, np.ndarray):
        return _channels_last(image, index, prefer_first=False)
    raise ValueError(
        f"image {index}: unsupported type {type(image).__name__}; expected a PIL image, numpy array or torch tensor"
    )


def _to_gray(array: np.ndarray) -> np.ndarray:
    """[H, W] or [H, W, C] -> [H, W] float64: drop alpha; equal colour channels give one of them, else BT.601 luma."""
    if array.ndim == 2:
        return array.astype(np.float64)
    array = array[..., :3]
    if array.shape[-1] == 1 or all(np.array_equal(array[..., 0], array[..., c]) for c in (1, 2)):
        return array[..., 0].astype(np.float64)
    return array.astype(np.float64) @ np.asarray(LUMA_WEIGHTS)


def _window(gray: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """Map the [low, high] percentile window to [0, 1] (clipped). A constant image gives zeros; a window that
    collapses on a non-constant image (e.g. mostly background) falls back to min-max."""
    low, high = gray.min(), gray.max()
    if percentiles != (0.0, 100.0):
        p_low, p_high = np.percentile(gray, percentiles)
        if p_high > p_low:
            low, high = p_low, p_high
    if not high > low:
        return np.zeros(gray.shape, dtype=np.float32)
    return np.clip((gray - low) / (high - low), 0.0, 1.0).astype(np.float32)


def _resize_and_pad(image: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """Scale the longest side to fit (height, width) keeping the aspect ratio (PIL 'F', antialiased), clip to
    [0, 1], and pad centred with 0 (black)."""
    h, w = image.shape
    scale = min(height / h, width / w)
    new_h, new_w = min(height, max(1, round(h * scale))), min(width, max(1, round(w * scale)))
    if (new_h, new_w) != (h, w):
        resized = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32)).resize((new_w, new_h), resample)
        image = np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)
    out = np.zeros((height, width), dtype=np.float32)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    out[top : top + new_h, left : left + new_w] = image
    return out


def _as_batch(images: Any) -> list:
    """A single image, a list/tuple of images, or a 4D array/tensor (a batch along axis 0) -> list of images."""
    if isinstance(images, (list, tuple)):
        batch = list(images)
    elif (isinstance(images, np.ndarray) or is_torch_tensor(images)) and images.ndim == 4:
        batch = list(images)
    else:
        batch = [images]
    if not batch:
        raise ValueError("no images given (empty batch)")
    return batch


def _three(value: float | Sequence[float], name: str) -> list[float]:
    """A float or a 3-sequence -> list of 3 floats (one per output channel)."""
    values = [float(value)] * 3 if np.isscalar(value) else [float(v) for v in value]
    if len(values) != 3:
        raise ValueError(f"{name} must be a float or 3 floats, got {value!r}")
    return values


def _check_options(options: dict[str, Any]) -> dict[str, Any]:
    """Validate and canonicalise image options (size dict, int filter, float tuple window, 3-lists)."""
    size = options["size"]
    if isinstance(size, int):
        size = {"height": size, "width": size}
    elif isinstance(size, (list, tuple)) and len(size) == 2:
        size = {"height": size[0], "width": size[1]}
    size = dict(size)
    if set(size) != {"height", "width"} or min(size.values()) < 1:
        raise ValueError(f"size must be a positive int or {{'height': h, 'width': w}}, got {options['size']!r}")
    low, high = (float(p) for p in options["intensity_percentiles"])
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"intensity_percentiles must satisfy 0 <= low < high <= 100, got {(low, high)}")
    resample = int(options["resample"])
    if resample not in PIL_FILTERS:
        raise ValueError(f"resample must be a PIL resampling filter {PIL_FILTERS}, got {options['resample']!r}")
    image_std = _three(options["image_std"], "image_std")
    if min(image_std) <= 0:
        raise ValueError(f"image_std must be positive, got {image_std}")
    return {
        "size": {"height": int(size["height"]), "width": int(size["width"])},
        "resample": resample,
        "intensity_percentiles": (low, high),
        "do_normalize": bool(options["do_normalize"]),
        "image_mean": _three(options["image_mean"], "image_mean"),
        "image_std": image_std,
    }


class PedCLIPImageProcessor(BaseImageProcessor):
    r"""
    X-ray aware image processor (numpy/PIL only). Turns each image into a `[3, H, W]` float32 array:

    a) To a 2D grayscale array. Inputs: PIL images (modes L, I;16, I, F, RGB, RGBA; LA/La drop alpha; 1 -> L;
       P/PA/RGBa -> RGBA; CMYK/YCbCr/RGBX -> RGB), numpy arrays or torch tensors of any integer/float/bool dtype, 2D
       `[H, W]` or 3D `[H, W, C]` / `[C, H, W]` with C in {1, 3, 4} (a 4D array/tensor is a batch). Alpha is
       dropped; if the colour channels are equal one of them is taken as is, so a grayscale X-ray and its RGB copy
       give bit-identical `pixel_values` (transformers' zero-shot pipeline converts every image to RGB); otherwise
       ITU-R BT.601 luma `0.299 R + 0.587 G + 0.114 B`.
    b) Intensity to [0, 1]: per image, the window between the `intensity_percentiles` of its pixel values is mapped
       to [0, 1] and clipped. The default (0, 100) is plain min-max, which works for any dtype and bit depth
       (8-bit, 12-bit stored in uint16, float). A constant image maps to all zeros; a percentile window that
       collapses on a non-constant image falls back to min-max.
    c) Resize without distorting anatomy: the longest side is scaled to fit `size` keeping the aspect ratio
       (PIL mode 'F' resize with `resample`, antialiased when shrinking, then clipped to [0, 1]), and the result
       is padded centred to `size` with 0 (black).
    d) Normalise `(x - image_mean[c]) / image_std[c]` per channel while replicating to 3 channels.

    Bad images raise a `ValueError` naming the image's index in the batch and the problem (empty, NaN/inf, wrong
    rank or channel count, unsupported type, dtype or PIL mode).

    Args:
        size (`int` or `dict[str, int]`, defaults to `{"height": 224, "width": 224}`): output size; an int means
            a square.
        resample (`int` or `PIL.Image.Resampling`, defaults to `Resampling.BICUBIC` (3)): PIL filter used to resize.
        intensity_percentiles (`tuple[float, float]`, defaults to `(0.0, 100.0)`): per-image intensity window,
            in percent of the image's pixel values, mapped to [0, 1]. E.g. `(0.5, 99.5)` ignores outliers.
        do_normalize (`bool`, defaults to `True`): apply step d's mean/std (else the output lies in [0, 1]).
        image_mean (`float` or `list[float]`, defaults to `[0.5, 0.5, 0.5]`): per-channel mean (ViT-B/16 ImageNet
            convention).
        image_std (`float` or `list[float]`, defaults to `[0.5, 0.5, 0.5]`): per-channel standard deviation.
        kwargs: other attributes kept as is (e.g. `auto_map` written by `save_pretrained`).
    """

    model_input_names = ["pixel_values"]
    valid_kwargs = PedCLIPImageProcessorKwargs

    def __init__(
        self,
        size: int | dict[str, int] | None = None,
        resample: int = Image.Resampling.BICUBIC,
        intensity_percentiles: Sequence[float] = (0.0, 100.0),
        do_normalize: bool = True,
        image_mean: float | Sequence[float] = 0.5,
        image_std: float | Sequence[float] = 0.5,
        **kwargs,
    ):
        super().__init__(**kwargs)
        options = _check_options(
            {
                "size": {"height": 224, "width": 224} if size is None else size,
                "resample": resample,
                "intensity_percentiles": intensity_percentiles,
                "do_normalize": do_normalize,
                "image_mean": image_mean,
                "image_std": image_std,
            }
        )
        for name, value in options.items():
            setattr(self, name, value)

    def preprocess(self, images: Any, return_tensors: str | TensorType | None = None, **kwargs) -> ImageBatchFeature:
        """Process one image or a batch into `pixel_values` `[B, 3, H, W]` float32. Keyword arguments named like
        the `__init__` arguments override them for this call; `return_tensors="pt"` gives a torch tensor."""
        unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in IMAGE_CALL_OPTIONS)
        if unknown:
            raise TypeError(f"{type(self).__name__} does not support {unknown}; options: {IMAGE_CALL_OPTIONS}")
        options = {name: getattr(self, name) for name in IMAGE_CALL_OPTIONS}
        options = _check_options({**options, **{k: v for k, v in kwargs.items() if v is not None}})
        pixel_values = np.stack([self._process_one(image, i, **options) for i, image in enumerate(_as_batch(images))])
        return ImageBatchFeature(data={"pixel_values": pixel_values}, tensor_type=return_tensors)

    def _process_one(
        self,
        image: Any,
        index: int,
        size: dict[str, int],
        resample: int,
        intensity_percentiles: tuple[float, float],
        do_normalize: bool,
        image_mean: list[float],
        image_std: list[float],
    ) -> np.ndarray:
        """Steps a-d for one image -> [3, H, W] float32."""
        gray = _window(_to_gray(_to_array(image, index)), intensity_percentiles)
        gray = _resize_and_pad(gray, size["height"], size["width"], resample)
        if not do_normalize:
            return np.repeat(gray[None], 3, axis=0)
        mean = np.asarray(image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(image_std, dtype=np.float32)[:, None, None]
        return (gray[None] - mean) / std


def _body_part_key(name: str) -> str:
    """Case-insensitive key; runs of spaces, hyphens and underscores become one underscore."""
    return re.sub(r"[\s\-_]+", "_", name.strip().lower())


class PedCLIPProcessorKwargs(ProcessingKwargs, total=False):
    """Processor kwargs: images kwargs are `PedCLIPImageProcessorKwargs`."""

    images_kwargs: PedCLIPImageProcessorKwargs


class PedCLIPProcessor(ProcessorMixin):
    r"""
    PedCLIP processor: a `PedCLIPImageProcessor` and a BERT tokenizer, plus body-part names -> label ids.

    Args:
        image_processor (`PedCLIPImageProcessor`, defaults to `PedCLIPImageProcessor()`): the image processor.
        tokenizer (`PreTrainedTokenizerBase`, required): the text tower's (BERT) tokenizer.
        max_length (`int`, defaults to 120): reports are truncated, and by default padded, to this many tokens.
        body_parts (`list[str]`, defaults to `DEFAULT_BODY_PARTS`): body part name of each label id, in expert
            order (as `PedCLIPConfig.body_parts`).
        kwargs: `chat_template` (unused, accepted for `ProcessorMixin`).
    """

    valid_processor_kwargs = PedCLIPProcessorKwargs

    def __init__(
        self,
        image_processor: PedCLIPImageProcessor | None = None,
        tokenizer: Any = None,
        max_length: int = 120,
        body_parts: Sequence[str] | None = None,
        **kwargs,
    ):
        image_processor = PedCLIPImageProcessor() if image_processor is None else image_processor
        super().__init__(image_processor, tokenizer, **kwargs)
        if int(max_length) < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.max_length = int(max_length)
        self.body_parts = list(DEFAULT_BODY_PARTS if body_parts is None else body_parts)
        keys = [_body_part_key(name) for name in self.body_parts]
        if len(set(keys)) != len(keys):
            raise ValueError(f"body_parts has duplicate names (ignoring case, spaces and hyphens): {self.body_parts}")

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        body_parts: str | int | Sequence[str | int] | None = None,
        return_tensors: str | TensorType | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        """Tokenize `text` (input_ids, attention_mask, token_type_ids), process `images` (pixel_values) and map
        `body_parts` to `body_part_labels`. Text is truncated to `max_length` and padded to it unless the caller
        passes `padding`. Other kwargs go to the tokenizer or image processor (flat or as `text_kwargs=` /
        `images_kwargs=` dicts)."""
        if images is None and text is None and body_parts is None:
            raise ValueError("give at least one of images, text or body_parts")
        merged = self._merge_kwargs(PedCLIPProcessorKwargs, **kwargs)
        data = {}
        if text is not None:
            text_kwargs = {"padding": "max_length", "truncation": True, "max_length": self.max_length}
            text_kwargs.update(merged["text_kwargs"], return_tensors=return_tensors)
            data.update(self.tokenizer(text, **text_kwargs))
        if images is not None:
            images_kwargs = {**merged["images_kwargs"], "return_tensors": return_tensors}
            data.update(self.image_processor(images, **images_kwargs))
        if body_parts is not None:
            labels = self.body_part_ids(body_parts)
            if images is not None and len(labels) != len(data["pixel_values"]):
                raise ValueError(f"got {len(labels)} body_parts for {len(data['pixel_values'])} images")
            data["body_part_labels"] = np.asarray(labels, dtype=np.int64)
        return BatchFeature(data, tensor_type=return_tensors)

    def body_part_ids(self, body_parts: str | int | Sequence[str | int]) -> list[int]:
        """Map body parts to label ids (indices into `self.body_parts`). Each item is a name (case-insensitive,
        spaces/hyphens = underscores, e.g. "Lower leg"), a DICOM BodyPartExamined term (e.g. "CSPINE"), or an id."""
        items = [body_parts] if isinstance(body_parts, (str, int, np.integer)) else list(body_parts)
        terms = [(DICOM_BODY_PART_TERMS.get(name), i) for i, name in enumerate(self.body_parts)]
        lookup = {_body_part_key(term): i for term, i in terms if term is not None}
        lookup.update({_body_part_key(name): i for i, name in enumerate(self.body_parts)})
        ids = []
        for index, item in enumerate(items):
            if isinstance(item, (int, np.integer)) and not isinstance(item, bool) and 0 <= item < len(self.body_parts):
                ids.append(int(item))
            elif isinstance(item, str) and _body_part_key(item) in lookup:
                ids.append(lookup[_body_part_key(item)])
            else:
                raise ValueError(
                    f"unknown body part {item!r} (item {index}); valid names: {', '.join(self.body_parts)}; "
                    f"or their DICOM terms, or ids 0-{len(self.body_parts) - 1}"
                )
        return ids

    @property
    def model_input_names(self) -> list[str]:
        return [*super().model_input_names, "body_part_labels"]

    @classmethod
    def for_config(cls, config, tokenizer) -> "PedCLIPProcessor":
        """The processor that matches a `PedCLIPConfig`: its image size, text `max_length` and body parts."""
        image_processor = PedCLIPImageProcessor(size=config.vision_config.image_size)
        return cls(image_processor, tokenizer, max_length=config.text_config.max_length, body_parts=config.body_parts)

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs) -> list:
        """Load the image processor by class (no Auto registration needed) and the tokenizer with `AutoTokenizer`."""
        subfolder = kwargs.pop("subfolder", "")
        image_processor = PedCLIPImageProcessor.from_pretrained(
            pretrained_model_name_or_path, subfolder=subfolder, **kwargs
        )
        tokenizer = cls._load_tokenizer_from_pretrained(
            "tokenizer", pretrained_model_name_or_path, subfolder=subfolder, **kwargs
        )
        return [image_processor, tokenizer]


# `save_pretrained` then writes `auto_map` and copies this file, so the folder loads as Hub remote code.
PedCLIPImageProcessor.register_for_auto_class("AutoImageProcessor")
PedCLIPProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["PedCLIPImageProcessor", "PedCLIPImageProcessorKwargs", "PedCLIPProcessor", "PedCLIPProcessorKwargs"]
