"""Tests for pexr.dicom: real CR films from pydicom-data, pydicom's own test files, and DICOMs written here."""

from __future__ import annotations

import pickle
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.uid import MPEG2MPML, HTJ2KLossless, JPEGLosslessSV1, JPEGLSLossless

import pexr.dicom as dicom
from configuration_pedclip import DEFAULT_BODY_PARTS, DICOM_BODY_PART_TERMS
from dicom_testing import ramp, write_dicom
from pexr.dicom import (
    DICOM_ERROR_REASONS,
    DicomError,
    age_from_dates,
    body_part_candidates,
    is_pediatric,
    map_body_part,
    parse_patient_age,
    pseudonym,
    read_dicom,
)


def data_file(name: str) -> str:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not installed (pip install pydicom-data)")
    return path


def assert_refused(path, code: str, message: str, **kwargs) -> DicomError:
    """`read_dicom(path)` raises a `DicomError` with reason `code` and a message "<path>: ..." matching `message`."""
    with pytest.raises(DicomError, match=re.escape(str(path)) + ": .*" + message) as info:
        read_dicom(path, **kwargs)
    assert info.value.reason == code and code in DICOM_ERROR_REASONS
    return info.value


def write_compressed(path: Path, syntax, frame: bytes) -> Path:
    """A CR file whose pixel data is one encapsulated `frame` in transfer syntax `syntax`."""
    ds = pydicom.dcmread(write_dicom(path, ramp(), bits_stored=12, BodyPartExamined="HAND"))
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([frame])
    ds.save_as(path, enforce_file_format=True)
    return path


def linear_window(values, center, width):
    """DICOM PS3.3 C.11.2.1.2.1 (LINEAR) window, scaled to [0, 1]."""
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def region(image, y0, y1, x0, x1) -> float:
    rows, columns = image.shape
    return float(image[int(y0 * rows) : int(y1 * rows), int(x0 * columns) : int(x1 * columns)].mean())


# ------------------------------------------------------------------------------------- real films (pydicom-data)


@pytest.fixture(scope="module")
def chest():
    return {name: read_dicom(data_file(f"RG1_{name}.dcm"), salt="s") for name in ("UNCR", "J2KR")}


@pytest.fixture(scope="module")
def leg():
    return {name: read_dicom(data_file(f"RG3_{name}.dcm")) for name in ("UNCR", "J2KR")}


def test_chest_cr_jpeg2000_lossless_matches_uncompressed(chest):
    plain, j2k = chest["UNCR"], chest["J2KR"]
    np.testing.assert_array_equal(plain.image, j2k.image)
    assert j2k.transfer_syntax == "JPEG 2000 Image Compression (Lossless Only)"
    assert (plain.photometric, plain.bits_stored, plain.voi, plain.modality) == ("MONOCHROME1", 15, "window", "CR")
    assert (plain.body_part, plain.body_part_source, plain.body_part_term) == ("chest", "BodyPartExamined", "CHEST")
    assert plain.age_source == "PatientBirthDate" and 64 < plain.age_years < 65 and not is_pediatric(plain.age_years)
    assert plain.study_key == j2k.study_key is not None


def test_chest_cr_window_by_hand_and_bone_bright(chest):
    ds = pydicom.dcmread(data_file("RG1_UNCR.dcm"))
    stored = ds.pixel_array.astype(np.float64)
    expected = 1.0 - linear_window(stored, float(ds.WindowCenter), float(ds.WindowWidth))  # MONOCHROME1
    image = chest["UNCR"].image
    np.testing.assert_allclose(image, expected, atol=1e-6)
    assert np.corrcoef(image[::7, ::7].ravel(), stored[::7, ::7].ravel())[0, 1] < -0.9  # inverted
    mediastinum = region(image, 0.15, 0.35, 0.45, 0.52)
    assert mediastinum > region(image, 0.15, 0.35, 0.17, 0.30) + 0.1  # right lung (image left)
    assert mediastinum > region(image, 0.15, 0.35, 0.62, 0.75) + 0.1


