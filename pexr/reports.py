"""Report splitting: one consolidated study report -> the text about each imaged body part.

A PeXR study images several body parts but has ONE free-text report. `split_report(report, body_parts)` first
removes the clinical history and irrelevant context (comparison, technique, signatures, recommendations), then
returns `{body_part: text}` for exactly the parts asked for ("" where the report says nothing of a part). Body part
names are the config vocabulary (`configuration_pedclip.DEFAULT_BODY_PARTS`); unknown names raise `ValueError`.

Backends (all expose `backend.split(report, body_parts) -> SplitResult`):

- `RuleBackend` (default, no model): section headers and sentence-level anatomy keywords, rules below.
- `TransformersBackend(model_path)`: any local instruction model through transformers' text-generation pipeline
  (the paper used Llama-3.1).
- `OpenAIBackend(base_url, model)`: an OpenAI-compatible server the user runs (vLLM, TGI), `POST
  {base_url}/chat/completions` with the standard library; the API key is read from an environment variable if set.
- `ChatBackend(chat, model_id)`: any `chat(messages) -> str` callable (the other two LLM backends are built on it).

Privacy: reports never leave the machine unless the user builds an `OpenAIBackend` with their own server's URL.
Report text is never logged (errors name parts and counts, not sentences); LLM answers are cached only in the local
`cache_dir` the user gives.

Rule backend
------------
1. Sections. A known header (`History:`, `Clinical history:`, `Indication:`, `Clinical information:`, `Reason for
   exam:`, `Comparison:`, `Technique:`, `Findings:`, `Impression:`, `Conclusion:`, ... case-insensitive) starts a
   section: with a colon anywhere in the text, or alone on its line without one. History and context sections
   (comparison, technique, examination, signatures, recommendations) are dropped. Such a section is dropped whole
   when it ends at a blank line or at the next history/context/findings header; when it runs on into the impression
   or the end of the report, only its first sentence and the following run of sentences that read like history
   (resp. comparison/technique) are dropped, the rest is findings. Text before the first header loses its leading
   run of history-like sentences (headerless reports).
2. History-like sentence: it states the patient's age/sex ("8-year-old boy", "9 yo female"), or it has a reason
   word (pain, fall, injury, swelling, fever, limp, query, "?", rule out...) and no imaging-description word
   (there is, is seen, normal, lucency, periosteal, alignment, in keeping with, soft tissue...). So "Swelling of the
   foot, query infection." is history but "Soft tissue swelling over the malleolus." is a finding.
3. In the kept sections, sentences about comparison/technique/signature that name no finding are dropped
   ("No previous imaging for comparison.", "AP and lateral views of the wrist.").
4. Each kept sentence names body parts through `BODY_PART_KEYWORDS` (whole words, case-insensitive, plural -s/-es
   accepted, the longest phrase wins: "distal radius" is the wrist, "radial shaft" the forearm, "femoral head"
   the hip; vertebral levels C1-C7/T1-T12/L1-L5 name the spine parts). Then:
   - it names parts that were asked for -> it goes to those parts (other parts it names are ignored);
   - it names only parts that were not asked for -> it goes to the first asked part in `ALSO_SEEN_ON` of the first
     part it names (films show neighbouring anatomy: a forearm-only study's "distal radius" is forearm text), else
     it is dropped;
   - it names no part and opens with an anaphora ("It", "This", "These", "Which", "Also", "The fracture"...) ->
     it continues the previous sentence of its section (same parts, or dropped with it);
   - it names no part otherwise -> it goes to the parts of the section's last label (a line "LEFT WRIST:", or a
     sentence opening with up to five words naming a part and a colon, "Left knee: small effusion."), or, with no
     label, it is a general statement and goes to every asked part ("No dislocation.", "No acute bony injury.").
     Label lines alone are not kept as text.
   On PeXR-mini every findings sentence names its part, so these rules give sentence F1 1.000 there (see
   tests/test_reports.py). To choose the no-part rule, PeXR-mini (600 patients, seed 0) was split with a table that
   knows only the 23 part names, so that most sentences name none: sentence F1 0.935 for "anaphora, else every
   part" (P 0.886, R 0.989; 0.933 with labels), 0.916 for "always the previous sentence's parts", 0.935 for "every
   part", 0.701 for "drop". Anaphora matter in real reports ("It is minimally displaced."), not in PeXR-mini.
   Known limitation, kept on purpose: a sentence that names no part, has no label and is no anaphora goes to EVERY
   imaged part, even where a reader would tie it to the sentence before: in a knee + chest study, "Small knee
   effusion. No fracture." gives "No fracture." to the knee and to the chest. Sending short negatives naming a bone
   finding ("No fracture.", "No dislocation.") to the previous sentence's parts instead was tried: PeXR-mini never
   writes such sentences (its negatives name their part), so F1 is the same either way (1.000 with this table,
   0.933 with the part-names-only one), and real reports also close with them about every part ("Normal chest.
   Normal knee. No fracture."). With no data to choose, the measured "every part" rule stays; label the parts
   ("Left knee: ...") or use an LLM backend where this matters.

LLM backends
------------
Two steps as in the paper: `CLEAN_PROMPT` asks to remove history and irrelevant context, then `EXTRACT_PROMPT` asks
"From the imaging report, extract the text of these body parts: hip, knee." with a JSON answer `{"hip": "...",
"knee": "..."}`. (Two calls, not one: a small model follows one short instruction more reliably, and the cleaned
text keeps the extraction prompt short.) The answer is parsed (```json fences and prose around the object are
tolerated) and validated: its keys must be exactly the parts asked for, and every extracted sentence must be
supported by the source report: a substring after normalising case and whitespace, or a `difflib` ratio >=
`FUZZY_THRESHOLD` (0.9) with one report sentence, which then replaces it. Anything else is a hallucination. Invalid
answers and exceptions are retried `retries` times, then the rule backend answers; `SplitResult` records which
backend produced the texts, the attempts and the last error (`SplitResult.source` sums it up as one of
`TEXT_SOURCES`: "rules", "llm", "rules after LLM failure"). Results are cached in `cache_dir` as one JSON file per
sha256(model id, `PROMPT_VERSION`, report, sorted parts), written atomically, so a rerun never asks twice; a fallback
caused by an exception (e.g. the server was down) is not cached, so a rerun asks again.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import logging
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Hashable, Mapping, NamedTuple, Protocol, Sequence

from configuration_pedclip import DEFAULT_BODY_PARTS

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------ vocabulary

# Anatomy words naming each body part (whole words, case-insensitive; "-s"/"-es" plurals are matched automatically,
# hyphens and spaces are interchangeable). A phrase may be listed under several parts.
BODY_PART_KEYWORDS: dict[str, tuple[str, ...]] = {
    "chest": ("chest", "thorax", "thoracic cage", "chest wall", "lung", "lung field", "pulmonary", "heart", "cardiac",
              "cardiothymic", "cardiomediastinal", "cardiopulmonary", "cardiomegaly", "mediastinum", "mediastinal",
              "thymus", "thymic", "hilum", "hila", "hilar", "perihilar", "pleura", "pleural", "costophrenic",
              "hemithorax", "hemithoraces", "lobe", "lobar", "lingula", "lingular", "bronchus", "bronchi", "bronchial",
              "peribronchial", "bronchovascular", "air bronchogram", "airspace", "trachea", "tracheal", "carina",
              "diaphragm", "hemidiaphragm", "rib", "pneumothorax", "pneumonia", "atelectasis", "aortic arch"),
    "abdomen": ("abdomen", "abdominal", "bowel", "bowel gas", "small bowel", "large bowel", "colon", "colonic",
                "rectum", "rectal", "stomach", "gastric", "liver", "hepatic", "spleen", "splenic", "kidney", "renal",
                "pneumoperitoneum", "intussusception", "appendix", "appendicolith", "faecal", "fecal", "faeces",
                "feces", "stool", "peritoneal", "ileus"),
    "skull": ("skull", "cranium", "cranial", "calvarium", "calvaria", "calvarial", "cranial vault", "skull vault",
              "skull base", "fontanelle", "fontanel", "cranial suture", "coronal suture", "sagittal suture",
              "lambdoid suture", "metopic suture", "parietal bone", "occipital bone", "frontal bone", "temporal bone",
              "sella", "sella turcica", "craniosynostosis"),
    "facial_bones": ("facial bone", "face", "facial", "orbit", "orbital", "orbital floor", "maxilla", "maxillary",
                     "mandible", "mandibular", "nasal bone", "zygoma", "zygomatic", "zygomatic arch",
                     "paranasal sinus", "sinus", "maxillary sinus", "frontal sinus", "ethmoid", "sphenoid sinus", "jaw",
                     "temporomandibular", "dentition", "tooth", "teeth"),
    "neck": ("neck", "soft tissue neck", "prevertebral", "retropharyngeal", "adenoid", "adenoidal", "nasopharynx",
             "nasopharyngeal", "oropharynx", "pharynx", "pharyngeal", "larynx", "laryngeal", "epiglottis",
             "subglottic", "upper airway"),
    "cervical_spine": ("cervical spine", "c spine", "cervical vertebra", "cervical vertebrae", "cervical",
                       "odontoid", "odontoid peg", "dens", "atlas", "atlantoaxial", "atlanto axial",
                       "atlanto occipital", "craniocervical", "cervicothoracic"),
    "thoracic_spine": ("thoracic spine", "t spine", "thoracic vertebra", "thoracic vertebrae", "thoracolumbar",
                       "cervicothoracic", "thoracic kyphosis"),
    "lumbar_spine": ("lumbar spine", "l spine", "lumbar", "lumbar vertebra", "lumbar vertebrae", "lumbosacral",
                     "thoracolumbar", "pars interarticularis", "spondylolysis", "spondylolisthesis", "lumbar lordosis"),
    "whole_spine": ("whole spine", "entire spine", "full spine", "spine", "spinal", "vertebra", "vertebrae",
                    "vertebral", "vertebral body", "vertebral column", "intervertebral", "disc space",
                    "spinous process", "pedicle", "scoliosis", "kyphosis", "kyphoscoliosis", "cobb angle"),
    "pelvis": ("pelvis", "pelvic", "pelvic ring", "sacrum", "sacral", "sacroiliac", "si joint", "ilium", "iliac",
               "iliac crest", "iliac wing", "iliac spine", "ischium", "ischial", "pubis", "pubic", "pubic symphysis",
               "symphysis pubis", "pubic ramus", "pubic rami", "obturator", "coccyx", "triradiate cartilage"),
    "hip": ("hip", "hip joint", "femoral head", "capital femoral", "capital femoral epiphysis", "femoral neck",
            "neck of femur", "neck of the femur", "proximal femur", "proximal femoral", "acetabulum", "acetabular",
            "trochanter", "greater trochanter", "lesser trochanter", "intertrochanteric", "perthes",
            "legg calve perthes", "scfe", "ddh"),
    "femur": ("femur", "femora", "femoral", "femoral shaft", "femoral diaphysis", "mid femur", "thigh"),
    "knee": ("knee", "knee joint", "patella", "patellae", "patellar", "suprapatellar", "infrapatellar", "prepatellar",
             "patellofemoral", "distal femur", "distal femoral", "femoral condyle", "femoral epicondyle",
             "femoral trochlea", "intercondylar", "proximal tibia", "proximal tibial", "tibial plateau", "tibial spine",
             "tibial tuberosity", "tibial tubercle", "proximal fibula", "proximal fibular", "fibular head",
             "osgood schlatter", "sinding larsen"),
    "lower_leg": ("lower leg", "leg", "tibia", "tibiae", "tibial", "tibial shaft", "fibula", "fibulae", "fibular",
                  "fibular shaft", "tibia and fibula", "tib/fib", "shin", "calf", "toddler's fracture"),
    "ankle": ("ankle", "ankle joint", "ankle mortise", "mortise", "malleolus", "malleoli", "malleolar",
              "lateral malleolus", "medial malleolus", "distal tibia", "distal tibial", "distal fibula",
              "distal fibular", "talus", "talar", "talar dome", "tibiotalar", "talocrural", "syndesmosis", "tillaux",
              "triplane"),
    "foot": ("foot", "feet", "forefoot", "midfoot", "hindfoot", "metatarsal", "metatarsal neck", "tarsal", "tarsus",
             "tarsometatarsal", "lisfranc", "calcaneus", "calcaneal", "calcaneum", "navicular", "cuboid", "cuneiform",
             "toe", "great toe", "hallux", "heel", "metatarsophalangeal"),
    "shoulder": ("shoulder", "glenohumeral", "glenoid", "scapula", "scapulae", "scapular", "acromion", "acromial",
                 "acromioclavicular", "ac joint", "coracoid", "proximal humerus", "proximal humeral", "humeral head",
                 "surgical neck", "anatomical neck", "humeral neck"),
    "clavicle": ("clavicle", "clavicular", "collarbone", "collar bone", "sternoclavicular"),
    "humerus": ("humerus", "humeri", "humeral", "humeral shaft", "upper arm"),
    "elbow": ("elbow", "supracondylar", "supracondylar humerus", "supracondylar humeral", "distal humerus",
              "distal humeral", "radial head", "radial neck", "proximal radius", "proximal ulna", "olecranon",
              "capitellum", "capitellar", "trochlea", "trochlear", "epicondyle", "medial epicondyle",
              "lateral epicondyle", "lateral condyle", "medial condyle", "coronoid", "fat pad", "radiocapitellar",
              "anterior humeral line"),
    "forearm": ("forearm", "radius", "radii", "radial", "ulna", "ulnae", "ulnar", "radial shaft", "ulnar shaft",
                "radial and ulnar shaft", "radius and ulna", "monteggia", "galeazzi"),
    "wrist": ("wrist", "carpal", "carpus", "carpal bone", "scaphoid", "lunate", "triquetrum", "pisiform", "trapezium",
              "trapezoid", "capitate", "hamate", "scapholunate", "distal radius", "distal radial", "distal ulna",
              "distal ulnar", "distal radius and ulna", "distal radial and ulnar", "radial styloid", "ulnar styloid",
              "radiocarpal", "distal radioulnar", "druj"),
    "hand": ("hand", "metacarpal", "metacarpal neck", "phalanx", "phalanges", "phalangeal", "finger", "fingertip",
             "thumb", "index finger", "middle finger", "ring finger", "little finger", "digit",
             "metacarpophalangeal", "interphalangeal", "boxer's fracture"),
}  # fmt: skip

# Where a part's anatomy also shows, best first: a sentence naming only parts that were not asked for goes to the
# first asked part listed here for the first part it names.
ALSO_SEEN_ON: dict[str, tuple[str, ...]] = {
    "chest": ("abdomen", "thoracic_spine", "shoulder", "clavicle"), "abdomen": ("pelvis", "chest", "lumbar_spine"),
    "skull": ("facial_bones", "cervical_spine"), "facial_bones": ("skull",), "neck": ("cervical_spine", "chest"),
    "cervical_spine": ("neck", "whole_spine"), "thoracic_spine": ("whole_spine", "chest"),
    "lumbar_spine": ("whole_spine", "pelvis", "abdomen"),
    "whole_spine": ("thoracic_spine", "lumbar_spine", "cervical_spine"), "pelvis": ("hip", "abdomen", "lumbar_spine"),
    "hip": ("pelvis", "femur"), "femur": ("hip", "knee"), "knee": ("femur", "lower_leg"),
    "lower_leg": ("knee", "ankle"), "ankle": ("lower_leg", "foot"), "foot": ("ankle",),
    "shoulder": ("humerus", "clavicle", "chest"), "clavicle": ("shoulder", "chest"), "humerus": ("shoulder", "elbow"),
    "elbow": ("humerus", "forearm"), "forearm": ("wrist", "elbow"), "wrist": ("forearm", "hand"), "hand": ("wrist",),
}  # fmt: skip

_SPINE_LEVELS = re.compile(r"\b([ctl])(1[0-2]|[1-9])\b", re.I)
_LEVEL_PART = {"c": ("cervical_spine", 7), "t": ("thoracic_spine", 12), "l": ("lumbar_spine", 5)}

# Section headers by kind (case-insensitive; several spaces allowed).
SECTION_HEADERS: dict[str, tuple[str, ...]] = {
    "history": ("history", "clinical history", "medical history", "relevant history", "indication", "indications",
                "clinical indication", "clinical information", "clinical info", "clinical details", "clinical notes",
                "clinical question", "clinical data", "reason for exam", "reason for examination", "reason for study",
                "reason for referral", "reason", "presenting complaint", "referral", "hx", "clinical hx"),
    "context": ("comparison", "comparisons", "prior", "priors", "prior studies", "technique", "procedure",
                "examination", "exam", "views", "projections", "dose", "radiation dose", "referring physician",
                "referrer", "requested by", "signed", "electronically signed by", "reported by", "dictated by",
                "recommendation", "recommendations", "follow up"),
    "findings": ("findings", "finding", "report", "description", "observations"),
    "impression": ("impression", "impressions", "conclusion", "conclusions", "opinion", "summary", "interpretation",
                   "diagnosis", "result", "results", "comment", "comments", "addendum"),
}  # fmt: skip

_AGE_SEX = re.compile(
    r"\b\d+(?:\.\d+)?[\s-]*(?:years?|yrs?|months?|mo|weeks?|wks?|days?)[\s-]*old\b"
    r"|\b\d+(?:\.\d+)?\s*(?:y/?o|yo|y|yrs?|years?|m|mo|months?|weeks?|wks?|days?)\b[^.]*?"
    r"\b(?:boy|girl|male|female|child|infant|baby|neonate|newborn|toddler|adolescent|patient)\b"
    r"|^(?:male|female|boy|girl|infant|neonate|newborn)\b",
    re.I,
)
_REASON = re.compile(
    r"\?|\b(?:pain|painful|ache|aching|tender|tenderness|swelling|swollen|falls?|fell|fallen|injury|injuries|injured"
    r"|trauma|twist(?:ed|ing)?|limp(?:ing|s)?|fever|febrile|cough(?:ing)?|wheeze|wheezing|murmur|shortness of breath"
    r"|dyspno?ea|breathless|refus\w*|range of (?:movement|motion)|unable to|bruis\w*|history of|known|presents?"
    r"|presented|presenting|complain\w*|mechanism|collision|football|bicycle|trampoline|on examination|query"
    r"|r/o|rule out|to exclude|suspected|please)\b",
    re.I,
)
# Words that describe what an image shows (a radiologist's, not a clinician's): they veto a reason word.
_DESCRIPTOR = re.compile(
    r"\b(?:there (?:is|are)|(?:is|are) seen|seen|demonstrated|noted|visuali[sz]ed|identified|unremarkable|normal"
    r"|normally|intact|clear|lucen\w*|opacit\w*|scleros\w*|sclerotic|cortical|cortex|periosteal|alignment|aligned"
    r"|in keeping with|consistent with|compatible with|silhouette|physis|physes|growth plates?|soft tissues?|bony"
    r"|joint space|no acute|fracture line|enlarged|widened|widening|flattening|fragmentation|displacement|elevat\w*"
    r"|shows?|shown|demonstrat\w*|appears?)\b",
    re.I,
)
_FINDING_NOUN = re.compile(
    r"\b(?:fractures?|effusions?|consolidation|pneumonia|pneumothorax|dislocation|subluxation|lesions?|callus|healing"
    r"|cardiomegaly|collapse|erosions?|swelling|mass|abnormalit\w*)\b",
    re.I,
)
_CONTEXT_SENTENCE = re.compile(
    r"\b(?:compar\w*|(?:prior|previous|earlier) (?:study|studies|imaging|films?|radiographs?|examinations?|x-?rays?)"
    r"|views?|projections?|technique|dose|electronically signed|signed by|dictated by|reported by|verified by"
    r"|thank you for)\b",
    re.I,
)
# A sentence opening with one of these continues the previous sentence ("It is minimally displaced.").
_ANAPHORA = re.compile(
    r"(?:it|its|this|these|those|they|which|also|additionally|there (?:is|are) also"
    r"|the (?:fracture|fragment|lesion|abnormality|finding|deformity|collection)s?)\b",
    re.I,
)
_ABBREVIATIONS = {"dr", "mr", "mrs", "ms", "prof", "vs", "approx", "e.g", "i.e", "cf", "fig", "ref", "st"}


def _phrase_pattern(phrase: str) -> str:
    words = re.split(r"[\s-]+", phrase.strip())
    return r"[\s-]+".join(re.escape(word) for word in words)


def _normalise_phrase(text: str) -> str:
    return re.sub(r"[\s-]+", " ", text.strip().lower())


class _PartMatcher:
    """Finds the body parts a sentence names: one regex over every keyword, longest first (phrases win)."""

    def __init__(self, keywords: Mapping[str, Sequence[str]]):
        unknown = set(keywords) - set(DEFAULT_BODY_PARTS)
        if unknown:
            raise ValueError(f"keywords for unknown body parts {sorted(unknown)}; known: {DEFAULT_BODY_PARTS}")
        self.parts_of: dict[str, list[str]] = {}
        for part, words in keywords.items():
            for word in words:
                self.parts_of.setdefault(_normalise_phrase(word), []).append(part)
        alternatives = sorted(self.parts_of, key=len, reverse=True)
        self.pattern = re.compile(
            r"(?<!\w)(?:" + "|".join(_phrase_pattern(w) for w in alternatives) + r")(?:e?s)?(?!\w)", re.I
        )

    def _lookup(self, matched: str) -> list[str]:
        key = _normalise_phrase(matched)
        for candidate in (key, key[:-1], key[:-2]):
            if candidate in self.parts_of:
                return self.parts_of[candidate]
        return []

    def __call__(self, sentence: str) -> list[str]:
        """The parts `sentence` names, in order of first mention."""
        found = [(m.start(), part) for m in self.pattern.finditer(sentence) for part in self._lookup(m.group(0))]
        for level in _SPINE_LEVELS.finditer(sentence):
            part, last = _LEVEL_PART[level.group(1).lower()]
            if int(level.group(2)) <= last:
                found.append((level.start(), part))
        return list(dict.fromkeys(part for _, part in sorted(found, key=lambda item: item[0])))


# ------------------------------------------------------------------------------------------------ sentences


def split_sentences(text: str) -> list[str]:
    """Split text into sentences: at line breaks, and after . ! ? followed by space and a non-lowercase character
    (not after common abbreviations such as "Dr." or "e.g.")."""
    sentences = []
    for line in text.splitlines():
        start = 0
        for boundary in re.finditer(r"(?<=[.!?])\s+(?=[^a-z\s])", line):
            before = line[start : boundary.start()].rstrip(".!?").split()
            if before and before[-1].lower() in _ABBREVIATIONS:
                continue
            sentences.append(line[start : boundary.start()])
            start = boundary.end()
        sentences.append(line[start:])
    return [s.strip() for s in sentences if re.search(r"\w", s)]


def _normalise_sentence(sentence: str) -> str:
    return re.sub(r"\s+", " ", sentence).strip(" \t\n.;:,").casefold()


class SentenceScores(NamedTuple):
    """Micro-averaged sentence-level scores (see `sentence_f1`)."""

    precision: float
    recall: float
    f1: float
    true_positives: int
    num_predicted: int
    num_true: int


def sentence_f1(predicted: Mapping[Hashable, str], truth: Mapping[Hashable, str]) -> SentenceScores:
    """Sentence-level precision/recall/F1, micro-averaged over (key, sentence) pairs.

    `predicted` and `truth` map a key (e.g. `(study_id, body_part)`) to text; both texts are split with
    `split_sentences` and compared as multisets of case- and whitespace-normalised sentences. A key missing on one
    side counts as empty text. With nothing predicted and nothing true, all scores are 1.
    """
    hits = num_predicted = num_true = 0
    for key in set(predicted) | set(truth):
        said = Counter(map(_normalise_sentence, split_sentences(predicted.get(key, "") or "")))
        true = Counter(map(_normalise_sentence, split_sentences(truth.get(key, "") or "")))
        hits += sum((said & true).values())
        num_predicted += sum(said.values())
        num_true += sum(true.values())
    precision = hits / num_predicted if num_predicted else float(num_true == 0)
    recall = hits / num_true if num_true else float(num_predicted == 0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return SentenceScores(precision, recall, f1, hits, num_predicted, num_true)


# ------------------------------------------------------------------------------------------------ sections

_CLOSING_KINDS = ("history", "context", "findings")  # headers that end a history/context section whole
_HEADER_KIND = {_normalise_phrase(name): kind for kind, names in SECTION_HEADERS.items() for name in names}
_HEADER_NAMES = "|".join(_phrase_pattern(name) for name in sorted(_HEADER_KIND, key=len, reverse=True))
_HEADER_RE = re.compile(
    rf"(?<![\w-])(?P<inline>{_HEADER_NAMES})[ \t]*:|^[ \t]*(?P<alone>{_HEADER_NAMES})[ \t]*$", re.I | re.M
)


def is_history_like(sentence: str) -> bool:
    """Rule 2 of the module docstring: age/sex, or a reason word without an imaging-description word."""
    if _AGE_SEX.search(sentence):
        return True
    return bool(_REASON.search(sentence)) and not _DESCRIPTOR.search(sentence)


def _is_context_like(sentence: str) -> bool:
    """A comparison/technique/signature sentence that states no finding."""
    return (
        bool(_CONTEXT_SENTENCE.search(sentence))
        and not _FINDING_NOUN.search(sentence)
        and not _DESCRIPTOR.search(sentence)
    )


def _leading_run(sentences: list[str], member: Callable[[str], bool], first_always: bool) -> int:
    count = 1 if first_always and sentences else 0
    while count < len(sentences) and member(sentences[count]):
        count += 1
    return count


def _is_title(sentence: str) -> bool:
    """An exam title line such as "XR LEFT WRIST 2 VIEWS": no lowercase letter, no final full stop."""
    return not re.search(r"[a-z]", sentence) and not sentence.endswith((".", "!", "?"))


def _kept_sentences(kind: str | None, body: str, closed: bool) -> list[str]:
    """The sentences of one section body that rules 1-2 keep (`kind` None: the text before the first header)."""
    if kind in ("findings", "impression"):
        return split_sentences(body)
    body = body.strip()
    paragraph = re.search(r"\n[ \t]*\n", body)
    if kind is not None and paragraph:  # a history/context section ends at a blank line
        return split_sentences(body[paragraph.end() :])
    if kind is not None and closed:
        return []
    sentences = split_sentences(body)
    member = _is_context_like if kind == "context" else is_history_like
    return sentences[_leading_run(sentences, member, first_always=kind is not None) :]


def report_sections(report: str) -> list[list[str]]:
    """The report's findings/impression sentences, per section, with history and context removed (rules 1-3)."""
    report = report.replace("\r\n", "\n").replace("\r", "\n")
    headers = list(_HEADER_RE.finditer(report))
    kinds = [_HEADER_KIND[_normalise_phrase(m.group("inline") or m.group("alone"))] for m in headers]
    starts = [0] + [m.end() for m in headers]
    ends = [m.start() for m in headers] + [len(report)]
    sections = []
    for index, kind in enumerate([None] + kinds):
        following = kinds[index] if index < len(kinds) else None
        sentences = _kept_sentences(kind, report[starts[index] : ends[index]], following in _CLOSING_KINDS)
        if kind is None and headers:  # exam title lines before the first header
            sentences = [s for s in sentences if not _is_title(s)]
        kept = [s for s in sentences if not _is_context_like(s)]
        if kept:
            sections.append(kept)
    return sections


