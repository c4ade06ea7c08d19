"""`pedclip push` (pedclip.publish): the built Hub folder loads as remote code in a fresh process, holds only the
allowed files, carries a card whose model-index is the given evaluation; dtype and sharding; private by default;
offline or unreachable Hub -> a clear error and nothing half-done.

The repo's model files are also installed as modules in the venv, so a fresh process could load them instead of
the folder's code. The fresh-process test blocks those modules (and `pedclip`) with an import hook, so only the
built folder's own code files can serve `AutoModel` / `AutoProcessor` / the pipeline, as on a machine without PedCLIP.
"""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import numpy as np
import pytest
import torch
from eval_testing import build_pedclip_folder, one_thread  # noqa: F401  (one_thread: autouse fixture)
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, ModelCard
from PIL import Image
from safetensors import safe_open

from modeling_pedclip import PedCLIPModel
from pedclip import cli, publish
from pedclip.model_card import TRAINING_STATS_FILE, training_statistics, update_model_card
from processing_pedclip import PedCLIPProcessor

REPO_ID = "someone/pedclip-tiny"
ALLOWED_SINGLE_FILE = {
    "README.md", "config.json", "model.safetensors", "configuration_pedclip.py", "modeling_pedclip.py",
    "processing_pedclip.py", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
}  # fmt: skip
TEXTS = ["no acute fracture of the wrist", "right lower lobe consolidation"]
LABELS = ["fracture", "pneumonia", "normal"]
BLOCKED = ("pedclip", "configuration_pedclip", "modeling_pedclip", "processing_pedclip")

# A fresh interpreter in another directory, the installed PedCLIP modules blocked: the folder's code or nothing.
LOAD_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys, torch

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in %r:
                raise ModuleNotFoundError(f"{name} is blocked: the folder's own code must serve")

    sys.meta_path.insert(0, Block())
    from PIL import Image
    from transformers import AutoModel, AutoProcessor, pipeline
    folder, image_path, out_path = sys.argv[1:4]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    image = Image.open(image_path)
    with torch.no_grad():
        logits = model(**processor(images=image, text=%r, body_parts=["chest"])).logits_per_image
    classifier = pipeline("zero-shot-image-classification", model=folder, trust_remote_code=True)
    scores = {r["label"]: r["score"] for r in classifier(image, candidate_labels=%r)}
    modules = [type(model).__module__, type(processor).__module__, type(classifier.model).__module__]
    torch.save({"logits": logits, "scores": scores, "modules": modules}, out_path)
    """
    % (BLOCKED, TEXTS, LABELS)
)


def _metric(name: str, value: float, width: float = 0.03) -> dict:
    return {name: value, name + "_ci_low": value - width, name + "_ci_high": value + width}


def eval_json_records(model: str) -> list[dict]:
    """eval's results.json: `model`'s runs (one failed), and another model's that must not reach the card."""
    pedi, bone_age = {"dataset": "pedi_cxr", "split": "test"}, {"dataset": "rsna_boneage", "split": "test"}
    return [
        {"model": model, **pedi, "task": "zero_shot", "metrics": _metric("auc/macro", 0.65) | _metric("auc/a", 0.7)},
        {"model": model, **pedi, "task": "linear_probe", "metrics": _metric("auc/macro", 0.8)},
        {"model": model, **pedi, "task": "finetune", "metrics": _metric("auc/macro", 0.85)},
        {"model": model, **bone_age, "task": "regression", "metrics": _metric("mae", 10.6)},
        {"model": model, "dataset": "chd_cxr", "split": "test", "task": "zero_shot", "metrics": {}, "error": "boom"},
        {"model": "CLIP", **pedi, "task": "zero_shot", "metrics": _metric("auc/macro", 0.55)},
    ]  # fmt: skip


