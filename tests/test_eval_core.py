"""eval/ infrastructure: metrics and bootstrap CIs, the embedding cache, model adapters (PedCLIP and transformers
dual encoders), prompts, the task registry and the command line."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from eval_testing import (  # noqa: F401 -- fixtures
    PEXR_LABEL_NAMES, PixelAdapter, QUADRANTS, clip_folder, encoded_single, one_thread, pedclip_folder,
    tiny_clip_tokenizer,
)  # fmt: skip
from PIL import Image
from sklearn.metrics import roc_auc_score

from eval import adapters, cache, cli, metrics, registry
from pedclip import prompts
from eval.tasks.common import label_matrix, resolve_label_names, train_validation_test

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ------------------------------------------------------------------------------------------------ metrics


def test_roc_auc_is_sklearns_and_nan_for_one_class():
    rng = np.random.default_rng(0)
    y, s = rng.random(50) < 0.3, rng.normal(size=50)
    assert metrics.roc_auc(y, s) == roc_auc_score(y, s)
    assert np.isnan(metrics.roc_auc(np.ones(5), np.arange(5)))
    assert np.isnan(metrics.roc_auc(y, np.where(np.arange(50) == 3, np.nan, s)))  # an untrainable probe's label
    mask = np.ones((50, 2), bool)
    mask[:25, 1] = False
    y2, s2 = np.stack([y, ~y], 1), np.stack([s, -s], 1)
    aucs = metrics.label_aucs(y2, s2, mask)
    assert aucs[0] == roc_auc_score(y, s) and aucs[1] == roc_auc_score(~y[25:], -s[25:])
    assert metrics.macro_auc(y2, s2, mask) == pytest.approx(aucs.mean())


def test_dice_and_mae():
    a = np.zeros((4, 4))
    a[:2] = 1
    b = np.zeros((4, 4))
    b[1:3] = 1
    assert metrics.dice(a, a) == pytest.approx(1.0) and metrics.dice(a, b) == pytest.approx(0.5)
    assert metrics.dice(np.zeros(3), np.zeros(3)) == 1.0
    assert metrics.mae([1, 2, 3], [2, 2, 5]) == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(2))
def test_bootstrap_ci_is_seeded_and_contains_the_estimate(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(80) < 0.4
    s = y + rng.normal(0, 1.0, 80)
    ci = metrics.bootstrap_ci(metrics.roc_auc, y, s, n_resamples=120, seed=seed)
    assert ci == metrics.bootstrap_ci(metrics.roc_auc, y, s, n_resamples=120, seed=seed)
    assert ci != metrics.bootstrap_ci(metrics.roc_auc, y, s, n_resamples=120, seed=seed + 10)
    assert ci[0] <= metrics.roc_auc(y, s) <= ci[1]
    out = metrics.with_ci("auc", metrics.roc_auc, y, s, n_resamples=120, seed=seed)
    assert out == {"auc": metrics.roc_auc(y, s), "auc_ci_low": ci[0], "auc_ci_high": ci[1]}


def test_bootstrap_skips_one_class_resamples_and_resamples_rows():
    y = np.zeros(20, bool)
    y[0] = True  # one positive: about 36% of resamples lack it
    seen = []

    def metric(y_, s_):
        seen.append(len(y_))
        assert np.array_equal(y_, s_ > 0.5)  # rows (pairs) stay together
        return metrics.roc_auc(y_, s_)

    low, high = metrics.bootstrap_ci(metric, y, y.astype(float), n_resamples=200)
    assert low == high == 1.0 and len(seen) == 200 and set(seen) == {20}
    low, high = metrics.bootstrap_ci(lambda y_: metrics.roc_auc(y_, y_), np.zeros(5, bool), n_resamples=10)
    assert np.isnan(low) and np.isnan(high)
    vector = metrics.bootstrap_ci(lambda x: x.mean(0), np.eye(4)[np.arange(40) % 4], n_resamples=100)
    assert vector[0].shape == (4,) and (vector[0] <= 0.25).all() and (vector[1] >= 0.25).all()


# ------------------------------------------------------------------------------------------------ cache


def test_cache_computes_once_and_keys_on_model_and_data(tmp_path, encoded_single):
    adapter, test = PixelAdapter(), encoded_single["test"]
    first = cache.cached_embeddings(adapter, test, "image", "image", cache_dir=tmp_path)
    again = cache.cached_embeddings(adapter, test, "image", "image", cache_dir=tmp_path)
    assert adapter.calls["image"] == 1 and np.array_equal(first, again)
    assert np.allclose(first, adapter.embed_images(list(test["image"])))
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".npy"]  # no temporary file left over
    cache.cached_embeddings(adapter, test.select(range(10)), "image", "image", cache_dir=tmp_path)
    cache.cached_embeddings(PixelAdapter(noise=0.1), test, "image", "image", cache_dir=tmp_path)
    texts = cache.cached_embeddings(adapter, test, "text", "text", cache_dir=tmp_path)
    assert texts.shape == (len(test), adapter.dim) and len(list(tmp_path.iterdir())) == 4
    with pytest.raises(ValueError, match="kind"):
        cache.cached_embeddings(adapter, test, "audio", "image", cache_dir=tmp_path)


def test_cache_default_dir_comes_from_the_environment(tmp_path, monkeypatch, encoded_single):
    monkeypatch.setenv("PEDCLIP_EVAL_CACHE", str(tmp_path / "env"))
    cache.cached_embeddings(PixelAdapter(), encoded_single["test"], "image", "image")
    assert len(list((tmp_path / "env").glob("*.npy"))) == 1
    adapter = PixelAdapter()
    cache.cached_embeddings(adapter, encoded_single["test"], "image", "image", cache_dir=False)
    assert adapter.calls["image"] == 1 and len(list((tmp_path / "env").glob("*.npy"))) == 1


# ------------------------------------------------------------------------------------------------ adapters


@pytest.fixture(scope="module")
def pedclip_adapter(pedclip_folder):
    return adapters.load_adapter(str(pedclip_folder))


@pytest.fixture(scope="module")
def clip_adapter(clip_folder):
    return adapters.load_adapter(str(clip_folder))


def _images(n=5, size=40):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size, size + 4), dtype=np.uint8)) for _ in range(n)]


def test_pedclip_adapter_matches_the_model(pedclip_adapter):
    a, images = pedclip_adapter, _images()
    assert isinstance(a, adapters.PedCLIPAdapter) and a.name == "tiny-pedclip" and len(a.fingerprint) == 64
    embeds = a.embed_images(images, batch_size=2)
    with torch.no_grad():
        pixels = a.processor(images=images, return_tensors="pt")["pixel_values"]
        expected = torch.nn.functional.normalize(a.model.get_image_features(pixels).pooler_output, dim=-1)
        text = a.processor(text=["fracture", "no fracture"], padding=True, return_tensors="pt")
        expected_text = torch.nn.functional.normalize(a.model.get_text_features(**text).pooler_output, dim=-1)
    np.testing.assert_allclose(embeds, expected.numpy(), atol=1e-5)
    np.testing.assert_allclose(a.embed_texts(["fracture", "no fracture"]), expected_text.numpy(), atol=1e-5)
    assert embeds.dtype == np.float32 and np.allclose(np.linalg.norm(embeds, axis=1), 1, atol=1e-5)
    gates = a.gate_logits(images)
    assert gates.shape == (5, len(a.body_parts)) and a.body_parts == a.model.config.body_parts
    assert a.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)
    pooled, patches = a.vision_features(a.pixel_values(images))
    assert a.patch_grid == (4, 4) and pooled.shape == (5, 32) and patches.shape == (5, 16, 32)
    assert pooled.requires_grad  # for fine-tuning


def test_clip_adapter_matches_the_model_and_ignores_gray(clip_adapter):
    a, images = clip_adapter, _images()
    assert isinstance(a, adapters.DualEncoderAdapter) and a.gate_logits(images) is None and a.body_parts is None
    embeds = a.embed_images(images, batch_size=3)
    np.testing.assert_allclose(embeds, a.embed_images([im.convert("RGB") for im in images]), atol=1e-6)
    with torch.no_grad():
        pixels = a.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        expected = torch.nn.functional.normalize(a.model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    np.testing.assert_allclose(embeds, expected.numpy(), atol=1e-5)
    texts = a.embed_texts(["fracture", "no fracture", "a much longer text about a fracture"], batch_size=2)
    assert texts.shape == (3, 16) and np.allclose(np.linalg.norm(texts, axis=1), 1, atol=1e-5)
    pooled, patches = a.vision_features(a.pixel_values(images))
    assert pooled.shape == (5, 32) and patches.shape == (5, 16, 32) and a.patch_grid == (4, 4)


def test_siglip_and_dual_encoder_adapters(tmp_path):
    from transformers import (
        BertConfig, SiglipConfig, SiglipModel, VisionTextDualEncoderConfig, VisionTextDualEncoderModel,
        VisionTextDualEncoderProcessor, ViTConfig,
    )  # fmt: skip
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    tokenizer = tiny_clip_tokenizer()
    tower = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    siglip = SiglipModel(SiglipConfig(
        text_config=dict(tower, vocab_size=len(tokenizer), max_position_embeddings=16, pad_token_id=1,
                         bos_token_id=0, eos_token_id=1),
        vision_config=dict(tower, image_size=32, patch_size=8),
    ))  # fmt: skip
    processor = VisionTextDualEncoderProcessor(image_processor=image_processor, tokenizer=tokenizer)
    a = adapters.DualEncoderAdapter(siglip, processor, "siglip", "0" * 64, device="cpu")
    assert a.text_padding == "max_length" and a.embed_texts(["fracture", "no"]).shape == (2, 32)
    pooled, patches = a.vision_features(a.pixel_values(_images(2)))
    assert pooled.shape == (2, 32) and patches.shape == (2, 16, 32)  # no class token: every token is a patch
    dual = VisionTextDualEncoderModel(VisionTextDualEncoderConfig.from_vision_text_configs(
        ViTConfig(**tower, image_size=32, patch_size=8), BertConfig(**tower, vocab_size=len(tokenizer)),
        projection_dim=8,
    ))  # fmt: skip
    dual.save_pretrained(tmp_path / "vtde")
    processor.save_pretrained(tmp_path / "vtde")
    a = adapters.load_adapter(str(tmp_path / "vtde"), name="VTDE")
    assert isinstance(a, adapters.DualEncoderAdapter) and a.name == "VTDE"
    assert a.embed_images(_images(3)).shape == (3, 8) and a.embed_texts(["a b"]).shape == (1, 8)
    pooled, patches = a.vision_features(a.pixel_values(_images(2)))
    assert pooled.shape == (2, 32) and patches.shape == (2, 16, 32)


def test_fingerprint_follows_weights_and_options(pedclip_folder):
    base = adapters.folder_fingerprint(pedclip_folder)
    assert base == adapters.folder_fingerprint(pedclip_folder)
    assert base != adapters.folder_fingerprint(pedclip_folder, {"router_mode": "topk"})
    weights = pedclip_folder / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        assert adapters.folder_fingerprint(pedclip_folder) != base
    finally:
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))


# ------------------------------------------------------------------------------------------------ prompts


def test_label_embeddings_are_normalised_template_means():
    adapter = PixelAdapter()
    templates = ["{label}", "a {label} x-ray", "no {label}"]
    got = prompts.label_embeddings(adapter, ["top_left", "bottom right"], templates)
    for row, label in zip(got, ["top_left", "bottom right"]):
        embeds = adapter.embed_texts([t.format(label=label) for t in templates])
        mean = embeds.mean(0)
        np.testing.assert_allclose(row, mean / np.linalg.norm(mean), atol=1e-6)
    assert prompts.format_prompts("fracture", prompts.BODY_PART_TEMPLATES, "lower_leg")[0] == (
        "fracture of the lower leg"
    )
    with pytest.raises(ValueError, match="body part"):
        prompts.label_embeddings(adapter, ["x"], prompts.BODY_PART_TEMPLATES)
    assert prompts.label_text("top_left") == "top left" and prompts.label_text("a", {"a": "b"}) == "b"


def test_positive_negative_and_softmax_scores():
    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    images, pos, neg = unit(rng.normal(size=(6, 8))), unit(rng.normal(size=(3, 8))), unit(rng.normal(size=(3, 8)))
    scores = prompts.positive_negative_scores(images, pos, neg)
    for l in range(3):
        pair = torch.tensor(images @ np.stack([pos[l], neg[l]]).T).softmax(-1)[:, 0].numpy()
        np.testing.assert_allclose(scores[:, l], pair, atol=1e-6)
    soft = prompts.softmax_scores(images, pos, 10.0)
    np.testing.assert_allclose(soft, torch.tensor(10 * images @ pos.T).softmax(-1).numpy(), atol=1e-6)


# ------------------------------------------------------------------------------------------------ registry, tasks


def test_registry_holds_the_tasks_and_refuses_duplicates():
    tasks = registry.load_tasks()
    assert {"zero_shot", "linear_probe", "concept_alignment", "retrieval", "routing"} <= set(tasks)

    def fake(adapter, data, **options):
        return {"x": 1.0}

    try:
        registry.register_task("fake_task")(fake)
        assert registry.run_task("fake_task", None, None) == {"x": 1.0}
        with pytest.raises(ValueError, match="already registered"):
            registry.register_task("fake_task")(lambda *a, **k: {})
    finally:
        registry.TASKS.pop("fake_task", None)
    with pytest.raises(KeyError, match="zero_shot"):
        registry.run_task("nope", None, None)


def test_label_helpers(encoded_single):
    test = encoded_single["test"]
    names = resolve_label_names(test)
    assert names == sorted(QUADRANTS)
    assert resolve_label_names(test, column="label") == list(QUADRANTS)  # ClassLabel names
    y = label_matrix(test, QUADRANTS, "label")
    assert np.array_equal(y, label_matrix(test, QUADRANTS)) and y.sum(1).tolist() == [1] * len(test)
    train, validation, held_out = train_validation_test(test)
    assert (len(train), len(validation), len(held_out)) == (28, 10, 10)
    assert "fracture" in PEXR_LABEL_NAMES and "normal" not in PEXR_LABEL_NAMES


# ------------------------------------------------------------------------------------------------ command line


def test_parse_options_reads_json_values():
    options = cli.parse_options(['templates=["{label}"]', "fraction=0.1", "eligibility=body_part", "x=a=b"])
    assert options == {"templates": ["{label}"], "fraction": 0.1, "eligibility": "body_part", "x": "a=b"}
    with pytest.raises(SystemExit):
        cli.parse_options(["novalue"])


def test_command_line_runs_a_task_on_a_saved_dataset(pedclip_folder, encoded_single, tmp_path):
    encoded_single.save_to_disk(str(tmp_path / "data"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PEDCLIP_EVAL_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "eval", "retrieval", "--model", str(pedclip_folder), "--data", str(tmp_path / "data"),
        "--option", "ks=[1,2]", "--option", "n_resamples=50", "--out", str(tmp_path / "out"),
        "--update_model_card", str(tmp_path / "card.md"),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(result.stdout[result.stdout.index("{") :])
    assert record["model"] == "tiny-pedclip" and record["task"] == "retrieval" and record["split"] == "test"
    assert {"image_to_text/R@1", "text_to_image/R@2_ci_high", "mean_recall"} <= record["metrics"].keys()
    assert (tmp_path / "out" / "results.json").is_file() and list((tmp_path / "cache").glob("*.npy"))
    from huggingface_hub import ModelCard

    results = ModelCard.load(tmp_path / "card.md").data.eval_results  # the card's model-index holds the run
    written = {r.metric_value for r in results if r.dataset_type == "data" and r.task_type}
    assert {record["metrics"]["image_to_text/R@1"], record["metrics"]["mean_recall"]} <= written


def test_to_rgb_keeps_16_bit_contrast():
    """CLIP-like processors need 8-bit RGB; PIL's own conversion would clip a 16-bit X-ray to white."""
    from PIL import Image

    from eval.adapters import to_rgb

    ramp = np.linspace(0, 4095, 64 * 64).reshape(64, 64).astype(np.uint16)  # 12-bit data in a 16-bit PNG
    rgb = np.asarray(to_rgb(Image.fromarray(ramp)))
    assert rgb.shape == (64, 64, 3) and rgb.min() == 0 and rgb.max() == 255
    assert np.corrcoef(rgb[..., 0].ravel(), ramp.ravel())[0, 1] > 0.999
    gray = Image.fromarray((ramp // 16).astype(np.uint8))
    assert np.array_equal(np.asarray(to_rgb(gray)), np.asarray(gray.convert("RGB")))
