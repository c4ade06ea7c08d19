"""Shared test helpers: small DICOM files written with pydicom (for the tests of pexr.dicom and pexr.build)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def ramp(rows=12, columns=10, low=0, high=4095, dtype=np.uint16) -> np.ndarray:
    """A `[rows, columns]` image rising linearly from `low` to `high` (never blank)."""
    return np.linspace(low, high, rows * columns).round().astype(dtype).reshape(rows, columns)


def write_dicom(path: Path, pixels: np.ndarray, photometric="MONOCHROME2", bits_stored=None, raw=None, **elements):
    """A minimal valid CR file (Explicit VR Little Endian, new UIDs) at `path`, parent folders created; `elements`
    set header fields (None deletes one), `raw` replaces the pixel bytes. Returns `path`."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CR_IMAGE_STORAGE, generate_uid(), "CR"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.set_pixel_data(pixels, photometric, bits_stored or pixels.dtype.itemsize * 8)
    if raw is not None:
        ds.PixelData = raw
    for name, value in elements.items():
        if value is None:
            delattr(ds, name)
        else:
            setattr(ds, name, value)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path