def remove_history(report: str) -> str:
    """The report without clinical history and irrelevant context: its kept sentences joined by spaces."""
    return " ".join(sentence for section in report_sections(report) for sentence in section)


# ------------------------------------------------------------------------------------------------ rule backend


TEXT_SOURCES = ("rules", "llm", "rules after LLM failure")  # the values of `SplitResult.source`


@dataclass(frozen=True)
class SplitResult:
    """What a backend produced: `texts` ({part: text}), which backend produced them, LLM attempts made (0 for the
    rules), the last error if the LLM failed, and whether the result came from the cache."""

    texts: dict[str, str]
    backend_used: str
    attempts: int = 0
    error: str | None = None
    cached: bool = False

    @property
    def source(self) -> str:
        """How the texts were produced, one of `TEXT_SOURCES`: "rules", "llm" (any LLM backend), or "rules after
        LLM failure" (its answers stayed invalid or it could not be reached)."""
        if self.backend_used != "rules":
            return "llm"
        return "rules" if self.error is None else "rules after LLM failure"


class SplitBackend(Protocol):
    def split(self, report: str, body_parts: Sequence[str]) -> SplitResult: ...


def check_body_parts(body_parts: Sequence[str]) -> tuple[str, ...]:
    """Validate body part names against the config vocabulary; duplicates are dropped, order kept."""
    if isinstance(body_parts, str):
        raise TypeError(f"body_parts must be a sequence of names, not the string {body_parts!r}")
    unknown = sorted({part for part in body_parts if part not in DEFAULT_BODY_PARTS})
    if unknown:
        raise ValueError(f"unknown body parts {unknown}; known: {', '.join(DEFAULT_BODY_PARTS)}")
    return tuple(dict.fromkeys(body_parts))


