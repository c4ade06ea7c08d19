"""The evaluation tasks end to end on small labelled sets (PeXR-mini and quadrant images whose label is visible),
against scikit-learn on the cached embeddings and against `pedclip.evaluation` (the training demo's protocol);
and a suite with a tiny PedCLIP beside a tiny transformers CLIPModel baseline."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from datasets import DatasetDict
from eval_testing import (  # noqa: F401 -- fixtures
    PEXR_LABEL_NAMES, PixelAdapter, QUADRANTS, clip_folder, encoded_multi, encoded_single, encoded_splits,
    one_thread, pedclip_folder, pexr_mini_splits,
)  # fmt: skip
from sklearn.metrics import roc_auc_score

from eval import cli
from pedclip import prompts
from eval.adapters import load_adapter
from eval.metrics import CI_HIGH, CI_LOW
from eval.registry import run_task
from eval.tasks.linear_probe import subsample_rows
from eval.tasks.routing import routing_matrix
from eval.tasks.zero_shot import CHEXZERO_OPTIONS
from pedclip.data import PedCLIPCollator
from pedclip.evaluation import embed_split, finding_eligibility, retrieval_recall, routing_accuracy, zero_shot_auc

N = 40  # bootstrap resamples: enough to test, quick
CS = [0.1, 1.0, 10.0]


@pytest.fixture(scope="module")
def pedclip_adapter(pedclip_folder):
    return load_adapter(str(pedclip_folder))


@pytest.fixture(scope="module")
def clip_adapter(clip_folder):
    return load_adapter(str(clip_folder))


@pytest.fixture(scope="module")
def pexr():
    return pexr_mini_splits(num_patients=40, split_fractions=(0.4, 0.1, 0.5))


def check_cis(metrics: dict) -> None:
    """Every metric has both bounds, and the bounds contain it."""
    values = {k: v for k, v in metrics.items() if not k.endswith((CI_LOW, CI_HIGH))}
    assert values
    for key, value in values.items():
        low, high = metrics[key + CI_LOW], metrics[key + CI_HIGH]
        assert low - 1e-9 <= value <= high + 1e-9, (key, low, value, high)


def shuffled(data: DatasetDict, columns, seed: int = 0) -> DatasetDict:
    """`data` with `columns` permuted within each split (labels no longer match images)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, split in data.items():
        order = rng.permutation(len(split))
        for column in columns:
            values = list(split[column])
            split = split.remove_columns(column).add_column(column, [values[i] for i in order])
        out[name] = split
    return DatasetDict(out)


# ------------------------------------------------------------------------------------------------ zero_shot


def test_zero_shot_reproduces_pedclip_evaluation(pedclip_adapter, pexr, tmp_path):
    """The training demo's number (`pedclip.evaluation.zero_shot_auc`) is eval's zero_shot with CHEXZERO_OPTIONS."""
    got = run_task(
        "zero_shot", pedclip_adapter, pexr, split="test", label_names=PEXR_LABEL_NAMES, cache_dir=tmp_path,
        n_resamples=N, **CHEXZERO_OPTIONS,
    )  # fmt: skip
    test, model, processor = pexr["test"], pedclip_adapter.model, pedclip_adapter.processor
    embedded = embed_split(model, PedCLIPCollator(processor), test, batch_size=64)
    findings = list(test["findings"])
    eligible = finding_eligibility(findings, list(test["body_part"]))
    expected = zero_shot_auc(model, processor, embedded["image_embeds"], findings, eligible)
    per_finding = expected["zero_shot_auc_per_finding"]
    assert len(per_finding) >= 3
    assert {k[4:] for k in got if not k.endswith((CI_LOW, CI_HIGH))} == {*per_finding, "macro"}
    assert got["auc/macro"] == pytest.approx(expected["zero_shot_auc"], abs=1e-6)
    for finding, auc in per_finding.items():
        assert got[f"auc/{finding}"] == pytest.approx(auc, abs=1e-6)
        # and the shared implementation is the original per-finding formula
        mask = np.asarray(eligible[finding])
        with torch.no_grad():
            text = processor(text=[finding, f"no {finding}"], padding=True, return_tensors="pt")
            pair = torch.nn.functional.normalize(model.get_text_features(**text).pooler_output, dim=-1)
        probs = (embedded["image_embeds"][torch.as_tensor(mask)] @ pair.t()).softmax(-1)[:, 0].numpy()
        labels = [finding in row for row, keep in zip(findings, mask) if keep]
        assert auc == pytest.approx(roc_auc_score(labels, probs), abs=1e-9)
    check_cis(got)


