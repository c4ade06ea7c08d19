"""Convert a PedCLIP-like checkpoint trained elsewhere (a raw PyTorch state dict) into a PedCLIP Hub folder.

    python convert_checkpoint.py CHECKPOINT --out FOLDER [--format auto|open_clip|mgca|pedclip]
        [--config CONFIG.json] [--tokenizer DIR] [--report report.json] [--strict] [--new_projections] [--seed 0]

Input: `.safetensors`, or `.pt`/`.pth`/`.bin`/`.ckpt` read with `torch.load(weights_only=True)` only (a pickle holding
anything but tensors and plain containers is refused). Containers are unwrapped (`{"state_dict": ...}`,
`{"model": ...}`, `{"module": ...}`, `{"model_state_dict": ...}`, other entries such as `epoch` or `optimizer` are
ignored); wrapper prefixes shared by every key (`module.` from DDP, `model.` from Lightning, `_orig_mod.` from
torch.compile) and FSDP/activation-checkpointing infixes (`_fsdp_wrapped_module.`, `_checkpoint_wrapped_module.`)
are stripped.

Layouts (`--format auto` tells them apart by their keys):
- `open_clip`: open_clip `CLIP`/`CustomTextCLIP` with a ViT image tower and an HF BERT text tower.
  * timm trunk (`TimmModel`): `visual.trunk.*` = timm `VisionTransformer` keys (`cls_token`, `pos_embed`,
    `patch_embed.proj`, `blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`) and
    `visual.head.proj.weight` `[embed, width]` (a linear `timm_proj`). LayerNorm eps 1e-6.
  * native `VisionTransformer`: `visual.conv1.weight` (no bias: the converted patch bias is zero),
    `visual.class_embedding` `[width]`, `visual.positional_embedding` `[grid*grid+1, width]`,
    `visual.transformer.resblocks.N.{ln_1, attn.in_proj_weight/bias (fused q,k,v), attn.out_proj, ln_2, mlp.c_fc,
    mlp.c_proj}`, `visual.ln_post` and `visual.proj` `[width, embed]` (used as `x @ proj`: transposed). LayerNorm
    eps 1e-5, GELU (OpenAI-trained towers use QuickGELU: set `"hidden_act": "quick_gelu"` with --config).
    `visual.ln_pre` has no PedCLIP counterpart (only `no_ln_pre` towers convert exactly).
  * text (`HFTextEncoder`): `text.transformer.*` = BERT keys (`embeddings.*`, `encoder.layer.N.*`; a `pooler.*`
    is not converted: PedCLIP embeds the [CLS] last hidden state, open_clip's `cls_last_hidden_state_pooler`) and
    `text.proj.weight` (a linear `hf_proj_type`; an `mlp` projection does not convert). `logit_scale` is copied.
- `mgca`: MGCA (`img_encoder_q.model.*` timm-layout ViT, LayerNorm eps 1e-6, `text_encoder_q.model.*` BERT).
  `img_encoder_q.global_embed.*` / `text_encoder_q.global_embed.*` convert when they are one bias-free Linear;
  MGCA's own heads are MLPs with BatchNorm, which PedCLIP's projections cannot hold: they are reported unmapped
  and the conversion fails unless `--new_projections` starts the projections random. MGCA's temperature is a
  hyperparameter: `logit_scale` is the config's `logit_scale_init_value`. Local heads, prototypes etc. are unmapped.
- `pedclip`: a `PedCLIPModel` state dict (e.g. saved from a DDP/FSDP run): identity mapping after prefix stripping.

A ViT + BERT checkpoint has no MoBE: every expert of a MoBE layer starts as a copy of that layer's MLP and the gate
starts random, as `PedCLIPModel.from_towers` does. Per-expert weights in any layout but pedclip's are out of scope.

Config: shapes are read off the weights (widths, layers, intermediate sizes, patch and image size from the position
embeddings, vocabulary, positions, projection size, and for pedclip MoBE layers and experts). What the weights do
not hold is assumed and listed in the report: attention heads `hidden_size // 64`, the LayerNorm eps of the layout,
GELU. A `--tokenizer` folder holding a BERT `config.json` (the text tower's folder) supplies the text fields, and
`--config` (a full or partial `PedCLIPConfig` JSON, e.g. `{"vision_config": {"moe_layers": [10, 11]}}`) overrides
anything; a value that contradicts the weights is an error.

Mapping report (`--report` JSON, and a summary on stdout): for each PedCLIP tensor its source keys and transform
(copy, split qkv, transpose, reshape, upcycled, zeros or new), the source tensors left unconverted (with why) and
the PedCLIP tensors no source gave. The conversion fails, naming them, if any PedCLIP tensor is missing, except the
allowed new ones (the gates of upcycled MoBE layers, MGCA's `logit_scale`, projections under `--new_projections`);
unconverted source tensors are a warning, or an error with `--strict`. Buffers that are not weights
(`embeddings.position_ids`, `embeddings.token_type_ids`) are ignored.
"""

