"""convert_checkpoint.py: open_clip (native and timm-trunk ViT), MGCA and DDP-wrapped PedCLIP state dicts convert into
PedCLIP models whose features equal the source's; the report names every mapping; errors name what is wrong."""

import argparse
import json
from types import SimpleNamespace

import pytest
import torch
from pedclip_testing import TINY_BODY_PARTS, minilm_path, randomize_experts, timm_state_dict_from_vit, tiny_config
from safetensors.torch import save_file
from transformers import AutoModel, AutoProcessor, AutoTokenizer, BertConfig, BertModel, ViTConfig, ViTModel

from convert_checkpoint import ConversionError, Mapped, build_config, convert_checkpoint, convert_open_clip, main
from modeling_pedclip import PedCLIPModel

VOCAB = 30522  # MiniLM's tokenizer, used for the saved processor
PIXELS = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
IDS = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(6))
MASK = torch.ones_like(IDS).index_fill_(1, torch.tensor([7, 8]), 0)
# What the weights cannot tell (heads; MoBE layout and body parts) for a tiny model.
PARTIAL_CONFIG = {
    "vision_config": {"num_attention_heads": 2, "moe_layers": [1], "num_experts": 5},
    "text_config": {"num_attention_heads": 2}, "body_parts": TINY_BODY_PARTS,
}  # fmt: skip


@pytest.fixture(scope="module")
def towers():
    """A tiny ViT (timm layout; its patch bias zero, as open_clip's conv1 has none), a BERT with pooler, projections."""
    torch.manual_seed(0)
    vit_config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                           image_size=32, patch_size=8, layer_norm_eps=1e-6)  # fmt: skip
    vit = ViTModel(vit_config, add_pooling_layer=False).eval()
    with torch.no_grad():
        vit.embeddings.patch_embeddings.projection.bias.zero_()
    bert = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=37)).eval()  # fmt: skip
    timm = {k: v for k, v in timm_state_dict_from_vit(vit).items() if not k.startswith("head.")}
    projections = torch.randn(2, 16, 32) * 32**-0.5  # features of order 1, so atol 1e-6 is float32 rounding
    return SimpleNamespace(vit=vit, bert=bert, timm=timm, visual_proj=projections[0], text_proj=projections[1])


def reference_features(towers) -> tuple[torch.Tensor, torch.Tensor]:
    """The source's CLIP features: projected CLS tokens of the ViT and of BERT."""
    with torch.no_grad():
        image = towers.vit(pixel_values=PIXELS).last_hidden_state[:, 0] @ towers.visual_proj.t()
        text = towers.bert(input_ids=IDS, attention_mask=MASK).last_hidden_state[:, 0] @ towers.text_proj.t()
    return image, text


def features(model) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.get_image_features(PIXELS).pooler_output, model.get_text_features(IDS, MASK).pooler_output


def assert_same_features(got, expected):
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------- fake layouts (inverse mappings)
def open_clip_text(towers) -> dict:
    bert = {f"text.transformer.{k}": v for k, v in towers.bert.state_dict().items()}
    return {**bert, "text.proj.weight": towers.text_proj, "logit_scale": torch.tensor(2.5)}


def open_clip_trunk(towers) -> dict:
    state = {f"visual.trunk.{key}": value for key, value in towers.timm.items()}
    return {**state, "visual.head.proj.weight": towers.visual_proj, **open_clip_text(towers)}


