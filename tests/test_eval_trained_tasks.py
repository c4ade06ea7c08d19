"""The trained evaluation tasks (`finetune`, `regression`, `segmentation`), their heads and training loop, on tiny
models (hidden 32, 32 px images) and small generated sets whose labels are plainly visible."""

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict, Features, Image, Value
from eval_testing import (  # noqa: F401 (fixtures)
    QUADRANTS, clip_folder, encoded_splits, eval_cache_dir, one_thread, pedclip_folder,
)
from PIL import Image as PILImage

from eval.adapters import load_adapter
from eval.heads import ClassificationHead, SegmentationDecoder
from eval.metrics import dice
from eval.registry import run_task
from eval.tasks.finetune import apply_lora, build_classifier, lora_targets_of
from eval.tasks.regression import sex_one_hot
from eval.tasks.segmentation import class_count, segmentation_loss
from eval.training import BatchSource, fit, private_adapter, subsample

FAST = {"n_resamples": 30}


@pytest.fixture(scope="module")
def pedclip(pedclip_folder):  # noqa: F811
    return load_adapter(str(pedclip_folder), device="cpu")


@pytest.fixture(scope="module")
def clip(clip_folder):  # noqa: F811
    return load_adapter(str(clip_folder), device="cpu")


def assert_cis_contain_points(metrics: dict) -> None:
    points = [k for k in metrics if not k.endswith(("_ci_low", "_ci_high"))]
    assert points
    for key in points:
        low, value, high = metrics[key + "_ci_low"], metrics[key], metrics[key + "_ci_high"]
        assert low - 1e-9 <= value <= high + 1e-9, (key, low, value, high)


def state_of(module: torch.nn.Module) -> dict:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def assert_same_state(module: torch.nn.Module, state: dict) -> None:
    current = module.state_dict()
    assert current.keys() == state.keys()
    assert all(torch.equal(current[name], state[name]) for name in state)


# ------------------------------------------------------------------------------------------------ data


def bone_age_splits(num_rows: int = 48, size: int = 32, seed: int = 0, sex_shift: float = 0.0) -> DatasetDict:
    """Noisy dark images with a bright bar rising from the bottom: target (months) = 6 x bar height (+ `sex_shift`
    for boys, invisible in the image). Per-image intensity windowing cannot hide a bar's height."""
    rng = np.random.default_rng(seed)
    features = Features({"image": Image(), "target": Value("float32"), "sex": Value("string")})
    splits = {}
    for name in ("train", "validation", "test"):
        rows = {"image": [], "target": [], "sex": []}
        for _ in range(num_rows):
            height, sex = int(rng.integers(2, size - 1)), "MF"[int(rng.integers(2))]
            pixels = rng.normal(40, 10, (size, size))
            pixels[size - height :, 8:24] = 220
            rows["image"].append(PILImage.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
            rows["target"].append(6.0 * height + (sex_shift if sex == "M" else 0.0))
            rows["sex"].append(sex)
        splits[name] = Dataset.from_dict(rows, features=features)
    return DatasetDict(splits)


def mean_baseline_mae(data: DatasetDict) -> float:
    train, test = np.array(list(data["train"]["target"])), np.array(list(data["test"]["target"]))
    return float(np.abs(test - train.mean()).mean())


# ------------------------------------------------------------------------------------------------ heads, loop


def test_dice_is_one_for_a_perfect_mask_and_zero_for_a_disjoint_one():
    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 2:5] = 1
    disjoint = np.zeros_like(mask)
    disjoint[6:, 6:] = 1
    assert dice(mask, mask) == pytest.approx(1.0)
    assert dice(disjoint, mask) == 0.0
    assert dice(np.zeros_like(mask), np.zeros_like(mask)) == 1.0


@pytest.mark.parametrize(
    "grid, size, classes", [((4, 4), (32, 32), 1), ((14, 14), (224, 224), 3), ((16, 16), (224, 224), 2)]
)
def test_segmentation_decoder_reaches_the_input_size(grid, size, classes):
    decoder = SegmentationDecoder(32, grid, size, classes, channels=16)
    assert decoder(torch.randn(2, grid[0] * grid[1], 32)).shape == (2, classes, *size)
    with pytest.raises(ValueError, match="patch tokens"):
        decoder(torch.randn(2, grid[0] * grid[1] + 1, 32))


