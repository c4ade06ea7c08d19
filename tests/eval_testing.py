"""Shared helpers for the `eval/` tests: tiny saved model folders (PedCLIP, transformers CLIP), small labelled
`datasets` splits in the eval column contract, and a pixel-feature adapter whose embeddings carry the label.

Builders are plain functions (use them anywhere); the pytest fixtures at the bottom wrap them with session scope.
Import the fixtures into a test module to use them: `from eval_testing import pedclip_folder, clip_folder`.

Data columns (see /tmp/eval_spec.md "Contracts"): `image` (datasets Image), `labels` (list[str]), `body_part`,
`text`, one bool column per concept, `target` (float), `sex` ("M"/"F"), `mask` (datasets Image, mode "L", 0/1).
"""

from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, List, Value
from pedclip_testing import minilm_path, randomize_experts, tiny_config
from PIL import Image as PILImage
from threadpoolctl import threadpool_limits

from pexr.synthetic import FINDINGS_BY_BODY_PART, RENDERED_BODY_PARTS, generate_pexr_mini



@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on shared CPU cores: one thread each for torch and BLAS while a module that imports this fixture
    runs (several threads contend, up to 50x slower); the previous settings come back after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)

# ------------------------------------------------------------------------------------------------ model folders

TINY_IMAGE_SIZE = 32
PEXR_BODY_PARTS = list(RENDERED_BODY_PARTS)  # chest, hip, knee, foot, elbow, forearm, wrist, hand (expert order)


