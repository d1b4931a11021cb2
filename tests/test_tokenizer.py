"""daemon.tokenizer against transformers' own tokenizer, plus properties of streaming detokenization and stops."""

from __future__ import annotations

import json
import string
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer

from daemon.models import pull
from daemon.tokenizer import ChatTemplateError, IncrementalDetokenizer, StopMatcher, Tokenizer

TEXTS = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "Café crème brûlée, naïve façade, Ångström, São Paulo",
    "日本語のテキストと中文文本，还有한국어",
    "Emoji: 😀🎉👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷",
    "def f(x):\n\treturn {'a': [1, 2, 3]}  # comment\n\n\n",
    "tabs\t\tand\n\n\nnewlines   and    runs      of spaces",
    "Ελληνικά, русский, العربية, हिन्दी",
    "<|im_start|>user\nspecial tokens in text<|im_end|>",
    "",
]
CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}],
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": "Tell me a joke 😀"},
    ],
    [{"role": "user", "content": "ünïcödé and\nnewlines", "name": None}],
]
MULTILINGUAL = TEXTS[:8] + ["Ça va? 你好吗? 👋🏾 Ünïcode 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑∫√ ❤️‍🔥", "The quick brown fox. " * 3]
ROOT = Path(__file__).resolve().parents[1]
CORPUS = ["the quick brown fox jumps over the lazy dog. Hello world, hello there! The capital is Paris."] * 20


@pytest.fixture(scope="module")
def folder() -> Path:
    return pull()


@pytest.fixture(scope="module")
def tok(folder: Path) -> Tokenizer:
    return Tokenizer.from_folder(folder)


@pytest.fixture(scope="module")
def reference(folder: Path):
    return AutoTokenizer.from_pretrained(str(folder))


def _write_folder(folder: Path, backend: Backend, config: dict, generation: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **config}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


def _sentencepiece_backend() -> Backend:
    """A tiny Llama-style tokenizer: Metaspace words, byte fallback for anything else, a space-stripping decoder."""
    backend = Backend(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    alphabet = [*string.ascii_letters, *string.digits, *string.punctuation, "▁"]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    spec = json.loads(backend.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    backend = Backend.from_str(json.dumps(spec))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return backend


def _byte_level_backend() -> Backend:
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    return backend


@pytest.fixture(scope="module")
def sp_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # add_bos_token contradicts tokenizer.json's post-processor, which wins (as in transformers 5)
    eos = {"__type": "AddedToken", "content": "</s>", "special": True}
    config = {"bos_token": "<s>", "eos_token": eos, "add_bos_token": False}
    return _write_folder(
        tmp_path_factory.mktemp("sp"), _sentencepiece_backend(), config, {"eos_token_id": [5]}
    )


@pytest.fixture(scope="module")
def sp(sp_folder: Path) -> Tokenizer:
    return Tokenizer.from_folder(sp_folder)


# ---- encode / decode / special tokens


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_match_transformers(tok: Tokenizer, reference, text: str) -> None:
    ids = tok.encode(text)
    assert ids == reference.encode(text)
    assert tok.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    assert tok.decode(ids, skip_special_tokens=False) == reference.decode(ids) == text


def test_encode_batch_and_special_tokens(tok: Tokenizer, reference) -> None:
    assert tok.encode_batch(TEXTS) == [reference.encode(t) for t in TEXTS]
    assert 2 in tok.eos_token_ids and tok.eos_token_ids == {0, 2}  # generation_config's [2, 0] and <|im_end|>
    assert (
        (tok.bos_token, tok.eos_token)
        == (reference.bos_token, reference.eos_token)
        == ("<|im_start|>", "<|im_end|>")
    )
    assert tok.vocab_size == len(reference)


def test_post_processor_bos_and_eos_ids_from_config(sp: Tokenizer, sp_folder: Path) -> None:
    reference = AutoTokenizer.from_pretrained(str(sp_folder))
    for text in ["the quick fox", "Hello wörld 你好 😀", ""]:
        assert sp.encode(text) == reference.encode(text)
        assert sp.encode(text)[:1] == [1]
        assert sp.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False)
        ids = sp.encode(text)
        assert sp.decode(ids) == reference.decode(ids, skip_special_tokens=True) == text
    assert sp.eos_token_ids == {2, 5}
    assert (sp.bos_token, sp.eos_token) == ("<s>", "</s>")


def test_add_bos_token_applies_without_a_post_processor(tmp_path: Path) -> None:
    backend = _sentencepiece_backend()
    backend.post_processor = None
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "add_eos_token": True}
    tok = Tokenizer.from_folder(_write_folder(tmp_path / "flags", backend, config))
    assert tok.encode("the fox") == [1, *tok.encode("the fox", add_special_tokens=False), 2]
    tok = Tokenizer.from_folder(_write_folder(tmp_path / "plain", backend, {"bos_token": "<s>"}))
    assert tok.encode("the fox") == tok.encode("the fox", add_special_tokens=False)