class RuleBackend:
    """Section headers, history removal and anatomy keywords (rules in the module docstring); no model needed.

    `keywords` replaces `BODY_PART_KEYWORDS` (e.g. to add a hospital's local terms), `also_seen_on` replaces
    `ALSO_SEEN_ON`.
    """

    name = "rules"

    def __init__(self, keywords: Mapping[str, Sequence[str]] | None = None, also_seen_on=None):
        self.parts_named = _PartMatcher(BODY_PART_KEYWORDS if keywords is None else keywords)
        self.also_seen_on = ALSO_SEEN_ON if also_seen_on is None else also_seen_on

    def _target(self, named: list[str], asked: tuple[str, ...]) -> tuple[str, ...]:
        hits = tuple(part for part in asked if part in named)
        if hits or not named:
            return hits
        neighbours = [part for part in self.also_seen_on.get(named[0], ()) if part in asked]
        return tuple(neighbours[:1])

    def _label(self, sentence: str, asked: tuple[str, ...]) -> tuple[str, ...] | None:
        """The parts of a label ("LEFT WRIST:" alone, or "Left knee: small effusion."), None if it is none."""
        head, colon, _ = sentence.partition(":")
        if not colon or len(head.split()) > 5:
            return None
        named = self.parts_named(head)
        return self._target(named, asked) if named else None

    def split(self, report: str, body_parts: Sequence[str]) -> SplitResult:
        asked = check_body_parts(body_parts)
        texts: dict[str, list[str]] = {part: [] for part in asked}
        for section in report_sections(report):
            previous, labelled = asked, None
            for sentence in section:
                labelled = self._label(sentence, asked) or labelled
                named = self.parts_named(sentence)
                if named:
                    target = self._target(named, asked)
                elif _ANAPHORA.match(sentence):
                    target = previous
                else:
                    target = labelled if labelled is not None else asked
                if not sentence.endswith(":"):  # a label line alone is not text
                    for part in target:
                        texts[part].append(sentence)
                previous = target
        return SplitResult({part: " ".join(sentences) for part, sentences in texts.items()}, self.name)


