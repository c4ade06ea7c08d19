"""`PedCLIPModel.from_towers`: upcycled experts reproduce the source ViT and BERT exactly."""

import pytest
import torch
from pedclip_testing import minilm_path, timm_state_dict_from_vit
from safetensors.torch import save_file
from transformers import BertConfig, BertModel, ViTConfig, ViTModel

from modeling_pedclip import PedCLIPModel, convert_timm_vit_state_dict, upcycle_mlps

BODY_PARTS = ["chest", "hand", "knee", "hip", "foot"]
MOE = dict(moe_layers=[0, 1], num_experts=5, body_parts=BODY_PARTS, router_top_k=2)


def tiny_vit(layer_norm_eps=1e-12) -> ViTModel:
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=8, layer_norm_eps=layer_norm_eps,
    )  # fmt: skip
    return ViTModel(config, add_pooling_layer=False).eval()


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert")
    torch.manual_seed(1)
    config = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vit")
    tiny_vit().save_pretrained(folder)
    return folder


def assert_vision_matches(model: PedCLIPModel, vit: ViTModel):
    pixels = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 4, 4, 1, 0, 2])
    expected = vit(pixel_values=pixels).last_hidden_state
    model.eval()
    for mode in ("soft", "label", "topk"):
        got = model.vision_model(pixels, body_part_labels=labels, router_mode=mode).last_hidden_state
        assert (got - expected).abs().max() <= 1e-5, mode


def test_vision_from_transformers_folder_matches_vit(vit_folder, bert_folder):
    model = PedCLIPModel.from_towers(vision=vit_folder, text=bert_folder, **MOE)
    assert model.config.vision_config.num_attention_heads == 2
    assert_vision_matches(model, ViTModel.from_pretrained(vit_folder, add_pooling_layer=False).eval())


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_vision_from_timm_state_dict_matches_vit(tmp_path, bert_folder, suffix):
    vit = tiny_vit(layer_norm_eps=1e-6)
    state = timm_state_dict_from_vit(vit)
    path = tmp_path / f"vit{suffix}"
    save_file(state, path) if suffix == ".safetensors" else torch.save({"model": state}, path)
    model = PedCLIPModel.from_towers(vision=path, text=bert_folder, **MOE)
    vision = model.config.vision_config
    assert (vision.hidden_size, vision.num_attention_heads, vision.intermediate_size) == (128, 2, 64)
    assert (vision.image_size, vision.patch_size, vision.layer_norm_eps) == (32, 8, 1e-6)
    assert_vision_matches(model, vit)


def test_text_tower_matches_bert(vit_folder, bert_folder):
    model = PedCLIPModel.from_towers(vision=vit_folder, text=bert_folder, **MOE).eval()
    assert_text_matches(model, BertModel.from_pretrained(bert_folder).eval(), vocab_size=99)


def test_text_tower_matches_real_minilm(vit_folder):
    model = PedCLIPModel.from_towers(vision=vit_folder, text=minilm_path(), **MOE).eval()
    assert model.config.text_config.hidden_size == 384 and model.config.text_config.num_hidden_layers == 6
    assert_text_matches(model, BertModel.from_pretrained(minilm_path()).eval(), vocab_size=30522)


def assert_text_matches(model: PedCLIPModel, bert: BertModel, vocab_size: int):
    ids = torch.randint(1000 % vocab_size, vocab_size, (3, 11), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    expected = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    got = model.text_model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (got - expected).abs().max() <= 1e-5


def test_upcycling_is_pure_and_copies_the_mlp():
    state = {
        "encoder.layers.0.mlp.fc1.weight": torch.randn(6, 4), "encoder.layers.0.mlp.fc1.bias": torch.randn(6),
        "encoder.layers.0.mlp.fc2.weight": torch.randn(4, 6), "encoder.layers.0.mlp.fc2.bias": torch.randn(4),
    }  # fmt: skip
    before = {k: v.clone() for k, v in state.items()}
    up = upcycle_mlps(state, [0], 3)
    assert all(torch.equal(state[k], before[k]) for k in state)
    assert up["encoder.layers.0.mlp.fc1_weight"].shape == (3, 6, 4)
    assert up["encoder.layers.0.mlp.fc2_weight"].shape == (3, 6, 4)
    for e in range(3):
        assert torch.equal(up["encoder.layers.0.mlp.fc1_weight"][e], state["encoder.layers.0.mlp.fc1.weight"])
        assert torch.equal(up["encoder.layers.0.mlp.fc2_weight"][e], state["encoder.layers.0.mlp.fc2.weight"].t())
        assert torch.equal(up["encoder.layers.0.mlp.fc2_bias"][e], state["encoder.layers.0.mlp.fc2.bias"])


def test_unknown_timm_keys_are_named():
    state = timm_state_dict_from_vit(tiny_vit())
    state["dist_token"] = torch.zeros(1, 1, 128)
    with pytest.raises(ValueError, match="dist_token"):
        convert_timm_vit_state_dict(state, "deit_distilled.pth")


def test_missing_tower_weights_are_named(tmp_path, bert_folder):
    state = timm_state_dict_from_vit(tiny_vit())
    del state["blocks.1.norm2.weight"]
    save_file(state, tmp_path / "vit.safetensors")
    with pytest.raises(ValueError, match=r"missing \['encoder.layers.1.layernorm_after.weight'\]"):
        PedCLIPModel.from_towers(vision=tmp_path / "vit.safetensors", text=bert_folder, **MOE)


def test_unknown_override_is_an_error(vit_folder, bert_folder):
    with pytest.raises(TypeError, match="moe_layerz"):
        PedCLIPModel.from_towers(vision=vit_folder, text=bert_folder, moe_layerz=[0])


def test_random_vision_tower_with_pretrained_text(bert_folder):
    model = PedCLIPModel.from_towers(vision=None, text=bert_folder, vision_config={"hidden_size": 48, "num_hidden_layers": 2,
                                     "num_attention_heads": 2, "intermediate_size": 24, "image_size": 16, "patch_size": 8},
                                     **MOE)  # fmt: skip
    assert model.config.vision_config.hidden_size == 48 and model.config.vision_config.moe_layers == [0, 1]
    assert_text_matches(model.eval(), BertModel.from_pretrained(bert_folder).eval(), vocab_size=99)