import argparse
import json
import math
import pickle
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from configuration_pedclip import PedCLIPConfig
from modeling_pedclip import (
    BERT_SHAPE_FIELDS,
    TIMM_QKV,
    PedCLIPModel,
    convert_timm_vit_state_dict,
    load_exactly,
    read_state_dict_file,
    rename_keys,
    timm_vit_fields,
    upcycle_mlps,
)

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
CONTAINER_KEYS = ("state_dict", "model", "module", "model_state_dict")
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
WRAPPER_INFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
IGNORED = r"(^|\.)embeddings\.(position_ids|token_type_ids)$"
SECTIONS = ("vision_config", "text_config")
ASSUMED_FIELDS = ("num_attention_heads", "layer_norm_eps", "hidden_act")

# open_clip's native ViT names -> timm ViT names (then converted as a timm ViT).
NATIVE_VIT_RENAMES = (
    (r"^class_embedding$", "cls_token"),
    (r"^positional_embedding$", "pos_embed"),
    (r"^conv1\.weight$", "patch_embed.proj.weight"),
    (r"^transformer\.resblocks\.(\d+)\.ln_1\.", r"blocks.\1.norm1."),
    (r"^transformer\.resblocks\.(\d+)\.ln_2\.", r"blocks.\1.norm2."),
    (r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", r"blocks.\1.attn.qkv.\2"),
    (r"^transformer\.resblocks\.(\d+)\.attn\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_fc\.", r"blocks.\1.mlp.fc1."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_proj\.", r"blocks.\1.mlp.fc2."),
    (r"^ln_post\.", "norm."),
)  # fmt: skip
NATIVE_RESHAPES = {"cls_token": lambda t: t.reshape(1, 1, -1), "pos_embed": lambda t: t.unsqueeze(0)}
# BERT state dict keys (old TF-style LayerNorm gamma/beta renamed); a pooler matches nothing and stays unmapped.
BERT_RENAMES = (
    (r"^(.*LayerNorm)\.gamma$", r"\1.weight"),
    (r"^(.*LayerNorm)\.beta$", r"\1.bias"),
    (r"^((?:embeddings|encoder)\..+)$", r"\1"),
)  # fmt: skip
# Dense MLP name -> stacked expert name and the extra transforms of upcycling.
UPCYCLED = (
    ("fc1.weight", "fc1_weight", ()), ("fc1.bias", "fc1_bias", ()),
    ("fc2.weight", "fc2_weight", ("transpose",)), ("fc2.bias", "fc2_bias", ()),
)  # fmt: skip
PROJECTIONS = ("visual_projection.weight", "text_projection.weight")
OPEN_CLIP_TEXT_HEADS = {"text.proj.weight": ("text_projection.weight", "copy"), "logit_scale": ("logit_scale", "copy")}
TRANSFORMS = {"copy": lambda t: t, "transpose": lambda t: t.t()}
# Why a source tensor was left unconverted: the first matching pattern names the reason.
UNMAPPED_REASONS = (
    (r"expert", "per-expert weights in a foreign layout: only the pedclip layout's experts convert"),
    (r"ln_pre\.", "pre-LayerNorm: PedCLIP's vision tower has none, so the image features will differ"),
    (r"(fc_norm|attn_pool)\.", "pooling other than the CLS token: PedCLIP pools the CLS token"),
    (r"pooler\.", "BERT pooler: PedCLIP embeds the [CLS] last hidden state"),
    (r"^(visual\.head\.proj|text\.proj|\w+_encoder_q\.global_embed)\.bias$", "projection bias: PedCLIP's have none"),
    (r"^(visual\.head\.mlp|text\.proj\.\d|\w+_encoder_q\.global_embed)\.", "MLP projection head: PedCLIP's is one Linear"),
    (r"\.ls_?\d\.|\.gamma_\d", "layer scale: PedCLIP's layers have none"),
    (r"(^|\.)head\.(weight|bias)$", "classification head: not part of PedCLIP"),
)  # fmt: skip


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; `report` holds the mapping report built so far (or None)."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report


# ------------------------------------------------------------------------------------------------ reading the file
def load_checkpoint(path: Path) -> tuple[dict, dict]:
    """(flat state dict of tensors, notes on the containers unwrapped and the prefixes stripped)."""
    if path.suffix == ".safetensors":
        state, containers = read_state_dict_file(path), []
    elif path.suffix in TORCH_SUFFIXES:
        state, containers = unwrap(read_torch_file(path), path)
    else:
        raise ConversionError(f"{path}: unknown checkpoint type; expected .safetensors or {', '.join(TORCH_SUFFIXES)}")
    if not state:
        raise ConversionError(f"{path}: the checkpoint holds no tensors")
    state, stripped = strip_wrappers(state)
    return state, {"containers": containers, "stripped_prefixes": stripped}


def read_torch_file(path: Path):
    """`torch.load(weights_only=True)`; a pickle holding other objects is refused with a clear error."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"WeightsUnpickler error: (.*?)(?: Please|$)", str(error), re.MULTILINE)
        why = found.group(1) if found else str(error).strip().splitlines()[-1]
        raise ConversionError(
            f"{path}: refused by weights_only loading: it holds objects other than tensors and plain containers "
            f"({why}). Where you trust the file, re-save only its tensors, e.g. "
            "torch.save(checkpoint['state_dict'], 'weights.pt'), and convert that"
        ) from None


def unwrap(obj, path: Path) -> tuple[dict, list[str]]:
    """Descend through `CONTAINER_KEYS` until a dict of tensors; returns it and the keys descended."""
    containers = []
    while isinstance(obj, dict) and not all(isinstance(value, torch.Tensor) for value in obj.values()):
        key = next((key for key in CONTAINER_KEYS if isinstance(obj.get(key), dict)), None)
        if key is None:
            others = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))[:10]
            raise ConversionError(f"{path}: not a state dict of tensors (non-tensor entries {others}) and no "
                                  f"{'/'.join(CONTAINER_KEYS)} entry holding one")  # fmt: skip
        obj = obj[key]
        containers.append(key)
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return obj, containers


def strip_wrappers(state: dict) -> tuple[dict, list[str]]:
    """Drop FSDP/checkpoint-wrapper infixes anywhere, then wrapper prefixes that every key carries."""
    stripped = [infix for infix in WRAPPER_INFIXES if any(infix in key for key in state)]
    for infix in stripped:
        state = {key.replace(infix, ""): value for key, value in state.items()}
    while prefix := next((p for p in WRAPPER_PREFIXES if all(key.startswith(p) for key in state)), None):
        state = {key[len(prefix) :]: value for key, value in state.items()}
        stripped.append(prefix)
    return state, stripped


def detect_format(state: dict, source: str) -> str:
    """`pedclip`, `open_clip` or `mgca` from the keys."""
    keys = list(state)
    if "visual_projection.weight" in state or any(key.startswith("vision_model.") for key in keys):
        return "pedclip"
    if any(key.startswith("visual.") for key in keys):
        return "open_clip"
    if any(key.startswith(("img_encoder_q.", "text_encoder_q.")) for key in keys):
        return "mgca"
    raise ConversionError(f"{source}: cannot tell the checkpoint's layout from its keys ({keys[:8]}...); "
                          "pass --format open_clip|mgca|pedclip")  # fmt: skip


# ---------------------------------------------------------------------------------------------- tracked mappings
@dataclass
class Mapped:
    """Tensors under their converted names, each with the source keys it came from and the transforms applied."""

    tensors: dict = field(default_factory=dict)
    origins: dict = field(default_factory=dict)  # key -> (tuple of source keys, tuple of transform names)

    @classmethod
    def of(cls, state: dict) -> "Mapped":
        return cls(dict(state), {key: ((key,), ()) for key in state})

    def add(self, key: str, tensor: torch.Tensor, sources: tuple, transforms: tuple) -> None:
        self.tensors[key], self.origins[key] = tensor, (tuple(sources), tuple(transforms))

    def view(self, prefix: str) -> "Mapped":
        """The entries under `prefix`, with the prefix removed from their names (origins kept)."""
        keys = [key for key in self.tensors if key.startswith(prefix)]
        tensors = {key[len(prefix) :]: self.tensors[key] for key in keys}
        return Mapped(tensors, {key[len(prefix) :]: self.origins[key] for key in keys})

    def prefixed(self, prefix: str) -> "Mapped":
        tensors = {prefix + key: value for key, value in self.tensors.items()}
        return Mapped(tensors, {prefix + key: value for key, value in self.origins.items()})

    def update(self, other: "Mapped") -> None:
        self.tensors.update(other.tensors)
        self.origins.update(other.origins)


def remap(mapped: Mapped, convert, step_of) -> Mapped:
    """Apply the pure converter `convert` to each entry alone (`{key: tensor}` -> `{new key: tensor}`); entries it
    refuses (ValueError) or drops are left out, so they end up unmapped. `step_of(key)` names the transform."""
    out = Mapped()
    for key, tensor in mapped.tensors.items():
        try:
            converted = convert({key: tensor})
        except ValueError:
            continue
        sources, steps = mapped.origins[key]
        step = step_of(key)
        for new_key, new_tensor in converted.items():
            out.add(new_key, new_tensor, sources, steps + ((step,) if step != "copy" else ()))
    return out


def pick(mapped: Mapped, table: dict) -> Mapped:
    """The entries named in `table` (`key -> (new key, transform name in TRANSFORMS)`), converted."""

    def convert(one: dict) -> dict:
        ((key, tensor),) = one.items()
        if key not in table:
            raise ValueError(key)
        return {table[key][0]: TRANSFORMS[table[key][1]](tensor)}

    return remap(mapped, convert, lambda key: table[key][1])


def layer_indices(tensors: dict, pattern: str) -> list[int]:
    """Sorted distinct layer numbers: group 1 of `pattern` over the keys."""
    return sorted({int(m.group(1)) for key in tensors if (m := re.match(pattern, key))})


def layer_count(tensors: dict, pattern: str) -> int:
    """1 + the highest layer number (group 1 of `pattern`), so a layer with no tensors at all is reported missing."""
    return 1 + max(layer_indices(tensors, pattern), default=-1)


def default_assumptions(hidden_size: int, layer_norm_eps: float = 1e-12) -> dict:
    """What a tower's weights do not say: 64-dim attention heads, the LayerNorm eps, GELU."""
    return {"num_attention_heads": max(1, hidden_size // 64), "layer_norm_eps": layer_norm_eps, "hidden_act": "gelu"}


def split_fields(fields: dict) -> tuple[dict, dict]:
    """(fields read off the weights, fields assumed because the weights do not hold them)."""
    assumed = {name: fields[name] for name in ASSUMED_FIELDS if name in fields}
    return {name: value for name, value in fields.items() if name not in assumed}, assumed


# ------------------------------------------------------------------------------------------------------- towers
def timm_tower(view: Mapped, source: str, layer_norm_eps: float = 1e-6) -> tuple[Mapped, dict, dict]:
    """A timm-layout ViT -> (dense PedCLIP vision tower entries, measured fields, assumed fields)."""
    fields = {**timm_vit_fields(view.tensors, source), "layer_norm_eps": layer_norm_eps}
    step_of = lambda key: "split qkv" if re.match(TIMM_QKV, key) else "copy"  # noqa: E731
    mapped = remap(view, lambda one: convert_timm_vit_state_dict(one, source), step_of)
    return (mapped, *split_fields(fields))


def native_vit_tower(view: Mapped, source: str) -> tuple[Mapped, dict, dict]:
    """open_clip's own `VisionTransformer` (under `visual.`) -> timm layout -> PedCLIP vision tower entries."""
    if "class_embedding" not in view.tensors or "conv1.weight" not in view.tensors:
        raise ConversionError(f"{source}: the open_clip image tower is not a ViT (no visual.class_embedding / "
                              "visual.conv1.weight, nor visual.trunk.*); PedCLIP's image tower is a ViT")  # fmt: skip

    def to_timm(one: dict) -> dict:
        renamed = rename_keys(one, NATIVE_VIT_RENAMES, source)
        return {key: NATIVE_RESHAPES.get(key, TRANSFORMS["copy"])(tensor) for key, tensor in renamed.items()}

    step_of = lambda key: "reshape" if key in ("class_embedding", "positional_embedding") else "copy"  # noqa: E731
    timm = remap(view, to_timm, step_of)
    width = view.tensors["conv1.weight"].shape[0]
    timm.add("patch_embed.proj.bias", torch.zeros(width), (), ("zeros: open_clip's conv1 has no bias",))
    return timm_tower(timm, source, layer_norm_eps=1e-5)


def bert_tower(view: Mapped, source: str) -> tuple[Mapped, dict, dict]:
    """A BERT state dict -> (PedCLIP text tower entries, measured fields, assumed fields)."""
    tensors = view.tensors
    try:
        vocab, hidden = tensors["embeddings.word_embeddings.weight"].shape
        fields = {
            "vocab_size": vocab, "hidden_size": hidden,
            "num_hidden_layers": layer_count(tensors, r"^encoder\.layer\.(\d+)\."),
            "intermediate_size": tensors["encoder.layer.0.intermediate.dense.weight"].shape[0],
            "max_position_embeddings": tensors["embeddings.position_embeddings.weight"].shape[0],
            "type_vocab_size": tensors["embeddings.token_type_embeddings.weight"].shape[0],
        }  # fmt: skip
    except KeyError as missing:
        raise ConversionError(f"{source}: no BERT text tower (no {missing}); PedCLIP's text tower is BERT") from None
    weights = Mapped()
    for key in (key for key in tensors if not re.search(IGNORED, key)):
        weights.add(key, tensors[key], *view.origins[key])
    mapped = remap(weights, lambda one: rename_keys(one, BERT_RENAMES, source), lambda key: "copy")
    return mapped, fields, default_assumptions(hidden)


def pedclip_vision_fields(tensors: dict, source: str) -> tuple[dict, dict]:
    """(measured, assumed) vision config fields of a PedCLIP vision tower state dict."""
    try:
        hidden = tensors["embeddings.cls_token"].shape[-1]
        patch = tensors["embeddings.patch_embedding.weight"]
        positions = tensors["embeddings.position_embeddings"].shape[1] - 1
    except KeyError as missing:
        raise ConversionError(f"{source}: not a PedCLIP vision tower (no vision_model.{missing.args[0]})") from None
    grid = math.isqrt(positions)
    if grid * grid != positions:
        raise ConversionError(f"{source}: {positions} patch positions are not a square grid plus one CLS token")
    moe = layer_indices(tensors, r"^encoder\.layers\.(\d+)\.mlp\.fc1_weight$")
    experts = tensors[f"encoder.layers.{moe[0]}.mlp.fc1_weight"] if moe else None
    fc1 = experts[0] if moe else tensors.get("encoder.layers.0.mlp.fc1.weight")
    measured = {
        "hidden_size": hidden, "num_hidden_layers": layer_count(tensors, r"^encoder\.layers\.(\d+)\."),
        "image_size": grid * patch.shape[-1], "patch_size": patch.shape[-1], "num_channels": patch.shape[1],
        "qkv_bias": "encoder.layers.0.attention.q_proj.bias" in tensors, "moe_layers": moe,
        **({"num_experts": experts.shape[0]} if moe else {}),
        **({"intermediate_size": fc1.shape[0]} if fc1 is not None else {}),
    }  # fmt: skip
    return measured, default_assumptions(hidden)


# ------------------------------------------------------------------------------------------------------ layouts
@dataclass
class Parts:
    """A checkpoint split into PedCLIP's pieces: vision tower entries (tower names; dense MLPs when `upcycle`), BERT
    entries, top-level entries (projections, logit_scale), config fields measured on the weights and assumed, and
    the PedCLIP tensors that may start new (name -> why)."""

    vision: Mapped
    text: Mapped
    heads: Mapped
    measured: dict
    assumed: dict
    upcycle: bool = True
    new: dict = field(default_factory=dict)


def make_parts(vision: tuple, text: tuple, heads: Mapped, upcycle: bool = True) -> Parts:
    """`vision`/`text` are (entries, measured fields, assumed fields); the projection size is read off the heads."""
    projection = heads.tensors.get("visual_projection.weight", heads.tensors.get("text_projection.weight"))
    measured = {"vision_config": vision[1], "text_config": text[1]}
    if projection is not None:
        measured["projection_dim"] = projection.shape[0]
    assumed = {"vision_config": vision[2], "text_config": text[2]}
    return Parts(vision[0], text[0], heads, measured, assumed, upcycle)


def convert_open_clip(root: Mapped, source: str) -> Parts:
    """open_clip: timm-trunk or native ViT under `visual.`, HF BERT under `text.transformer.`, `text.proj`."""
    visual = root.view("visual.")
    if any(key.startswith("trunk.") for key in visual.tensors):
        vision = timm_tower(visual.view("trunk."), f"{source} visual.trunk")
        heads = pick(visual, {"head.proj.weight": ("visual_projection.weight", "copy")})
    else:
        vision = native_vit_tower(visual, f"{source} visual")
        heads = pick(visual, {"proj": ("visual_projection.weight", "transpose")})
    text = bert_tower(root.view("text.transformer."), f"{source} text.transformer")
    heads.update(pick(root, OPEN_CLIP_TEXT_HEADS))
    return make_parts(vision, text, heads)


def single_linear(head: Mapped, target: str) -> Mapped:
    """A projection head that is one Linear -> its weight as `target` (a bias stays unmapped); an MLP -> nothing."""
    weights = [key for key, tensor in head.tensors.items() if tensor.ndim == 2]
    if len(weights) != 1 or any(key != weights[0] and not key.endswith("bias") for key in head.tensors):
        return Mapped()
    return pick(head, {weights[0]: (target, "copy")})


def convert_mgca(root: Mapped, source: str) -> Parts:
    """MGCA: timm-layout ViT `img_encoder_q.model.`, BERT `text_encoder_q.model.`, `*.global_embed` heads."""
    vision = timm_tower(root.view("img_encoder_q.model."), f"{source} img_encoder_q.model")
    text = bert_tower(root.view("text_encoder_q.model."), f"{source} text_encoder_q.model")
    heads = single_linear(root.view("img_encoder_q.global_embed."), "visual_projection.weight")
    heads.update(single_linear(root.view("text_encoder_q.global_embed."), "text_projection.weight"))
    parts = make_parts(vision, text, heads)
    parts.new["logit_scale"] = "new: the config's logit_scale_init_value (MGCA's temperature is a fixed hyperparameter)"
    return parts


def convert_pedclip(root: Mapped, source: str) -> Parts:
    """A PedCLIPModel state dict: every tensor keeps its name."""
    vision = root.view("vision_model.")
    measured, assumed = pedclip_vision_fields(vision.tensors, source)
    text = bert_tower(root.view("text_model."), f"{source} text_model")
    heads = pick(root, {name: (name, "copy") for name in (*PROJECTIONS, "logit_scale")})
    return make_parts((vision, measured, assumed), text, heads, upcycle=False)


CONVERTERS = {"open_clip": convert_open_clip, "mgca": convert_mgca, "pedclip": convert_pedclip}


# ------------------------------------------------------------------------------------------------------- config
def overlay(*layers: dict) -> dict:
    """Merge config dicts, later ones winning; `vision_config`/`text_config` are merged field by field."""
    merged = {}
    for layer in layers:
        for key, value in layer.items():
            merged[key] = {**merged.get(key, {}), **value} if key in SECTIONS else value
    return merged


def flatten(fields: dict) -> dict:
    """`{"vision_config": {"hidden_size": 8}, "projection_dim": 4}` -> `{"vision_config.hidden_size": 8, ...}`."""
    flat = {}
    for key, value in fields.items():
        flat.update({f"{key}.{name}": v for name, v in value.items()} if key in SECTIONS else {key: value})
    return flat


def read_config_json(path: str | Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ConversionError(f"--config {path}: cannot read it as JSON ({error})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"--config {path}: expected a JSON object of PedCLIPConfig fields")
    return data


def text_tower_fields(folder: str | Path) -> dict:
    """The BERT config fields of a text tower folder (its `config.json`), or {} when it holds no BERT config."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return {name: data[name] for name in BERT_SHAPE_FIELDS if name in data} if data.get("model_type") == "bert" else {}


def build_config(parts: Parts, config_path=None, tokenizer=None) -> tuple[PedCLIPConfig, dict]:
    """The config: assumed fields < fields measured on the weights < the text tower folder's BERT config <
    `--config`; a measured field that ends up different is an error. Returns it and the assumptions it kept."""
    user = read_config_json(config_path) if config_path else {}
    tower = {"text_config": text_tower_fields(tokenizer)} if tokenizer else {}
    try:
        config = PedCLIPConfig.from_dict(overlay(parts.assumed, parts.measured, tower, user))
    except (ValueError, TypeError) as error:
        raise ConversionError(f"the config for this checkpoint is invalid: {error}; set fields with --config") from None
    wrong = [
        f"{key} is {actual!r} but the weights give {value!r}"
        for key, value in flatten(parts.measured).items()
        if (actual := get_field(config, key)) != value
    ]
    if wrong:
        raise ConversionError(f"the config (--config / --tokenizer folder) contradicts the weights: {'; '.join(wrong)}")
    overridden = flatten(overlay(tower, user))
    return config, {key: value for key, value in flatten(parts.assumed).items() if key not in overridden}


def get_field(config: PedCLIPConfig, dotted: str):
    for name in dotted.split("."):
        config = getattr(config, name)
    return config


# ------------------------------------------------------------------------------------------------ assembly, report
def upcycle(vision: Mapped, moe_layers: list[int], num_experts: int) -> Mapped:
    """The dense MLP of each MoBE layer -> `num_experts` stacked copies (`upcycle_mlps`), origins carried along.
    A layer whose dense MLP is incomplete is left as it is (its expert tensors are then reported missing)."""
    out = Mapped(dict(vision.tensors), dict(vision.origins))
    for layer in moe_layers:
        prefix = f"encoder.layers.{layer}.mlp."
        if not all(prefix + dense in out.tensors for dense, _, _ in UPCYCLED):
            continue
        dense_mlp = {prefix + dense: out.tensors.pop(prefix + dense) for dense, _, _ in UPCYCLED}
        stacked = upcycle_mlps(dense_mlp, [layer], num_experts)
        for dense, name, steps in UPCYCLED:
            sources, before = out.origins.pop(prefix + dense)
            steps = before + steps + (f"upcycled to {num_experts} experts",)
            out.add(prefix + name, stacked[prefix + name], sources, steps)
    return out


def assemble(parts: Parts, config: PedCLIPConfig) -> Mapped:
    """All converted entries under PedCLIPModel names (MoBE layers upcycled for a ViT + BERT checkpoint)."""
    vision = parts.vision
    if parts.upcycle:
        vision = upcycle(vision, config.vision_config.moe_layers, config.vision_config.num_experts)
    mapped = Mapped()
    for prefix, part in (("vision_model.", vision), ("text_model.", parts.text), ("", parts.heads)):
        mapped.update(part.prefixed(prefix))
    return mapped


def allowed_new(parts: Parts, config: PedCLIPConfig, new_projections: bool) -> dict:
    """PedCLIP tensors that may start new when the checkpoint has none, and why."""
    new = dict(parts.new)
    if parts.upcycle:
        gate = "new: random gate of an upcycled MoBE layer (as from_towers)"
        new.update({f"vision_model.encoder.layers.{i}.mlp.gate.weight": gate for i in config.vision_config.moe_layers})
    if new_projections:
        new.update({name: "new: random projection (--new_projections)" for name in PROJECTIONS})
    return new


def unmapped_reason(key: str) -> str:
    return next((reason for pattern, reason in UNMAPPED_REASONS if re.search(pattern, key)), "no PedCLIP counterpart")


def make_report(source: str, fmt: str, state: dict, mapped: Mapped, target: dict, new: dict) -> dict:
    """The mapping report: PedCLIP tensor -> sources and transform; unmapped sources; missing and mis-shaped targets."""
    used = sorted(key for key in mapped.tensors if key in target)
    mapping = {key: {"sources": list(mapped.origins[key][0]), "transform": ", ".join(mapped.origins[key][1]) or "copy"}
               for key in used}  # fmt: skip
    new = {key: why for key, why in new.items() if key in target and key not in mapping}
    mapping.update({key: {"sources": [], "transform": why} for key, why in new.items()})
    consumed = {source_key for key in used for source_key in mapped.origins[key][0]}
    stray = {s: f"converted to {key}, which PedCLIPModel does not have" for key in mapped.tensors if key not in target
             for s in mapped.origins[key][0]}  # fmt: skip
    return {
        "checkpoint": source,
        "format": fmt,
        "source_dtypes": sorted({str(tensor.dtype).removeprefix("torch.") for tensor in state.values()}),
        "mapping": mapping,
        "unmapped_source_keys": {key: stray.get(key) or unmapped_reason(key) for key in state
                                 if key not in consumed and not re.search(IGNORED, key)},  # fmt: skip
        "ignored_source_keys": [key for key in state if re.search(IGNORED, key)],
        "missing_target_keys": sorted(set(target) - set(mapping)),
        "shape_mismatches": {key: f"{list(mapped.tensors[key].shape)} from {list(mapped.origins[key][0])}, "
                                  f"PedCLIP expects {list(target[key])}"
                             for key in used if tuple(mapped.tensors[key].shape) != target[key]},  # fmt: skip
    }


def check_report(report: dict, strict: bool) -> None:
    """Raise a `ConversionError` naming missing or mis-shaped PedCLIP tensors (and, with `strict`, unmapped sources)."""
    problems, unmapped = [], report["unmapped_source_keys"]
    if report["missing_target_keys"]:
        problems.append(f"no weights for the PedCLIP tensors {report['missing_target_keys']}")
    if report["shape_mismatches"]:
        problems.append(f"shape mismatches {report['shape_mismatches']}")
    if strict and unmapped:
        problems.append(f"--strict: source tensors not converted {unmapped}")
    elif problems and unmapped:
        problems.append(f"source tensors left unconverted: {dict(list(unmapped.items())[:12])}")
    if problems:
        raise ConversionError(f"{report['checkpoint']} ({report['format']}): {'; '.join(problems)}", report)


def convert_checkpoint(checkpoint, fmt="auto", config=None, tokenizer=None, strict=False, new_projections=False,
                       seed=0) -> tuple[PedCLIPModel, dict]:  # fmt: skip
    """Read `checkpoint`, convert it into a `PedCLIPModel` (in eval mode) and return it with the mapping report.
    `config`: a PedCLIPConfig JSON path (full or partial); `tokenizer`: a folder whose BERT config.json, if any,
    gives the text config; `seed` seeds whatever starts new (gates). Errors are `ConversionError`s/`ValueError`s."""
    path = Path(checkpoint)
    state, notes = load_checkpoint(path)
    fmt = detect_format(state, str(path)) if fmt == "auto" else fmt
    parts = CONVERTERS[fmt](Mapped.of(state), str(path))
    model_config, assumed = build_config(parts, config, tokenizer)
    torch.manual_seed(seed)
    model = PedCLIPModel(model_config).eval()
    target = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    mapped = assemble(parts, model_config)
    report = make_report(str(path), fmt, state, mapped, target, allowed_new(parts, model_config, new_projections))
    report.update(notes, assumed_config=assumed)
    check_report(report, strict)
    weights = {key: mapped.tensors[key] for key in report["mapping"] if key in mapped.tensors}
    load_exactly(model, weights, str(path), allowed_missing=set(report["mapping"]) - set(weights))
    return model, report


# ---------------------------------------------------------------------------------------------------------- CLI
def build_processor(config: PedCLIPConfig, tokenizer_source: str):
    """`PedCLIPProcessor` for `config` with the tokenizer of `tokenizer_source`."""
    from transformers import AutoTokenizer

    from processing_pedclip import PedCLIPProcessor

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    if len(tokenizer) > config.text_config.vocab_size:
        raise ConversionError(f"--tokenizer {tokenizer_source}: {len(tokenizer)} tokens, but the text tower has only "
                              f"{config.text_config.vocab_size} token embeddings")  # fmt: skip
    return PedCLIPProcessor.for_config(config, tokenizer)


def summarize(report: dict) -> str:
    """A readable summary of a mapping report."""
    wrappers = report.get("containers", []) + report.get("stripped_prefixes", [])
    lines = [f"{report['checkpoint']}: {report['format']} layout" + (f" (unwrapped {wrappers})" if wrappers else "")]
    counts = Counter(entry["transform"] for entry in report["mapping"].values())
    lines.append(f"{len(report['mapping'])} PedCLIP tensors: " + "; ".join(f"{n} {t}" for t, n in counts.most_common()))
    if set(report["source_dtypes"]) - {"float32"}:
        lines.append(f"source dtypes {report['source_dtypes']}: saved as float32")
    if report.get("assumed_config"):
        assumed = ", ".join(f"{key}={value!r}" for key, value in report["assumed_config"].items())
        lines.append(f"assumed, not in the weights (set them with --config): {assumed}")
    if report["unmapped_source_keys"]:
        lines.append(f"WARNING: {len(report['unmapped_source_keys'])} source tensors are not in the converted model "
                     "(if the source used them, its features differ):")  # fmt: skip
        lines += [f"  {key}: {reason}" for key, reason in report["unmapped_source_keys"].items()]
    if report["missing_target_keys"]:
        lines.append(f"MISSING: {report['missing_target_keys']}")
    return "\n".join(lines)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Convert a checkpoint trained elsewhere into a PedCLIP Hub folder.")
    parser.add_argument("checkpoint", help=".safetensors, or .pt/.pth/.bin/.ckpt (read with weights_only=True)")
    parser.add_argument("--out", required=True, help="output folder (save_pretrained of the model and processor)")
    parser.add_argument("--format", default="auto", choices=("auto", *CONVERTERS))
    parser.add_argument("--config", help="PedCLIPConfig JSON (full or partial) for what the weights do not say")
    parser.add_argument("--tokenizer", help="tokenizer folder or id (a text tower folder's config.json is read too)")
    parser.add_argument("--report", help="write the mapping report as JSON here")
    parser.add_argument("--strict", action="store_true", help="fail if any source tensor is not converted")
    parser.add_argument("--new_projections", action="store_true", help="start unconvertible projections random")
    parser.add_argument("--seed", type=int, default=0, help="seed for the tensors that start new (gates)")
    return parser


def write_report(report: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        model, report = convert_checkpoint(
            args.checkpoint, args.format, args.config, args.tokenizer, args.strict, args.new_projections, args.seed
        )
        processor = build_processor(model.config, args.tokenizer) if args.tokenizer else None
    except (ValueError, OSError) as error:  # ConversionError, bad shapes, unreadable files: one message, no traceback
        if args.report and getattr(error, "report", None):
            write_report(error.report, args.report)
        raise SystemExit(f"conversion failed: {error}") from None
    model.save_pretrained(args.out)
    if processor is not None:
        processor.save_pretrained(args.out)
    report["output"] = str(args.out)
    if args.report:
        write_report(report, args.report)
    print(summarize(report))
    print(f"saved to {args.out}" + ("" if processor else " (model only: pass --tokenizer to add the processor)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