def test_leg_cr_jpeg2000_matches_and_body_part_from_description(leg):
    plain, j2k = leg["UNCR"], leg["J2KR"]
    np.testing.assert_array_equal(plain.image, j2k.image)
    assert (plain.body_part, plain.body_part_source) == ("lower_leg", "StudyDescription")  # "...distal tibia"
    assert plain.body_part_term == "EXTREMITY" and plain.bits_stored == 10
    columns = [(0.46, 0.49), (0.38, 0.42), (0.28, 0.33)]
    tibia, soft_tissue, air = (region(plain.image, 0.1, 0.3, x0, x1) for x0, x1 in columns)
    assert tibia > soft_tissue + 0.2 and soft_tissue > air + 0.2


def test_rescale_and_window_by_hand_mr():
    ds = pydicom.dcmread(data_file("MR2_UNCR.dcm"))  # slope 3.77, intercept 6.1e-5, window 1000/2000, 12 of 16 bits
    values = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    result = read_dicom(data_file("MR2_UNCR.dcm"), modalities=None)
    np.testing.assert_allclose(result.image, linear_window(values, 1000.0, 2000.0), atol=1e-6)
    assert result.voi == "window" and result.body_part == "shoulder"


def test_signed_rescale_and_window_by_hand_ct():
    ds = pydicom.dcmread(data_file("693_UNCR.dcm"))  # signed 14 of 16 bits, intercept -1024, window 40/100
    values = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    result = read_dicom(data_file("693_UNCR.dcm"), modalities=None)
    np.testing.assert_allclose(result.image, linear_window(values, 40.0, 100.0), atol=1e-6)
    assert_refused(data_file("693_UNCR.dcm"), "modality", "modality CT is not one of CR")


def lut_lookup(stored, item):
    n_entries, first, _ = item.LUTDescriptor
    return np.asarray(item.LUTData, dtype=np.float64)[np.clip(stored.astype(np.int64) - first, 0, n_entries - 1)]


def test_voi_lut_sequence_by_hand():
    ds = pydicom.dcmread(data_file("vlut_04.dcm"))
    item = ds.VOILUTSequence[0]
    lut = np.asarray(item.LUTData, dtype=np.float64)
    expected = (lut_lookup(ds.pixel_array, item) - lut.min()) / (lut.max() - lut.min())
    result = read_dicom(data_file("vlut_04.dcm"), modalities=None)
    assert result.voi == "voi_lut"
    np.testing.assert_allclose(result.image, expected, atol=1e-6)


def test_modality_lut_sequence_by_hand():
    ds = pydicom.dcmread(data_file("mlut_18.dcm"))  # signed 12 of 16 bits through a Modality LUT, no VOI
    values = lut_lookup(ds.pixel_array, ds.ModalityLUTSequence[0])
    expected = (values - values.min()) / (values.max() - values.min())
    result = read_dicom(data_file("mlut_18.dcm"), modalities=None)
    assert result.voi == "min_max"
    np.testing.assert_allclose(result.image, expected, atol=1e-6)


@pytest.mark.parametrize(
    "name, code, message",
    [("MR_truncated.dcm", "corrupt", "less than expected"), ("no_meta.dcm", "not_dicom", "not a DICOM file"),
     ("emri_small.dcm", "multi_frame", "multi-frame image \\(10 frames\\)"),
     ("examples_palette.dcm", "not_grayscale", "not a grayscale image")],
)  # fmt: skip
def test_refused_pydicom_files(name, code, message):
    assert_refused(data_file(name), code, message, modalities=None)


def test_jpeg_lossless_decodes():
    if not get_decoder(JPEGLosslessSV1).is_available:
        pytest.skip("no JPEG Lossless plugin: pip install 'pylibjpeg>=2.0' 'pylibjpeg-libjpeg>=2.1' (the dicom extra)")
    path = data_file("JPEG-LL.dcm")  # NM bone scan, signed 16-bit, JPEG Lossless SV1 (1.2.840.10008.1.2.4.70)
    stored = pydicom.dcmread(path).pixel_array.astype(np.float64)
    # values from pydicom's own pixel reference tests (pixels_reference.py, JPGS_16_16_1_1_1F_M2)
    assert tuple(stored[400, 124:132]) == (60, 58, 61, 68, 59, 65, 64, 67)
    assert tuple(stored[600, 124:132]) == (3, 1, 2, 0, 2, 1, 2, 0)
    result = read_dicom(path, modalities=None)
    assert result.transfer_syntax == JPEGLosslessSV1.name and result.voi == "min_max"  # no rescale, no window
    expected = (stored - stored.min()) / (stored.max() - stored.min())
    np.testing.assert_allclose(result.image, expected, atol=1e-6)


