"""train_accelerate.py: schedule, global-batch equivalence across processes, kill + resume, Hub-ready output."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict
from datasets import Image as ImageFeature
from pedclip_testing import TINY_BODY_PARTS, minilm_path, tiny_config
from PIL import Image
from safetensors.torch import load_file

import train_accelerate
from pedclip.checkpointing import complete_checkpoints, resolve_checkpoint
from pedclip.hub import files_to_push, push_folder
from pedclip.schedule import RoutingSchedule, parameter_groups

REPO = Path(__file__).resolve().parents[1]
WORDS = ["no fracture", "effusion", "normal", "opacity", "swelling", "clear lungs"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny image-text dataset (train/validation/test, test with findings) and a tiny model config."""
    root = tmp_path_factory.mktemp("training")
    rng = np.random.default_rng(0)

    def rows(n, offset):
        parts = [TINY_BODY_PARTS[(i + offset) % 5] for i in range(n)]
        texts = [f"{p} film: " + " ".join(rng.choice(WORDS, 3)) for p in parts]
        images = [Image.fromarray(rng.integers(0, 255, (40, 36), dtype=np.uint8)) for _ in parts]
        findings = [["effusion"] if "effusion" in t else [] for t in texts]
        return Dataset.from_dict({"image": images, "text": texts, "body_part": parts, "findings": findings})

    splits = {"train": rows(40, 0), "validation": rows(10, 1), "test": rows(20, 2)}
    DatasetDict({k: v.cast_column("image", ImageFeature()) for k, v in splits.items()}).save_to_disk(root / "data")
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    tiny_config(text={"vocab_size": 30522, **no_dropout}).to_json_file(root / "config.json")
    return root


def train_args(inputs: Path, output: str, *extra: str) -> list[str]:
    return [
        "--dataset_name", str(inputs / "data"), "--model_config", str(inputs / "config.json"),
        "--tokenizer", minilm_path(), "--report_to", "none", "--logging_steps", "1", "--pad_to_max_length",
        "--output_dir", str(inputs / output), *extra,
    ]  # fmt: skip


def launch(args: list[str], processes: int = 1, wait: bool = True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    if processes == 1:
        command = [sys.executable, str(REPO / "train_accelerate.py"), *args]
    else:
        env["ACCELERATE_USE_CPU"] = "1"
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", "29517", str(REPO / "train_accelerate.py"), *args,
        ]  # fmt: skip
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def train_log(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "logs" / "train_log.jsonl").read_text().splitlines()]


def max_weight_difference(a: Path, b: Path) -> float:
    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert first.keys() == second.keys()
    return max((first[k] - second[k]).abs().max().item() for k in first)


@pytest.fixture(scope="module")
def one_process_run(inputs):
    launch(train_args(inputs, "one", "--per_device_train_batch_size", "8", "--max_steps", "4"))
    return inputs / "one"


def test_routing_schedule_switches_at_the_right_step():
    schedule = RoutingSchedule(teacher_forcing_steps=6, total_steps=16, final_gate_loss_weight=0.2)
    assert [schedule.at(s)[0] for s in (0, 5, 6, 15)] == ["label", "label", "soft", "soft"]
    assert [schedule.at(s)[1] for s in (0, 5)] == [1.0, 1.0]
    assert schedule.at(6)[1] == pytest.approx(1.0)
    assert schedule.at(11)[1] == pytest.approx(0.6)
    assert schedule.at(16)[1] == pytest.approx(0.2)


def test_trainer_routes_by_labels_for_the_teacher_forcing_epochs(inputs, monkeypatch):
    seen = []

    def recording_loss(model, batch, router_mode, gate_weight):
        seen.append((router_mode, gate_weight))
        return real_loss(model, batch, router_mode, gate_weight)

    real_loss = train_accelerate.training_loss
    monkeypatch.setattr(train_accelerate, "training_loss", recording_loss)
    extra = ["--per_device_train_batch_size", "8", "--num_train_epochs", "3", "--teacher_forcing_epochs", "1",
             "--final_gate_loss_weight", "0.0", "--checkpointing_steps", "0"]  # fmt: skip
    trainer = train_accelerate.Trainer(train_accelerate.parse_args(train_args(inputs, "schedule", *extra)))
    trainer.train()
    assert trainer.steps_per_epoch == 5 and len(seen) == 15
    assert [mode for mode, _ in seen] == ["label"] * 5 + ["soft"] * 10
    weights = [weight for _, weight in seen]
    assert weights[:6] == [1.0] * 6 and weights[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(weights[5:], weights[6:]))


