"""The LoRA fine-tuning recipe (`pedclip.lora`, README "LoRA fine-tuning") on a tiny saved PedCLIP folder: LoRA on
the attention projections, on the stacked MoBE experts (peft `target_parameters`), and on both; the saved adapter
holds only the LoRA matrices and the head, reloads onto `AutoModel.from_pretrained(folder, trust_remote_code=True)`
with identical outputs, and `merge_and_unload()` gives a plain model with the same outputs."""

import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from eval_testing import one_thread, pedclip_folder  # noqa: F401 (fixtures)
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch.nn import functional as F
from transformers import AutoModel

from pedclip.lora import HEAD_NAME, PedCLIPImageClassifier, lora_config

NUM_LABELS = 3
ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]
CASES = {"attention": (ATTENTION, False), "experts": ([], True), "both": (ATTENTION, True)}  # targets, experts
PEFT_PREFIX = "base_model.model."
MERGE_TOLERANCE = dict(rtol=1e-5, atol=1e-5)  # x @ (W + BA) vs x @ W + (x @ A) @ B: float32 rounding only


# Runs in a fresh interpreter: the base model comes from the folder's code (remote code), before `pedclip` is
# imported (once imported, transformers prefers the classes it registers); then the adapter goes on top.
RELOAD_SCRIPT = textwrap.dedent(
    f"""
    import sys, torch
    from transformers import AutoModel
    folder, adapter_dir, pixels_path, out_path = sys.argv[1:5]
    base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    from peft import PeftModel
    from pedclip.lora import PedCLIPImageClassifier
    model = PeftModel.from_pretrained(PedCLIPImageClassifier(base, {NUM_LABELS}), adapter_dir).eval()
    pixels, out = torch.load(pixels_path, weights_only=True), {{"module": type(base).__module__}}
    with torch.no_grad():
        for router_mode in ("soft", "topk"):
            out[router_mode] = model(pixels, router_mode=router_mode).logits
    torch.save(out, out_path)
    """
)


def load_base(folder) -> torch.nn.Module:
    return AutoModel.from_pretrained(folder, trust_remote_code=True).eval()


