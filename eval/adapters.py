"""Model adapters: one interface over PedCLIP and transformers' CLIP-like dual encoders, so every task (and the
paper's baseline comparison) runs through the same code.

`load_adapter(spec)` takes a local folder or a Hub id (resolved with `huggingface_hub.snapshot_download`, which
works offline from the cache), reads `config.json`'s `model_type` and builds:
- `PedCLIPAdapter` for `pedclip` (through the installed `pedclip` package: no remote code);
- `DualEncoderAdapter` for any model with `get_image_features` / `get_text_features` (`CLIPModel`, `SiglipModel`,
  `VisionTextDualEncoderModel`, ...), loaded with `AutoModel` / `AutoProcessor` (`trust_remote_code` passed on).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from modeling_pedclip import mean_gate_logits

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
PREPROCESSING_FILES = (
    "processor_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
)  # fmt: skip
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def resolve_folder(spec: str, revision: str | None = None) -> Path:
    """A local folder as is; a Hub id through `snapshot_download` (from the local cache when offline)."""
    if Path(spec).is_dir():
        return Path(spec)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(spec, revision=revision))


def folder_fingerprint(folder: Path, extra: dict | None = None) -> str:
    """sha256 of config.json, the weight files' names/sizes/mtimes, the preprocessing files' contents and `extra`
    (the adapter options that change embeddings)."""
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix in WEIGHT_SUFFIXES:
            stat = path.stat()
            digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
        elif path.name in PREPROCESSING_FILES:
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    digest.update(json.dumps(extra or {}, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _features(output) -> torch.Tensor:
    """`get_*_features` returns a tensor (transformers 4) or an output whose `pooler_output` is the embedding."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _normalised(features: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy().astype(np.float32)


class ModelAdapter:
    """A loaded dual encoder: `embed_images` / `embed_texts` (L2-normalised float32 numpy), `logit_scale`,
    `gate_logits` and `body_parts` (mixture-of-experts models only), and the vision tower for trained tasks
    (`pixel_values`, `vision_tower`, `vision_features`, `patch_grid`)."""

    body_parts: list[str] | None = None
    text_padding: str = "longest"

    def __init__(self, model, processor, name: str, fingerprint: str, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else default_device()
        self.model = model.to(self.device).eval()
        self.processor = processor
        self.name, self.fingerprint = name, fingerprint

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, model={type(self.model).__name__}, device={self.device})"

    @property
    def logit_scale(self) -> float:
        scale = getattr(self.model, "logit_scale", None)
        return float(scale.detach().exp()) if scale is not None else 100.0

    @property
    def image_processor(self):
        return getattr(self.processor, "image_processor", self.processor)

    def _prepare_images(self, images: Sequence) -> list:
        return list(images)

    def pixel_values(self, images: Sequence) -> torch.Tensor:
        """The model's own preprocessing of `images` (PIL) -> `[B, C, H, W]` on `self.device`."""
        batch = self.image_processor(self._prepare_images(images), return_tensors="pt")
        return batch["pixel_values"].to(self.device)

    def _image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_image_features(pixel_values=pixel_values))

    def _text_inputs(self, texts: list[str]) -> dict:
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        max_length = getattr(self.model.config, "text_config", self.model.config)
        max_length = getattr(max_length, "max_position_embeddings", None)
        inputs = tokenizer(
            texts, padding=self.text_padding, truncation=True, max_length=max_length, return_tensors="pt"
        )
        accepted = inspect.signature(self.model.get_text_features).parameters
        return {k: v.to(self.device) for k, v in inputs.items() if k in TEXT_INPUTS and k in accepted}

    @torch.inference_mode()
    def embed_images(self, images: Sequence, batch_size: int = 32) -> np.ndarray:
        """`[N, D]` L2-normalised float32 image embeddings."""
        chunks = [
            _normalised(self._image_features(self.pixel_values(images[start : start + batch_size])))
            for start in range(0, len(images), batch_size)
        ]
        return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """`[N, D]` L2-normalised float32 text embeddings (each batch padded to its longest text)."""
        texts = list(texts)
        chunks = [
            _normalised(_features(self.model.get_text_features(**self._text_inputs(texts[start : start + batch_size]))))
            for start in range(0, len(texts), batch_size)
        ]
        return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)

    def gate_logits(self, images: Sequence, batch_size: int = 32) -> np.ndarray | None:
        """`[N, E]` router logits (mean over mixture-of-experts layers); None for a model without experts."""
        return None

    def vision_tower(self) -> torch.nn.Module:
        return self.model.vision_model

    def _vision_output(self, pixel_values: torch.Tensor):
        return self.vision_tower()(pixel_values=pixel_values)

    def vision_features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled `[B, H]`, patch tokens `[B, N, H]`) of the vision tower, with gradients (for fine-tuning).
        A tower with a class token: pooled = that token after the final norm, patches = the other tokens;
        without one (SigLIP): pooled = the tower's pooling head, patches = every token."""
        output = self._vision_output(pixel_values)
        hidden = output.last_hidden_state
        if hidden.shape[1] == self.patch_grid[0] * self.patch_grid[1]:
            return output.pooler_output, hidden
        tower = self.vision_tower()
        pooled = output.pooler_output if hasattr(tower, "post_layernorm") else hidden[:, 0]
        return pooled, hidden[:, 1:]

    @property
    def patch_grid(self) -> tuple[int, int]:
        config = getattr(self.model.config, "vision_config", self.model.config)
        size, patch = config.image_size, config.patch_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
        return size[0] // patch[0], size[1] // patch[1]