# ---- logprob token strings and bytes


def test_token_bytes_agree_with_decoding_every_token(tok: Tokenizer) -> None:
    for i in range(tok.vocab_size):
        assert bytes(tok.token_bytes(i)).decode("utf-8", errors="replace") == tok.decode(
            [i], skip_special_tokens=False
        )


def test_token_bytes_rebuild_split_characters(tok: Tokenizer, sp: Tokenizer) -> None:
    text = "Emoji 😀 and 你好"
    ids = tok.encode(text)
    assert b"".join(bytes(tok.token_bytes(i)) for i in ids) == text.encode()
    strings = tok.token_strings(ids)
    assert "\ufffd" in "".join(strings)  # the emoji's bytes straddle tokens, each shown with U+FFFD
    assert [s for s in strings if "\ufffd" not in s] == [s for s in strings if s in text]
    ids = sp.encode(text, add_special_tokens=False)
    assert b"".join(bytes(sp.token_bytes(i)) for i in ids) == b" " + text.encode()  # Metaspace's leading "▁"
    assert sp.token_strings(sp.encode("the", add_special_tokens=False)) == [" the"]
    assert sp.token_bytes(sp._backend.token_to_id("<0xE4>")) == [0xE4]
    assert sp.token_strings([sp._backend.token_to_id("<0xE4>"), 1]) == ["\ufffd", "<s>"]
    with pytest.raises(ValueError):
        tok.token_bytes(tok.vocab_size + 10)


# ---- chat template


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_matches_transformers(tok: Tokenizer, reference, messages: list[dict]) -> None:
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(messages) == expected
    no_prompt = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == no_prompt


def test_content_parts_are_flattened(tok: Tokenizer, reference) -> None:
    parts = [{"type": "text", "text": "First part."}, {"type": "text", "text": "Second part."}]
    flat = [{"role": "user", "content": "First part.\nSecond part."}]
    expected = reference.apply_chat_template(flat, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template([{"role": "user", "content": parts}]) == expected
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    with pytest.raises(ValueError, match="image_url"):
        tok.apply_chat_template([{"role": "user", "content": [*parts, image]}])
    with pytest.raises(ValueError):
        tok.apply_chat_template([{"role": "user", "content": 42}])


TEMPLATE = """{%- set ns = namespace(n=0) -%}
{%- if tools %}Tools: {{ tools | tojson(indent=2) }}
{% endif -%}
{%- for m in messages -%}
  {%- if loop.first and m.role == 'assistant' -%}
    {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
  {%- endif -%}
  {%- if m.role == 'tool' %}{% continue %}{% endif -%}
  {%- set ns.n = ns.n + 1 %}
  {% if m.role == 'assistant' -%}
    {% generation %}{{ m.content }}{{ eos_token }}{% endgeneration %}
  {% else -%}
    {{ bos_token }}{{ m.role }}: {{ m.content | tojson }} {{ m | tojson }}
  {% endif -%}
{%- endfor -%}
{{ ns.n }} turns in {{ strftime_now('%Y') }} {{ extra_flag }}
{% if add_generation_prompt %}assistant:{% endif %}"""


@pytest.fixture(scope="module")
def templated_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": TEMPLATE}
    return _write_folder(tmp_path_factory.mktemp("templated"), _byte_level_backend(), config)


def test_template_features_match_transformers(templated_folder: Path) -> None:
    tok = Tokenizer.from_folder(templated_folder)
    reference = AutoTokenizer.from_pretrained(str(templated_folder))
    messages = [
        {"role": "user", "content": 'Quote "this" & <that> 😀'},
        {"role": "assistant", "content": "Sure."},
        {"role": "tool", "content": "skipped"},
        {"role": "user", "content": "Again", "tool_calls": None},
    ]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    expected = reference.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True, extra_flag="on"
    )
    assert tok.apply_chat_template(messages, tools=tools, extra_flag="on") == expected
    assert tok.apply_chat_template(
        messages[:1], add_generation_prompt=False
    ) == reference.apply_chat_template(messages[:1], tokenize=False)


