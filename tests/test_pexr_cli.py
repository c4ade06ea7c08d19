"""The `pexr` command line: mini -> build -> stats, split-report, argument errors."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from pexr.cli import main


def test_mini_build_stats(tmp_path, capsys):
    assert main(["mini", str(tmp_path / "in"), "--patients", "4", "--image_size", "32"]) == 0
    args = ["build", "--manifest", str(tmp_path / "in" / "manifest.csv"), "--output_dir", str(tmp_path / "out"),
            "--num_workers", "1", "--no_progress", "--salt", "s", "--max_side", "16"]  # fmt: skip
    assert main(args) == 0
    output = capsys.readouterr().out
    assert "complete" in output and "rejected: 0" in output and list((tmp_path / "out" / "data").glob("*.parquet"))
    assert main(["build", "--manifest", str(tmp_path / "in" / "manifest.csv"), "--output_dir", str(tmp_path / "out"),
                 "--no_progress", "--salt", "other"]) == 1  # fmt: skip
    assert "salt_check" in capsys.readouterr().err
    assert main(["stats", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.startswith("# PeXR build statistics")


def test_mini_as_a_datasets_folder(tmp_path):
    from datasets import load_from_disk

    assert main(["mini", str(tmp_path / "hf"), "--patients", "2", "--image_size", "16", "--format", "hf"]) == 0
    assert "train" in load_from_disk(str(tmp_path / "hf"))


def test_split_report_reads_stdin_and_writes_json(monkeypatch, capsys):
    report = "Clinical history: fall. Findings: Fracture of the distal radius. The hand is normal."
    monkeypatch.setattr(sys, "stdin", io.StringIO(report))
    assert main(["split-report", "--parts", "wrist,hand,knee"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "wrist": "Fracture of the distal radius.", "hand": "The hand is normal.", "knee": "",
    }  # fmt: skip


@pytest.mark.parametrize(
    "args",
    [
        ["split-report", "--parts", "wrist", "--llm_endpoint", "http://localhost:1/v1"],
        ["split-report", "--parts", "paw"],
        ["build", "--dicom_dir", "x", "--output_dir", "y"],
        ["build", "--manifest", "m.csv", "--output_dir", "y", "--split", "0.8,0.2"],
    ],
)
def test_bad_arguments_exit_with_usage(args, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Findings: normal."))
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "pexr", "--help"], capture_output=True, text=True, check=True)
    assert "split-report" in result.stdout and "build" in result.stdout