class PedCLIPAdapter(ModelAdapter):
    """PedCLIP: images keep their own mode (the X-ray-aware processor windows and grays them); `router_mode`
    (default: the config's, "soft") is used for every image forward."""

    def __init__(self, model, processor, name: str, fingerprint: str, device=None, router_mode: str | None = None):
        super().__init__(model, processor, name, fingerprint, device)
        self.router_mode = router_mode
        self.body_parts = list(model.config.body_parts)

    def _text_inputs(self, texts: list[str]) -> dict:
        inputs = self.processor(text=texts, padding=True, return_tensors="pt")
        return {k: v.to(self.device) for k, v in inputs.items() if k in TEXT_INPUTS}

    def _image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values, router_mode=self.router_mode).pooler_output

    def _vision_output(self, pixel_values: torch.Tensor):
        return self.vision_tower()(pixel_values, router_mode=self.router_mode)

    @torch.inference_mode()
    def gate_logits(self, images: Sequence, batch_size: int = 32) -> np.ndarray | None:
        if not self.model.config.vision_config.moe_layers:
            return None
        chunks = []
        for start in range(0, len(images), batch_size):
            gates = self._vision_output(self.pixel_values(images[start : start + batch_size])).gate_logits
            chunks.append(mean_gate_logits(gates).cpu().numpy())
        return np.concatenate(chunks) if chunks else np.zeros((0, len(self.body_parts)), np.float32)


class DualEncoderAdapter(ModelAdapter):
    """transformers CLIP-like models (`CLIPModel`, `SiglipModel`, `VisionTextDualEncoderModel`, ...): images are
    converted to RGB; SigLIP texts are padded to `max_length`, as it was trained."""

    def __init__(self, model, processor, name: str, fingerprint: str, device=None):
        super().__init__(model, processor, name, fingerprint, device)
        if "siglip" in model.config.model_type:
            self.text_padding = "max_length"

    def _prepare_images(self, images: Sequence) -> list:
        return [to_rgb(image) for image in images]


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB for processors that expect 8-bit colour. PIL's own conversion clips 16/32-bit gray at 255 (a white image),
    so integer and float modes are scaled by their maximum first."""
    if image.mode.startswith("I") or image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        peak = pixels.max()
        scale = 255.0 / peak if peak > 0 else 0.0
        image = Image.fromarray(np.clip(pixels * scale, 0, 255).astype(np.uint8))
    return image.convert("RGB")


def load_adapter(
    spec: str, device: str | None = None, name: str | None = None, trust_remote_code: bool = False,
    revision: str | None = None, router_mode: str | None = None,
) -> ModelAdapter:  # fmt: skip
    """A `ModelAdapter` for `spec` (folder or Hub id); `name` defaults to the folder name (or the Hub id)."""
    folder = resolve_folder(spec, revision)
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    name = name or (Path(spec).name if Path(spec).is_dir() else spec)
    options = {"model_type": model_type, "router_mode": router_mode}
    fingerprint = folder_fingerprint(folder, options)
    if model_type == "pedclip":
        import pedclip

        model = pedclip.PedCLIPModel.from_pretrained(folder)
        processor = pedclip.PedCLIPProcessor.from_pretrained(folder)
        return PedCLIPAdapter(model, processor, name, fingerprint, device, router_mode)
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
        raise ValueError(f"{spec}: {type(model).__name__} ({model_type}) is not a dual encoder (no get_*_features)")
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
    return DualEncoderAdapter(model, processor, name, fingerprint, device)