def test_template_errors(templated_folder: Path, sp: Tokenizer, tmp_path: Path) -> None:
    tok = Tokenizer.from_folder(templated_folder)
    with pytest.raises(ChatTemplateError, match=r"^Conversation roles must alternate user/assistant"):
        tok.apply_chat_template([{"role": "assistant", "content": "first"}])
    with pytest.raises(ChatTemplateError, match="no chat template"):
        sp.apply_chat_template([{"role": "user", "content": "hi"}])
    config = {"chat_template": "{% for m in messages %}{{ m.content }"}
    with pytest.raises(ChatTemplateError, match="does not compile"):
        Tokenizer.from_folder(_write_folder(tmp_path / "broken", _byte_level_backend(), config))


# ---- incremental detokenization


def _stream(
    tokenizer: Tokenizer, prompt: list[int], ids: list[int], sizes: list[int], skip: bool = True
) -> str:
    """Feed ids in chunks; check that emitted text only ever grows as a prefix of the final text."""
    final = tokenizer.decode(prompt + ids, skip)[len(tokenizer.decode(prompt, skip)) :]
    detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip)
    emitted, start, chunks = "", 0, iter(sizes)
    while start < len(ids):
        end = start + next(chunks, 1)
        emitted += detok.add(ids[start:end])
        assert final.startswith(emitted), (emitted, final)  # no U+FFFD that a later token would complete
        start = end
    return emitted + detok.flush()


@st.composite
def _real_token_slices(draw: st.DrawFn, tokenized: list[list[int]]) -> list[int]:
    ids = [
        i
        for k in draw(st.lists(st.integers(0, len(tokenized) - 1), min_size=1, max_size=3))
        for i in tokenized[k]
    ]
    start = draw(st.integers(0, len(ids)))  # a slice may start or end inside a character
    return ids[start : draw(st.integers(start, len(ids)))]


_SIZES = st.lists(st.integers(1, 4), max_size=60)
_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_detokenizer_holds_split_characters(tok: Tokenizer) -> None:
    ids = tok.encode("😀")
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tok, tok.encode("Say hi:"))
    assert [detok.add([i]) for i in ids] == [""] * (len(ids) - 1) + ["😀"]
    detok = IncrementalDetokenizer(tok, [])
    assert detok.add(ids[:-1]) == "" and detok.flush() == tok.decode(ids[:-1]) == "\ufffd"


@_SETTINGS
@given(data=st.data(), skip=st.booleans())
def test_detokenizer_on_real_text_equals_decode(tok: Tokenizer, data: st.DataObject, skip: bool) -> None:
    tokenized = tok.encode_batch(MULTILINGUAL + ["<|im_end|>\n<|im_start|>"])
    ids = data.draw(_real_token_slices(tokenized))
    assert _stream(tok, [], ids, data.draw(_SIZES), skip) == tok.decode(ids, skip_special_tokens=skip)
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hi"}]))
    assert _stream(tok, prompt, ids, data.draw(_SIZES), skip) == tok.decode(ids, skip_special_tokens=skip)


@_SETTINGS
@given(ids=st.lists(st.integers(0, 49151), max_size=40), sizes=_SIZES, skip=st.booleans())
def test_detokenizer_on_random_ids_equals_decode(
    tok: Tokenizer, ids: list[int], sizes: list[int], skip: bool
) -> None:
    assert _stream(tok, [], ids, sizes, skip) == tok.decode(ids, skip_special_tokens=skip)


class _WithoutByteTable:
    """The same tokenizer, but IncrementalDetokenizer takes its general path (decoding windows of ids)."""

    def __init__(self, tok: Tokenizer) -> None:
        self._tok = tok

    def __getattr__(self, name: str):
        return getattr(self._tok, name)

    def byte_table(self, skip_special_tokens: bool = True) -> None:
        return None


def _deltas(detok: IncrementalDetokenizer, ids: list[int], sizes: list[int]) -> list[str]:
    out, start, chunks = [], 0, iter(sizes)
    while start < len(ids):
        end = start + next(chunks, 1)
        out.append(detok.add(ids[start:end]))
        start = end
    return [*out, detok.flush()]


def test_byte_table_spells_each_token_as_decode_does(tok: Tokenizer) -> None:
    for skip in (True, False):
        table = tok.byte_table(skip)
        assert table is not None and len(table) == tok.vocab_size
        assert all(b.decode("utf-8", "replace") == tok.decode([i], skip) for i, b in enumerate(table))
    assert any(b"\xf0" in b for b in table), "some tokens are parts of characters"


def test_byte_table_only_for_a_plain_byte_level_decoder(sp: Tokenizer) -> None:
    assert sp.byte_table() is None  # Replace, ByteFallback, Fuse, Strip: decoded by windows of ids