def split_report(report: str, body_parts: Sequence[str], backend: SplitBackend | None = None) -> dict[str, str]:
    """`{body_part: text}` for exactly `body_parts` ("" where the report says nothing of a part).

    Give every body part the study imaged: the rules use the list to tell imaged parts from the others (a sentence
    about a part that was not imaged goes to a neighbouring imaged part or is dropped).

    `backend` defaults to `RuleBackend()`; pass a `TransformersBackend`/`OpenAIBackend` to use an LLM.
    """
    parts = check_body_parts(body_parts)
    return (backend or _default_rules()).split(report, parts).texts


@functools.lru_cache(maxsize=1)
def _default_rules() -> RuleBackend:
    return RuleBackend()  # compiled once: the keyword regex is large


# ------------------------------------------------------------------------------------------------ LLM answers

PROMPT_VERSION = "1"
SYSTEM_PROMPT = (
    "You edit pediatric radiology reports. You copy sentences from the report word for word; you never add, "
    "rephrase, summarise or infer anything."
)
CLEAN_PROMPT = (
    "Remove the medical history, the clinical indication and any irrelevant context (comparison with prior studies, "
    "technique, views, dose, signatures, recommendations) from this imaging report. Keep every sentence that "
    "describes the images, copied word for word. Answer with the remaining report text only.\n\n"
    "Imaging report:\n{report}"
)
EXTRACT_PROMPT = (
    "From the imaging report, extract the text of these body parts: {parts}.\n"
    "Copy the sentences word for word, in report order. A sentence about several of these body parts goes to each "
    "of them. Use an empty string for a body part the report does not describe. Answer with a JSON object only, "
    "with exactly these keys:\n{template}\n\nImaging report:\n{report}"
)
FUZZY_THRESHOLD = 0.9