def logits_of(model, pixels: torch.Tensor, router_mode: str | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(pixels, router_mode=router_mode).logits


def train(model, pixels: torch.Tensor, labels: torch.Tensor, steps: int = 4) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(pixels, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def train_and_save(case: str, folder, adapter_dir) -> SimpleNamespace:
    """A LoRA classifier (`CASES[case]`) on the PedCLIP in `folder`, trained a few steps, saved to `adapter_dir`."""
    torch.manual_seed(0)
    targets, experts = CASES[case]
    wrapper = PedCLIPImageClassifier(load_base(folder), NUM_LABELS)
    config = lora_config(wrapper, r=2, alpha=4, targets=targets, experts=experts, modules_to_save=[HEAD_NAME])
    model = get_peft_model(wrapper, config)
    pixels, labels = torch.randn(8, 3, 32, 32), torch.arange(8) % NUM_LABELS
    train(model, pixels, labels)
    model.save_pretrained(adapter_dir)
    return SimpleNamespace(case=case, model=model, pixels=pixels, adapter_dir=adapter_dir)


@pytest.fixture(scope="module")
def trained_cases(pedclip_folder, tmp_path_factory) -> dict:  # noqa: F811
    return {case: train_and_save(case, pedclip_folder, tmp_path_factory.mktemp(f"adapter-{case}")) for case in CASES}


@pytest.fixture(params=list(CASES))
def trained(request, trained_cases) -> SimpleNamespace:
    return trained_cases[request.param]


def reload(folder, adapter_dir) -> tuple[torch.nn.Module, PeftModel]:
    base = load_base(folder)
    return base, PeftModel.from_pretrained(PedCLIPImageClassifier(base, NUM_LABELS), adapter_dir).eval()


def test_only_the_adapter_and_the_head_train(trained, capsys):
    trainable = {name: p for name, p in trained.model.named_parameters() if p.requires_grad}
    adapted = {name for name in trainable if "lora_" in name}
    head = {f"{PEFT_PREFIX}{HEAD_NAME}.modules_to_save.default.{w}" for w in ("weight", "bias")}
    assert set(trainable) - adapted == head
    assert any(".attention." in name for name in adapted) == (trained.case != "experts")
    assert any(".mlp." in name for name in adapted) == (trained.case != "attention")
    count = sum(p.numel() for p in trainable.values())
    trained.model.print_trainable_parameters()
    assert f"trainable params: {count:,}" in capsys.readouterr().out


def test_training_changed_every_adapter_and_the_tower_output(trained, pedclip_folder):  # noqa: F811
    lora_b = {name: p for name, p in trained.model.named_parameters() if "lora_B" in name}
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b.values())  # B starts at zero: training moved all
    with torch.no_grad():
        adapted = trained.model.get_base_model().image_features(trained.pixels)
        base = PedCLIPImageClassifier(load_base(pedclip_folder), NUM_LABELS).image_features(trained.pixels)
    assert (adapted - base).abs().max() > 1e-3  # the adapter, not only the head, changes the outputs


def test_the_saved_adapter_holds_only_lora_matrices_and_the_head(trained, pedclip_folder):  # noqa: F811
    assert sorted(os.listdir(trained.adapter_dir)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    saved = load_file(trained.adapter_dir / "adapter_model.safetensors")
    names = {name.removeprefix(PEFT_PREFIX) for name in saved}
    assert names - {n for n in names if "lora_" in n} == {f"{HEAD_NAME}.weight", f"{HEAD_NAME}.bias"}
    base_names = set(load_file(pedclip_folder / "model.safetensors"))
    assert not names & base_names and not any("fc1_weight" in n or "fc2_weight" in n for n in names)
    assert sum(t.numel() for t in saved.values()) == trained.model.get_nb_trainable_parameters()[0]
    config = json.loads((trained.adapter_dir / "adapter_config.json").read_text())
    assert config["modules_to_save"] == [HEAD_NAME]
    assert config["target_parameters"] == (["fc1_weight", "fc2_weight"] if trained.case != "attention" else None)


def test_the_adapter_reloads_onto_automodel_with_identical_outputs(trained, pedclip_folder):  # noqa: F811
    _, reloaded = reload(pedclip_folder, trained.adapter_dir)  # the installed classes: `import pedclip` registered them
    assert not any(p.requires_grad for p in reloaded.parameters())
    for router_mode in ("soft", "topk"):
        expected = logits_of(trained.model, trained.pixels, router_mode)
        assert torch.equal(logits_of(reloaded, trained.pixels, router_mode), expected), router_mode


def test_the_adapter_reloads_onto_the_hub_code_in_a_fresh_process(trained_cases, pedclip_folder, tmp_path):  # noqa
    trained = trained_cases["both"]
    torch.save(trained.pixels, tmp_path / "pixels.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "PYTHONPATH": ""}
    args = [str(pedclip_folder), str(trained.adapter_dir), str(tmp_path / "pixels.pt"), str(tmp_path / "out.pt")]
    subprocess.run([sys.executable, "-c", RELOAD_SCRIPT, *args], cwd=tmp_path, env=env, check=True, timeout=300)
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert out["module"].startswith("transformers_modules.")  # the folder's own code, through trust_remote_code
    for router_mode in ("soft", "topk"):
        assert torch.equal(out[router_mode], logits_of(trained.model, trained.pixels, router_mode)), router_mode


def test_merge_and_unload_gives_a_plain_model_with_the_same_outputs(trained, pedclip_folder, tmp_path):  # noqa: F811
    base, reloaded = reload(pedclip_folder, trained.adapter_dir)
    merged = reloaded.merge_and_unload()
    assert isinstance(merged, PedCLIPImageClassifier) and merged.vision_model is base.vision_model
    assert not any("lora_" in name or "base_layer" in name for name, _ in base.named_parameters())
    expected = logits_of(trained.model, trained.pixels)
    torch.testing.assert_close(logits_of(merged, trained.pixels), expected, **MERGE_TOLERANCE)
    base.save_pretrained(tmp_path)  # the merged tower is the base model's: it saves as a plain PedCLIP checkpoint
    again = PedCLIPImageClassifier(load_base(tmp_path), NUM_LABELS)
    again.classifier.load_state_dict(merged.classifier.state_dict())
    torch.testing.assert_close(logits_of(again, trained.pixels), expected, **MERGE_TOLERANCE)


def test_lora_config_picks_attention_mlps_and_experts_and_refuses_what_peft_cannot_do(pedclip_folder):  # noqa: F811
    wrapper = PedCLIPImageClassifier(load_base(pedclip_folder), NUM_LABELS)
    config = lora_config(wrapper, r=4, alpha=8)
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
    assert set(config.target_parameters) == {"fc1_weight", "fc2_weight"} and config.modules_to_save is None
    assert lora_config(wrapper, targets=ATTENTION).target_parameters is None  # named targets: experts off
    assert lora_config(wrapper, dropout=0.1, experts=False).lora_dropout == 0.1
    with pytest.raises(ValueError, match="lora_dropout"):
        lora_config(wrapper, dropout=0.1)
    with pytest.raises(ValueError, match="MoBE"):
        lora_config(torch.nn.Sequential(torch.nn.Linear(4, 4)), targets=["0"], experts=True)
    with pytest.raises(ValueError, match="targets"):
        lora_config(wrapper, targets=[], experts=False)


def test_classifier_reads_the_projected_or_pooled_embedding_and_computes_its_loss(pedclip_folder):  # noqa: F811
    base = load_base(pedclip_folder)
    projected, pooled = PedCLIPImageClassifier(base, 2), PedCLIPImageClassifier(base, 2, use_projection=False)
    assert not any(name.startswith("text_model") for name in projected.state_dict())
    pixels = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = base.get_image_features(pixels).pooler_output
        torch.testing.assert_close(projected.image_features(pixels), expected, rtol=0, atol=0)
        vision = base.vision_model(pixels, router_mode="label", body_part_labels=torch.tensor([0, 1, 2, 3]))
        features = pooled.image_features(pixels, body_part_labels=torch.tensor([0, 1, 2, 3]), router_mode="label")
        torch.testing.assert_close(features, vision.pooler_output, rtol=0, atol=0)
        classes, targets = torch.tensor([0, 1, 1, 0]), torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.0, 1.0]])
        single, multi = projected(pixels, labels=classes), projected(pixels, labels=targets)
    assert single.loss == F.cross_entropy(single.logits, classes)
    assert multi.loss == F.binary_cross_entropy_with_logits(multi.logits, targets)