@pytest.mark.parametrize("syntax", [JPEGLSLossless, HTJ2KLossless])
def test_undecodable_syntax_names_syntax_and_plugins(tmp_path, syntax):
    if get_decoder(syntax).is_available:
        pytest.skip(f"a plugin that decodes {syntax.name} is installed")
    path = write_compressed(tmp_path / "a.dcm", syntax, bytes(64))
    error = assert_refused(path, "undecodable", f"'{re.escape(syntax.name)}': no plugin installed.*pylibjpeg")
    assert error.body_part == "hand"  # the header was read: the part is known though the pixels are not


# ----------------------------------------------------------------------------------------- files written here


@pytest.mark.parametrize("dtype, bits", [(np.uint8, 8), (np.uint16, 12), (np.uint16, 16)])
def test_min_max_without_voi(tmp_path, dtype, bits):
    pixels = ramp(low=3, high=2**bits - 5, dtype=dtype)
    result = read_dicom(write_dicom(tmp_path / "a.dcm", pixels, bits_stored=bits))
    expected = (pixels - pixels.min()) / float(pixels.max() - pixels.min())
    assert (result.voi, result.bits_stored, result.photometric) == ("min_max", bits, "MONOCHROME2")
    np.testing.assert_allclose(result.image, expected, atol=1e-6)


def test_garbage_above_bits_stored_is_ignored(tmp_path):
    pixels = ramp(high=4095)
    clean = read_dicom(write_dicom(tmp_path / "clean.dcm", pixels, bits_stored=12))
    dirty_bytes = (pixels | 0xA000).astype("<u2").tobytes()  # overlay-style bits 13-16 set
    dirty = read_dicom(write_dicom(tmp_path / "dirty.dcm", pixels, bits_stored=12, raw=dirty_bytes))
    np.testing.assert_array_equal(clean.image, dirty.image)


@pytest.mark.parametrize(
    "function, expected",
    [
        ("LINEAR", lambda v: linear_window(v, 0.0, 2000.0)),
        ("LINEAR_EXACT", lambda v: np.clip(v / 2000.0 + 0.5, 0.0, 1.0)),
        ("SIGMOID", lambda v: 1.0 / (1.0 + np.exp(-4.0 * v / 2000.0))),
    ],
)
def test_signed_rescale_window_functions_by_hand(tmp_path, function, expected):
    pixels = ramp(low=-2048, high=2047, dtype=np.int16)
    path = write_dicom(tmp_path / "a.dcm", pixels, bits_stored=12, RescaleSlope=2, RescaleIntercept=-1024,
                       WindowCenter=0, WindowWidth=2000, VOILUTFunction=function)  # fmt: skip
    result = read_dicom(path)
    np.testing.assert_allclose(result.image, expected(pixels * 2.0 - 1024.0), atol=1e-6)


def test_first_of_several_windows_and_invalid_window(tmp_path):
    pixels = ramp()
    several = read_dicom(write_dicom(tmp_path / "a.dcm", pixels, bits_stored=12, WindowCenter=[1000, 3000],
                                     WindowWidth=[500, 100]))  # fmt: skip
    np.testing.assert_allclose(several.image, linear_window(pixels.astype(float), 1000, 500), atol=1e-6)
    invalid = read_dicom(write_dicom(tmp_path / "b.dcm", pixels, bits_stored=12, WindowCenter=100, WindowWidth=0))
    assert invalid.voi == "min_max"


def test_monochrome1_is_inverted(tmp_path):
    pixels = ramp()
    mono2 = read_dicom(write_dicom(tmp_path / "2.dcm", pixels, bits_stored=12, WindowCenter=2000, WindowWidth=3000))
    mono1 = read_dicom(write_dicom(tmp_path / "1.dcm", pixels, "MONOCHROME1", 12, WindowCenter=2000, WindowWidth=3000))
    assert mono1.photometric == "MONOCHROME1"
    np.testing.assert_allclose(mono1.image, 1.0 - mono2.image, atol=1e-6)