Messages = list[dict[str, str]]
Chat = Callable[[Messages], str]


class InvalidAnswer(ValueError):
    """An LLM answer that is not valid JSON, has the wrong keys, or holds text the report does not support."""


def _messages(prompt: str) -> Messages:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]


def _strip_fences(answer: str) -> str:
    fenced = re.search(r"```[\w-]*\s*\n?(.*?)```", answer, re.S)
    return (fenced.group(1) if fenced else answer).strip()


def parse_json_answer(answer: str) -> dict:
    """The first JSON object in `answer` (```json fences and prose around it are tolerated)."""
    decoder = json.JSONDecoder()
    for text in (_strip_fences(answer), answer):
        for brace in re.finditer(r"\{", text):
            try:
                value, _ = decoder.raw_decode(text, brace.start())
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    raise InvalidAnswer("no JSON object in the answer")


def _supported(sentence: str, report_norm: str, report_sentences: list[str]) -> str | None:
    """`sentence` if the report holds it (normalised substring), else its fuzzy match among report sentences."""
    norm = _normalise_sentence(sentence)
    if norm and re.search(r"(?<!\w)" + re.escape(norm) + r"(?!\w)", report_norm):
        return sentence
    best, best_ratio = None, FUZZY_THRESHOLD
    for candidate in report_sentences:
        matcher = difflib.SequenceMatcher(None, norm, _normalise_sentence(candidate), autojunk=False)
        if matcher.quick_ratio() >= best_ratio and matcher.ratio() >= best_ratio:
            best, best_ratio = candidate, matcher.ratio()
    return best