def snapshot(folder: Path) -> dict:
    """Every path under `folder` with the sha256 of its bytes (None for folders)."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny PedCLIP output folder as train_accelerate.py leaves it: model, processor, eval_results.json,
    training_stats.json, plus things that must never be uploaded (checkpoints, logs, data, report text, caches)."""
    folder = build_pedclip_folder(tmp_path_factory.mktemp("publish") / "trained")
    for name in ("checkpoints/checkpoint-4/model.safetensors", "logs/train_log.jsonl", "data/train-0000.parquet",
                 "reports.jsonl", "llm_cache/answers.jsonl", "eval_cache/embeddings.npy", "notes.py"):  # fmt: skip
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("not for the Hub: patient report text\n")
    results = {"zero_shot_auc": 0.61, "zero_shot_auc_per_finding": {"fracture": 0.64}, "routing_accuracy": 0.99,
               "image_to_text_R@1": 0.07, "split": "test", "num_images": 138}  # fmt: skip
    (folder / "eval_results.json").write_text(json.dumps(results))
    stats = training_statistics(["chest"] * 30 + ["hand"] * 6 + ["knee"], None, steps=40, epochs=2, global_batch_size=8)
    (folder / TRAINING_STATS_FILE).write_text(json.dumps(stats))
    (folder.parent / "results.json").write_text(json.dumps(eval_json_records(folder.name)))
    return folder


@pytest.fixture(scope="module")
def built(trained) -> Path:
    """`pedclip push --dry-run` of `trained` with eval's results.json."""
    before = snapshot(trained)
    out = trained.parent / "hub"
    assert push_command("--model", str(trained), "--repo-id", REPO_ID, "--dry-run", "--out", str(out),
                        "--eval-results", str(trained.parent / "results.json")) == 0  # fmt: skip
    assert snapshot(trained) == before  # the source folder is only read
    return out


def push_command(*argv: str) -> int:
    """`pedclip push ARGS...`: the `pedclip` command's entry point, with the subcommand from `add_push_parser`."""
    return cli.main(["push", *argv])


def test_dry_run_holds_exactly_the_model_repo_files(built, trained):
    assert set(os.listdir(built)) == ALLOWED_SINGLE_FILE  # no checkpoints, logs, data, reports, caches, stats, notes.py
    assert not [p for p in built.parent.iterdir() if ".partial-" in p.name]  # the build folder was renamed into place
    assert (built / "modeling_pedclip.py").read_text() == (trained / "modeling_pedclip.py").read_text()


def test_built_folder_loads_as_remote_code_in_a_fresh_process(built, trained, tmp_path):
    image_path = tmp_path / "xray.png"
    Image.fromarray(np.linspace(0, 255, 48 * 40).reshape(48, 40).astype(np.uint8)).save(image_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "PYTHONPATH": ""}
    command = [sys.executable, "-c", LOAD_SCRIPT, str(built), str(image_path), str(tmp_path / "out.pt")]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = torch.load(tmp_path / "out.pt", weights_only=True)
    assert all(m.startswith("transformers_modules") for m in loaded["modules"]), loaded["modules"]
    model, processor = PedCLIPModel.from_pretrained(trained).eval(), PedCLIPProcessor.from_pretrained(trained)
    image = Image.open(image_path)
    prompts = [f"This is a photo of {label}." for label in LABELS]  # the pipeline's default hypothesis template
    with torch.no_grad():
        logits = model(**processor(images=image, text=TEXTS, body_parts=["chest"])).logits_per_image
        probs = model(**processor(images=image, text=prompts, padding=True)).logits_per_image.softmax(-1)[0]
    torch.testing.assert_close(loaded["logits"], logits, rtol=0, atol=1e-6)
    np.testing.assert_allclose([loaded["scores"][label] for label in LABELS], probs.numpy(), atol=1e-6)