def test_output_properties(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(12):
        rows, columns, bits = int(rng.integers(1, 40)), int(rng.integers(2, 40)), int(rng.integers(2, 17))
        signed = bool(rng.integers(2))
        low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        pixels = rng.integers(low, high + 1, (rows, columns)).astype(np.int16 if signed else np.uint16)
        pixels.flat[:2] = low, high  # never blank
        extra = {"WindowCenter": float(rng.normal(0, 100)), "WindowWidth": float(rng.uniform(1, 500))} if i % 2 else {}
        photometric = ("MONOCHROME1", "MONOCHROME2")[i % 3 == 0]
        result = read_dicom(write_dicom(tmp_path / f"{i}.dcm", pixels, photometric, bits, **extra))
        assert result.image.dtype == np.float32 and result.image.shape == (rows, columns)
        assert 0.0 <= result.image.min() <= result.image.max() <= 1.0
        assert not result.image.flags.writeable


def test_refused_written_files(tmp_path):
    pixels = ramp()
    multi = write_dicom(tmp_path / "multi.dcm", np.stack([pixels, pixels]), bits_stored=12)
    rgb = write_dicom(tmp_path / "rgb.dcm", np.stack([pixels.astype(np.uint8)] * 3, axis=-1), "RGB", 8)
    no_pixels = write_dicom(tmp_path / "nopix.dcm", pixels, bits_stored=12, PixelData=None)
    blank = write_dicom(tmp_path / "blank.dcm", np.zeros_like(pixels), bits_stored=12)
    text = tmp_path / "report.dcm"
    text.write_text("FINDINGS: no fracture.\n" * 20)
    cases = {multi: ("multi_frame", "multi-frame image \\(2 frames\\)"), no_pixels: ("no_pixel_data", "no Pixel Data"),
             rgb: ("not_grayscale", "not a grayscale image \\(PhotometricInterpretation RGB"),
             blank: ("blank", "blank image"), text: ("not_dicom", "not a DICOM file")}  # fmt: skip
    for path, (code, message) in cases.items():
        error = assert_refused(path, code, message)
        assert error.detail == str(error).removeprefix(f"{path}: ") and error.path == str(path)
    assert issubclass(DicomError, ValueError)
    copy = pickle.loads(pickle.dumps(error))  # crosses worker processes intact
    assert (str(copy), copy.reason, copy.detail, copy.body_part) == (str(error), "not_dicom", error.detail, None)
    with pytest.raises(ValueError, match="unknown DicomError reason"):
        DicomError(text, "broken", "?")


@pytest.mark.parametrize(
    "keep, code, message",
    [(250, "no_pixel_data", "no Pixel Data"), (4000, "corrupt", "less than expected"), (-2, "corrupt", "less than")],
)
def test_truncated_file(tmp_path, keep, code, message):
    path = write_dicom(tmp_path / "cut.dcm", ramp(64, 64), bits_stored=12, PatientName="Doe^Jane")
    path.write_bytes(path.read_bytes()[:keep])  # cut in the header, in the pixel data, 2 bytes short
    assert_refused(path, code, message)


def test_transfer_syntax_without_decoder(tmp_path):
    # a video syntax: pydicom has no decoder for it at all
    path = write_compressed(tmp_path / "video.dcm", MPEG2MPML, b"\x00\x00\x01\xb3" + bytes(60))
    assert_refused(path, "undecodable", "transfer syntax MPEG2 .* has no decoder in pydicom")


def test_no_identifying_fields(tmp_path):
    identifying = {"PatientName": "Doe^Jane", "PatientID": "MRN0042917", "AccessionNumber": "ACC77123",
                   "StudyInstanceUID": "1.2.826.0.1.3680043.99.7", "InstitutionName": "St Elsewhere Hospital",
                   "ReferringPhysicianName": "House^Gregory", "PatientBirthDate": "20150304",
                   "StudyDate": "20240110"}  # fmt: skip
    path = write_dicom(tmp_path / "a.dcm", ramp(), bits_stored=12, **identifying)
    for salt in (None, "secret"):
        result = read_dicom(path, salt=salt)
        text = repr(result) + " ".join(str(getattr(result, f)) for f in result.__dataclass_fields__)
        for value in identifying.values():
            assert value.split("^")[0] not in text
        assert not any(isinstance(getattr(result, f), Dataset) for f in result.__dataclass_fields__)
    assert result.patient_key == pseudonym("MRN0042917", "secret")
    assert result.study_key == pseudonym("1.2.826.0.1.3680043.99.7", "secret")
    assert result.accession_key == pseudonym("ACC77123", "secret")
    assert read_dicom(path, salt="other").patient_key != result.patient_key
    assert read_dicom(path).patient_key is None


def test_pseudonym():
    assert pseudonym("MRN1", "salt") == pseudonym(" MRN1 ", "salt") == pseudonym("MRN1", b"salt")
    assert pseudonym("MRN1", "salt") != pseudonym("MRN2", "salt")
    assert re.fullmatch(r"[0-9a-f]{32}", pseudonym("MRN1", "salt"))
    with pytest.raises(ValueError):
        pseudonym("MRN1", "")


# ------------------------------------------------------------------------------------------ header: body part


def test_body_part_precedence_in_file(tmp_path):
    def read(**fields):
        return read_dicom(write_dicom(tmp_path / "a.dcm", ramp(), bits_stored=12, **fields))

    study_only = read(StudyDescription="XR WRIST LT 2V")
    assert (study_only.body_part, study_only.body_part_source) == ("wrist", "StudyDescription")
    assert study_only.body_part_term is None
    series = read(StudyDescription="XR HAND AND WRIST", SeriesDescription="PA HAND")
    assert (series.body_part, series.body_part_source) == ("hand", "SeriesDescription")
    coded = read(BodyPartExamined="KNEE", SeriesDescription="FEMUR AP")
    assert (coded.body_part, coded.body_part_source, coded.body_part_status) == ("knee", "BodyPartExamined", "mapped")
    ambiguous = read(StudyDescription="XR HAND AND WRIST")
    assert (ambiguous.body_part, ambiguous.body_part_candidates) == (None, ("wrist", "hand"))
    assert ambiguous.body_part_status == "ambiguous"
    vague = read(BodyPartExamined="EXTREMITY", StudyDescription="Follow-up")
    assert (vague.body_part, vague.body_part_source, vague.body_part_status) == (None, None, "unmapped")
    narrow = read_dicom(tmp_path / "a.dcm", vocabulary=("chest", "hand"))
    assert narrow.body_part is None


def test_every_vocabulary_name_reachable_from_its_dicom_term():
    for name, term in DICOM_BODY_PART_TERMS.items():
        assert map_body_part(term) == name
        assert map_body_part(term.lower()) == name
    assert {map_body_part(term) for term in DICOM_BODY_PART_TERMS.values()} == set(DEFAULT_BODY_PARTS)


@pytest.mark.parametrize(
    "text, name",
    [
        ("XR WRIST LT 2V", "wrist"), ("Chest PA", "chest"), ("CXR AP portable", "chest"), ("THORAX", "chest"),
        ("XR TIB/FIB RT", "lower_leg"), ("Non-ossifying fibroma of distal tibia", "lower_leg"), ("LEG", "lower_leg"),
        ("C-SPINE 3 VIEWS", "cervical_spine"), ("L SPINE AP LAT", "lumbar_spine"), ("SCOLIOSIS", "whole_spine"),
        ("XR SPINE WHOLE", "whole_spine"), ("RADIAL HEAD VIEW", "elbow"), ("BONE AGE", "hand"), ("FINGERS R", "hand"),
        ("Hips frog leg", "hip"), ("KNEES STANDING", "knee"), ("FEET AP", "foot"), ("toes", "foot"), ("ARM", "humerus"),
        ("SOFT TISSUE NECK", "neck"), ("Sinuses", "facial_bones"), ("ABDOMEN AND PELVIS", "abdomen"),
        ("KUB", "abdomen"), ("SCAPHOID VIEWS", "wrist"), ("AC JOINTS", "shoulder"), ("SKULL", "skull"),
        ("PELVIS AP", "pelvis"),
    ],
)  # fmt: skip
def test_descriptions_map(text, name):
    assert map_body_part(text) == name


@pytest.mark.parametrize(
    "text, candidates",
    [
        ("HAND AND WRIST", ("wrist", "hand")), ("FOOT/ANKLE", ("ankle", "foot")), ("BABYGRAM", ("chest", "abdomen")),
        ("CHESTABDOMEN", ("chest", "abdomen")), ("CTSPINE", ("cervical_spine", "thoracic_spine")),
        ("EXTREMITY", ()), ("LEG LENGTH STUDY", ()), ("SKELETAL SURVEY", ()), ("Knie rechts", ()), ("", ()),
        (None, ()), ("HIPPOCAMPUS", ()), ("ARMADILLO", ()),
    ],
)  # fmt: skip
def test_ambiguous_and_unmapped(text, candidates):
    assert body_part_candidates(text) == candidates
    assert map_body_part(text) is None


def test_keyword_table_consistent_with_docstring():
    """Each keyword belongs to one body part, the docstring table lists exactly the code's table, and every
    listed keyword maps to its row."""
    words = [w for ws in dicom._PART_KEYWORDS.values() for w in ws] + list(dicom._COMPOUND_KEYWORDS)
    assert [w for w, n in Counter(words).items() if n > 1] == []
    compact = {}
    for phrase, names in dicom.BODY_PART_KEYWORDS.items():
        assert compact.setdefault(phrase.replace(" ", ""), names) == names
    rows = re.findall(r"^\| ([a-z_]+) \| (.+) \|$", dicom.__doc__, re.MULTILINE)
    assert [name for name, _ in rows] == list(DEFAULT_BODY_PARTS)
    for name, cell in rows:
        assert cell.split(", ") == list(dicom._PART_KEYWORDS[name])
        assert all(map_body_part(word) == name for word in cell.split(", "))


# ------------------------------------------------------------------------------------------------ header: age


@pytest.mark.parametrize(
    "value, years",
    [("011Y", 11.0), ("006M", 0.5), ("003W", 21 / 365.25), ("010D", 10 / 365.25), ("22Y", 22.0), ("017y ", 17.0),
     ("000Y", None), ("000D", 0.0), ("", None), (None, None), ("11", None), ("011X", None), ("1234Y", None),
     ("999Y", None)],
)  # fmt: skip
def test_parse_patient_age(value, years):
    if years is None:
        assert parse_patient_age(value) is None
    else:
        assert parse_patient_age(value) == pytest.approx(years)


def test_age_from_dates_is_exact_at_birthdays():
    assert age_from_dates("20010301", "20190228") == pytest.approx(17 + 364 / 365.25)
    assert age_from_dates("20010301", "20190301") == 18.0
    assert is_pediatric(age_from_dates("20010301", "20190228")) is True
    assert is_pediatric(age_from_dates("20010301", "20190301")) is False
    assert age_from_dates("20040229", "20050301") == 1.0  # leap-day birthday
    assert age_from_dates("2010.06.15", "2010.06.25") == pytest.approx(10 / 365.25)
    for birth, when in [("20100101", "20091231"), ("11111111", "20100101"), ("", "20100101"), ("20100101", None)]:
        assert age_from_dates(birth, when) is None


def test_is_pediatric():
    assert is_pediatric(17.99) is True and is_pediatric(18.0) is False and is_pediatric(None) is None
    assert is_pediatric(15.0, max_age=16.0) is True and is_pediatric(16.0, max_age=16.0) is False


def test_age_sources_in_file(tmp_path):
    def read(**fields):
        return read_dicom(write_dicom(tmp_path / "a.dcm", ramp(), bits_stored=12, **fields))

    both = read(PatientAge="006M", PatientBirthDate="20100101", StudyDate="20150101")
    assert (both.age_years, both.age_source) == (0.5, "PatientAge")
    dates = read(PatientAge="000Y", PatientBirthDate="20100101", StudyDate="20150101")
    assert (dates.age_years, dates.age_source) == (5.0, "PatientBirthDate")
    series_date = read(PatientBirthDate="20100101", SeriesDate="20120101")
    assert series_date.age_years == 2.0
    unknown = read(PatientBirthDate="20100101")
    assert (unknown.age_years, unknown.age_source) == (None, None) and is_pediatric(unknown.age_years) is None