def test_segmentation_loss_is_lowest_for_the_right_mask():
    masks = torch.zeros(2, 8, 8, dtype=torch.long)
    masks[:, 2:6, 2:6] = 1
    right, wrong = (masks[:, None].float() * 2 - 1) * 10, (0.5 - masks[:, None].float()) * 20
    assert segmentation_loss(right, masks) < 0.01 < segmentation_loss(wrong, masks)
    multiclass = torch.nn.functional.one_hot(masks * 2, 3).permute(0, 3, 1, 2).float() * 20
    assert segmentation_loss(multiclass, masks * 2) < 0.01
    assert class_count(np.array([0, 255]), None) == (2, True)
    assert class_count(np.array([0, 1, 3]), None) == (4, False)


def test_classification_head_starts_at_zero_and_takes_extra_features():
    head = ClassificationHead(8, 3, extra_features=2)
    assert torch.equal(head(torch.randn(4, 8), torch.ones(4, 2)), torch.zeros(4, 3))
    head.train()
    assert head(torch.randn(1, 8), torch.ones(1, 2)).shape == (1, 3)  # one row: running statistics


def test_fit_keeps_the_best_validation_epoch():
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    x, y = torch.randn(16, 2), torch.randn(16, 1)
    scores, weights = iter([0.5, 0.9, 0.7]), []

    def validate():
        weights.append(model.weight.detach().clone())
        return next(scores)

    best = fit(
        model, [{"params": list(model.parameters()), "lr": 0.1}],
        lambda i: torch.nn.functional.mse_loss(model(x[i]), y[i]), validate, num_rows=16, epochs=3, batch_size=4,
        seed=0,
    )  # fmt: skip
    assert best == 0.9
    assert torch.equal(model.weight, weights[1]) and not torch.equal(weights[1], weights[2])


def test_batch_source_caches_within_budget_and_subsample_is_seeded():
    make = lambda i: torch.as_tensor(np.asarray(i), dtype=torch.float32)[:, None] * 2  # noqa: E731
    cached, streamed = BatchSource(10, make, budget_mb=1), BatchSource(10, make, budget_mb=0)
    assert cached.cached is not None and streamed.cached is None
    assert torch.equal(cached(np.array([3, 1])), streamed(np.array([3, 1])))
    assert np.array_equal(subsample(10), np.arange(10))
    labels = np.zeros((100, 1), bool)
    labels[7] = True
    rows = subsample(100, "10%", seed=3, labels=labels)
    assert len(rows) in (10, 11) and 7 in rows and np.array_equal(rows, subsample(100, 0.1, seed=3, labels=labels))


def test_sex_one_hot():
    assert sex_one_hot(["M", "f", "female", None, "X"]).tolist() == [[1, 0], [0, 1], [0, 1], [0, 0], [0, 0]]


# ------------------------------------------------------------------------------------------------ finetune


def test_lora_trains_only_adapters_and_head_and_leaves_the_adapter_alone(pedclip, clip):
    assert lora_targets_of(pedclip.vision_tower()) == ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    base = state_of(pedclip.model)
    model, groups = build_classifier(pedclip, 4, 32, "lora", lora_r=2)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name or name.startswith("head.") for name in trainable)
    assert any("mlp.lora_A" in name for name in trainable)  # the stacked MoBE experts (target_parameters)
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    pixels, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 4
    fit(
        model, groups, lambda i: torch.nn.functional.cross_entropy(model(pixels[i]), y[i]), lambda: 0.0,
        num_rows=8, epochs=2, batch_size=4, seed=0,
    )  # fmt: skip
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert_same_state(pedclip.model, base)  # trained on a private copy of the tower; the rest is shared
    words = model.adapter.model.text_model.embeddings.word_embeddings.weight
    assert words is pedclip.model.text_model.embeddings.word_embeddings.weight
    assert model.tower.embeddings.cls_token is not pedclip.model.vision_model.embeddings.cls_token
    clip_tower = apply_lora(private_adapter(clip).vision_tower(), r=2)
    assert not any("lora_" in n for n, _ in clip.model.named_parameters())
    assert {n for n, p in clip_tower.named_parameters() if p.requires_grad} == {
        n for n, _ in clip_tower.named_parameters() if "lora_" in n
    }  # fmt: skip
    with pytest.raises(ValueError, match="MoBE"):
        apply_lora(private_adapter(clip).vision_tower(), experts=True)