def test_card_metadata_and_model_index_equal_the_eval_json(built):
    card = ModelCard.load(built / "README.md")
    data = card.data
    assert (data.library_name, data.pipeline_tag, data.license) == ("transformers", "zero-shot-image-classification",
                                                                    "apache-2.0")  # fmt: skip
    assert {"pedclip", "medical", "x-ray", "pediatric", "radiology", "clip", "mixture-of-experts"} <= set(data.tags)
    assert data.model_name == "pedclip-tiny"
    index = {(r.task_name, r.dataset_type, r.dataset_name, r.dataset_split, r.metric_name):
             (r.metric_value, r.metric_args) for r in data.eval_results}  # fmt: skip
    ci = lambda v: {"ci_low": pytest.approx(v - 0.03), "ci_high": pytest.approx(v + 0.03)}  # noqa: E731
    pedi = ("pedi_cxr", "Pedi-CXR (VinDr-PCXR)", "test", "auc/macro")
    assert index == {
        ("zero_shot", *pedi): (0.65, ci(0.65)), ("linear_probe", *pedi): (0.8, ci(0.8)),
        ("finetune", *pedi): (0.85, ci(0.85)),
        ("regression", "rsna_boneage", "RSNA Pediatric Bone Age", "test", "mae"): (10.6, ci(10.6)),
    }  # fmt: skip  (headline metrics of this model's successful runs; linear probe and fine-tune kept apart)
    text = card.text
    assert "| pedclip-tiny | 0.800 (0.770-0.830) |" in text and "CLIP | 0.550" not in text  # results table
    assert "not a medical device" in text and "{{" not in text and "MICCAI" in text
    assert "hold 8 experts each" in text and "| chest | 30 | 81.1% |" in text and "Demo model" in text
    assert f'AutoModel.from_pretrained("{REPO_ID}", trust_remote_code=True)' in text


def test_bf16_shards_and_the_trainer_results_by_default(trained, tmp_path):
    out = publish.dry_run(trained, tmp_path / "hub", REPO_ID, dtype="bf16", max_shard_size="300KB")
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) >= 2 and sorted(set(index["weight_map"].values())) == shards
    assert not (out / "model.safetensors").exists()
    for shard in shards:
        with safe_open(out / shard, "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    reloaded, reference = PedCLIPModel.from_pretrained(out), PedCLIPModel.from_pretrained(trained)
    assert reloaded.dtype == torch.bfloat16
    for name, tensor in reference.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor.to(torch.bfloat16)), name
    results = {(r.task_name, r.dataset_type, r.metric_name): r.metric_value
               for r in ModelCard.load(out / "README.md").data.eval_results}  # fmt: skip
    assert results == {("zero_shot", "pexr_mini", "auc/macro"): 0.61, ("routing", "pexr_mini", "gate_accuracy"): 0.99,
                       ("retrieval", "pexr_mini", "image_to_text/R@1"): 0.07}  # fmt: skip


class FakeHub:
    """Stands in for `huggingface_hub.HfApi`: records what a push asks for; `public_repo` = the repo exists, public."""

    def __init__(self, public_repo: bool = False, remote_files=()):
        self.public_repo, self.remote_files, self.calls = public_repo, list(remote_files), []
        self.private = None

    def __call__(self, endpoint=None, token=None):
        return self

    def create_repo(self, repo_id, private=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private, exist_ok))
        self.private = False if self.public_repo else private

    def model_info(self, repo_id):
        return SimpleNamespace(private=self.private)

    def list_repo_files(self, repo_id):
        return self.remote_files

    def create_commit(self, repo_id, operations, commit_message):
        adds = [op for op in operations if isinstance(op, CommitOperationAdd)]
        added = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in adds}  # the staged files exist
        deleted = [op.path_in_repo for op in operations if isinstance(op, CommitOperationDelete)]
        self.calls.append(("create_commit", repo_id, added, deleted))
        return SimpleNamespace(commit_url=f"https://hub.test/{repo_id}/commit/1")