def test_zero_shot_auc_is_sklearns_on_the_cached_embeddings(clip_adapter, encoded_single, tmp_path):
    got = run_task("zero_shot", clip_adapter, encoded_single, cache_dir=tmp_path, n_resamples=N)
    (cached,) = tmp_path.glob("*.npy")
    images = np.load(cached)
    names = sorted(QUADRANTS)
    labels = prompts.label_embeddings(clip_adapter, [prompts.label_text(n) for n in names])
    scores = prompts.softmax_scores(images, labels, clip_adapter.logit_scale)  # single-label: softmax over labels
    test = encoded_single["test"]
    aucs = [roc_auc_score([name in row for row in test["labels"]], scores[:, l]) for l, name in enumerate(names)]
    for name, auc in zip(names, aucs):
        assert got[f"auc/{name}"] == pytest.approx(auc, abs=1e-9)
    assert got["auc/macro"] == pytest.approx(np.mean(aucs), abs=1e-9)
    check_cis(got)


@pytest.mark.parametrize(
    "options",
    [
        {}, {"score": "cosine"}, {"body_part_prompts": True},
        {"templates": "{label}, a finding", "negative_templates": ["no {label}", "without {label}"]},
    ],  # fmt: skip
)
def test_zero_shot_options_read_visible_labels(encoded_multi, options):
    got = run_task("zero_shot", PixelAdapter(), encoded_multi, cache_dir=False, n_resamples=N, **options)
    assert got["auc/macro"] > 0.95
    check_cis(got)


def test_zero_shot_eligibility_restricts_rows(encoded_multi):
    test = encoded_multi["test"]
    eligibility = {"top_left": ["chest"], "top_right": ["hand", "knee"]}
    got = run_task(
        "zero_shot", PixelAdapter(noise=0.3), test, cache_dir=False, n_resamples=N, eligibility=eligibility,
        label_names=["top_left", "top_right"], score="cosine",
    )  # fmt: skip
    adapter = PixelAdapter(noise=0.3)
    images = adapter.embed_images(list(test["image"]))
    labels = prompts.label_embeddings(adapter, ["top left", "top right"], prompts.DEFAULT_TEMPLATES)
    scores, parts = images @ labels.T, np.asarray(test["body_part"])
    for column, (name, allowed) in enumerate(eligibility.items()):
        rows = np.isin(parts, allowed)
        y = [name in row for row, keep in zip(test["labels"], rows) if keep]
        assert got[f"auc/{name}"] == pytest.approx(roc_auc_score(y, scores[rows, column]), abs=1e-9)


# ------------------------------------------------------------------------------------------------ probes


def test_linear_probe_finds_the_label_and_not_a_shuffled_one():
    data = encoded_splits(num_rows=120)
    got = run_task("linear_probe", PixelAdapter(noise=0.05), data, cache_dir=False, n_resamples=N, Cs=CS)
    assert got["auc/macro"] > 0.95
    check_cis(got)
    chance = run_task("linear_probe", PixelAdapter(noise=0.05), shuffled(data, ["labels"]), cache_dir=False,
                      n_resamples=N, Cs=CS)  # fmt: skip
    assert abs(chance["auc/macro"] - 0.5) < 0.12
    assert chance["auc/macro_ci_low"] < 0.5 < chance["auc/macro_ci_high"]


def test_linear_probe_label_fraction():
    data, options = encoded_splits(num_rows=120, multi_label=True), dict(cache_dir=False, n_resamples=N, Cs=CS)
    tenth = run_task("linear_probe", PixelAdapter(noise=0.05), data, label_fraction="10%", **options)
    full = run_task("linear_probe", PixelAdapter(noise=0.05), data, fraction=1.0, **options)
    assert full["auc/macro"] > 0.95 and tenth["auc/macro"] > 0.85
    y = np.random.default_rng(0).random((200, 3)) < 0.1
    for fraction in (0.01, 0.1, 1.0):
        rows = subsample_rows(y, fraction, seed=1)
        assert len(rows) >= int(np.ceil(fraction * 200)) and len(set(rows)) == len(rows)
        assert all(y[rows, l].any() and not y[rows, l].all() for l in range(3))
    assert np.array_equal(subsample_rows(y, 0.1, 1), subsample_rows(y, 0.1, 1))


def test_concept_alignment_reads_concepts_and_not_shuffled_ones():
    data = encoded_splits(num_rows=120, multi_label=True)
    got = run_task("concept_alignment", PixelAdapter(noise=0.05), data, cache_dir=False, n_resamples=N, Cs=CS)
    assert {f"auc/{q}" for q in QUADRANTS} < got.keys() and min(got[f"auc/{q}"] for q in QUADRANTS) > 0.95
    check_cis(got)
    chance = run_task("concept_alignment", PixelAdapter(noise=0.05), shuffled(data, QUADRANTS), cache_dir=False,
                      concepts=["top_left", "bottom_right"], n_resamples=N, Cs=CS)  # fmt: skip
    assert "auc/top_right" not in chance and abs(chance["auc/macro"] - 0.5) < 0.15


@pytest.mark.parametrize("task", ["linear_probe", "concept_alignment"])
def test_probes_run_on_real_models(task, pedclip_adapter, clip_adapter, encoded_single, tmp_path):
    for adapter in (pedclip_adapter, clip_adapter):
        got = run_task(task, adapter, encoded_single, cache_dir=tmp_path, n_resamples=N, Cs=[0.1, 10])
        assert 0 <= got["auc/macro"] <= 1
        check_cis(got)