def _answer_value(part: str, value) -> str:
    if value is None:
        return ""
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return " ".join(value)
    if not isinstance(value, str):
        raise InvalidAnswer(f"value of {part!r} is a {type(value).__name__}, not text")
    if value.strip() in ("...", "\u2026"):
        raise InvalidAnswer(f"value of {part!r} repeats the template")
    return value


def validate_answer(answer: Mapping, report: str, body_parts: Sequence[str]) -> dict[str, str]:
    """Check an extraction answer: keys exactly `body_parts` (case, spaces and hyphens ignored), every sentence
    supported by `report` (substring or fuzzy match, see `FUZZY_THRESHOLD`). Returns `{part: text}`."""
    values = {re.sub(r"[\s-]+", "_", str(key).strip().lower()): value for key, value in answer.items()}
    if set(values) != set(body_parts):
        extra = sorted(k if k in DEFAULT_BODY_PARTS else "<not a body part>" for k in set(values) - set(body_parts))
        missing = sorted(set(body_parts) - set(values))
        raise InvalidAnswer(f"keys do not match the body parts asked for (extra {extra}, missing {missing})")
    report_norm = re.sub(r"\s+", " ", report).casefold()
    report_sentences = split_sentences(_HEADER_RE.sub("\n", report))
    texts = {}
    for part in body_parts:
        kept = []
        for sentence in split_sentences(_answer_value(part, values[part])):
            source = _supported(sentence, report_norm, report_sentences)
            if source is None:
                raise InvalidAnswer(f"text for {part!r} is not in the report (hallucinated sentence)")
            kept.append(source)
        texts[part] = " ".join(kept)
    return texts


