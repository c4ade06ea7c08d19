"""Curation throughput on one core: DICOM -> stored 16-bit PNG through `pexr build`'s image path, against plain
pydicom + Pillow on the same files (decode, 16-bit image, same resize, PNG), measured in one run.

    python benchmarks/curate.py                 # pydicom-data's real CR films (chest RG1, leg RG3), plain and JPEG 2000
    python benchmarks/curate.py --max_side 1024 --repeats 7

PeXR's path (`pexr.build.load_image` then `png16`) adds to the peer the modality LUT, the VOI window, MONOCHROME1
inversion, float conversion, body-part and age reading. Both run in this process (one core): images/s per core.
A build runs one such process per core (`pexr build --num_workers`).
"""

import argparse
import io
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core, whatever the libraries would use

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pexr.build import BuildOptions, load_image, png16  # noqa: E402
from pexr.sources import ImageRef  # noqa: E402

from timing import paired_ratio  # noqa: E402

FILES = ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG3_UNCR.dcm", "RG3_J2KR.dcm")


def pexr_png(path: str, options: BuildOptions) -> bytes:
    pixels, _, _ = load_image(ImageRef(path, path, path), options)
    return png16(pixels)


def plain_png(path: str, max_side: int) -> bytes:
    """The peer: pydicom's decoded array as a 16-bit Pillow image, resized alike and saved as PNG."""
    pixels = pydicom.dcmread(path).pixel_array.astype(np.uint16)
    image = Image.fromarray(pixels)
    scale = min(1.0, max_side / max(image.size))
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.convert("I").resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0).convert("I;16")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_side", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5, help="timed passes over the files, alternating order")
    args = parser.parse_args(argv)
    paths = [get_testdata_file(name, download=False) for name in FILES]
    if any(path is None for path in paths):
        raise SystemExit(f"pydicom-data's films {FILES} are needed: pip install pydicom-data")
    options = BuildOptions(max_side=args.max_side, max_age_years=None)
    ours = lambda: [pexr_png(path, options) for path in paths]  # noqa: E731
    peer = lambda: [plain_png(path, args.max_side) for path in paths]  # noqa: E731
    seconds, peer_seconds, ratio = paired_ratio(ours, peer, torch.device("cpu"), args.repeats)
    print(f"{len(paths)} CR films ({', '.join(FILES)}), longest side -> {args.max_side} px, one core")
    print(f"pexr DICOM -> PNG:            {len(paths) / seconds:6.2f} images/s per core")
    print(f"pydicom + Pillow -> PNG:      {len(paths) / peer_seconds:6.2f} images/s per core")
    print(f"time ratio pexr / plain:      {ratio:6.2f}")


if __name__ == "__main__":
    main()