# ------------------------------------------------------------------------------------------------ retrieval, routing


def test_retrieval_recall_from_cached_embeddings(pedclip_adapter, pexr, tmp_path):
    test = pexr["test"]
    got = run_task("retrieval", pedclip_adapter, pexr, cache_dir=tmp_path, n_resamples=N)
    embedded = embed_split(pedclip_adapter.model, PedCLIPCollator(pedclip_adapter.processor), test)
    expected = retrieval_recall(embedded["image_embeds"], embedded["text_embeds"], ks=(1, 5, 10))
    for direction in ("image_to_text", "text_to_image"):
        for k in (1, 5, 10):
            assert got[f"{direction}/R@{k}"] == pytest.approx(expected[f"{direction}_R@{k}"], abs=1e-6)
    assert got["image_to_text/R@1"] <= got["image_to_text/R@5"] <= got["image_to_text/R@10"]
    check_cis(got)
    pixel = run_task("retrieval", PixelAdapter(), encoded_splits(), cache_dir=False, n_resamples=N)
    assert pixel["image_to_text/R@1"] == 1  # texts repeat: an image's own text ties with its copies


def test_routing_matrix_and_gate_accuracy(pedclip_adapter, clip_adapter, pexr, tmp_path):
    test = pexr["test"]
    got = run_task("routing", pedclip_adapter, pexr, cache_dir=tmp_path, n_resamples=N)
    gates = pedclip_adapter.gate_logits(list(test["image"]))
    ids = torch.tensor(pedclip_adapter.processor.body_part_ids(list(test["body_part"])))
    assert got["gate_accuracy"] == pytest.approx(routing_accuracy(torch.tensor(gates), ids), abs=1e-6)
    matrix, parts, experts = routing_matrix(got)
    assert experts == pedclip_adapter.body_parts and set(parts) == set(test["body_part"])
    np.testing.assert_allclose(matrix.sum(1), 1.0, atol=1e-9)
    for part, row in zip(parts, matrix):
        rows = np.asarray(test["body_part"]) == part
        np.testing.assert_allclose(row, np.bincount(gates[rows].argmax(1), minlength=len(experts)) / rows.sum())
        assert got[f"gate_accuracy/{part}"] == pytest.approx(row[experts.index(part)])
    check_cis(got)
    with pytest.raises(ValueError, match="no body-part experts"):
        run_task("routing", clip_adapter, pexr, cache_dir=tmp_path)


# ------------------------------------------------------------------------------------------------ suite


def test_suite_with_a_clip_baseline_row(pedclip_folder, clip_folder, tmp_path):
    config = {
        "models": [str(pedclip_folder), {"spec": str(clip_folder), "name": "CLIP baseline"}],
        "datasets": [{"name": "pexr_mini", "options": {"num_patients": 40, "image_size": 32,
                                                      "split_fractions": [0.4, 0.1, 0.5]}}],
        "tasks": [
            {"task": "zero_shot", "options": CHEXZERO_OPTIONS}, {"task": "retrieval"},
            {"task": "linear_probe", "name": "linear_probe_10pct", "options": {"fraction": 0.1, "Cs": [1.0]}},
            {"task": "routing", "models": ["tiny-pedclip"]},
        ],
        "options": {"n_resamples": 20}, "cache_dir": str(tmp_path / "cache"),
    }  # fmt: skip
    (tmp_path / "suite.json").write_text(json.dumps(config))
    assert cli.main(["suite", str(tmp_path / "suite.json"), "--out", str(tmp_path / "json")]) == 0
    records = json.loads((tmp_path / "json" / "results.json").read_text())
    records = records["results"] if isinstance(records, dict) else records
    rows = {(r["model"], r["task"]) for r in records}
    assert len(records) == 7 and not any("error" in r for r in records)
    assert {("CLIP baseline", "zero_shot"), ("CLIP baseline", "linear_probe_10pct")} <= rows
    assert ("tiny-pedclip", "routing") in rows and ("CLIP baseline", "routing") not in rows
    for record in records:
        assert record["dataset"] == "pexr_mini" and record["split"] == "test" and record["metrics"]
        check_cis(record["metrics"])
    if importlib.util.find_spec("eval.report"):  # the report draws the zero-shot ROC and routing figures
        assert (tmp_path / "json" / "results.md").is_file()
        assert len(list((tmp_path / "json" / "roc").glob("*.png"))) == 2
        assert len(list((tmp_path / "json" / "routing").glob("*.png"))) == 1
    yaml = pytest.importorskip("yaml")
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump({**config, "out": str(tmp_path / "yaml")}))
    again = cli.run_suite(cli.read_config(tmp_path / "suite.yaml"), log=lambda line: None)
    assert [r["metrics"] for r in again] == [r["metrics"] for r in records]
    assert (tmp_path / "yaml" / "results.json").is_file()
