"""Saved folders load back: as Hub remote code in a fresh process, from the installed package with no remote code,
and in transformers' zero-shot image classification pipeline."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from pedclip_testing import minilm_path, tiny_config
from PIL import Image
from transformers import AutoTokenizer, pipeline

from modeling_pedclip import PedCLIPModel
from processing_pedclip import PedCLIPImageProcessor, PedCLIPProcessor

REPORTS = ["no acute fracture of the wrist", "right lower lobe consolidation", "normal knee joint"]

# Runs in a fresh interpreter in another directory: loads the folder through the Auto classes and saves the logits.
LOAD_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from PIL import Image
    from transformers import AutoConfig, AutoModel, AutoProcessor
    folder, image_path, out_path, mode = sys.argv[1:5]
    remote = mode == "remote"
    if not remote:
        import pedclip  # the installed package registers its classes with the Auto classes
    config = AutoConfig.from_pretrained(folder, trust_remote_code=remote or None)
    model = AutoModel.from_pretrained(folder, trust_remote_code=remote or None).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=remote or None)
    inputs = processor(images=[Image.open(image_path)] * 3, text=%r, body_parts=["chest", "hand", "knee"])
    with torch.no_grad():
        logits = model(**inputs, router_mode="topk").logits_per_image
    classes = [type(config).__module__, type(model).__module__, type(processor).__module__]
    torch.save({"logits": logits, "classes": classes}, out_path)
    """
    % REPORTS
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny PedCLIP with the real MiniLM tokenizer, saved with its processor; plus a test X-ray PNG."""
    root = tmp_path_factory.mktemp("saved")
    torch.manual_seed(0)
    model = PedCLIPModel(tiny_config(text={"vocab_size": 30522})).eval()
    processor = PedCLIPProcessor(
        PedCLIPImageProcessor(size=32), AutoTokenizer.from_pretrained(minilm_path()), body_parts=model.config.body_parts
    )
    model.save_pretrained(root / "pedclip")
    processor.save_pretrained(root / "pedclip")
    # 8-bit grayscale: the pipeline converts images to RGB, which PIL does by clipping 16-bit values to 255.
    ramp = np.linspace(0, 255, 48 * 40).reshape(48, 40).astype(np.uint8)
    Image.fromarray(ramp).save(root / "xray.png")
    return root, model, processor


def expected_logits(saved) -> torch.Tensor:
    root, model, processor = saved
    inputs = processor(images=[Image.open(root / "xray.png")] * 3, text=REPORTS, body_parts=["chest", "hand", "knee"])
    with torch.no_grad():
        return model(**inputs, router_mode="topk").logits_per_image


def load_in_fresh_process(saved, mode: str) -> dict:
    root = saved[0]
    workdir = root / f"cwd_{mode}"
    workdir.mkdir(exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(root / f"hf_home_{mode}"), "PYTHONPATH": ""}
    out = workdir / "out.pt"
    args = [sys.executable, "-c", LOAD_SCRIPT, str(root / "pedclip"), str(root / "xray.png"), str(out), mode]
    result = subprocess.run(args, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=True)


def test_folder_is_a_complete_hub_repo(saved):
    folder = saved[0] / "pedclip"
    files = set(os.listdir(folder))
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= files
    assert {"configuration_pedclip.py", "modeling_pedclip.py", "processing_pedclip.py"} <= files
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_pedclip.PedCLIPConfig",
        "AutoModel": "modeling_pedclip.PedCLIPModel",
        "AutoModelForZeroShotImageClassification": "modeling_pedclip.PedCLIPModel",
    }
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_pedclip.PedCLIPProcessor"


def test_remote_code_round_trip_in_fresh_process(saved):
    loaded = load_in_fresh_process(saved, "remote")
    assert all(module.startswith("transformers_modules") for module in loaded["classes"]), loaded["classes"]
    torch.testing.assert_close(loaded["logits"], expected_logits(saved), rtol=0, atol=1e-6)


def test_installed_package_loads_without_remote_code(saved):
    loaded = load_in_fresh_process(saved, "installed")
    assert loaded["classes"] == ["configuration_pedclip", "modeling_pedclip", "processing_pedclip"]
    torch.testing.assert_close(loaded["logits"], expected_logits(saved), rtol=0, atol=1e-6)


def test_zero_shot_pipeline_on_pil_images_and_paths(saved):
    root, model, processor = saved
    classifier = pipeline("zero-shot-image-classification", model=str(root / "pedclip"), trust_remote_code=True)
    labels = ["fracture", "pneumonia", "normal"]
    image = Image.open(root / "xray.png")
    from_pil = classifier(image, candidate_labels=labels)
    from_path = classifier(str(root / "xray.png"), candidate_labels=labels)
    assert from_pil == from_path
    assert sorted(r["label"] for r in from_pil) == sorted(labels)
    assert abs(sum(r["score"] for r in from_pil) - 1) < 1e-5
    # The pipeline converts to RGB and pads prompts to the longest: same scores as the model on the gray image.
    prompts = [f"This is a photo of {label}." for label in labels]
    inputs = processor(images=image, text=prompts, padding=True)
    with torch.no_grad():
        probs = model(**inputs).logits_per_image.softmax(-1)[0]
    scores = {r["label"]: r["score"] for r in from_pil}
    np.testing.assert_allclose([scores[label] for label in labels], probs.numpy(), atol=1e-5)
