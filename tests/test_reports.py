"""Tests for pexr.reports: rule-based report splitting (headers, history removal, keyword assignment, PeXR-mini F1),
the sentence F1 metric, and the LLM backends (answer parsing and validation, retries, fallback, cache, a tiny local
transformers model, an OpenAI-compatible server on localhost). Nothing touches the network."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import http.server
import json
import logging
import socket
import threading
import time

import pytest

from configuration_pedclip import DEFAULT_BODY_PARTS
from pexr.reports import (
    ALSO_SEEN_ON,
    BODY_PART_KEYWORDS,
    TEXT_SOURCES,
    ChatBackend,
    InvalidAnswer,
    OpenAIBackend,
    RuleBackend,
    SplitResult,
    TransformersBackend,
    cache_key,
    is_history_like,
    llm_split,
    make_backend,
    parse_json_answer,
    remove_history,
    sentence_f1,
    split_report,
    split_sentences,
    validate_answer,
)
from pexr.synthetic import generate_pexr_mini

REPORT = (
    "Clinical history: 9-year-old girl. Fell off a trampoline, query fracture.\n"
    "Comparison: None.\n"
    "Findings: Buckle fracture of the distal radius. It is minimally angulated. The left hand is normal. "
    "No fracture of the fifth metacarpal.\n"
    "Impression: Distal radius buckle fracture."
)
WRIST = "Buckle fracture of the distal radius. It is minimally angulated. Distal radius buckle fracture."
HAND = "The left hand is normal. No fracture of the fifth metacarpal."


@pytest.fixture(scope="module")
def pexr_studies():
    """PeXR-mini grouped by study: (report, {part: ground-truth text}, history)."""
    dataset = generate_pexr_mini(num_patients=200, seed=1, image_size=32)
    studies = {}
    for split in dataset.values():
        for row in split.remove_columns("image"):
            report, parts, history = studies.setdefault(row["study_id"], (row["report"], {}, row["history"]))
            parts[row["body_part"]] = row["text"]
    return studies


# ------------------------------------------------------------------------------------------------ rules: API


def test_vocabulary_tables_cover_every_body_part():
    assert set(BODY_PART_KEYWORDS) == set(DEFAULT_BODY_PARTS)
    assert set(ALSO_SEEN_ON) == set(DEFAULT_BODY_PARTS)
    assert all(set(neighbours) <= set(DEFAULT_BODY_PARTS) for neighbours in ALSO_SEEN_ON.values())
    rules = RuleBackend()
    for part in DEFAULT_BODY_PARTS:
        assert part in rules.parts_named(f"Normal {part.replace('_', ' ')}."), part


def test_unknown_body_parts_raise():
    with pytest.raises(ValueError, match="elbw.*knees|knees.*elbw"):
        split_report(REPORT, ["wrist", "elbw", "knees"])
    with pytest.raises(TypeError):
        split_report(REPORT, "wrist")
    with pytest.raises(ValueError, match="tail"):
        RuleBackend(keywords={"tail": ("tail",)})


def test_split_returns_exactly_the_parts_asked_for():
    out = split_report(REPORT, ["wrist", "hand", "knee"])
    assert list(out) == ["wrist", "hand", "knee"]
    assert out == {"wrist": WRIST, "hand": HAND, "knee": ""}
    assert split_report(REPORT, []) == {}
    result = RuleBackend().split(REPORT, ["hand", "wrist"])
    assert result == SplitResult({"hand": HAND, "wrist": WRIST}, "rules", 0, None) and result.source == "rules"


# ------------------------------------------------------------------------------------------------ rules: sections


@pytest.mark.parametrize(
    "report",
    [
        "History: 7-year-old boy. Fall. Findings: No fracture of the left elbow. Impression: Normal elbow.",
        "INDICATION:\nFall.\n\nFINDINGS:\nNo fracture of the left elbow.\n\nIMPRESSION:\nNormal elbow.",
        "clinical information: Fall.\nfindings: No fracture of the left elbow.\nimpression: Normal elbow.",
        "Reason for exam: Fall\nFINDINGS\nNo fracture of the left elbow.\nCONCLUSION\nNormal elbow.",
        "Indication: Fall. No fracture of the left elbow. Normal elbow.",  # history runs on without a header
        "History: Fall.\n\nNo fracture of the left elbow. Normal elbow.",  # history ends at a blank line
        "7-year-old boy, painful left elbow after a fall. No fracture of the left elbow. Normal elbow.",  # no headers
        "Technique: AP and lateral. No fracture of the left elbow. Normal elbow.",
    ],
)
def test_headers_and_history_removal(report):
    assert split_report(report, ["elbow"]) == {"elbow": "No fracture of the left elbow. Normal elbow."}


HISTORY_LIKE = ("8-year-old boy.", "9 yo female.", "Fall, query fracture.", "Swelling of the foot, query infection.",
                "Painful right hip for a month.", "? fracture", "Limping, refusing to bear weight.")  # fmt: skip
NOT_HISTORY_LIKE = ("Soft tissue swelling over the lateral malleolus.", "No fracture of the hand.", "Normal heart.",
                    "Periosteal reaction along the ulna; correlate clinically for infection.")  # fmt: skip


def test_history_like_sentences():
    assert all(is_history_like(sentence) for sentence in HISTORY_LIKE)
    assert not any(is_history_like(sentence) for sentence in NOT_HISTORY_LIKE)


def test_history_in_a_header_bounded_section_is_dropped_whole():
    report = "History: Known osteogenesis imperfecta. Previous fracture of the femur.\nFindings: The femur is intact."
    assert split_report(report, ["femur"]) == {"femur": "The femur is intact."}


def test_title_and_label_lines():
    report = "XR LEFT WRIST AND HAND 4 VIEWS\nIndication: fall.\nFindings:\nLEFT WRIST:\nNo fracture.\nHAND:\nNormal."
    assert split_report(report, ["wrist", "hand"]) == {"wrist": "No fracture.", "hand": "Normal."}
    report = "Both hips: Normal femoral heads. Shenton's lines intact. Left knee: Small effusion. No fracture."
    assert split_report(report, ["hip", "knee"]) == {
        "hip": "Both hips: Normal femoral heads. Shenton's lines intact.",
        "knee": "Left knee: Small effusion. No fracture.",
    }


def test_context_sentences_dropped_unless_they_state_a_finding():
    report = (
        "AP and lateral views of the left wrist. No previous imaging for comparison. "
        "Compared with the prior study, the distal radius fracture shows callus. Comparison: 2 May 2024."
    )
    assert remove_history(report) == "Compared with the prior study, the distal radius fracture shows callus."


# ------------------------------------------------------------------------------------------------ rules: keywords


def test_keywords_are_whole_words_and_longest_phrases_win():
    named = RuleBackend().parts_named
    assert named("Injury during football.") == []  # "foot" is not in "football"
    assert named("Fracture of the fifth metacarpal.") == ["hand"]  # "carpal" is not in "metacarpal"
    assert named("Fracture of the distal radius.") == ["wrist"]  # not the forearm's "radius"
    assert named("Fracture of the radial shaft.") == ["forearm"]
    assert named("The femoral heads are normal.") == ["hip"]  # plural of "femoral head", not the femur
    assert named("Supracondylar humerus fracture.") == ["elbow"]
    assert named("FRACTURE OF THE TIBIAL PLATEAU AND THE ANKLE.") == ["knee", "ankle"]
    assert named("Wedging of T12 and L1, C2 normal.") == ["thoracic_spine", "lumbar_spine", "cervical_spine"]
    assert named("Legg-Calve-Perthes disease.") == ["hip"]


def test_sentence_assignment_rules():
    report = (
        "Findings: Fracture of the distal radius. It is minimally displaced. No dislocation. "
        "No fracture of the fifth metatarsal. It is intact. Soft tissues of the hand and wrist are normal.\n"
        "Impression: No other acute bony injury."
    )
    out = split_report(report, ["wrist", "hand"])
    # no part named: an anaphora continues the previous sentence, anything else goes to every part; metatarsal (foot)
    # not imaged: dropped, with its continuation; two asked parts named: both
    assert out["wrist"] == (
        "Fracture of the distal radius. It is minimally displaced. No dislocation. "
        "Soft tissues of the hand and wrist are normal. No other acute bony injury."
    )
    assert out["hand"] == "No dislocation. Soft tissues of the hand and wrist are normal. No other acute bony injury."
    # the documented limitation: an unlabelled sentence naming no part goes to every imaged part
    assert split_report("Findings: Small knee effusion. No fracture.", ["knee", "chest"]) == {
        "knee": "Small knee effusion. No fracture.", "chest": "No fracture.",
    }  # fmt: skip
    # a part that was not imaged but shows on an imaged part's film goes there (ALSO_SEEN_ON)
    assert split_report("Fracture of the distal radius.", ["forearm"]) == {"forearm": "Fracture of the distal radius."}
    assert split_report("Fracture of the distal radius.", ["knee"]) == {"knee": ""}


def test_split_sentences():
    text = "Fracture seen by Dr. Smith, e.g. the radius. Angle 2.5 degrees! Is it healed? yes.\nLeft hip: normal"
    assert split_sentences(text) == [
        "Fracture seen by Dr. Smith, e.g. the radius.", "Angle 2.5 degrees!", "Is it healed? yes.", "Left hip: normal",
    ]  # fmt: skip


def test_sentence_f1_metric():
    truth = {("s1", "hip"): "A. B.", ("s1", "knee"): "C.", ("s2", "chest"): "D. E."}
    predicted = {("s1", "hip"): "a.  B", ("s1", "knee"): "A.", ("s3", "hand"): "F."}
    scores = sentence_f1(predicted, truth)
    assert (scores.true_positives, scores.num_predicted, scores.num_true) == (2, 4, 5)
    assert scores.precision == pytest.approx(0.5) and scores.recall == pytest.approx(0.4)
    assert scores.f1 == pytest.approx(2 * 0.5 * 0.4 / 0.9)
    assert sentence_f1({}, {("s", "hip"): ""}).f1 == 1.0
    assert sentence_f1({("s", "hip"): "X."}, {}).f1 == 0.0


def test_rules_recover_pexr_mini_text(pexr_studies):
    predicted, truth, leaked = {}, {}, 0
    for study_id, (report, parts, history) in pexr_studies.items():
        texts = split_report(report, list(parts))
        assert list(texts) == list(parts)
        for part, text in texts.items():
            predicted[study_id, part], truth[study_id, part] = text, parts[part]
            leaked += sum(sentence in split_sentences(history) for sentence in split_sentences(text))
    scores = sentence_f1(predicted, truth)
    assert len(pexr_studies) > 300 and scores.num_true > 1000
    assert scores.f1 >= 0.9, scores
    assert leaked == 0


# ------------------------------------------------------------------------------------------------ LLM answers


def test_parse_json_answer_tolerates_fences_and_prose():
    expected = {"hip": "a", "knee": ""}
    assert parse_json_answer('```json\n{"hip": "a", "knee": ""}\n```') == expected
    assert parse_json_answer('Sure! {not json} Here it is: {"hip": "a", "knee": ""} Hope this helps.') == expected
    with pytest.raises(InvalidAnswer, match="no JSON object"):
        parse_json_answer("I cannot help with that. [1, 2]")


def test_validate_answer_rejects_hallucinations_and_wrong_keys():
    answer = {"Wrist": "buckle   FRACTURE of the distal radius. It is minimaly angulated", "hand": HAND}
    texts = validate_answer(answer, REPORT, ["wrist", "hand"])
    # substring match keeps the answer's words; a fuzzy match is replaced by the report's sentence
    assert texts == {"wrist": "buckle   FRACTURE of the distal radius. It is minimally angulated.", "hand": HAND}
    assert validate_answer({"lower leg": None}, "Normal tibia.", ["lower_leg"]) == {"lower_leg": ""}
    with pytest.raises(InvalidAnswer, match="hallucinated"):
        validate_answer({"wrist": "Fracture of the scaphoid.", "hand": ""}, REPORT, ["wrist", "hand"])
    with pytest.raises(InvalidAnswer, match="hallucinated"):  # a substring must be whole words
        validate_answer({"wrist": "Rad", "hand": ""}, REPORT, ["wrist", "hand"])
    with pytest.raises(InvalidAnswer, match="template"):
        validate_answer({"wrist": "...", "hand": "..."}, REPORT, ["wrist", "hand"])
    with pytest.raises(InvalidAnswer, match="<not a body part>"):  # report text never goes into the error
        validate_answer({"wrist": "", "hand": "", "No fracture": ""}, REPORT, ["wrist", "hand"])
    with pytest.raises(InvalidAnswer, match="missing \\['hand'\\]"):
        validate_answer({"wrist": ""}, REPORT, ["wrist", "hand"])
    with pytest.raises(InvalidAnswer, match="extra \\['knee'\\]"):
        validate_answer({"wrist": "", "hand": "", "knee": ""}, REPORT, ["wrist", "hand"])


class FakeChat:
    """A chat callable: answers the cleaning prompt with `cleaned`, the extraction prompt with the next answer."""

    def __init__(self, *answers, cleaned="Buckle fracture of the distal radius."):
        self.answers, self.cleaned, self.calls = list(answers), cleaned, []

    def __call__(self, messages):
        self.calls.append(messages)
        prompt = messages[-1]["content"]
        if prompt.startswith("Remove the medical history"):
            return self.cleaned
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


VALID = json.dumps({"wrist": WRIST, "hand": HAND})
HALLUCINATED = json.dumps({"wrist": "Comminuted fracture of the scaphoid.", "hand": ""})


def test_two_prompts_as_in_the_paper():
    chat = FakeChat(VALID)
    result = ChatBackend(chat, "fake-model").split(REPORT, ["wrist", "hand"])
    assert result == SplitResult({"wrist": WRIST, "hand": HAND}, "chat", 1, None) and result.source == "llm"
    clean, extract = (messages[-1]["content"] for messages in chat.calls)
    assert "Remove the medical history" in clean and REPORT in clean
    assert "From the imaging report, extract the text of these body parts: wrist, hand." in extract
    assert '{"wrist": "...", "hand": "..."}' in extract and extract.endswith(chat.cleaned)
    assert chat.calls[0][0]["role"] == "system"
    other = FakeChat(json.dumps({"hip": "", "lower_leg": ""}))
    llm_split(REPORT, ["hip", "lower_leg"], other, model_id="m")
    assert "these body parts: hip, lower leg." in other.calls[1][-1]["content"]


def test_retries_then_falls_back_to_rules(caplog):
    chat = FakeChat("not json", VALID)
    assert llm_split(REPORT, ["wrist", "hand"], chat, model_id="m", retries=2).attempts == 2
    chat = FakeChat(HALLUCINATED)
    with caplog.at_level(logging.DEBUG, logger="pexr.reports"):
        result = llm_split(REPORT, ["wrist", "hand"], chat, model_id="m", retries=2, backend_name="fake")
    assert result.backend_used == "rules" and result.attempts == 3 and len(chat.calls) == 6
    assert result.source == "rules after LLM failure" and result.source in TEXT_SOURCES
    assert "hallucinated" in result.error
    assert result.texts == split_report(REPORT, ["wrist", "hand"])
    assert any(r.levelno == logging.WARNING and "falling back to rules" in r.getMessage() for r in caplog.records)
    for record in caplog.records:  # no report text in the log
        assert "distal radius" not in record.getMessage().lower() and "scaphoid" not in record.getMessage()
    with pytest.raises(ValueError, match="retries"):
        llm_split(REPORT, ["wrist"], chat, model_id="m", retries=-1)
    chat = FakeChat(RuntimeError("model crashed"))
    result = llm_split(REPORT, ["wrist"], chat, model_id="m", retries=0)
    assert (result.backend_used, result.attempts, result.error) == ("rules", 1, "RuntimeError: model crashed")


def test_cache_never_asks_twice(tmp_path):
    chat = FakeChat(VALID)
    backend = ChatBackend(chat, "fake-model", cache_dir=tmp_path / "cache")
    first = backend.split(REPORT, ["wrist", "hand"])
    assert len(chat.calls) == 2 and not first.cached
    again = ChatBackend(chat, "fake-model", cache_dir=tmp_path / "cache").split(REPORT, ["hand", "wrist"])
    assert len(chat.calls) == 2 and again.cached and again.texts == first.texts
    assert list(again.texts) == ["hand", "wrist"]  # the order asked, though the key sorts the parts
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert files == [cache_key("fake-model", REPORT, ["wrist", "hand"]) + ".json"]
    assert cache_key("other-model", REPORT, ["wrist", "hand"]) not in files[0]
    (tmp_path / "cache" / files[0]).write_text("{truncated")  # an unreadable entry is asked again and rewritten
    assert not backend.split(REPORT, ["wrist", "hand"]).cached and len(chat.calls) == 4
    assert backend.split(REPORT, ["wrist", "hand"]).cached and len(chat.calls) == 4
    # an invalid answer falls back and is cached; a failure to reach the model is not (a rerun asks again)
    bad = FakeChat(HALLUCINATED)
    for _ in range(2):
        assert llm_split(REPORT, ["wrist"], bad, model_id="m", retries=1, cache_dir=tmp_path / "c2").error
    assert len(bad.calls) == 4
    down = FakeChat(ConnectionError("down"))
    for _ in range(2):
        llm_split(REPORT, ["wrist"], down, model_id="m", retries=0, cache_dir=tmp_path / "c3")
    assert len(down.calls) == 4 and not list((tmp_path / "c3").glob("*"))


# ------------------------------------------------------------------------------------------------ local model


def _tiny_chat_model(path):
    """A random 1-layer Llama with a word-level tokenizer and a chat template, saved to `path`."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]", "</s>", "{", "}", '"', ":", ",", ".", "wrist", "hand", "the", "fracture", "no", "user"]
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>")
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}assistant :{% endif %}"
    )
    torch.manual_seed(0)
    sizes = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = LlamaConfig(vocab_size=len(words), num_key_value_heads=1, pad_token_id=1, bos_token_id=2, eos_token_id=2,
                         **sizes)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def test_transformers_backend_garbage_falls_back(tmp_path, monkeypatch):
    from transformers import TextGenerationPipeline

    calls = []
    original = TextGenerationPipeline.__call__

    def counting(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TextGenerationPipeline, "__call__", counting)
    backend = TransformersBackend(_tiny_chat_model(tmp_path / "tiny"), max_new_tokens=6, retries=1, device="cpu")
    result = backend.split(REPORT, ["wrist", "hand"])
    assert isinstance(backend.generator, TextGenerationPipeline)
    assert len(calls) == 4 and calls[0]["do_sample"] is False and calls[0]["return_full_text"] is False
    assert result.backend_used == "rules" and result.attempts == 2
    assert result.error.startswith("invalid answer:")
    assert result.texts == {"wrist": WRIST, "hand": HAND}


