"""scripts/finding_ceiling.py: the supervised upper bound of the demo's vision tower on PeXR-mini findings."""

import importlib.util
import json
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "finding_ceiling.py"
spec = importlib.util.spec_from_file_location("finding_ceiling", SCRIPT)
ceiling = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ceiling)


def test_within_part_auc_only_counts_the_body_parts_that_can_show_the_finding():
    parts = ["chest", "chest", "chest", "chest", "wrist", "wrist"]
    labels = np.zeros((6, len(ceiling.FINDINGS)), np.float32)
    column = ceiling.FINDINGS.index("cardiomegaly")
    labels[[0, 1], column] = 1
    scores = np.zeros_like(labels)
    scores[:, column] = [0.9, 0.8, 0.1, 0.2, 5.0, 5.0]  # the wrists' high scores are outside the chest-only AUC
    aucs = ceiling.within_part_aucs(labels, scores, parts)
    assert aucs == {"cardiomegaly": 1.0}
    scores[:, column] = [0.1, 0.2, 0.9, 0.8, 0.0, 0.0]
    assert ceiling.within_part_aucs(labels, scores, parts) == {"cardiomegaly": 0.0}


def test_a_tiny_run_prints_per_finding_aucs(capsys):
    ceiling.main(["--patients", "24", "--steps", "2", "--image_size", "32", "--patch_size", "8", "--hidden_size", "64",
                  "--num_layers", "1", "--reference_size", "8"])  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert result["steps"] == 2 and result["train_images"] > result["eval_images"] > 0
    for key in ("tower_auc", "pixel_logistic_auc"):
        assert result[key] and set(result[key]) <= set(ceiling.FINDINGS)
        assert all(0.0 <= value <= 1.0 for value in result[key].values())
        assert result[f"{key}_mean"] == round(float(np.mean(list(result[key].values()))), 3)
