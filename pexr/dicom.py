"""Read one hospital DICOM radiograph into what PeXR curation needs: a [0, 1] image, a body part and an age.

`read_dicom(path)` returns a `DicomImage`; a file that is not a usable X-ray raises `DicomError` (a `ValueError`)
whose message names the file and the reason, and whose `reason` attribute is a machine-readable code from
`DICOM_ERROR_REASONS` (not_dicom, corrupt, no_pixel_data, modality, multi_frame, not_grayscale, undecodable, blank).
Nothing identifying leaves this module: the pydicom `Dataset` is dropped, and patient, study and accession
identifiers come back only as salted pseudonyms (`pseudonym`), and only when a secret `salt` is given.

Image pipeline (DICOM PS3.4 Annex N order):

1. refuse: no Pixel Data; a modality outside `modalities` (default CR, DX, DR, RG); more than one frame; anything
   but one-sample MONOCHROME1/MONOCHROME2 (RGB, YBR and PALETTE COLOR are refused, not converted to gray: a colour
   "radiograph" is a screenshot or a photo, and its grey levels have no fixed meaning);
2. decode with pydicom (`Dataset.pixel_array`): compressed syntaxes need a plugin (JPEG 2000 is decoded by Pillow
   built with OpenJPEG, as the Pillow wheels are; JPEG Lossless, common in CR/DX archives, and JPEG-LS by
   pylibjpeg + pylibjpeg-libjpeg, GPL-3.0, in the "dicom" extra); a syntax no installed plugin decodes is refused,
   naming the syntax and the packages that would decode it. pydicom masks bits above BitsStored and sign-extends
   signed pixels;
3. modality LUT: the Modality LUT Sequence, else RescaleSlope/RescaleIntercept (`pydicom.pixels.apply_modality_lut`);
4. VOI: the first VOI LUT Sequence item if present, else the first Window Center/Width pair (LINEAR, LINEAR_EXACT
   or SIGMOID) — the two halves of `pydicom.pixels.apply_voi_lut`, called apart so that the output range is known.
   The result is scaled to [0, 1] over that range: the window's limits (its values at -inf and +inf) or the VOI
   LUT's smallest and largest entries. With no VOI (or an invalid window, e.g. width < 1) the min-max of the
   modality values actually present is used; `DicomImage.voi` says which ("voi_lut", "window", "min_max");
5. MONOCHROME1 is inverted so that bone is bright; float32, `[Rows, Columns]`, read-only.
   Presentation LUT Shape is ignored: in DX images it restates the photometric interpretation.

Body part: the first of `BODY_PART_FIELDS` (BodyPartExamined, then SeriesDescription, then StudyDescription) that
names any body part decides. BodyPartExamined comes first (a coded term); the series description comes before the
study description because it describes this image, while a study may cover several parts. A field is matched
whole against the table below with spaces and punctuation removed ("C-SPINE" -> CSPINE), else scanned for the
keywords as words, longest first, each with an optional plural S/ES ("XR WRIST LT 2V" -> wrist, "Tib/Fib" ->
lower_leg, "RADIAL HEAD" -> elbow, not skull). If the deciding field names two or more parts ("HAND AND WRIST",
BodyPartExamined CHESTABDOMEN) the body part is None with those candidates kept (`body_part_status` "ambiguous"):
a wrong expert label costs more than a missing one. Nothing matched: None, "unmapped". Vague terms (EXTREMITY,
WHOLEBODY, SKELETAL SURVEY, LEG LENGTH, UPPER/LOWER LIMB) name no part, so a later field may still decide (RG3's
BodyPartExamined EXTREMITY and study "... of distal tibia" give lower_leg). English only; extend
`_PART_KEYWORDS` (and this table) to add terms. Candidates outside `vocabulary` are dropped.

| body part | keywords (DICOM BodyPartExamined terms, PS3.16 Annex L, and description words) |
| --- | --- |
| chest | CHEST, THORAX, CXR, LUNG, RIB, STERNUM |
| abdomen | ABDOMEN, AXR, KUB, ABDOMENPELVIS, ABDOMEN PELVIS, ABDOMEN AND PELVIS |
| skull | SKULL, HEAD |
| facial_bones | FACE, FACIAL BONE, JAW, MANDIBLE, MAXILLA, NASAL BONE, NOSE, ORBIT, ZYGOMA, TMJ, SINUS |
| neck | NECK, SOFT TISSUE NECK, LARYNX, PHARYNX, ADENOID, AIRWAY |
| cervical_spine | CSPINE, C SPINE, CERVICAL SPINE, ODONTOID |
| thoracic_spine | TSPINE, T SPINE, THORACIC SPINE, DORSAL SPINE |
| lumbar_spine | LSPINE, L SPINE, LUMBAR SPINE, LSSPINE, LUMBOSACRAL SPINE |
| whole_spine | SPINE, WHOLE SPINE, FULL SPINE, ENTIRE SPINE, SCOLIOSIS |
| pelvis | PELVIS, SACRUM, SSPINE, COCCYX, SIJOINT, SI JOINT, SACROILIAC JOINT, ILIUM |
| hip | HIP, FEMORAL HEAD, FEMORAL NECK, NECK OF FEMUR, FROG LEG |
| femur | FEMUR, THIGH |
| knee | KNEE, PATELLA |
| lower_leg | LEG, LOWER LEG, TIBIA, FIBULA, TIB FIB, CALF |
| ankle | ANKLE |
| foot | FOOT, FEET, TOE, HEEL, CALCANEUS |
| shoulder | SHOULDER, SCAPULA, ACJOINT, AC JOINT |
| clavicle | CLAVICLE, SCJOINT, SC JOINT |
| humerus | HUMERUS, ARM, UPPER ARM |
| elbow | ELBOW, RADIAL HEAD, OLECRANON |
| forearm | FOREARM, RADIUS, ULNA |
| wrist | WRIST, SCAPHOID |
| hand | HAND, FINGER, THUMB, BONE AGE |
| (several) | CHESTABDOMEN, BABYGRAM -> chest + abdomen; CTSPINE -> cervical + thoracic; TLSPINE -> thoracic + lumbar |
| (none) | EXTREMITY, WHOLEBODY, WHOLE BODY, SKELETAL SURVEY, LEG LENGTH, LONG LEG, UPPER LIMB, LOWER LIMB |

Age: PatientAge ("011Y", "006M", "003W", "010D"; "000Y" is read as unknown, a common placeholder) if valid, else
PatientBirthDate with the first valid of StudyDate, SeriesDate, AcquisitionDate, ContentDate, in calendar years
(whole birthdays passed plus the fraction of the current year). Neither: `age_years` None. `is_pediatric` then
returns None, a third outcome for the caller to count and report: unknown age neither passes nor fails the filter.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from types import MappingProxyType
from typing import Collection, Mapping

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing, get_decoder

from configuration_pedclip import DEFAULT_BODY_PARTS, DICOM_BODY_PART_TERMS

XRAY_MODALITIES = ("CR", "DX", "DR", "RG")  # computed / digital / retired digital / conventional radiography
BODY_PART_FIELDS = ("BodyPartExamined", "SeriesDescription", "StudyDescription")
PEDIATRIC_MAX_AGE_YEARS = 18.0
_DATE_FIELDS = ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")
_DAYS_PER_YEAR = 365.25
_MAX_PLAUSIBLE_AGE = 130.0  # older ages are placeholders ("11111111" birth dates, "999Y")

# --------------------------------------------------------------------------------------------------- body parts

_PART_KEYWORDS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "chest": ("CHEST", "THORAX", "CXR", "LUNG", "RIB", "STERNUM"),
    "abdomen": ("ABDOMEN", "AXR", "KUB", "ABDOMENPELVIS", "ABDOMEN PELVIS", "ABDOMEN AND PELVIS"),
    "skull": ("SKULL", "HEAD"),
    "facial_bones": ("FACE", "FACIAL BONE", "JAW", "MANDIBLE", "MAXILLA", "NASAL BONE", "NOSE", "ORBIT", "ZYGOMA",
                     "TMJ", "SINUS"),
    "neck": ("NECK", "SOFT TISSUE NECK", "LARYNX", "PHARYNX", "ADENOID", "AIRWAY"),
    "cervical_spine": ("CSPINE", "C SPINE", "CERVICAL SPINE", "ODONTOID"),
    "thoracic_spine": ("TSPINE", "T SPINE", "THORACIC SPINE", "DORSAL SPINE"),
    "lumbar_spine": ("LSPINE", "L SPINE", "LUMBAR SPINE", "LSSPINE", "LUMBOSACRAL SPINE"),
    "whole_spine": ("SPINE", "WHOLE SPINE", "FULL SPINE", "ENTIRE SPINE", "SCOLIOSIS"),
    "pelvis": ("PELVIS", "SACRUM", "SSPINE", "COCCYX", "SIJOINT", "SI JOINT", "SACROILIAC JOINT", "ILIUM"),
    "hip": ("HIP", "FEMORAL HEAD", "FEMORAL NECK", "NECK OF FEMUR", "FROG LEG"),
    "femur": ("FEMUR", "THIGH"),
    "knee": ("KNEE", "PATELLA"),
    "lower_leg": ("LEG", "LOWER LEG", "TIBIA", "FIBULA", "TIB FIB", "CALF"),
    "ankle": ("ANKLE",),
    "foot": ("FOOT", "FEET", "TOE", "HEEL", "CALCANEUS"),
    "shoulder": ("SHOULDER", "SCAPULA", "ACJOINT", "AC JOINT"),
    "clavicle": ("CLAVICLE", "SCJOINT", "SC JOINT"),
    "humerus": ("HUMERUS", "ARM", "UPPER ARM"),
    "elbow": ("ELBOW", "RADIAL HEAD", "OLECRANON"),
    "forearm": ("FOREARM", "RADIUS", "ULNA"),
    "wrist": ("WRIST", "SCAPHOID"),
    "hand": ("HAND", "FINGER", "THUMB", "BONE AGE"),
})  # fmt: skip

# Phrases naming several parts, or none (vague): matched like the others so their words are not read alone.
_COMPOUND_KEYWORDS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "CHESTABDOMEN": ("chest", "abdomen"), "BABYGRAM": ("chest", "abdomen"),
    "CTSPINE": ("cervical_spine", "thoracic_spine"), "TLSPINE": ("thoracic_spine", "lumbar_spine"),
    **dict.fromkeys(("EXTREMITY", "WHOLEBODY", "WHOLE BODY", "SKELETAL SURVEY", "LEG LENGTH", "LONG LEG",
                     "UPPER LIMB", "LOWER LIMB"), ()),
})  # fmt: skip


def _build_keywords() -> Mapping[str, tuple[str, ...]]:
    table: dict[str, tuple[str, ...]] = dict(_COMPOUND_KEYWORDS)
    for name, term in DICOM_BODY_PART_TERMS.items():  # the config's own terms always map to their name
        table[term] = (name,)
    for name, words in _PART_KEYWORDS.items():
        table.update(dict.fromkeys(words, (name,)))
    return MappingProxyType(table)


BODY_PART_KEYWORDS: Mapping[str, tuple[str, ...]] = _build_keywords()  # normalised phrase -> body part names
_COMPACT_KEYWORDS = MappingProxyType({k.replace(" ", ""): v for k, v in BODY_PART_KEYWORDS.items()})
_KEYWORD_RE = re.compile(
    r"\b(" + "|".join(re.escape(k) for k in sorted(BODY_PART_KEYWORDS, key=len, reverse=True)) + r")(?:E?S)?\b"
)


def _normalise(text: object) -> str:
    return " ".join(re.sub(r"[^A-Z0-9]+", " ", str(text or "").upper()).split())


def body_part_candidates(text: object, vocabulary: Collection[str] = DEFAULT_BODY_PARTS) -> tuple[str, ...]:
    """Every body part of `vocabulary` that `text` (a BodyPartExamined term or a description) names, in
    `vocabulary` order: the whole text as one term if it is one, else each keyword found in it."""
    words = _normalise(text)
    names = _COMPACT_KEYWORDS.get(words.replace(" ", ""))
    if names is None:
        names = tuple(name for match in _KEYWORD_RE.finditer(words) for name in BODY_PART_KEYWORDS[match[1]])
    return tuple(name for name in vocabulary if name in names)


def map_body_part(text: object, vocabulary: Collection[str] = DEFAULT_BODY_PARTS) -> str | None:
    """The one body part `text` names, or None when it names none or several (see the module docstring)."""
    candidates = body_part_candidates(text, vocabulary)
    return candidates[0] if len(candidates) == 1 else None


def _body_part(ds: pydicom.Dataset, vocabulary: Collection[str]) -> tuple[str | None, str | None, tuple[str, ...]]:
    for name in BODY_PART_FIELDS:
        candidates = body_part_candidates(ds.get(name), vocabulary)
        if candidates:
            return (candidates[0] if len(candidates) == 1 else None), name, candidates
    return None, None, ()


# --------------------------------------------------------------------------------------------------------- age

_AGE_RE = re.compile(r"^\s*(\d{1,3})\s*([DWMY])\s*$", re.IGNORECASE)
_AGE_UNIT_YEARS = MappingProxyType({"D": 1 / _DAYS_PER_YEAR, "W": 7 / _DAYS_PER_YEAR, "M": 1 / 12, "Y": 1.0})


def parse_patient_age(value: object) -> float | None:
    """A DICOM Age String ("011Y", "006M", "003W", "010D"; unpadded "22Y" accepted) in years, or None if invalid.
    "000Y" (a common placeholder; infants' ages are written in D, W or M) and ages over 130 give None."""
    match = _AGE_RE.match(str(value or ""))
    if match is None:
        return None
    count, unit = int(match[1]), match[2].upper()
    years = count * _AGE_UNIT_YEARS[unit]
    return None if (count == 0 and unit == "Y") or years > _MAX_PLAUSIBLE_AGE else years


def _parse_date(value: object) -> date | None:
    digits = re.sub(r"\D", "", str(value or ""))  # DA is YYYYMMDD; old ACR-NEMA files write YYYY.MM.DD
    if len(digits) != 8:
        return None
    try:
        return date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        return None


def age_from_dates(birth_date: object, on_date: object) -> float | None:
    """Age in years on `on_date` of someone born on `birth_date` (DICOM DA strings): whole birthdays passed plus
    the fraction of the year since the last one, so `age < 18` is exact to the day. None if either is invalid,
    `on_date` is before birth, or the age is over 130 (a placeholder birth date)."""
    birth, when = _parse_date(birth_date), _parse_date(on_date)
    if birth is None or when is None or when < birth:
        return None
    years = when.year - birth.year - ((when.month, when.day) < (birth.month, birth.day))
    try:
        last_birthday = birth.replace(year=birth.year + years)
    except ValueError:  # born on 29 February, non-leap year: the birthday is taken as 1 March
        last_birthday = date(birth.year + years, 3, 1)
    age = years + (when - last_birthday).days / _DAYS_PER_YEAR
    return age if age <= _MAX_PLAUSIBLE_AGE else None


def _age(ds: pydicom.Dataset) -> tuple[float | None, str | None]:
    age = parse_patient_age(ds.get("PatientAge"))
    if age is not None:
        return age, "PatientAge"
    for name in _DATE_FIELDS:
        age = age_from_dates(ds.get("PatientBirthDate"), ds.get(name))
        if age is not None:
            return age, "PatientBirthDate"
    return None, None


def is_pediatric(age_years: float | None, max_age: float = PEDIATRIC_MAX_AGE_YEARS) -> bool | None:
    """True if `age_years < max_age`, False if not, None if the age is unknown (report it, do not guess)."""
    return None if age_years is None else age_years < max_age


def pseudonym(value: object, salt: str | bytes) -> str:
    """A 128-bit hex pseudonym of `value`: HMAC-SHA256 keyed with a secret `salt`, so that nobody without the salt
    can test a known identifier against it. The same (value, salt) always gives the same pseudonym."""
    if not salt:
        raise ValueError("pseudonym needs a non-empty secret salt")
    key = salt.encode() if isinstance(salt, str) else bytes(salt)
    return hmac.new(key, str(value).strip().encode(), hashlib.sha256).hexdigest()[:32]


# ------------------------------------------------------------------------------------------------------ pixels


# Why `read_dicom` refuses a file: `DicomError.reason`, one of these codes (code -> meaning).
DICOM_ERROR_REASONS: Mapping[str, str] = MappingProxyType({
    "not_dicom": "no DICOM Part 10 header (no 'DICM' marker after the 128-byte preamble)",
    "corrupt": "truncated or malformed: the header or the pixel data cannot be parsed or decoded",
    "no_pixel_data": "no Pixel Data element (not an image, or cut before the pixels)",
    "modality": "a Modality outside the accepted ones",
    "multi_frame": "more than one frame",
    "not_grayscale": "not one-sample MONOCHROME1/MONOCHROME2 (colour or palette)",
    "undecodable": "a transfer syntax that no installed plugin (or no pydicom decoder at all) decodes",
    "blank": "every pixel has the same value",
})  # fmt: skip


class DicomError(ValueError):
    """A file that is not a usable X-ray. The message is "<path>: <detail>"; `reason` is a `DICOM_ERROR_REASONS`
    code, `detail` the text without the path, and `body_part` what the header names (as `DicomImage.body_part`)
    when the header could be read, else None: a refused image's part is still known to the report splitter."""

    def __init__(self, path: str | Path, reason: str, detail: str, body_part: str | None = None):
        if reason not in DICOM_ERROR_REASONS:
            raise ValueError(f"unknown DicomError reason {reason!r}; known: {', '.join(DICOM_ERROR_REASONS)}")
        super().__init__(f"{path}: {detail}")
        self.path, self.reason, self.detail, self.body_part = str(path), reason, detail, body_part

    def __reduce__(self):  # picklable across worker processes despite the extra arguments
        return type(self), (self.path, self.reason, self.detail, self.body_part)


class _Unusable(Exception):
    """Internal: why a dataset is refused (a `DICOM_ERROR_REASONS` code and the text); `read_dicom` adds the path
    and raises `DicomError`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _read_dataset(path: Path) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError as err:
        raise _Unusable("not_dicom", "not a DICOM file (no 'DICM' marker after the 128-byte preamble)") from err
    except OSError:
        raise  # missing or unreadable file: not a DICOM problem
    except Exception as err:  # pydicom raises EOFError, ValueError, struct.error, ... on broken files
        raise _Unusable("corrupt", f"truncated or corrupt DICOM file ({type(err).__name__}: {err})") from err


def _check_header(ds: pydicom.Dataset, modalities: Collection[str] | None) -> None:
    if "PixelData" not in ds:
        raise _Unusable("no_pixel_data", "no Pixel Data element (not an image, or the file is truncated)")
    modality = str(ds.get("Modality") or "").strip().upper()
    if modalities is not None and modality not in modalities:
        raise _Unusable("modality", f"modality {modality or '(missing)'} is not one of {', '.join(modalities)}")
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError) as err:
        raise _Unusable("corrupt", f"invalid NumberOfFrames {ds.get('NumberOfFrames')!r}") from err
    if frames > 1:
        raise _Unusable("multi_frame", f"multi-frame image ({frames} frames): one radiograph per file is expected")
    photometric = str(ds.get("PhotometricInterpretation") or "").strip().upper()
    samples = ds.get("SamplesPerPixel", 1)
    if photometric not in ("MONOCHROME1", "MONOCHROME2") or samples != 1:
        raise _Unusable(
            "not_grayscale",
            f"not a grayscale image (PhotometricInterpretation {photometric or '(missing)'}, SamplesPerPixel "
            f"{samples}): only MONOCHROME1/MONOCHROME2 are read, colour and palette images are refused"
        )


def _decode(ds: pydicom.Dataset) -> np.ndarray:
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    hint = ""
    if syntax is not None:
        try:
            decoder = get_decoder(syntax)
        except NotImplementedError as err:
            raise _Unusable(
                "undecodable",
                f"transfer syntax {syntax.name} ({syntax}) has no decoder in pydicom {pydicom.__version__}; "
                "convert the file to an uncompressed syntax (e.g. dcmtk's dcmdjpeg, gdcmconv --raw)"
            ) from err
        plugins = "; ".join(decoder.missing_dependencies)
        if not decoder.is_available:
            raise _Unusable("undecodable", f"cannot decode transfer syntax '{syntax.name}': no plugin installed, "
                            f"install one of: {plugins}")  # fmt: skip
        hint = f"; other plugins that decode '{syntax.name}': {plugins}" if plugins else ""
    try:
        pixels = ds.pixel_array
    except Exception as err:  # plugin errors, short pixel data, bad group 0028 values
        name = syntax.name if syntax is not None else "unknown transfer syntax"
        raise _Unusable("corrupt", f"pixel data could not be decoded ({name}): {err}{hint}") from err
    if pixels.ndim != 2:
        raise _Unusable("corrupt", f"decoded pixel data has shape {pixels.shape}, expected [Rows, Columns]")
    return pixels


def _voi_kind(ds: pydicom.Dataset) -> str:
    """Which VOI transform applies, as `pydicom.pixels.apply_voi_lut` decides it (a VOI LUT wins)."""
    items = ds.get("VOILUTSequence")
    if items and items[0].get("LUTDescriptor") is not None and items[0].get("LUTData") is not None:
        return "voi_lut"
    if ds.get("WindowCenter") not in (None, "") and ds.get("WindowWidth") not in (None, ""):
        return "window"
    return "min_max"


def _apply_voi(ds: pydicom.Dataset, values: np.ndarray, kind: str) -> tuple[np.ndarray, float, float]:
    """VOI output and the two values of its range that map to 0 and 1."""
    if kind == "voi_lut":
        if values.dtype.kind == "f":  # a LUT is indexed by integers; rescaled values are integral in practice
            values = np.rint(values).astype(np.int64)
        n_entries, first_mapped = ds.VOILUTSequence[0].LUTDescriptor[:2]
        entries = apply_voi(np.arange(first_mapped, first_mapped + (n_entries or 2**16)), ds, index=0)
        return apply_voi(values, ds, index=0), float(entries.min()), float(entries.max())
    # window: pydicom maps below/above the window to its output limits, read here at -inf and +inf
    low, high = apply_windowing(np.array([-np.inf, np.inf]), ds, index=0)
    return apply_windowing(values, ds, index=0), float(low), float(high)


def _to_unit_range(ds: pydicom.Dataset, stored: np.ndarray) -> tuple[np.ndarray, str]:
    """Modality LUT, VOI, scale to [0, 1] (float64); returns the image and the VOI kind used."""
    values = apply_modality_lut(stored, ds)
    kind = _voi_kind(ds)
    if kind != "min_max":
        try:
            out, low, high = _apply_voi(ds, values, kind)
        except (ValueError, TypeError, IndexError, NotImplementedError):  # width < 1, unknown VOI function, ...
            kind = "min_max"
    if kind == "min_max":
        out, low, high = values, float(values.min()), float(values.max())
        if low == high:
            raise _Unusable("blank", f"blank image: every pixel is {low:g}")
    image = (np.asarray(out, dtype=np.float64) - low) / (high - low)
    return np.clip(image, 0.0, 1.0), kind


# ----------------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True, eq=False)
class DicomImage:
    """One radiograph, with only non-identifying header facts.

    Attributes:
        image: float32 `[Rows, Columns]` in [0, 1], bone bright (read-only).
        body_part: a vocabulary name, or None (see `body_part_status`).
        body_part_source: the header field that decided (one of `BODY_PART_FIELDS`), or None.
        body_part_candidates: the parts that field named (two or more when ambiguous).
        body_part_term: BodyPartExamined as written (a coded term), for reports on unmapped terms.
        age_years: age at the study, or None if unknown.
        age_source: "PatientAge", "PatientBirthDate" (with a study/series/acquisition/content date) or None.
        modality, photometric, bits_stored, transfer_syntax: as in the header (syntax by name).
        voi: "voi_lut", "window" or "min_max" (see the module docstring).
        patient_key, study_key, accession_key: `pseudonym`s of PatientID, StudyInstanceUID and AccessionNumber
            (link images to patients and reports); None without a salt or when the field is empty.
    """

    image: np.ndarray = field(repr=False)
    body_part: str | None
    body_part_source: str | None
    body_part_candidates: tuple[str, ...]
    body_part_term: str | None
    age_years: float | None
    age_source: str | None
    modality: str
    photometric: str
    bits_stored: int
    transfer_syntax: str
    voi: str
    patient_key: str | None = None
    study_key: str | None = None
    accession_key: str | None = None

    @property
    def body_part_status(self) -> str:
        """One of "mapped", "ambiguous" (several parts named) or "unmapped" (none)."""
        if self.body_part is not None:
            return "mapped"
        return "ambiguous" if self.body_part_candidates else "unmapped"


def _keys(ds: pydicom.Dataset, salt: str | bytes | None) -> dict[str, str | None]:
    fields = {"patient_key": "PatientID", "study_key": "StudyInstanceUID", "accession_key": "AccessionNumber"}
    return {
        key: pseudonym(ds.get(name), salt) if salt is not None and str(ds.get(name) or "").strip() else None
        for key, name in fields.items()
    }


def read_dicom(
    path: str | Path,
    *,
    salt: str | bytes | None = None,
    vocabulary: Collection[str] = DEFAULT_BODY_PARTS,
    modalities: Collection[str] | None = XRAY_MODALITIES,
) -> DicomImage:
    """Read one single-frame grayscale radiograph (see the module docstring for the pipeline and header rules).

    Args:
        path: the DICOM file.
        salt: secret for `pseudonym`; without it no identifier-derived key is returned.
        vocabulary: body-part names that may be returned (e.g. `config.body_parts`).
        modalities: accepted Modality values; None accepts any modality.

    Raises:
        DicomError: the file is not a usable X-ray (the message names the file and the reason; `reason` is a
            `DICOM_ERROR_REASONS` code; `body_part` is set when the header could be read).
    """
    path = Path(path)
    try:
        ds = _read_dataset(path)
    except _Unusable as err:
        raise DicomError(path, err.reason, str(err)) from err
    body_part, source, candidates = _body_part(ds, vocabulary)
    try:
        _check_header(ds, modalities)
        image, voi = _to_unit_range(ds, _decode(ds))
    except _Unusable as err:
        raise DicomError(path, err.reason, str(err), body_part) from err
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    if photometric == "MONOCHROME1":
        image = 1.0 - image
    image = image.astype(np.float32)
    image.flags.writeable = False
    age, age_source = _age(ds)
    term = str(ds.get("BodyPartExamined") or "").strip() or None
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    return DicomImage(
        image=image, body_part=body_part, body_part_source=source, body_part_candidates=candidates,
        body_part_term=term, age_years=age, age_source=age_source, modality=str(ds.get("Modality") or ""),
        photometric=photometric, bits_stored=int(ds.get("BitsStored") or 0),
        transfer_syntax=syntax.name if syntax is not None else "", voi=voi, **_keys(ds, salt),
    )  # fmt: skip


__all__ = [
    "BODY_PART_FIELDS", "BODY_PART_KEYWORDS", "DICOM_ERROR_REASONS", "DicomError", "DicomImage",
    "PEDIATRIC_MAX_AGE_YEARS", "XRAY_MODALITIES", "age_from_dates", "body_part_candidates", "is_pediatric",
    "map_body_part", "parse_patient_age", "pseudonym", "read_dicom",
]  # fmt: skip
