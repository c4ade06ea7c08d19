"""Reading X-ray image files for PedCLIP: PNG/JPEG/BMP (8-bit), 16-bit PNG/TIFF and DICOM, as PIL images.

One implementation for the `pedclip` CLI and the evaluation data sets (`eval.data.common` imports it).

- `load_image(path)`: 8-bit files as the transformers zero-shot pipeline reads them (EXIF orientation applied;
  grayscale kept as mode "L", which the PedCLIP image processor reads exactly as its RGB copy; every other 8-bit
  mode converted to RGB as the pipeline does), 16- and 32-bit gray files (modes "I;16", "I", "F") kept at full
  precision (the PedCLIP image processor windows any bit depth to [0, 1]), DICOM files through
  `pexr.dicom.read_dicom` (modality LUT, VOI window, MONOCHROME1 inverted: bone bright) as 16-bit images.
- DICOM files are recognised by a .dcm/.dicom suffix, or, for any other name that is not an image suffix (e.g.
  UID file names), by the "DICM" magic at byte 128 (`is_dicom`).
- `find_images(paths)`: the files named, and every image or DICOM file under the folders named (recursive).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

DICOM_SUFFIXES = (".dcm", ".dicom")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# PIL modes kept as they are: 8-bit gray and high-bit-depth gray (everything else becomes RGB, as in the pipeline).
KEPT_MODES = ("L", "I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def is_dicom(path: Path) -> bool:
    """A DICOM file by its .dcm/.dicom suffix, or, unless it has an image suffix, by the "DICM" magic at byte 128."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return False
    with open(path, "rb") as handle:
        return handle.read(132)[128:132] == b"DICM"


def is_image_file(path: Path) -> bool:
    """An image (`IMAGE_SUFFIXES`) or DICOM file (see `is_dicom`)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES or is_dicom(path)


def find_images(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Each path that is not a folder, as given (read errors come later, per file), then, for each folder, its image
    and DICOM files (`is_image_file`; hidden files and folders skipped), recursively, in sorted order. A file
    unreadable while checking for DICOM magic is kept, so that reading it reports the error."""
    found = []
    for path in map(Path, paths):
        if not path.is_dir():
            found.append(path)
            continue
        for folder, subfolders, names in os.walk(path):
            subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
            for name in sorted(name for name in names if not name.startswith(".")):
                found.extend(_if_image(Path(folder) / name))
    return found


def _if_image(path: Path) -> list[Path]:
    try:
        return [path] if is_image_file(path) else []
    except OSError:
        return [path]


def dicom_image(path: str | os.PathLike, mode: str = "L", max_side: int | None = 512):
    """A DICOM radiograph as a PIL image: `pexr.dicom.read_dicom`'s [0, 1] bone-bright float image, resized (PIL
    bicubic on the float image) so that its longer side is at most `max_side` (None: full size), quantised to 16 bits
    ("I;16") or 8 bits ("L")."""
    from PIL import Image

    from pexr.dicom import read_dicom

    if mode not in ("I;16", "L"):
        raise ValueError(f"dicom_mode={mode!r}: expected 'I;16' (16-bit) or 'L' (8-bit)")
    pixels = np.asarray(read_dicom(path).image, dtype=np.float32)
    image = Image.fromarray(pixels, mode="F")
    if max_side and max(image.size) > max_side:
        scale = max_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
    array = np.clip(np.asarray(image), 0.0, 1.0)
    if mode == "L":
        return Image.fromarray((array * 255.0 + 0.5).astype(np.uint8), mode="L")
    return Image.fromarray((array * 65535.0 + 0.5).astype(np.uint16))


def load_image(path: str | os.PathLike, dicom_mode: str = "I;16", max_side: int | None = None):
    """One image file as a decoded PIL image (see the module docstring); DICOM files as `dicom_image(path,
    dicom_mode, max_side)`. Raises what the reader raises for an unreadable file (`OSError` for a truncated or
    unknown image, `pexr.dicom.DicomError` (a `ValueError`) for a refused DICOM, `FileNotFoundError`)."""
    from PIL import Image, ImageOps

    if is_dicom(Path(path)):
        return dicom_image(path, dicom_mode, max_side)
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)  # a decoded copy (the file is closed on return)
    return image if image.mode in KEPT_MODES else image.convert("RGB")
