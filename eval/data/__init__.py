"""Data-set adapters: local copies of the public pediatric benchmarks (and any folder/CSV) as `datasets.DatasetDict`
splits in the eval columns.

    from eval import data
    splits = data.load("pedi_cxr", root="/data/vindr-pcxr/1.0.0")      # train / validation / test
    names = data.label_names("pedi_cxr")                                # the official label names

| name | module | task columns | splits |
| --- | --- | --- | --- |
| pedi_cxr | `pedi_cxr` | `labels` (the 15 official diagnoses, "No finding" too) | official train/test + seeded val. |
| chd_cxr | `chd_cxr` | `labels` (class folders or labels.csv; no official layout found) | given, else seeded |
| grazpedwri_dx | `grazpedwri` | `labels` (YOLO classes), optional `mask` (rasterised boxes) | seeded, patient level |
| rsna_boneage | `rsna_boneage` | `target` (bone age, months), `sex` | official, missing ones seeded |
| generic | `generic` | image folder, or a CSV with columns chosen by options | given, else seeded |
| pexr_mini | `pexr_mini` | generated: `labels` = findings or ["normal"], `text`, `body_part` | the generator's |

Each module's docstring gives the layout it expects (with sources), its label names and its options. Every set
has `image` (a `datasets.Image`) and `body_part` (a PedCLIP vocabulary name); most have `image_id`. Missing files
raise FileNotFoundError and malformed ones ValueError, saying what was expected where.
"""

from __future__ import annotations

from typing import Callable

from . import chd_cxr, generic, grazpedwri, pedi_cxr, pexr_mini, rsna_boneage

_MODULES = {
    "pedi_cxr": pedi_cxr, "chd_cxr": chd_cxr, "grazpedwri_dx": grazpedwri, "rsna_boneage": rsna_boneage,
    "generic": generic, "pexr_mini": pexr_mini,
}  # fmt: skip
SETS: dict[str, Callable] = {name: module.load for name, module in _MODULES.items()}


def _module(name: str):
    if name not in _MODULES:
        raise KeyError(f"unknown data set {name!r}; known: {', '.join(_MODULES)}")
    return _MODULES[name]


def load(name: str, root: str | None = None, **options):
    """The data set `name` (a `SETS` key) read from `root` with `options` (see its module), as a DatasetDict."""
    return _module(name).load(root, **options)


def label_names(name: str, root: str | None = None, **options) -> list[str]:
    """The candidate labels of `name` (official names where published; from the data at `root` for chd_cxr and
    generic when given; empty for the regression set rsna_boneage). `options` as for `load` (e.g.
    include_no_finding=False for pedi_cxr, label_source for grazpedwri_dx)."""
    module = _module(name)
    if name in ("chd_cxr", "generic"):
        return module.label_names(root, **options)
    return module.label_names(**options)


__all__ = ["SETS", "label_names", "load"]