@_SETTINGS
@given(data=st.data(), skip=st.booleans(), with_prompt=st.booleans())
def test_byte_table_detokenizer_gives_the_general_ones_deltas(
    tok: Tokenizer, data: st.DataObject, skip: bool, with_prompt: bool
) -> None:
    """Delta for delta (not only joined), the byte-table path says what decoding windows of ids says."""
    tokenized = tok.encode_batch(MULTILINGUAL + ["<|im_end|>\n<|im_start|>"])
    ids = data.draw(st.one_of(_real_token_slices(tokenized), st.lists(st.integers(0, 49151), max_size=40)))
    prompt = data.draw(_real_token_slices(tokenized)) if with_prompt else []
    sizes = data.draw(_SIZES)
    fast = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    general = IncrementalDetokenizer(_WithoutByteTable(tok), prompt, skip_special_tokens=skip)  # type: ignore[arg-type]
    assert fast._bytes is not None and general._bytes is None
    assert _deltas(fast, ids, sizes) == _deltas(general, ids, sizes)


@_SETTINGS
@given(data=st.data(), skip=st.booleans(), with_prompt=st.booleans())
def test_detokenizer_sentencepiece(sp: Tokenizer, data: st.DataObject, skip: bool, with_prompt: bool) -> None:
    tokenized = sp.encode_batch(MULTILINGUAL, add_special_tokens=False)
    random_ids = st.lists(st.integers(0, sp.vocab_size - 1), max_size=30)
    ids = data.draw(st.one_of(_real_token_slices(tokenized), random_ids))
    prompt = sp.encode("Hello there, the capital is") if with_prompt else []
    # With a prompt, the output's text is what it adds to the prompt's, first token's leading space included.
    expected = sp.decode(prompt + ids, skip)[len(sp.decode(prompt, skip)) :]
    assert _stream(sp, prompt, ids, data.draw(_SIZES), skip) == expected
    if not with_prompt:
        assert expected == sp.decode(ids, skip)


def test_detokenizer_sentencepiece_leading_space(sp: Tokenizer) -> None:
    output = sp.encode(" Paris", add_special_tokens=False)
    assert sp.decode(output) == "Paris"
    assert _stream(sp, [], output, []) == "Paris"
    assert _stream(sp, sp.encode("The capital is"), output, []) == " Paris"


# ---- stop strings


def _run_stops(stops: list[str], deltas: list[str]) -> tuple[list[str], bool, str]:
    matcher = StopMatcher(stops)
    outputs, matched = [], False
    for delta in deltas:
        text, matched = matcher.feed(delta)
        outputs.append(text)
        if matched:
            break
    return outputs, matched, "" if matched else matcher.flush()


@settings(max_examples=400, deadline=None)
@given(
    text=st.text(alphabet="ab c", max_size=40),
    stops=st.lists(st.text(alphabet="ab c", max_size=5), max_size=4),
    cuts=st.lists(st.integers(0, 40), max_size=10),
)
def test_stop_matcher_cuts_at_first_stop(text: str, stops: list[str], cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    deltas = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    outputs, matched, tail = _run_stops(stops, deltas)
    # The first stop to be completed cuts the text at its start (the longest, if several complete together).
    hits = [(i + len(s), i) for s in stops if s and (i := text.find(s)) >= 0]
    emitted = "".join(outputs) + tail
    assert matched == bool(hits)
    assert emitted == (text[: min(hits)[1]] if hits else text)
    assert not any(s and s in emitted for s in stops)


def test_stop_across_three_deltas() -> None:
    outputs, matched, _ = _run_stops(["STOP"], ["hello ST", "O", "P and more"])
    assert outputs == ["hello ", "", ""] and matched


def test_overlapping_stops() -> None:
    matcher = StopMatcher(["abc", "ab"])
    assert matcher.feed("xa") == ("x", False)
    assert matcher.feed("bc") == ("", True)
    assert matcher.matched_stop == "ab"
    assert matcher.feed("more") == ("", True)
    outputs, matched, _ = _run_stops(["abc", "bd"], ["a", "b", "d"])
    assert outputs == ["", "", "a"] and matched


def test_held_back_text_is_released() -> None:
    matcher = StopMatcher(["<end>", ""])
    assert matcher.feed("a <e") == ("a ", False)
    assert matcher.feed("n") == ("", False)
    assert matcher.feed("x") == ("<enx", False)
    assert matcher.feed("<") == ("", False)
    assert matcher.flush() == "<"
    assert StopMatcher([""]).feed("anything") == ("anything", False)


def test_daemon_side_imports_stay_light() -> None:
    code = "import sys, daemon.tokenizer; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