@pytest.mark.parametrize("mode, lr", [("full", 3e-3), ("lora", 1e-2)])
def test_finetune_learns_an_easy_visual_label(pedclip, mode, lr):
    base = state_of(pedclip.model)
    metrics = run_task(
        "finetune", pedclip, encoded_splits(), mode=mode, epochs=20, batch_size=8, lr=lr, seed=1, **FAST
    )  # fmt: skip
    assert metrics["auc/macro"] > 0.9, metrics
    assert {f"auc/{q}" for q in QUADRANTS} | {"auc/macro", "accuracy"} <= set(metrics)
    assert_cis_contain_points(metrics)
    assert_same_state(pedclip.model, base)


def test_finetune_is_deterministic_and_runs_multi_label_with_a_label_fraction(pedclip):
    data = encoded_splits(multi_label=True)
    options = dict(mode="lora", epochs=2, batch_size=16, lr=1e-2, label_fraction=0.5, seed=4, **FAST)
    first, second = (run_task("finetune", pedclip, data, **options) for _ in range(2))
    assert first == second
    assert "accuracy" not in first and np.isfinite(first["auc/macro"])
    head = run_task("finetune", pedclip, data, mode="head", epochs=3, multi_label=True, **FAST)
    assert_cis_contain_points(head)


def test_finetune_runs_on_a_transformers_clip(clip):
    data = DatasetDict({"train": encoded_splits()["train"], "test": encoded_splits()["test"]})  # validation carved
    metrics = run_task("finetune", clip, data, mode="lora", epochs=3, batch_size=16, lr=1e-2, **FAST)
    assert 0.0 <= metrics["auc/macro"] <= 1.0
    assert_cis_contain_points(metrics)


# ------------------------------------------------------------------------------------------------ regression


def test_regression_ridge_reads_a_visible_target_and_uses_sex(pedclip, eval_cache_dir):
    plain = bone_age_splits()
    ridge = run_task("regression", pedclip, plain, **FAST)
    assert ridge["mae"] < 0.2 * mean_baseline_mae(plain), ridge
    assert_cis_contain_points(ridge)
    shifted = bone_age_splits(sex_shift=60.0)
    without = run_task("regression", pedclip, shifted, **FAST)["mae"]
    with_sex = run_task("regression", pedclip, shifted, use_sex=True, **FAST)["mae"]
    assert with_sex < 0.3 * without, (with_sex, without)


def test_regression_finetuned_beats_the_mean(pedclip, clip):
    data = bone_age_splits(sex_shift=30.0)
    options = dict(mode="finetune", use_sex=True, epochs=8, batch_size=8, lr=3e-3, head_lr=1e-2, **FAST)
    metrics = run_task("regression", pedclip, data, **options)
    assert metrics["mae"] < 0.5 * mean_baseline_mae(data), metrics
    assert_cis_contain_points(metrics)
    lora = run_task("regression", clip, data, mode="lora", loss="l2", epochs=1, **FAST)
    assert np.isfinite(lora["mae"])


# ------------------------------------------------------------------------------------------------ segmentation


def test_segmentation_learns_an_easy_mask(pedclip):
    metrics = run_task("segmentation", pedclip, encoded_splits(), epochs=15, batch_size=8, lr=3e-3, **FAST)
    assert metrics["dice/foreground"] == metrics["dice/mean"] > 0.8, metrics  # all-foreground scores ~0.25
    assert_cis_contain_points(metrics)


def test_segmentation_multiclass_reports_each_class(clip):
    def class_mask(row):
        mask = (np.asarray(row["mask"]) * (row["label"] + 1)).astype(np.uint8)
        return {"mask": PILImage.fromarray(mask, mode="L")}

    data = DatasetDict({name: split.map(class_mask) for name, split in encoded_splits(num_rows=24).items()})
    metrics = run_task("segmentation", clip, data, class_names=["background", *QUADRANTS], epochs=4, **FAST)
    assert {f"dice/{q}" for q in QUADRANTS} | {"dice/mean"} <= set(metrics)
    assert all(0.0 <= metrics[f"dice/{q}"] <= 1.0 for q in QUADRANTS)
    assert_cis_contain_points(metrics)
