"""Tests for processing_pedclip: the X-ray image processor and the image + BERT tokenizer processor."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from configuration_pedclip import DEFAULT_BODY_PARTS
from pedclip_testing import minilm_path
from processing_pedclip import PedCLIPImageProcessor, PedCLIPProcessor

MAX_LENGTH = 120


def gray_image(height: int = 60, width: int = 80, seed: int = 0) -> np.ndarray:
    """A uint8 'X-ray': a gradient plus noise spanning the full 0..255 range."""
    rng = np.random.default_rng(seed)
    image = np.linspace(0, 200, width)[None, :] + rng.integers(0, 56, (height, width))
    image[0, 0], image[-1, -1] = 0, 255
    return image.astype(np.uint8)


@pytest.fixture(scope="module")
def image_processor() -> PedCLIPImageProcessor:
    return PedCLIPImageProcessor()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_path())


@pytest.fixture(scope="module")
def processor(tokenizer) -> PedCLIPProcessor:
    return PedCLIPProcessor(tokenizer=tokenizer)


G = gray_image()
ALPHA = np.random.default_rng(1).integers(0, 256, G.shape, dtype=np.uint8)
# Inputs that hold exactly the pixels of G (any dtype / bit depth / layout): all must give G's pixel_values.
SAME_AS_G = {
    "pil_L": lambda: Image.fromarray(G),
    "pil_RGB": lambda: Image.fromarray(G).convert("RGB"),
    "pil_RGBA": lambda: Image.fromarray(np.dstack([G, G, G, ALPHA])),
    "pil_LA": lambda: Image.merge("LA", [Image.fromarray(G), Image.fromarray(ALPHA)]),
    "pil_P": lambda: Image.fromarray(G).convert("P"),
    "pil_I;16": lambda: Image.fromarray(G.astype(np.uint16) * 257),
    "pil_I": lambda: Image.fromarray(G.astype(np.int32) * 1000 - 5000),
    "pil_F": lambda: Image.fromarray(G.astype(np.float32) / 255),
    "np_uint8": lambda: G,
    "np_uint16_12bit": lambda: G.astype(np.uint16) * 16,
    "np_uint16": lambda: G.astype(np.uint16) * 257,
    "np_int64": lambda: G.astype(np.int64) - 100,
    "np_float64": lambda: G / 255.0,
    "np_float16": lambda: (G / 255.0).astype(np.float16),
    "np_HW1": lambda: G[..., None],
    "np_HW3": lambda: np.dstack([G] * 3),
    "np_HW4": lambda: np.dstack([G, G, G, ALPHA]),
    "np_1HW": lambda: G[None],
    "np_3HW": lambda: np.stack([G] * 3),
    "np_4HW": lambda: np.stack([G, G, G, ALPHA]),
    "torch_uint8_HW": lambda: torch.from_numpy(G),
    "torch_float_3HW": lambda: torch.from_numpy(np.stack([G] * 3)).float() / 255,
    "torch_HW3": lambda: torch.from_numpy(np.dstack([G] * 3)),
    "torch_int16_1HW": lambda: torch.from_numpy(G[None].astype(np.int16)),
}


@pytest.mark.parametrize("name", sorted(SAME_AS_G))
def test_every_input_kind_gives_the_same_pixel_values(image_processor, name):
    reference = image_processor(G).pixel_values
    pixel_values = image_processor([SAME_AS_G[name](), G]).pixel_values
    assert pixel_values.shape == (2, 3, 224, 224) and pixel_values.dtype == np.float32
    assert pixel_values.min() == -1 and pixel_values.max() <= 1  # black padding, within the normalised range
    np.testing.assert_allclose(pixel_values[:1], reference, atol=2e-3, rtol=0)


def test_other_inputs_shapes_and_range(image_processor):
    images = [
        Image.fromarray(G).convert("1"),
        torch.rand(5, 7, dtype=torch.float64).to(torch.bfloat16),
        np.random.default_rng(0).random((30, 40, 3)),  # colour: luminance
        G > 100,
    ]
    pixel_values = image_processor(images, return_tensors="pt").pixel_values
    assert pixel_values.shape == (4, 3, 224, 224) and pixel_values.dtype == torch.float32
    assert pixel_values.min() >= -1 and pixel_values.max() <= 1
    assert (pixel_values.amax(dim=(1, 2, 3)) == 1).all()  # every image keeps its full [0, 1] range


def test_4d_batch_and_numpy_output(image_processor):
    batch = torch.from_numpy(np.stack([G[None], 255 - G[None]]))
    pixel_values = image_processor(batch).pixel_values
    assert isinstance(pixel_values, np.ndarray) and pixel_values.shape == (2, 3, 224, 224)
    np.testing.assert_allclose(pixel_values[0], image_processor(G).pixel_values[0])


def test_gray_and_its_rgb_copy_are_bit_identical(image_processor):
    for image in (Image.fromarray(G), Image.fromarray(gray_image(517, 311, seed=3))):
        gray = image_processor(image, return_tensors="pt").pixel_values
        rgb = image_processor(images=[image.convert("RGB")], return_tensors="pt").pixel_values  # as the pipeline
        assert torch.equal(gray, rgb)


def test_bit_depth_invariance(image_processor):
    image = gray_image(300, 250, seed=5)
    reference = image_processor(image).pixel_values
    for other in (image.astype(np.uint16) * 257, image.astype(np.float32) / 255, image.astype(np.uint16) * 16):
        np.testing.assert_allclose(image_processor(other).pixel_values, reference, atol=1e-5)


def test_colour_image_uses_luminance():
    rgb = np.random.default_rng(0).integers(0, 256, (224, 224, 3)).astype(np.uint8)
    luma = rgb.astype(np.float64) @ [0.299, 0.587, 0.114]
    expected = (luma - luma.min()) / (luma.max() - luma.min())
    alpha = np.random.default_rng(1).integers(0, 256, (224, 224, 1)).astype(np.uint8)
    rgba = Image.fromarray(np.concatenate([rgb, alpha], axis=-1))  # alpha is dropped
    pixel_values = PedCLIPImageProcessor(do_normalize=False)([rgb, rgba]).pixel_values
    np.testing.assert_allclose(pixel_values, np.broadcast_to(expected, (2, 3, 224, 224)), atol=1e-6)


@pytest.mark.parametrize("shape", [(100, 400), (400, 100), (5, 7)])
def test_aspect_ratio_preserved_with_black_padding(shape):
    image = np.ones(shape, dtype=np.float32)
    image[0, 0] = 0  # not constant, so min-max keeps the ones at 1
    pixel_values = PedCLIPImageProcessor(do_normalize=False)(image).pixel_values[0, 0]
    height, width = (224 * s / max(shape) for s in shape)
    rows, cols = np.nonzero(pixel_values.max(axis=1))[0], np.nonzero(pixel_values.max(axis=0))[0]
    assert abs(len(rows) - height) <= 1 and abs(len(cols) - width) <= 1
    assert rows.max() - rows.min() + 1 == len(rows) and cols.max() - cols.min() + 1 == len(cols)  # one block
    assert abs(rows.min() - (223 - rows.max())) <= 1 and abs(cols.min() - (223 - cols.max())) <= 1  # centred
    assert np.median(pixel_values[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]) == 1


def test_antialiased_downscale():
    checkerboard = (np.indices((896, 896)).sum(axis=0) % 2 * 255).astype(np.uint8)
    pixel_values = PedCLIPImageProcessor(do_normalize=False)(checkerboard).pixel_values
    np.testing.assert_allclose(pixel_values, 0.5, atol=0.02)


def test_percentile_window_clips():
    image = np.tile(np.linspace(0, 1, 224), (224, 1))
    image[0, 0] = 1000.0  # one hot outlier
    plain = PedCLIPImageProcessor(do_normalize=False)(image).pixel_values[0, 0]
    assert plain[1:].max() < 0.002  # min-max: the outlier squashes everything else
    windowed = PedCLIPImageProcessor(do_normalize=False, intensity_percentiles=(1, 99))(image).pixel_values[0, 0]
    assert windowed.min() == 0 and windowed.max() == 1
    assert 0.005 < (windowed == 1).mean() < 0.03 and 0.005 < (windowed == 0).mean() < 0.03  # ~1 % clipped each side
    np.testing.assert_allclose(windowed[100, 100:120], (image[100, 100:120] - 0.01) / 0.98, atol=0.01)


def test_collapsed_percentile_window_falls_back_to_min_max():
    image = np.zeros((224, 224), np.uint16)
    image[100:110, 100:110] = 3000  # 0.2 % of the pixels: the 1st and 99th percentiles are both 0
    windowed = PedCLIPImageProcessor(do_normalize=False, intensity_percentiles=(1, 99))(image).pixel_values[0, 0]
    assert windowed.max() == 1 and windowed.sum() == 100


@pytest.mark.parametrize("image", [np.full((50, 60), 7, np.uint16), Image.new("L", (30, 20), 200)])
def test_constant_image_maps_to_zero(image):
    assert not PedCLIPImageProcessor(do_normalize=False)(image).pixel_values.any()
    assert (PedCLIPImageProcessor()(image).pixel_values == -1).all()  # 0 after normalisation
    assert not PedCLIPImageProcessor(do_normalize=False, intensity_percentiles=(2, 98))(image).pixel_values.any()


def test_call_options_override_defaults(image_processor):
    out = image_processor(G, size={"height": 32, "width": 48}, image_mean=0.0, image_std=1.0).pixel_values
    assert out.shape == (1, 3, 32, 48) and out.min() == 0 and out.max() <= 1
    assert image_processor.size == {"height": 224, "width": 224}  # unchanged
    with pytest.raises(TypeError, match="do_resize"):
        image_processor(G, do_resize=False)
    with pytest.raises(ValueError, match="intensity_percentiles"):
        image_processor(G, intensity_percentiles=(60, 40))
    with pytest.raises(ValueError, match="image_std"):
        PedCLIPImageProcessor(image_std=[0.5, 0.0, 0.5])


BAD_IMAGES = {
    "empty array": (np.zeros((0, 5), np.uint8), "empty"),
    "empty PIL": (Image.new("L", (0, 5)), "empty"),
    "NaN": (np.array([[0.0, np.nan], [1.0, 2.0]]), "NaN or infinite"),
    "inf tensor": (torch.tensor([[0.0, float("inf")], [1.0, 2.0]]), "NaN or infinite"),
    "rank 1": (np.arange(10, dtype=np.uint8), "rank 1"),
    "rank 4 in a list": (np.zeros((1, 1, 8, 8), np.uint8), "rank 4"),
    "5 channels": (np.zeros((5, 8, 9), np.uint8), "channels"),
    "2 channels": (np.zeros((8, 9, 2), np.uint8), "channels"),
    "complex": (np.zeros((8, 8), np.complex64), "unsupported dtype"),
    "string": ("chest.png", "unsupported type str"),
    "nested list": ([G], "unsupported type list"),
    "HSV mode": (Image.new("HSV", (8, 8)), "unsupported PIL mode 'HSV'"),
}


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_image_raises_with_index_and_problem(image_processor, name):
    bad, problem = BAD_IMAGES[name]
    with pytest.raises(ValueError, match="image 1") as error:
        image_processor([G, bad])
    assert problem in str(error.value)


def test_empty_batch_raises(image_processor):
    with pytest.raises(ValueError, match="no images"):
        image_processor([])


@pytest.mark.parametrize(
    "name, expected",
    [("chest", 0), ("CHEST", 0), ("Lower leg", 13), ("lower-leg", 13), ("LOWER_LEG", 13), ("Facial Bones", 3),
     ("CSPINE", 5), ("cspine", 5), ("LEG", 13), ("FACE", 3), ("SPINE", 8), ("hand", 22), (7, 7)],
)  # fmt: skip
def test_body_part_names_and_dicom_terms(processor, name, expected):
    assert processor(body_parts=[name])["body_part_labels"].tolist() == [expected]


def test_unknown_body_part_lists_valid_names(processor):
    with pytest.raises(ValueError, match="'forehead' \\(item 1\\)") as error:
        processor(body_parts=["chest", "forehead"])
    assert all(name in str(error.value) for name in DEFAULT_BODY_PARTS)
    with pytest.raises(ValueError, match="unknown body part 23"):
        processor(body_parts=[23])


def test_custom_body_parts(tokenizer):
    processor = PedCLIPProcessor(tokenizer=tokenizer, body_parts=["hand", "knee"])
    assert processor(body_parts=["KNEE", "Hand"])["body_part_labels"].tolist() == [1, 0]
    with pytest.raises(ValueError, match="valid names: hand, knee"):
        processor(body_parts="chest")
    with pytest.raises(ValueError, match="duplicate"):
        PedCLIPProcessor(tokenizer=tokenizer, body_parts=["hand", "Hand"])


def test_body_parts_length_must_match_images(processor):
    with pytest.raises(ValueError, match="2 body_parts for 3 images"):
        processor(images=[G, G, G], body_parts=["chest", "hand"])


def test_full_call(processor, tokenizer):
    out = processor(images=[G, Image.fromarray(G)], text=["normal chest", "fracture"], body_parts=["chest", "WRIST"])
    assert set(out) == {"input_ids", "attention_mask", "token_type_ids", "pixel_values", "body_part_labels"}
    assert out["input_ids"].shape == out["attention_mask"].shape == out["token_type_ids"].shape == (2, MAX_LENGTH)
    assert out["pixel_values"].shape == (2, 3, 224, 224) and out["pixel_values"].dtype == torch.float32
    assert out["body_part_labels"].dtype == torch.long and out["body_part_labels"].tolist() == [0, 21]
    assert (out["input_ids"][:, 0] == tokenizer.cls_token_id).all()
    assert out["attention_mask"][0].sum() == 4 and (out["input_ids"][0, 4:] == tokenizer.pad_token_id).all()
    assert set(processor.model_input_names) == set(out)


def test_text_truncation_and_caller_padding(processor, tokenizer):
    long_report = "The lungs are clear without focal consolidation or effusion. " * 40
    out = processor(text=[long_report, "no acute findings"])
    assert out["input_ids"].shape == (2, MAX_LENGTH) and out["attention_mask"][0].all()
    assert out["input_ids"][0, 0] == tokenizer.cls_token_id and out["input_ids"][0, -1] == tokenizer.sep_token_id
    assert processor(text="no acute findings", padding=True)["input_ids"].shape == (1, 5)
    assert processor(text=long_report, padding="longest")["input_ids"].shape == (1, MAX_LENGTH)
    assert processor(text="no acute findings", text_kwargs={"max_length": 8})["input_ids"].shape == (1, 8)


def test_image_kwargs_through_processor(processor):
    assert processor(images=G, size=64)["pixel_values"].shape == (1, 3, 64, 64)
    out = processor(images=G, images_kwargs={"do_normalize": False}, return_tensors="np")
    assert isinstance(out["pixel_values"], np.ndarray) and out["pixel_values"].min() == 0


def test_decode_passthrough(processor):
    ids = processor(text=["normal chest radiograph", "no fracture"])["input_ids"]
    assert processor.decode(ids[0], skip_special_tokens=True) == "normal chest radiograph"
    assert processor.batch_decode(ids, skip_special_tokens=True) == ["normal chest radiograph", "no fracture"]


def test_save_and_load_round_trip(tmp_path, tokenizer):
    image_processor = PedCLIPImageProcessor(intensity_percentiles=(0.5, 99.5), size=96, image_mean=[0.4, 0.5, 0.6])
    processor = PedCLIPProcessor(image_processor, tokenizer, max_length=40, body_parts=["hand", "knee", "chest"])
    processor.save_pretrained(tmp_path)
    loaded = PedCLIPProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded.image_processor, PedCLIPImageProcessor)
    assert loaded.max_length == 40 and loaded.body_parts == ["hand", "knee", "chest"]
    assert loaded.image_processor.to_dict() == image_processor.to_dict()
    assert loaded.image_processor.intensity_percentiles == (0.5, 99.5)
    inputs = dict(images=[gray_image(seed=9)], text=["left knee effusion"], body_parts=["KNEE"])
    expected, actual = processor(**inputs), loaded(**inputs)
    assert set(actual) == set(expected) and actual["input_ids"].shape == (1, 40)
    assert all(torch.equal(actual[key], expected[key]) for key in expected)


def test_image_processor_round_trip(tmp_path):
    image_processor = PedCLIPImageProcessor(intensity_percentiles=(1, 99), resample=Image.Resampling.BILINEAR)
    image_processor.save_pretrained(tmp_path)
    loaded = PedCLIPImageProcessor.from_pretrained(tmp_path)
    assert (loaded.intensity_percentiles, loaded.resample) == ((1.0, 99.0), 2)
    np.testing.assert_array_equal(loaded(G).pixel_values, image_processor(G).pixel_values)