# ------------------------------------------------------------------------------------------------ HTTP server


@pytest.fixture
def chat_server():
    """An OpenAI-compatible server on localhost that answers with queued contents and records the requests."""
    state = {"answers": [], "requests": []}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state["requests"].append((self.path, dict(self.headers), body))
            time.sleep(state.get("delay", 0.0))
            content = state["answers"].pop(0)
            data = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(data.encode())

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", state
    server.shutdown()
    server.server_close()


def test_openai_backend_against_local_server(chat_server, monkeypatch):
    base_url, state = chat_server
    monkeypatch.setenv("PEDCLIP_TEST_KEY", "secret-token")
    backend = OpenAIBackend(base_url + "/", "llama-3.1-8b", api_key_env="PEDCLIP_TEST_KEY", retries=0, timeout=10)
    state["answers"] = ["Buckle fracture of the distal radius.", f"```json\n{VALID}\n```"]
    assert backend.split(REPORT, ["wrist", "hand"]) == SplitResult({"wrist": WRIST, "hand": HAND}, "openai", 1)
    path, headers, body = state["requests"][1]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer secret-token"
    assert body["model"] == "llama-3.1-8b" and body["temperature"] == 0 and body["messages"][1]["role"] == "user"
    state["answers"] = ["cleaned", HALLUCINATED]
    result = backend.split(REPORT, ["wrist", "hand"])
    assert result.backend_used == "rules" and "hallucinated" in result.error
    monkeypatch.delenv("PEDCLIP_TEST_KEY")
    state["answers"] = ["cleaned", json.dumps({"hand": HAND, "wrist": WRIST, "knee": ""})]
    assert backend.split(REPORT, ["hand", "wrist", "knee"]).backend_used == "openai"
    assert "Authorization" not in state["requests"][-1][1]


