"""PeXR-mini (`pexr.synthetic.generate_pexr_mini`, no files needed) in the eval columns.

Every generated column is kept (`image`, `text` = the image's body-part report text, `body_part`, `findings`,
`report`, `history`, `study_id`, `patient_id`, `age_years`) and `labels` is added: the image's findings, or
["normal"] when it has none. `label_names` = every finding PeXR-mini draws (sorted; "normal" is not a candidate).
Splits: the generator's patient-level train/validation/test. Options (the generator's): `num_patients` (600),
`seed` (42), `image_size` (128), `split_fractions` ((0.8, 0.1, 0.1)); the defaults are the set the CPU demo
(`train_accelerate.py` with no arguments: 600 patients, `--seed` 42) trains and tests on. `root` is ignored.
"""

from __future__ import annotations

NAME = "pexr_mini"


def label_names(**_) -> list[str]:
    from pexr.synthetic import FINDINGS_BY_BODY_PART

    return sorted({finding for findings in FINDINGS_BY_BODY_PART.values() for finding in findings})


def _labels(findings: list) -> dict:
    return {"labels": list(findings) or ["normal"]}


def load(root=None, num_patients: int = 600, seed: int = 42, image_size: int = 128, split_fractions=(0.8, 0.1, 0.1)):
    from datasets import DatasetDict

    from pexr.synthetic import generate_pexr_mini

    data = generate_pexr_mini(num_patients=num_patients, seed=seed, image_size=image_size,
                              split_fractions=split_fractions)  # fmt: skip
    return DatasetDict({name: split.map(_labels, input_columns="findings") for name, split in data.items()})