def test_weight_decay_skips_norms_biases_and_temperature():
    from modeling_pedclip import PedCLIPModel

    model = PedCLIPModel(tiny_config())
    decayed, plain = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    plain_names = {names[id(p)] for p in plain["params"]}
    assert "logit_scale" in plain_names and decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert "vision_model.encoder.layers.1.mlp.fc1_bias" in plain_names
    assert "vision_model.layernorm.weight" in plain_names
    assert {names[id(p)] for p in decayed["params"]} >= {"vision_model.encoder.layers.1.mlp.fc1_weight"}
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_two_processes_train_like_one_with_twice_the_batch(inputs, one_process_run):
    launch(train_args(inputs, "two", "--per_device_train_batch_size", "4", "--max_steps", "4"), processes=2)
    two, one = train_log(inputs / "two"), train_log(one_process_run)
    losses = [(a["loss"], b["loss"]) for a, b in zip(two, one) if "loss" in a]
    assert len(losses) == 4
    for two_loss, one_loss in losses:
        assert abs(two_loss - one_loss) <= 1e-5
    assert max_weight_difference(inputs / "two", one_process_run) <= 1e-5


def test_killed_run_resumes_to_the_same_weights(inputs):
    extra = ["--per_device_train_batch_size", "8", "--max_steps", "40", "--checkpointing_steps", "3"]
    launch(train_args(inputs, "straight", *extra))
    process = launch(train_args(inputs, "killed", *extra), wait=False)
    checkpoints = inputs / "killed" / "checkpoints"
    deadline = time.time() + 300
    while not any(p.name == "checkpoint-6" for p in complete_checkpoints(checkpoints)):
        assert process.poll() is None, f"the run ended before it could be killed: {process.stderr.read()[-2000:]}"
        assert time.time() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (inputs / "killed" / "model.safetensors").exists()  # it really stopped mid-run
    launch(train_args(inputs, "killed", *extra, "--resume_from_checkpoint", "latest"))
    assert max_weight_difference(inputs / "killed", inputs / "straight") <= 1e-6


def test_only_complete_checkpoints_count(tmp_path):
    for name in ("checkpoint-2", "checkpoint-4", "checkpoint-6.tmp", "checkpoint-8"):
        (tmp_path / name).mkdir()
    for name in ("checkpoint-2", "checkpoint-4", "checkpoint-6.tmp"):
        (tmp_path / name / "trainer_state.json").write_text("{}")
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4"]
    assert resolve_checkpoint("latest", tmp_path).name == "checkpoint-4"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_checkpoint(str(tmp_path / "checkpoint-8"), tmp_path)


def test_output_is_a_hub_ready_folder_and_offline_push_fails_clearly(one_process_run, tmp_path):
    from transformers import AutoModel

    pushed = files_to_push(one_process_run)
    names = {p.name for p in pushed}
    assert {"config.json", "model.safetensors", "modeling_pedclip.py", "processor_config.json"} <= names
    assert {"tokenizer.json", "README.md"} <= names and not any("checkpoint" in n for n in names)
    assert "eval_results.json" not in names and "training_stats.json" not in names
    results = json.loads((one_process_run / "eval_results.json").read_text())
    assert {"routing_accuracy", "image_to_text_R@1", "zero_shot_auc"} <= results.keys()
    for path in pushed:
        shutil.copy(path, tmp_path / path.name)
    model = AutoModel.from_pretrained(tmp_path, trust_remote_code=True)
    reference = load_file(one_process_run / "model.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.items())
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE"):
        push_folder(one_process_run, "someone/pedclip-test")


@pytest.mark.parametrize("name", ["ddp_2gpu", "fsdp_2gpu", "deepspeed_zero2_2gpu", "multinode_ddp"])
def test_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "configs" / "accelerate" / f"{name}.yaml"))
    assert config.mixed_precision == "bf16" and config.num_processes == (8 if name == "multinode_ddp" else 2)
    assert config.distributed_type.value == {"fsdp": "FSDP", "deepspeed": "DEEPSPEED"}.get(name.split("_")[0], "MULTI_GPU")