def test_timeouts_retry_then_fall_back(chat_server):
    chat = FakeChat(TimeoutError("timed out"))  # the injected interface: a stand-in generator that times out
    result = llm_split(REPORT, ["wrist", "hand"], chat, model_id="m", retries=1)
    assert (result.backend_used, result.attempts, result.error) == ("rules", 2, "TimeoutError: timed out")
    base_url, state = chat_server  # a real server slower than the client's timeout
    state["delay"], state["answers"] = 1.0, ["cleaned", VALID] * 2
    result = OpenAIBackend(base_url, "m", retries=1, timeout=0.2).split(REPORT, ["wrist", "hand"])
    assert result.backend_used == "rules" and result.attempts == 2 and "timed out" in result.error
    assert result.texts == {"wrist": WRIST, "hand": HAND}


def test_openai_backend_unreachable_server_falls_back():
    with socket.socket() as sock:  # a free localhost port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    backend = OpenAIBackend(f"http://127.0.0.1:{port}/v1", "m", retries=1, timeout=5)
    result = backend.split(REPORT, ["wrist", "hand"])
    assert result.backend_used == "rules" and result.attempts == 2
    assert result.error.startswith(f"ConnectionError: cannot reach http://127.0.0.1:{port}/v1/chat/completions")
    assert result.texts == {"wrist": WRIST, "hand": HAND}
    with pytest.raises(ValueError, match="http"):
        OpenAIBackend("localhost:8000", "m")


def test_make_backend(tmp_path):
    assert isinstance(make_backend(), RuleBackend)
    local = make_backend("some/model", cache_dir=tmp_path, retries=1)
    assert isinstance(local, TransformersBackend) and local.retries == 1 and local._generator is None
    remote = make_backend("llama", base_url="http://localhost:8000/v1")
    assert isinstance(remote, OpenAIBackend) and remote.url == "http://localhost:8000/v1/chat/completions"
    with pytest.raises(ValueError):
        make_backend(base_url="http://localhost:8000/v1")
