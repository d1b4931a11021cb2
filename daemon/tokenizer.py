"""A checkpoint's tokenizer for the daemon: encode/decode, chat template, streaming detokenization, stop strings.

Built on `tokenizers` and jinja2 alone (no transformers, no torch), reading the folder's JSON files itself.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _Backend
from tokenizers import processors

_REPLACEMENT = "\ufffd"  # what a decoder writes for bytes that are not (yet) a whole UTF-8 character
_SPECIAL_TOKEN_NAMES = tuple(f"{name}_token" for name in ("bos", "eos", "unk", "sep", "pad", "cls", "mask"))
# How many prompt tokens an IncrementalDetokenizer decodes in front of the output, as context.
_PROMPT_CONTEXT_TOKENS = 4


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, inverted: byte-level BPE spells each byte as one printable character."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]  # "!".."~", "¡".."¬", "®".."ÿ"
    char_of = {b: b for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in printable):
        char_of[b] = 256 + n
    return {chr(c): b for b, c in char_of.items()}


_BYTE_OF_CHAR = _byte_level_alphabet()
_BYTE_LEVEL_CHARS = frozenset(_BYTE_OF_CHAR)
_LATIN1_OF_CHAR = {ord(c): b for c, b in _BYTE_OF_CHAR.items()}  # str.translate: a char to the byte it spells


def _byte_level_bytes(token: str) -> bytes:
    """What the ByteLevel decoder makes of one token: the bytes its characters spell, or, if any character
    is outside the alphabet (an added token's plain text), the token's UTF-8 as it is."""
    if _BYTE_LEVEL_CHARS.issuperset(token):
        return token.translate(_LATIN1_OF_CHAR).encode("latin-1")
    return token.encode()


class ChatTemplateError(ValueError):
    """The chat template refused or failed to render a conversation (the message is the template's own)."""


class Tokenizer:
    """One checkpoint's tokenizer. Thread-safe: `encode` may run in a worker thread off the event loop."""

    def __init__(
        self,
        backend: _Backend,
        *,
        special_tokens: dict[str, str],
        eos_token_ids: frozenset[int],
        chat_template: str | None,
    ) -> None:
        self._backend = backend
        self._special_tokens = special_tokens  # bos_token, eos_token... as the template sees them
        self.bos_token: str | None = special_tokens.get("bos_token")
        self.eos_token: str | None = special_tokens.get("eos_token")
        self.eos_token_ids = eos_token_ids
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        added = backend.get_added_tokens_decoder()
        self._added_text = {i: t.content for i, t in added.items()}
        self.special_token_ids = frozenset(i for i, t in added.items() if t.special)
        decoder = backend.decoder.__getstate__() if backend.decoder is not None else b""  # its JSON
        self._byte_level = b'"ByteLevel"' in decoder  # alone or inside a Sequence of decoders
        # decode() through a ByteLevel decoder alone is the (lossy) UTF-8 decoding of the tokens' bytes joined,
        # so text can be decoded token by token from a table of bytes (see byte_table)
        # Built here, at start-up, not on a first request: tens of ms for a 50k vocabulary would stall the loop.
        self._byte_tables: dict[bool, list[bytes]] = {}
        if decoder and json.loads(decoder).get("type") == "ByteLevel":
            spelled = [_byte_level_bytes(t or "") for t in map(backend.id_to_token, range(self.vocab_size))]
            self._byte_tables = {False: spelled, True: [b"" if i in self.special_token_ids else b
                                                        for i, b in enumerate(spelled)]}
        # sentencepiece-style byte fallback: "<0xE4>" tokens, one byte each, for characters outside the vocab
        ids = [backend.token_to_id(f"<0x{b:02X}>") for b in range(256)]
        fallback = getattr(backend.model, "byte_fallback", False)
        self.byte_fallback_ids: dict[int, int] = {
            i: b for b, i in enumerate(ids) if fallback and i is not None
        }
        self.chat_template = chat_template
        self._template = _compile_template(chat_template) if chat_template is not None else None

    @classmethod
    def from_folder(cls, folder: Path) -> Tokenizer:
        """Load tokenizer.json with tokenizer_config.json and generation_config.json from a checkpoint folder."""
        folder = Path(folder)
        backend = _Backend.from_file(str(folder / "tokenizer.json"))
        config = _read_json(folder / "tokenizer_config.json")
        special = {name: text for name in _SPECIAL_TOKEN_NAMES if (text := _token_text(config.get(name)))}
        # tokenizer.json's post-processor says which special tokens encode() adds (transformers 5 ignores the
        # config's add_bos_token/add_eos_token when there is a tokenizer.json). Only where it has none do the
        # flags decide, as transformers 4's Llama tokenizer did: they are the checkpoint's only word on it.
        if backend.post_processor is None:
            backend.post_processor = _bos_eos_processor(backend, special, config)
        generation = _read_json(folder / "generation_config.json") or _read_json(folder / "config.json")
        eos = generation.get("eos_token_id")
        eos_ids = {eos} if isinstance(eos, int) else set(eos or ())
        if (eos_text := special.get("eos_token")) and (eos_id := backend.token_to_id(eos_text)) is not None:
            eos_ids.add(eos_id)
        template = _read_chat_template(folder, config)
        return cls(backend, special_tokens=special, eos_token_ids=frozenset(eos_ids), chat_template=template)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special-token text in it (e.g. "<|im_start|>") becomes the special token."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        encodings = self._backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [e.ids for e in encodings]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> list[int]:
        """The raw bytes one token stands for (OpenAI logprobs' `bytes`); may be part of a UTF-8 character."""
        token = self._backend.id_to_token(token_id)
        if token is None:
            raise ValueError(f"token id {token_id} is outside the vocabulary")
        if token_id in self._added_text:
            return list(self._added_text[token_id].encode())  # added tokens are stored as their plain text
        if token_id in self.byte_fallback_ids:
            return [self.byte_fallback_ids[token_id]]
        if self._byte_level:
            try:
                return [_BYTE_OF_CHAR[c] for c in token]
            except KeyError:  # not byte-level spelled: the decoder passes such a token through as UTF-8
                return list(token.encode())
        return list(token.replace("▁", " ").encode())  # sentencepiece's word-start marker is a space

    def byte_table(self, skip_special_tokens: bool = True) -> list[bytes] | None:
        """Each token id's bytes as decode() joins them (b"" for a skipped special token), when decode() is
        exactly the lossy UTF-8 decoding of those bytes joined (a ByteLevel decoder alone); else None."""
        return self._byte_tables.get(skip_special_tokens)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """Each token's own text (OpenAI logprobs' `token`): its bytes decoded, partial characters as U+FFFD."""
        return [bytes(self.token_bytes(i)).decode("utf-8", errors="replace") for i in ids]

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        """Render a conversation into the prompt text, as transformers' apply_chat_template(tokenize=False) does.

        `content` may be a string or OpenAI's list of text parts (joined with newlines); `extra` (tools,
        documents...) is passed to the template. Raises ChatTemplateError, or ValueError for a bad message.
        """
        if self._template is None:
            raise ChatTemplateError("this model has no chat template: use the completions API instead")
        plain = [_plain_message(m) for m in messages]
        # tools and documents are always defined, as in transformers: templates test `tools is not none`.
        context = {**self._special_tokens, "tools": None, "documents": None, **extra}
        try:
            return self._template.render(
                messages=plain, add_generation_prompt=add_generation_prompt, **context
            )
        except jinja2.TemplateError as e:  # includes the template's raise_exception("...")
            raise ChatTemplateError(str(e)) from e
        except Exception as e:  # the template is foreign code over client input: any failure is a bad request
            raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from e


class IncrementalDetokenizer:
    """Turns one sequence's generated token ids into text deltas as they arrive.

    Joined, the deltas of `add` and a final `flush` are the text the output adds after the prompt:
    decode(prompt tail + output) minus decode(prompt tail). For byte-level BPE (SmolLM2, Llama 3, Qwen)
    that is exactly decode(output_ids); for sentencepiece decoders that strip the first token's leading
    space it keeps that space, so `prompt + completion` reads right (vLLM and TGI do the same).
    A character split across tokens is held back until complete, so emitted text is never retracted.
    Each step decodes only the tokens since the last emitted text plus those of that emission.
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int] = (), skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        # Byte-level decoding needs no context: each token's bytes are decoded after the held ones alone
        self._bytes = tokenizer.byte_table(skip_special_tokens)
        self._held = b""  # with _bytes: the bytes of tokens not emitted yet (text ending in U+FFFD, or none)
        context = [] if self._bytes is not None else list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        prefix = self._decode(context)
        # A prompt ending inside a character or a byte-fallback run cannot be context: the output's first
        # bytes would change the prompt's text. Decoding the output alone is then the honest answer.
        if prefix.endswith(_REPLACEMENT) or (context and context[-1] in tokenizer.byte_fallback_ids):
            context, prefix = [], ""
        self._window = context  # tokens of the last emitted delta (context), then tokens not yet emitted
        self._read = len(context)  # where the not-yet-emitted tokens start in _window
        self._prefix = prefix  # decode(_window[:_read])
        self._in_byte_run = False

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def add(self, token_ids: Sequence[int]) -> str:
        """Append generated tokens; return the text that became final (often "", never retracted later)."""
        if (table := self._bytes) is not None:
            n = len(table)
            if len(token_ids) == 1:  # the usual case: one token a step
                raw = self._held + table[t] if 0 <= (t := token_ids[0]) < n else self._held
            else:  # decode() skips unknown ids
                raw = self._held + b"".join([table[t] if 0 <= t < n else b"" for t in token_ids])
            text = raw.decode("utf-8", "replace")  # decode()'s lossy decoding is Python's "replace"
            if not text or text[-1] == _REPLACEMENT:
                self._held = raw  # nothing visible yet, or a character that later tokens may complete
                return ""
            self._held = b""
            return text
        self._window.extend(token_ids)
        fallback = self._tokenizer.byte_fallback_ids
        if fallback:
            # The ByteFallback decoder decodes a run of byte tokens as one unit (all U+FFFD if invalid), so a
            # run's text is final only once a non-byte token ends it. Skipped special tokens don't end it.
            for t in reversed(token_ids):
                if not (self._skip and t in self._tokenizer.special_token_ids):
                    self._in_byte_run = t in fallback
                    break
            if self._in_byte_run:
                return ""
        text = self._decode(self._window)
        if len(text) <= len(self._prefix) or text.endswith(_REPLACEMENT):
            return ""  # nothing visible yet, or a character that later tokens may complete
        return self._emit(text)

    def flush(self) -> str:
        """At the end of the sequence: whatever is still held back (an incomplete character as U+FFFD)."""
        if self._bytes is not None:
            text, self._held = self._held.decode("utf-8", "replace"), b""
            return text
        text = self._decode(self._window)
        return self._emit(text) if len(text) > len(self._prefix) else ""

    def _emit(self, text: str) -> str:
        delta = text[len(self._prefix) :]
        # The tokens just emitted become the context of the next ones: decoders that strip the first
        # token's leading space (Metaspace, Strip) then strip a context token's, never a new one's.
        self._window = self._window[self._read :]
        self._read = len(self._window)
        self._prefix = self._decode(self._window)
        return delta


class StopMatcher:
    """Cuts generated text at the first stop string, holding back text that may be the start of one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(dict.fromkeys(s for s in stops if s))
        self._longest = max((len(s) for s in self._stops), default=0)
        self._first_chars = frozenset(s[0] for s in self._stops)
        self._held = ""
        self.matched_stop: str | None = None  # the stop string that ended the text, once one has

    def feed(self, delta: str) -> tuple[str, bool]:
        """Return (text safe to emit now, whether a stop string was reached); after a match, ("", True)."""
        if self.matched_stop is not None:
            return "", True
        if not self._stops:
            return delta, False
        text = self._held + delta
        # Emitted text never ends with the start of a stop, so a stop can only begin in held + delta.
        # The stop that ends first wins (the longest if several end together): generation would have stopped
        # there, whatever the deltas' boundaries.
        hits = [(i + len(s), i, s) for s in self._stops if (i := text.find(s)) >= 0]
        if hits:
            _, start, self.matched_stop = min(hits)
            self._held = ""
            return text[:start], True
        keep = self._partial_stop_length(text)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """The held-back text, once the sequence ended without reaching a stop string."""
        held, self._held = self._held, ""
        return held

    def _partial_stop_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that some stop string starts with (a proper prefix)."""
        for start in range(max(0, len(text) - self._longest + 1), len(text)):
            # the first-character test is cheap and rejects almost every position
            if text[start] in self._first_chars and any(s.startswith(text[start:]) for s in self._stops):
                return len(text) - start
        return 0


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering keeps it."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # transformers' filter: unlike jinja's own, no HTML escaping, and its options are exposed
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _compile_template(source: str) -> jinja2.Template:
    """Compile once, in the environment transformers renders chat templates in."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:  # a broken checkpoint: say so at load, not at the first request
        raise ChatTemplateError(f"chat template does not compile: {e} (line {e.lineno})") from e


def _plain_message(message: Any) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise ValueError(f"a message must be an object, got {type(message).__name__}")
    # As transformers: keys set to None are dropped, since templates handle a missing key but not a None.
    plain = {k: v for k, v in message.items() if v is not None}
    content = plain.get("content")
    if isinstance(content, list):
        plain["content"] = "\n".join(_part_text(part) for part in content)
    elif content is not None and not isinstance(content, str):
        raise ValueError(f"message content must be a string or a list of parts, got {type(content).__name__}")
    return plain


def _part_text(part: Any) -> str:
    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
    if kind != "text":
        raise ValueError(f"content part of type {kind!r} is not supported: this model takes text parts only")
    if not isinstance(text := part.get("text"), str):
        raise ValueError("a text content part needs a string 'text'")
    return text


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken object with `content`."""
    return value.get("content") if isinstance(value, dict) else value


def _read_chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    # Newer checkpoints keep the template in its own file, which transformers prefers over the config's.
    if (path := folder / "chat_template.jinja").is_file():
        return path.read_text(encoding="utf-8")
    template = _read_json(folder / "chat_template.json").get("chat_template") or config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def _bos_eos_processor(backend: _Backend, special: dict[str, str], config: dict[str, Any]) -> Any:
    bos, eos = special.get("bos_token"), special.get("eos_token")
    add_bos = bool(config.get("add_bos_token")) and bos is not None and backend.token_to_id(bos) is not None
    add_eos = bool(config.get("add_eos_token")) and eos is not None and backend.token_to_id(eos) is not None
    single = " ".join([*([f"{bos}:0"] if add_bos else []), "$A:0", *([f"{eos}:0"] if add_eos else [])])
    tokens = [(t, backend.token_to_id(t)) for t, added in ((bos, add_bos), (eos, add_eos)) if added]
    return processors.TemplateProcessing(single=single, special_tokens=tokens)