def ask_llm(chat: Chat, report: str, body_parts: Sequence[str]) -> dict[str, str]:
    """The two prompts (clean, then extract) for one report; raises `InvalidAnswer` on an unusable answer."""
    cleaned = _strip_fences(chat(_messages(CLEAN_PROMPT.format(report=report))))
    if not cleaned:
        raise InvalidAnswer("empty answer to the cleaning prompt")
    names = ", ".join(part.replace("_", " ") for part in body_parts)
    template = json.dumps({part: "..." for part in body_parts})
    prompt = EXTRACT_PROMPT.format(parts=names, template=template, report=cleaned)
    return validate_answer(parse_json_answer(chat(_messages(prompt))), report, body_parts)


# ------------------------------------------------------------------------------------------------ cache


def cache_key(model_id: str, report: str, body_parts: Sequence[str]) -> str:
    """sha256 of (model id, `PROMPT_VERSION`, report, sorted parts)."""
    payload = json.dumps([model_id, PROMPT_VERSION, report, sorted(body_parts)], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _cache_read(cache_dir, key: str) -> SplitResult | None:
    if cache_dir is None:
        return None
    path = Path(cache_dir) / f"{key}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return SplitResult(data["texts"], data["backend_used"], data["attempts"], data["error"], cached=True)
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        logger.debug("ignoring unreadable cache file %s: %s", path, exc)
        return None


def _cache_write(cache_dir, key: str, result: SplitResult) -> None:
    """One JSON file per key, written to a temporary file and renamed (atomic on POSIX and Windows)."""
    if cache_dir is None:
        return
    directory = Path(cache_dir)
    directory.mkdir(parents=True, exist_ok=True)
    data = {"texts": result.texts, "backend_used": result.backend_used, "attempts": result.attempts,
            "error": result.error}  # fmt: skip
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=directory, suffix=".tmp", delete=False) as handle:
        json.dump(data, handle, ensure_ascii=False)
    os.replace(handle.name, directory / f"{key}.json")


# ------------------------------------------------------------------------------------------------ LLM backends


def llm_split(
    report: str,
    body_parts: Sequence[str],
    chat: Chat,
    *,
    model_id: str,
    retries: int = 2,
    cache_dir: str | os.PathLike | None = None,
    backend_name: str = "llm",
    fallback: SplitBackend | None = None,
) -> SplitResult:
    """Split with an LLM behind `chat(messages) -> str`: cached, validated, retried `retries` times, then the
    `fallback` (default `RuleBackend()`) answers with the error recorded."""
    parts = check_body_parts(body_parts)
    if retries < 0:
        raise ValueError(f"retries={retries}: must be >= 0")
    key = cache_key(model_id, report, parts)
    cached = _cache_read(cache_dir, key)
    if cached is not None:  # keyed by the sorted parts: give them back in the order asked
        return replace(cached, texts={part: cached.texts.get(part, "") for part in parts})
    error, transient, attempt = None, False, 0
    for attempt in range(1, retries + 2):
        try:
            texts = ask_llm(chat, report, parts)
        except InvalidAnswer as exc:
            error, transient = f"invalid answer: {exc}", False
        except Exception as exc:  # a broken model or server must not stop a curation run
            error, transient = f"{type(exc).__name__}: {exc}", True
        else:
            result = SplitResult(texts, backend_name, attempt)
            _cache_write(cache_dir, key, result)
            return result
        logger.debug("%s attempt %d failed: %s", backend_name, attempt, error)
    logger.warning("%s failed after %d attempts (%s); falling back to rules", backend_name, attempt, error)
    result = replace((fallback or _default_rules()).split(report, parts), attempts=attempt, error=error)
    if not transient:
        _cache_write(cache_dir, key, result)
    return result