def open_clip_native(towers) -> dict:
    timm = towers.timm
    state = {
        "visual.conv1.weight": timm["patch_embed.proj.weight"], "visual.class_embedding": timm["cls_token"].reshape(-1),
        "visual.positional_embedding": timm["pos_embed"][0], "visual.ln_post.weight": timm["norm.weight"],
        "visual.ln_post.bias": timm["norm.bias"], "visual.proj": towers.visual_proj.t().contiguous(),
        "text.transformer.embeddings.position_ids": torch.arange(512)[None],  # a buffer old BERT checkpoints hold
    }  # fmt: skip
    names = {"norm1": "ln_1", "norm2": "ln_2", "attn.qkv": "attn.in_proj", "attn.proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}  # fmt: skip
    for i in range(2):
        for old, new in names.items():
            for kind in ("weight", "bias"):
                dot = "_" if new == "attn.in_proj" else "."
                state[f"visual.transformer.resblocks.{i}.{new}{dot}{kind}"] = timm[f"blocks.{i}.{old}.{kind}"]
    return {**state, **open_clip_text(towers)}


def mgca(towers) -> dict:
    state = {f"img_encoder_q.model.{key}": value for key, value in towers.timm.items()}
    bert = {k: v for k, v in towers.bert.state_dict().items() if not k.startswith("pooler.")}
    state.update({f"text_encoder_q.model.{key}": value for key, value in bert.items()})
    state["img_encoder_q.global_embed.weight"] = towers.visual_proj
    state["text_encoder_q.global_embed.weight"] = towers.text_proj
    state["img_encoder_q.local_embed.conv.weight"] = torch.randn(8, 32, 1)  # MGCA's local head: no counterpart
    return state


def write(state: dict, path, container: dict | None = None):
    """`.safetensors`, or a torch file holding `state` (inside `container`'s "state_dict" when given)."""
    state = {key: value.detach().clone().contiguous() for key, value in state.items()}
    if path.suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save({**container, "state_dict": state} if container else state, path)
    return path


def write_config(path, **vision) -> str:
    config = {**PARTIAL_CONFIG, "vision_config": {**PARTIAL_CONFIG["vision_config"], **vision}}
    path.write_text(json.dumps(config))
    return str(path)


# --------------------------------------------------------------------------------------------------------- tests
ZEROS = "zeros: open_clip's conv1 has no bias"
GATE = "new: random gate of an upcycled MoBE layer (as from_towers)"
LAYOUTS = {
    "open_clip_native": (open_clip_native, "ckpt.pt", None, {
        "vision_model.embeddings.cls_token": (["visual.class_embedding"], "reshape"),
        "vision_model.embeddings.patch_embedding.bias": ([], ZEROS),
        "vision_model.encoder.layers.0.attention.k_proj.weight": (["visual.transformer.resblocks.0.attn.in_proj_weight"], "split qkv"),
        "vision_model.encoder.layers.1.mlp.fc2_weight": (["visual.transformer.resblocks.1.mlp.c_proj.weight"], "transpose, upcycled to 5 experts"),
        "visual_projection.weight": (["visual.proj"], "transpose"),
        "logit_scale": (["logit_scale"], "copy"),
    }),
    "open_clip_trunk": (open_clip_trunk, "ckpt.safetensors", None, {
        "vision_model.encoder.layers.1.attention.v_proj.bias": (["visual.trunk.blocks.1.attn.qkv.bias"], "split qkv"),
        "vision_model.encoder.layers.1.mlp.fc1_weight": (["visual.trunk.blocks.1.mlp.fc1.weight"], "upcycled to 5 experts"),
        "vision_model.encoder.layers.1.mlp.gate.weight": ([], GATE),
        "text_model.encoder.layer.1.output.LayerNorm.bias": (["text.transformer.encoder.layer.1.output.LayerNorm.bias"], "copy"),
        "text_projection.weight": (["text.proj.weight"], "copy"),
    }),
    "mgca": (mgca, "mgca.ckpt", {"epoch": 3, "global_step": 40}, {
        "vision_model.encoder.layers.0.mlp.fc1.weight": (["img_encoder_q.model.blocks.0.mlp.fc1.weight"], "copy"),
        "text_projection.weight": (["text_encoder_q.global_embed.weight"], "copy"),
        "logit_scale": ([], "new: the config's logit_scale_init_value (MGCA's temperature is a fixed hyperparameter)"),
    }),
}  # fmt: skip
UNMAPPED = {
    "open_clip_native": {"text.transformer.pooler.dense.weight", "text.transformer.pooler.dense.bias"},
    "open_clip_trunk": {"text.transformer.pooler.dense.weight", "text.transformer.pooler.dense.bias"},
    "mgca": {"img_encoder_q.local_embed.conv.weight"},
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_vit_bert_layouts_convert_to_the_same_features(tmp_path, towers, layout):
    make, name, container, expected = LAYOUTS[layout]
    path = write(make(towers), tmp_path / name, container)
    config = write_config(tmp_path / "config.json", layer_norm_eps=1e-6)  # the source ViT's eps
    model, report = convert_checkpoint(path, config=config)
    assert_same_features(features(model), reference_features(towers))
    assert report["format"] == layout.removesuffix("_native").removesuffix("_trunk")
    assert report["containers"] == (["state_dict"] if container else [])
    assert report["missing_target_keys"] == [] and report["shape_mismatches"] == {}
    assert set(report["mapping"]) == set(model.state_dict())
    for target, (sources, transform) in expected.items():
        assert report["mapping"][target] == {"sources": sources, "transform": transform}, target
    assert set(report["unmapped_source_keys"]) == UNMAPPED[layout]
    if layout == "open_clip_native":
        assert report["ignored_source_keys"] == ["text.transformer.embeddings.position_ids"]
        assert report["unmapped_source_keys"]["text.transformer.pooler.dense.weight"].startswith("BERT pooler")


def test_ddp_pedclip_state_dict_converts_exactly(tmp_path):
    torch.manual_seed(1)
    source = PedCLIPModel(tiny_config(text={"vocab_size": VOCAB})).eval()
    randomize_experts(source)
    state = {f"module.{key}": value for key, value in source.state_dict().items()}
    path = write(state, tmp_path / "ddp.pt", {"epoch": 2, "optimizer": {"lr": torch.tensor(1e-5)}})
    source.config.to_json_file(tmp_path / "config.json")
    model, report = convert_checkpoint(path, config=tmp_path / "config.json")
    assert report["format"] == "pedclip" and report["stripped_prefixes"] == ["module."]
    assert all(entry == {"sources": [key], "transform": "copy"} for key, entry in report["mapping"].items())
    assert set(report["mapping"]) == set(source.state_dict()) and report["unmapped_source_keys"] == {}
    assert_same_features(features(model), features(source))
    with torch.no_grad():
        got, expected = model.vision_model(PIXELS).gate_logits, source.vision_model(PIXELS).gate_logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_cli_writes_a_folder_the_auto_classes_load(tmp_path, towers, capsys):
    text_tower = tmp_path / "text_tower"  # tokenizer + BERT config.json: it gives the text heads (no --config for them)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(text_tower)
    towers.bert.config.save_pretrained(text_tower)
    path = write(open_clip_trunk(towers), tmp_path / "open_clip.safetensors")
    config = {**PARTIAL_CONFIG, "text_config": {}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    out, report_path = tmp_path / "pedclip", tmp_path / "report.json"
    argv = [str(path), "--out", str(out), "--config", str(tmp_path / "config.json"), "--tokenizer", str(text_tower)]
    assert main([*argv, "--report", str(report_path)]) == 0
    stdout = capsys.readouterr().out
    assert "split qkv" in stdout and "text.transformer.pooler.dense.weight: BERT pooler" in stdout
    # the folder carries its code (a fresh process loads it as remote code: tests/test_loading.py, test_publish.py)
    assert {"configuration_pedclip.py", "modeling_pedclip.py", "processing_pedclip.py"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModel"] == "modeling_pedclip.PedCLIPModel"
    model = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    assert_same_features(features(model), reference_features(towers))
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    inputs = processor(images=[PIXELS[0, 0].numpy()], text=["no fracture"])
    assert inputs["pixel_values"].shape == (1, 3, 32, 32) and inputs["input_ids"].shape == (1, 120)
    report = json.loads(report_path.read_text())
    assert report["output"] == str(out) and "text_config.num_attention_heads" not in report["assumed_config"]
    assert report["mapping"]["visual_projection.weight"] == {"sources": ["visual.head.proj.weight"], "transform": "copy"}


def test_missing_tensor_fails_naming_it(tmp_path, towers):
    state = open_clip_trunk(towers)
    del state["visual.trunk.blocks.1.norm2.weight"]
    path = write(state, tmp_path / "ckpt.bin")
    config, report_path = write_config(tmp_path / "config.json"), tmp_path / "report.json"
    argv = [str(path), "--out", str(tmp_path / "out"), "--config", config, "--report", str(report_path)]
    with pytest.raises(SystemExit, match=r"no weights for the PedCLIP tensors \['vision_model\.encoder\.layers\.1\."
                                         r"layernorm_after\.weight'\]"):  # fmt: skip
        main(argv)
    assert json.loads(report_path.read_text())["missing_target_keys"] == ["vision_model.encoder.layers.1.layernorm_after.weight"]
    assert not (tmp_path / "out").exists()


def test_pickle_holding_objects_is_refused(tmp_path, towers):
    path = write(open_clip_trunk(towers), tmp_path / "lightning.ckpt", {"hyper_parameters": argparse.Namespace(lr=1)})
    with pytest.raises(ConversionError, match=r"lightning\.ckpt: refused by weights_only loading.*Namespace"):
        convert_checkpoint(path)


def test_unconverted_source_tensors_warn_and_fail_with_strict(tmp_path, towers):
    state = {**open_clip_native(towers), "visual.ln_pre.weight": torch.ones(32), "visual.ln_pre.bias": torch.zeros(32)}
    path = write(state, tmp_path / "ckpt.pth")
    config = write_config(tmp_path / "config.json", layer_norm_eps=1e-6)
    _, report = convert_checkpoint(path, config=config)
    assert report["unmapped_source_keys"]["visual.ln_pre.weight"].startswith("pre-LayerNorm")
    with pytest.raises(ConversionError, match=r"--strict: source tensors not converted .*visual\.ln_pre\.weight"):
        convert_checkpoint(path, config=config, strict=True)


def test_mgca_mlp_heads_fail_unless_new_projections(tmp_path, towers):
    state = {k: v for k, v in mgca(towers).items() if ".global_embed." not in k}
    for tower in ("img", "text"):  # MGCA's GlobalEmbedding: Linear, BatchNorm1d, ReLU, Linear, BatchNorm1d
        prefix = f"{tower}_encoder_q.global_embed.head."
        state.update({prefix + "0.weight": torch.randn(64, 32), prefix + "0.bias": torch.randn(64),
                      prefix + "1.weight": torch.ones(64), prefix + "1.running_mean": torch.zeros(64),
                      prefix + "3.weight": torch.randn(16, 64), prefix + "4.running_var": torch.ones(16)})  # fmt: skip
    path = write(state, tmp_path / "mgca.pt")
    config = write_config(tmp_path / "config.json")
    with pytest.raises(ConversionError, match=r"\['text_projection\.weight', 'visual_projection\.weight'\]") as error:
        convert_checkpoint(path, config=config)
    assert error.value.report["unmapped_source_keys"]["img_encoder_q.global_embed.head.0.weight"].startswith("MLP")
    model, report = convert_checkpoint(path, config=config, new_projections=True)
    assert report["mapping"]["visual_projection.weight"]["transform"] == "new: random projection (--new_projections)"
    with torch.no_grad():
        got = model.vision_model(PIXELS).last_hidden_state
    torch.testing.assert_close(got, towers.vit(pixel_values=PIXELS).last_hidden_state, rtol=0, atol=1e-6)


def test_config_contradicting_the_weights_is_an_error(tmp_path, towers):
    path = write(open_clip_trunk(towers), tmp_path / "ckpt.safetensors")
    config = write_config(tmp_path / "config.json", hidden_size=64, num_attention_heads=1)
    with pytest.raises(ConversionError, match="vision_config.hidden_size is 64 but the weights give 32"):
        convert_checkpoint(path, config=config)


@pytest.mark.parametrize("layout, eps", [(open_clip_native, 1e-5), (open_clip_trunk, 1e-6)])
def test_config_is_read_off_the_weights(towers, layout, eps):
    config, assumed = build_config(convert_open_clip(Mapped.of(layout(towers)), "ckpt"))
    vision, text = config.vision_config, config.text_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.intermediate_size) == (32, 2, 37)
    assert (vision.image_size, vision.patch_size, vision.num_channels, vision.layer_norm_eps) == (32, 8, 3, eps)
    assert (text.vocab_size, text.hidden_size, text.num_hidden_layers, text.intermediate_size) == (VOCAB, 32, 2, 37)
    assert (text.max_position_embeddings, text.type_vocab_size, config.projection_dim) == (512, 2, 16)
    assert vision.moe_layers == [1] and vision.num_experts == 23
    assert assumed["vision_config.num_attention_heads"] == 1 and assumed["vision_config.layer_norm_eps"] == eps


def test_pedclip_checkpoint_with_unknown_body_parts_asks_for_config(tmp_path):
    path = write(PedCLIPModel(tiny_config()).state_dict(), tmp_path / "model.safetensors")
    with pytest.raises(ConversionError, match=r"5 experts.*--config"):
        convert_checkpoint(path)