@pytest.fixture
def online(monkeypatch, tmp_path):
    """Network allowed for pedclip and huggingface_hub (which reads HF_HUB_OFFLINE at import); temp files in a
    folder of the test's own, so leftovers show."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    return tmp_path / "tmp"


def test_push_is_private_by_default_one_commit_of_allowed_files(trained, online, monkeypatch):
    for public in (False, True):
        hub = FakeHub(remote_files=["README.md", "model-00001-of-00002.safetensors", ".gitattributes"])
        monkeypatch.setattr(huggingface_hub, "HfApi", hub)
        assert push_command("--model", str(trained), "--repo-id", REPO_ID, *(["--public"] if public else [])) == 0
        (_, repo, private, _), (kind, _, added, deleted) = hub.calls
        assert (repo, private, kind) == (REPO_ID, not public, "create_commit")
        assert set(added) == ALLOWED_SINGLE_FILE and deleted == ["model-00001-of-00002.safetensors"]  # stale shard
        assert ModelCard(added["README.md"].decode()).data.model_name == "pedclip-tiny"
        assert not os.listdir(online)  # the staging folder is gone


def test_push_refuses_an_existing_public_repo_unless_public(trained, online, monkeypatch, capsys):
    hub = FakeHub(public_repo=True)
    monkeypatch.setattr(huggingface_hub, "HfApi", hub)
    assert push_command("--model", str(trained), "--repo-id", REPO_ID) == 1
    assert "exists and is public" in capsys.readouterr().err
    assert [call[0] for call in hub.calls] == ["create_repo"] and not os.listdir(online)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_hub_fails_clearly_and_leaves_nothing(trained, online, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    before = snapshot(trained)
    assert push_command("--model", str(trained), "--repo-id", REPO_ID, "--token", "hf_not_a_real_token") == 1
    err = capsys.readouterr().err
    assert "pushing" in err and REPO_ID in err and "failed" in err and "connect" in err.lower(), err
    assert not os.listdir(online) and snapshot(trained) == before


def test_offline_refuses_before_building(trained, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(publish, "build_hub_folder", lambda *a, **k: pytest.fail("built while offline"))
    assert push_command("--model", str(trained), "--repo-id", REPO_ID) == 1
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err


def test_broken_weights_or_used_out_folder_build_nothing(trained, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(trained, broken, ignore=shutil.ignore_patterns("checkpoints", "data", "logs"))
    tensors = {}
    with safe_open(broken / "model.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in list(f.keys())[1:]}  # one tensor missing
    from safetensors.torch import save_file

    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    assert push_command("--model", str(broken), "--repo-id", REPO_ID, "--dry-run", "--out", str(tmp_path / "hub")) == 1
    assert "do not match the config" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["broken"]  # no output, no partial build folder
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    used = ("--dry-run", "--out", str(tmp_path / "used"))
    assert push_command("--model", str(trained), "--repo-id", REPO_ID, *used) == 1
    assert "not an empty folder" in capsys.readouterr().err and os.listdir(tmp_path / "used") == ["keep.txt"]


def test_eval_results_of_several_models_need_a_choice(trained, tmp_path):
    records = eval_json_records("other-model")
    (tmp_path / "results.json").write_text(json.dumps(records))
    with pytest.raises(ValueError, match="--eval-model"):
        publish.gather_records(trained, [tmp_path / "results.json"])
    chosen = publish.gather_records(trained, [tmp_path / "results.json"], eval_model="CLIP")
    assert [(r["model"], r["task"]) for r in chosen] == [("CLIP", "zero_shot")]
    (tmp_path / "bad.json").write_text(json.dumps({"loss": 1.0}))
    with pytest.raises(ValueError, match="bad.json: no known metric"):
        publish.gather_records(trained, [tmp_path / "bad.json"])


def test_eval_refreshes_a_pushed_card_of_its_own_model_only(built, tmp_path):
    card_path = tmp_path / "README.md"
    shutil.copy(built / "README.md", card_path)
    other = [{"model": "someone-else", "dataset": "chd_cxr", "split": "test", "task": "zero_shot",
              "metrics": _metric("auc/macro", 0.5)}]  # fmt: skip
    with pytest.raises(ValueError, match="none is the card's model 'pedclip-tiny'"):
        update_model_card(card_path, other)
    update_model_card(card_path, [{**other[0], "model": "pedclip-tiny"}])
    card = ModelCard.load(card_path)
    assert len(card.data.eval_results) == 5 and "CHD-CXR: auc/macro" in card.text  # added beside the pushed four
    assert "Pedi-CXR (VinDr-PCXR): auc/macro" in card.text and "## Intended use" in card.text