@dataclass
class ChatBackend:
    """An LLM behind any `chat(messages) -> str` callable (OpenAI-style messages). `model_id` keys the cache."""

    chat: Chat
    model_id: str
    retries: int = 2
    cache_dir: str | os.PathLike | None = None
    fallback: SplitBackend | None = None
    name: str = field(default="chat", kw_only=True)

    def split(self, report: str, body_parts: Sequence[str]) -> SplitResult:
        return llm_split(report, body_parts, self.chat, model_id=self.model_id, retries=self.retries,
                         cache_dir=self.cache_dir, backend_name=self.name, fallback=self.fallback)  # fmt: skip


class TransformersBackend(ChatBackend):
    """A local instruction model (a Hub id or folder with a chat template) through transformers' text-generation
    pipeline, greedy decoding. The pipeline is built on first use; `pipeline_kwargs` go to `transformers.pipeline`
    (e.g. `device_map="auto"`, `model_kwargs={...}`)."""

    def __init__(self, model_path: str | os.PathLike, *, retries: int = 2, cache_dir=None, max_new_tokens: int = 512,
                 device=None, dtype="auto", fallback: SplitBackend | None = None, **pipeline_kwargs):  # fmt: skip
        super().__init__(self._chat, str(model_path), retries, cache_dir, fallback, name="transformers")
        self.max_new_tokens = max_new_tokens
        self._pipeline_kwargs = {"device": device, "dtype": dtype, **pipeline_kwargs}
        self._generator = None

    @property
    def generator(self):
        """The text-generation pipeline (built on first access)."""
        if self._generator is None:
            from transformers import pipeline

            self._generator = pipeline("text-generation", model=self.model_id, **self._pipeline_kwargs)
        return self._generator

    def _chat(self, messages: Messages) -> str:
        output = self.generator(messages, max_new_tokens=self.max_new_tokens, do_sample=False, return_full_text=False)
        text = output[0]["generated_text"]
        if isinstance(text, list):  # a chat transcript: the answer is the last message
            text = text[-1]["content"]
        return text if isinstance(text, str) else json.dumps(text)


class OpenAIBackend(ChatBackend):
    """An OpenAI-compatible chat server that the user runs (vLLM, TGI...): `POST {base_url}/chat/completions`.

    Opt-in only: reports are sent to `base_url`, so give your own server's address (e.g. `http://localhost:8000/v1`).
    The bearer token is read from the environment variable `api_key_env` when it is set.
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY", timeout: float = 120.0,
                 max_tokens: int = 1024, retries: int = 2, cache_dir=None, fallback=None):  # fmt: skip
        parsed = urllib.parse.urlparse(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"base_url must be an http(s) URL such as http://localhost:8000/v1, got {base_url!r}")
        super().__init__(self._chat, model, retries, cache_dir, fallback, name="openai")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.api_key_env, self.timeout, self.max_tokens = api_key_env, timeout, max_tokens

    def _chat(self, messages: Messages) -> str:
        body = {"model": self.model_id, "messages": messages, "temperature": 0, "max_tokens": self.max_tokens}
        headers = {"Content-Type": "application/json"}
        if os.environ.get(self.api_key_env):
            headers["Authorization"] = f"Bearer {os.environ[self.api_key_env]}"
        request = urllib.request.Request(self.url, json.dumps(body).encode("utf-8"), headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                data = json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            raise ConnectionError(f"{self.url} answered HTTP {exc.code} {exc.reason}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise ConnectionError(f"cannot reach {self.url}: {getattr(exc, 'reason', exc)}") from exc
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as exc:
            raise RuntimeError(f"{self.url} did not return a chat completion") from exc
        if not isinstance(content, str):
            raise RuntimeError(f"{self.url} returned a chat completion without text content")
        return content


def make_backend(model: str | None = None, base_url: str | None = None, **options) -> SplitBackend:
    """A backend from command-line style options: no model -> `RuleBackend()`; a model alone -> a local
    `TransformersBackend(model)`; a model and a base URL -> `OpenAIBackend(base_url, model)`. `options` go to the
    LLM backend (`cache_dir`, `retries`, ...)."""
    if model is None:
        if base_url is not None:
            raise ValueError("base_url needs a model name (the model the server serves)")
        return RuleBackend()
    if base_url is None:
        return TransformersBackend(model, **options)
    return OpenAIBackend(base_url, model, **options)


__all__ = [
    "ALSO_SEEN_ON", "BODY_PART_KEYWORDS", "CLEAN_PROMPT", "EXTRACT_PROMPT", "FUZZY_THRESHOLD", "PROMPT_VERSION",
    "SECTION_HEADERS", "SYSTEM_PROMPT", "TEXT_SOURCES", "ChatBackend", "InvalidAnswer", "OpenAIBackend", "RuleBackend",
    "SentenceScores", "SplitBackend", "SplitResult", "TransformersBackend", "ask_llm", "cache_key",
    "check_body_parts", "is_history_like", "llm_split", "make_backend", "parse_json_answer", "remove_history",
    "report_sections", "sentence_f1", "split_report", "split_sentences", "validate_answer",
]  # fmt: skip
