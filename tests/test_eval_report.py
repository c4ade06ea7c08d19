"""Tests of `eval.report`: JSON + Markdown from fake result records, ROC / routing PNGs, and the model card's
model-index (parsed back with huggingface_hub)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results
from PIL import Image

from eval import report


def _metric(name: str, value: float, width: float = 0.03) -> dict:
    return {name: value, name + "_ci_low": value - width, name + "_ci_high": value + width}


def fake_records() -> list[dict]:
    records = []
    for model, shift in (("PedCLIP", 0.05), ("CLIP", 0.0)):
        for dataset in ("pedi_cxr", "chd_cxr"):
            metrics = {**_metric("auc/macro", 0.6 + shift), **_metric("auc/Pneumonia", 0.7 + shift),
                       **_metric("auc/Bronchitis", 0.5 + shift)}  # fmt: skip
            records.append({"model": model, "dataset": dataset, "split": "test", "task": "zero_shot",
                            "metrics": metrics})  # fmt: skip
        records.append({"model": model, "dataset": "rsna_boneage", "split": "test", "task": "regression",
                        "metrics": _metric("mae", 10.6 + 10 * shift, 0.8)})  # fmt: skip
    records.append({"model": "CLIP", "dataset": "grazpedwri_dx", "split": "test", "task": "zero_shot",
                    "metrics": {}, "error": "ValueError: boom"})  # fmt: skip
    return records


def test_headline_and_detail_keys():
    metrics = {**_metric("auc/macro", 0.6), **_metric("auc/a", 0.5), **_metric("gate_accuracy", 0.9),
               **_metric("gate_accuracy/chest", 0.8), **_metric("routing/chest/chest", 0.7),
               **_metric("image_to_text/R@1", 0.2), **_metric("mae", 3.0)}  # fmt: skip
    assert report.headline_keys(metrics) == ["auc/macro", "gate_accuracy", "image_to_text/R@1", "mae"]
    assert report.detail_keys(metrics) == ["auc/a", "gate_accuracy/chest"]
    assert report.format_cell(_metric("auc/macro", 0.912, 0.031), "auc/macro") == "0.912 (0.881-0.943)"
    assert report.format_cell(_metric("mae", 10.64, 0.8), "mae") == "10.6 (9.8-11.4)"
    assert report.format_cell({"m": float("nan")}, "m") == report.format_cell({}, "m") == "–"


def test_write_results_json_and_markdown(tmp_path):
    records = fake_records()
    records[0]["metrics"]["auc/Lung tumor"] = float("nan")
    paths = report.write_results(records, tmp_path / "out", details=True)
    stored = json.loads(paths["json"].read_text())
    assert len(stored) == len(records) and stored[0]["metrics"]["auc/Lung tumor"] is None
    assert stored[0]["metrics"]["auc/macro"] == pytest.approx(0.65)
    text = paths["markdown"].read_text()
    zero_shot = text.split("## zero_shot — auc/macro", 1)[1].split("\n\n")[1].splitlines()
    assert zero_shot[0] == "| model | pedi_cxr | chd_cxr | grazpedwri_dx |"  # data sets as columns
    assert zero_shot[2] == "| PedCLIP | 0.650 (0.620-0.680) | 0.650 (0.620-0.680) | – |"  # models as rows
    assert zero_shot[3] == "| CLIP | 0.600 (0.570-0.630) | 0.600 (0.570-0.630) | failed |"
    assert "## regression — mae" in text and "| PedCLIP | 11.1 (10.3-11.9) |" in text
    assert "auc/Pneumonia" not in text.split("### ")[0]  # per-label AUCs only in the detail tables
    assert "### zero_shot — pedi_cxr (test) details" in text and "ValueError: boom" in text


def test_split_columns_when_a_data_set_has_several(tmp_path):
    records = [{"model": "m", "dataset": "d", "split": s, "task": "t", "metrics": _metric("x", 0.5)}
               for s in ("validation", "test")]  # fmt: skip
    text = report.markdown_tables(records)
    assert "| model | d (validation) | d (test) |" in text


def _valid_png(path) -> tuple[int, int]:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_plots_are_valid_pngs(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.random((50, 3)) < 0.4
    labels[:, 2] = False  # one label with a single class: skipped
    scores = labels + rng.normal(0, 0.7, labels.shape)
    roc = report.plot_roc(["a", "b", "c"], labels, scores, tmp_path / "roc.png", title="t")
    assert min(_valid_png(roc)) > 100
    matrix = rng.dirichlet(np.ones(4), size=3)
    routing = report.plot_routing(matrix, ["chest", "hand", "knee"], ["e0", "e1", "e2", "e3"], tmp_path / "r.png")
    assert min(_valid_png(routing)) > 100
    with pytest.raises(ValueError, match="matrix shape"):
        report.plot_routing(matrix, ["chest"], ["e0"], tmp_path / "bad.png")


def test_write_results_draws_roc_and_routing(tmp_path):
    rng = np.random.default_rng(1)
    labels = rng.random((30, 2)) < 0.5
    scored = {"model": "PedCLIP", "dataset": "pexr_mini", "split": "test", "task": "zero_shot",
              "metrics": _metric("auc/macro", 0.7),
              "scores": {"names": ["x", "y"], "labels": labels, "scores": labels + rng.normal(0, 1, labels.shape)}}
    cells = {f"routing/{p}/{e}": float(p == e) for p in ("chest", "hand") for e in ("chest", "hand", "knee")}
    routing = {"model": "PedCLIP", "dataset": "pexr_mini", "split": "test", "task": "routing",
               "metrics": {**_metric("gate_accuracy", 0.9), **cells}}  # fmt: skip
    paths = report.write_results([scored, routing], tmp_path)
    figures = sorted(p.relative_to(tmp_path).as_posix() for k, p in paths.items() if k.startswith("figure"))
    assert figures == ["roc/PedCLIP__pexr_mini__test__zero_shot.png", "routing/PedCLIP__pexr_mini__test__routing.png"]
    for path in figures:
        _valid_png(tmp_path / path)
    assert "scores" not in json.loads(paths["json"].read_text())[0]
    assert "routing/chest" not in paths["markdown"].read_text().split("## Figures")[0]  # matrix cells not tabled


def _index(card: ModelCard) -> dict:
    name, results = model_index_to_eval_results(card.data.to_dict()["model-index"])
    return name, {(r.task_name, r.dataset_type, r.dataset_split, r.metric_name): r for r in results}


def test_update_model_card_creates_valid_card(tmp_path):
    path = tmp_path / "model_card.md"
    with pytest.raises(ValueError, match="several models"):
        report.update_model_card(path, fake_records())
    report.update_model_card(path, fake_records(), model_name="PedCLIP")
    card = ModelCard(path.read_text())
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "zero-shot-image-classification"
    assert card.data.license and "pedclip" in card.data.tags
    name, results = _index(card)
    assert name == "PedCLIP" and len(results) == 3  # headline metrics of PedCLIP's 3 successful runs
    auc = results["zero_shot", "pedi_cxr", "test", "auc/macro"]
    assert auc.metric_value == pytest.approx(0.65) and auc.metric_type == "roc_auc"
    assert auc.metric_args == {"ci_low": pytest.approx(0.62), "ci_high": pytest.approx(0.68)}
    assert auc.task_type == "zero-shot-image-classification" and auc.dataset_name == "Pedi-CXR (VinDr-PCXR)"
    assert results["regression", "rsna_boneage", "test", "mae"].metric_value == pytest.approx(11.1)
    assert "| PedCLIP | 0.650 (0.620-0.680) | 0.650 (0.620-0.680) |" in card.text and "| CLIP |" not in card.text


def test_update_model_card_keeps_metadata_body_and_other_results(tmp_path):
    path = tmp_path / "model_card.md"
    body = "# PedCLIP\n\nHand-written description.\n\n## Uses\n\nResearch only.\n"
    path.write_text("---\nlicense: mit\ntags:\n- custom\nbase_model: google/vit-base-patch16-224\n---\n" + body)
    report.update_model_card(path, fake_records(), model_name="PedCLIP")
    first = ModelCard(path.read_text())
    assert first.text == body and first.data.license == "mit" and first.data.base_model == "google/vit-base-patch16-224"
    update = [{"model": "PedCLIP", "dataset": "pedi_cxr", "split": "test", "task": "zero_shot",
               "metrics": _metric("auc/macro", 0.7)}]  # fmt: skip
    report.update_model_card(path, update)  # model name from the card
    card = ModelCard(path.read_text())
    name, results = _index(card)
    assert card.text == body and len(results) == 3
    assert results["zero_shot", "pedi_cxr", "test", "auc/macro"].metric_value == pytest.approx(0.7)  # replaced
    assert results["zero_shot", "chd_cxr", "test", "auc/macro"].metric_value == pytest.approx(0.65)  # kept