def build_pedclip_folder(path: str | Path, seed: int = 0, body_parts: Sequence[str] = PEXR_BODY_PARTS) -> Path:
    """Save a tiny random PedCLIP (one expert per body part, experts randomised so routing differs) with its
    processor (`PedCLIPImageProcessor(size=32)` + the real MiniLM tokenizer) to `path`; returns `path`."""
    from transformers import AutoTokenizer

    from modeling_pedclip import PedCLIPModel
    from processing_pedclip import PedCLIPImageProcessor, PedCLIPProcessor

    path = Path(path)
    torch.manual_seed(seed)
    config = tiny_config(
        vision={"num_experts": len(body_parts), "image_size": TINY_IMAGE_SIZE},
        text={"vocab_size": 30522}, body_parts=list(body_parts),
    )  # fmt: skip
    model = PedCLIPModel(config).eval()
    randomize_experts(model, seed)
    processor = PedCLIPProcessor(
        PedCLIPImageProcessor(size=TINY_IMAGE_SIZE), AutoTokenizer.from_pretrained(minilm_path()),
        body_parts=list(body_parts),
    )  # fmt: skip
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def tiny_clip_tokenizer():
    """A `CLIPTokenizer` over a tiny character-level BPE vocabulary (every letter, alone and word-final): any
    lower-case English text tokenizes, fully offline."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in "abcdefghijklmnopqrstuvwxyz0123456789.,-'{}":
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def build_clip_folder(path: str | Path, seed: int = 0) -> Path:
    """Save a tiny random transformers `CLIPModel` (hidden 32, 2 layers, 32 px images) with a `CLIPProcessor`
    (`CLIPImageProcessorPil`, no torchvision, + `tiny_clip_tokenizer()`) to `path`; returns `path`."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    path = Path(path)
    tokenizer = tiny_clip_tokenizer()
    tower = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(
            tower, vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(tower, image_size=TINY_IMAGE_SIZE, patch_size=8),
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": TINY_IMAGE_SIZE}, crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    )
    model.save_pretrained(path)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------------ PeXR-mini

PEXR_LABEL_NAMES = sorted({finding for findings in FINDINGS_BY_BODY_PART.values() for finding in findings})


def _pexr_labels(row: dict) -> dict:
    return {"labels": list(row["findings"]) or ["normal"]}


@functools.lru_cache(maxsize=4)
def pexr_mini_splits(
    num_patients: int = 30, image_size: int = 32, seed: int = 0, split_fractions: tuple = (0.8, 0.1, 0.1)
) -> DatasetDict:
    """Small PeXR-mini in the eval contract: every generated column (image, text, body_part, findings, ...) plus
    `labels` = the findings, or ["normal"] when none. Candidate labels: `PEXR_LABEL_NAMES` (every finding).
    A larger test split: e.g. `split_fractions=(0.4, 0.1, 0.5)`."""
    data = generate_pexr_mini(
        num_patients=num_patients, seed=seed, image_size=image_size, split_fractions=split_fractions
    )
    return DatasetDict({name: split.map(_pexr_labels) for name, split in data.items()})


# ------------------------------------------------------------------------------------------------ encoded sets

QUADRANTS = ("top_left", "top_right", "bottom_left", "bottom_right")  # label names = concept column names
QUADRANT_TEXT = {q: q.replace("_", " ") + " square" for q in QUADRANTS}


def _encoded_features(concepts: Sequence[str]) -> Features:
    text = Value("string")
    return Features({
        "image": Image(), "labels": List(text), "body_part": text, "text": text, "target": Value("float32"),
        "sex": text, "mask": Image(), **{c: Value("bool") for c in concepts}, "label": ClassLabel(names=QUADRANTS),
    })  # fmt: skip


def _encoded_row(rng: np.random.Generator, lit: list[int], size: int, body_parts: Sequence[str]) -> dict:
    half = size // 2
    intensity = float(rng.uniform(120, 255))
    pixels = rng.normal(40, 12, (size, size))
    mask = np.zeros((size, size), np.uint8)
    for q in lit:
        top, left = (q // 2) * half, (q % 2) * half
        pixels[top + 2 : top + half - 2, left + 2 : left + half - 2] = intensity
        mask[top + 2 : top + half - 2, left + 2 : left + half - 2] = 1
    names = [QUADRANTS[q] for q in lit]
    return {
        "image": PILImage.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), "labels": names,
        "body_part": body_parts[int(rng.integers(len(body_parts)))],
        "text": " and ".join(QUADRANT_TEXT[n] for n in names) or "empty", "target": intensity,
        "sex": "MF"[int(rng.integers(2))], "mask": PILImage.fromarray(mask, mode="L"),
        **{q: q in names for q in QUADRANTS}, "label": lit[0] if lit else 0,
    }  # fmt: skip


@functools.lru_cache(maxsize=8)
def encoded_splits(
    num_rows: int = 48, multi_label: bool = False, image_size: int = 32, seed: int = 0,
    body_parts: tuple[str, ...] = ("chest", "hand", "knee"),
) -> DatasetDict:  # fmt: skip
    """train/validation/test splits (`num_rows` each) of noisy dark images where each label is a bright square in
    its quadrant (`QUADRANTS`), so any reasonable image feature carries it. Single-label: exactly one square per
    image, `labels` = [its quadrant], `label` (ClassLabel) its index; multi-label: each square independently with
    p = 0.5 (at least one). Also one bool concept column per quadrant, `text` naming the lit squares, `target` =
    the squares' brightness (120-255), `sex`, `mask` (0/1 square pixels) and `body_part` (random among
    `body_parts`)."""
    rng = np.random.default_rng(seed)
    splits = {}
    for name in ("train", "validation", "test"):
        rows = []
        for index in range(num_rows):
            if multi_label:
                lit = [q for q in range(4) if rng.random() < 0.5] or [int(rng.integers(4))]
            else:
                lit = [index % 4]  # balanced classes
            rows.append(_encoded_row(rng, lit, image_size, body_parts))
        features = _encoded_features(QUADRANTS)
        splits[name] = Dataset.from_dict({c: [r[c] for r in rows] for c in features}, features=features)
    return DatasetDict(splits)


# ------------------------------------------------------------------------------------------------ pixel adapter


class PixelAdapter:
    """A model adapter (duck-typed to `eval.adapters.ModelAdapter`) with no network: an image's embedding is the
    mean brightness of its four quadrants (centred, L2-normalised), a text's is the one-hot of the `QUADRANTS`
    it names (spaces or underscores), negated when the text says "no" or "without"; other texts get a seeded
    random vector. Zero-shot and probes on `encoded_splits` therefore succeed; `noise` > 0 adds seeded noise to
    image embeddings."""

    body_parts = None
    logit_scale = 100.0
    device = torch.device("cpu")
    model = None
    processor = None

    def __init__(self, name: str = "pixel", noise: float = 0.0, dim: int = 8):
        self.name, self.noise, self.dim = name, noise, dim
        self.fingerprint = hashlib.sha256(f"pixel-adapter/{noise}/{dim}".encode()).hexdigest()
        self.calls = {"image": 0, "text": 0}  # how many embed_* calls (to test caching)

    def embed_images(self, images, batch_size: int = 32) -> np.ndarray:
        self.calls["image"] += 1
        out = np.zeros((len(images), self.dim), np.float32)
        for i, image in enumerate(images):
            gray = np.asarray(image.convert("L"), np.float32) / 255.0
            h, w = gray.shape[0] // 2, gray.shape[1] // 2
            means = [gray[:h, :w].mean(), gray[:h, w:].mean(), gray[h:, :w].mean(), gray[h:, w:].mean()]
            out[i, :4] = np.asarray(means) - np.mean(means)
        if self.noise:
            out += np.random.default_rng(0).normal(0, self.noise, out.shape).astype(np.float32)
        return _normalise(out + 1e-6)

    def embed_texts(self, texts, batch_size: int = 64) -> np.ndarray:
        self.calls["text"] += 1
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, text in enumerate(texts):
            lowered = text.lower().replace("_", " ")
            sign = -1.0 if re.search(r"\b(no|without)\b", lowered) else 1.0
            hits = [q for q, name in enumerate(QUADRANTS) if name.replace("_", " ") in lowered]
            if hits:
                out[i, hits] = sign
            else:
                seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
                out[i] = np.random.default_rng(seed).normal(size=self.dim)
        return _normalise(out)

    def gate_logits(self, images) -> None:
        return None


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def pedclip_folder(tmp_path_factory) -> Path:
    """A saved tiny random PedCLIP folder (8 experts = PeXR-mini's body parts, 32 px images, MiniLM tokenizer)."""
    return build_pedclip_folder(tmp_path_factory.mktemp("eval_models") / "tiny-pedclip")


@pytest.fixture(scope="session")
def clip_folder(tmp_path_factory) -> Path:
    """A saved tiny random transformers `CLIPModel` + `CLIPProcessor` folder."""
    return build_clip_folder(tmp_path_factory.mktemp("eval_models") / "tiny-clip")


@pytest.fixture(scope="session")
def pexr_mini_small() -> DatasetDict:
    """PeXR-mini with 30 patients, 32 px, in the eval columns (`labels` = findings or ["normal"])."""
    return pexr_mini_splits()


@pytest.fixture(scope="session")
def encoded_single() -> DatasetDict:
    """Single-label quadrant set (48 rows per split)."""
    return encoded_splits()


@pytest.fixture(scope="session")
def encoded_multi() -> DatasetDict:
    """Multi-label quadrant set (48 rows per split)."""
    return encoded_splits(multi_label=True)


@pytest.fixture
def eval_cache_dir(tmp_path, monkeypatch) -> Path:
    """A fresh embedding cache directory, also set as `PEDCLIP_EVAL_CACHE`."""
    cache = tmp_path / "eval_cache"
    monkeypatch.setenv("PEDCLIP_EVAL_CACHE", str(cache))
    return cache
