"""Validation of OpenAI request bodies into `GenerationRequest`s; anything wrong raises `APIError`.

The scheduler only ever sees valid work: every field is type- and range-checked here, before the
prompt is tokenized and before anything is queued.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MAX_N = 16
MAX_STOPS = 4
MAX_TOP_LOGPROBS = 20
# a Step carries logit_bias and stop_token_ids as msgpack maps/arrays, which the wire caps at MAX_ITEMS
# entries: far lower caps keep every accepted request encodable (and cheap) whatever the vocabulary size
MAX_LOGIT_BIAS = 1024
MAX_STOP_TOKEN_IDS = 1024
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
# chat_template_kwargs may not override what the server itself passes to the template
RESERVED_TEMPLATE_KWARGS = frozenset({"self", "messages", "add_generation_prompt"})
# OpenAI's error `type` by status; any other 4xx is the client's "invalid_request_error"
_ERROR_TYPES = {401: "authentication_error", 429: "rate_limit_exceeded"}


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 type_: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code
        default = "invalid_request_error" if status < 500 else "server_error"
        self.type = type_ or _ERROR_TYPES.get(status, default)
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(slots=True)
class GenerationRequest:
    """A validated completions or chat request, before tokenization."""

    chat: bool
    model: str
    prompts: list[str | list[int]] = field(default_factory=list)  # completions
    messages: list[dict[str, Any]] = field(default_factory=list)  # chat
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    max_tokens: int | None = None
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None  # number of top logprobs (0 = only the chosen token's); None = none
    min_tokens: int = 0
    ignore_eos: bool = False
    user: str | None = None


def _check(cond: bool, message: str, param: str, code: str = "invalid_value") -> None:
    if not cond:
        raise APIError(message, param=param, code=code)


def _required(body: dict[str, Any], name: str) -> Any:
    value = body.get(name)
    if value is None:
        raise APIError(f"'{name}' is required", param=name, code="missing_required_parameter")
    return value


def _typed(body: dict[str, Any], name: str, kinds: tuple[type, ...], what: str, default: Any = None,
           param: str | None = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise APIError(f"'{param or name}' must be {what}, got {type(value).__name__}", param=param or name,
                       code="invalid_type")
    return value


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    value = _typed(body, name, (int, float), "a number", default)
    try:
        value = float(value)
    except OverflowError:  # an integer literal too large for a float: out of range whatever the range
        value = float("inf") if value > 0 else float("-inf")
    ok = (lo < value if lo_open else lo <= value) and value <= hi  # NaN fails
    bracket = "(" if lo_open else "["
    _check(ok, f"'{name}' must be in {bracket}{lo}, {hi}], got {value}", name)
    return value


def _integer(body: dict, name: str, default: int | None, lo: int, hi: int) -> int | None:
    value = _typed(body, name, (int,), "an integer", default)
    if value is not None:
        _check(lo <= value <= hi, f"'{name}' must be in [{lo}, {hi}], got {value}", name)
    return value


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    ok = isinstance(stops, list) and all(isinstance(s, str) for s in stops)
    _check(ok, "'stop' must be a string or a list of strings", "stop", "invalid_type")
    _check(all(stops), "'stop' strings must not be empty", "stop")
    _check(len(stops) <= MAX_STOPS, f"'stop' takes at most {MAX_STOPS} strings", "stop")
    return stops


def _logit_bias(body: dict, vocab_size: int) -> dict[int, float] | None:
    raw = _typed(body, "logit_bias", (dict,), "an object mapping token ids to biases")
    if not raw:
        return None
    _check(len(raw) <= MAX_LOGIT_BIAS, f"'logit_bias' takes at most {MAX_LOGIT_BIAS} tokens", "logit_bias")
    out = {}
    for key, value in raw.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise APIError(f"logit_bias key {key!r} is not a token id", param="logit_bias",
                           code="invalid_value") from None
        _check(0 <= token < vocab_size, f"logit_bias token id {token} is outside the vocabulary", "logit_bias")
        ok = isinstance(value, int | float) and not isinstance(value, bool) and -100 <= value <= 100
        _check(ok, f"logit_bias value for {token} must be a number in [-100, 100]", "logit_bias")
        out[token] = float(value)
    return out


def _prompts(body: dict, vocab_size: int) -> list[str | list[int]]:
    prompt = _required(body, "prompt")
    if isinstance(prompt, str):
        return [prompt]
    _check(isinstance(prompt, list), "'prompt' must be a string, a list of strings, or token ids", "prompt",
           "invalid_type")
    _check(len(prompt) > 0, "'prompt' must not be an empty list", "prompt")
    def is_ids(x: Any) -> bool:
        return isinstance(x, list) and len(x) > 0 and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if is_ids(prompt):
        prompts: list[str | list[int]] = [prompt]
    elif all(isinstance(p, str) for p in prompt) or all(is_ids(p) for p in prompt):
        prompts = list(prompt)
    else:
        raise APIError("'prompt' must be a string, a list of strings, a list of token ids, or a list of those",
                       param="prompt", code="invalid_type")
    for p in prompts:
        if isinstance(p, list):
            _check(all(0 <= t < vocab_size for t in p), "prompt token ids must be in the vocabulary", "prompt")
    return prompts


def _content_ok(content: Any) -> bool:
    if content is None or isinstance(content, str):
        return True
    return isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("type"), str)
                                             for p in content)


def _messages(body: dict) -> list[dict[str, Any]]:
    messages = _required(body, "messages")
    _check(isinstance(messages, list), "'messages' must be a list of messages", "messages", "invalid_type")
    _check(len(messages) > 0, "'messages' must not be empty", "messages")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        _check(isinstance(m, dict), f"{where} must be an object", where, "invalid_type")
        role = _typed(m, "role", (str,), "a string", param=f"{where}.role")
        _check(role in CHAT_ROLES, f"{where}.role must be one of {sorted(CHAT_ROLES)}", f"{where}.role")
        _check(_content_ok(m.get("content")), f"{where}.content must be a string or a list of content parts",
               f"{where}.content", "invalid_type")
        if m.get("content") is None:
            _check(role == "assistant", f"{where}.content is required", f"{where}.content")
    return messages


def _template_kwargs(body: dict) -> dict[str, Any]:
    kwargs = _typed(body, "chat_template_kwargs", (dict,), "an object", {})
    reserved = sorted(RESERVED_TEMPLATE_KWARGS.intersection(kwargs))
    _check(not reserved, f"'chat_template_kwargs' may not set {', '.join(reserved)}", "chat_template_kwargs")
    tools = body.get("tools")
    return {**kwargs, **({"tools": tools} if tools else {})}


def _stop_token_ids(body: dict, vocab_size: int) -> list[int]:
    ids = _typed(body, "stop_token_ids", (list,), "a list of token ids", [])
    _check(len(ids) <= MAX_STOP_TOKEN_IDS, f"'stop_token_ids' takes at most {MAX_STOP_TOKEN_IDS} ids",
           "stop_token_ids")
    _check(all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in ids),
           "'stop_token_ids' must be token ids in the vocabulary", "stop_token_ids")
    return ids


def _unsupported(body: dict) -> None:
    if body.get("echo"):
        raise APIError("'echo' is not supported", param="echo", code="unsupported")
    if _typed(body, "best_of", (int,), "an integer", 1) not in (1, body.get("n", 1)):
        raise APIError("'best_of' other than n is not supported", param="best_of", code="unsupported")
    if body.get("suffix"):
        raise APIError("'suffix' is not supported", param="suffix", code="unsupported")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise APIError("only response_format {'type': 'text'} is supported", param="response_format",
                       code="unsupported")


def parse_generation(body: Any, chat: bool, vocab_size: int) -> GenerationRequest:
    """Checks a completions (`chat=False`) or chat completions body; raises APIError on anything wrong."""
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object", code="invalid_type")
    _required(body, "model")
    model = _typed(body, "model", (str,), "a string")
    _check(bool(model), "'model' must not be empty", "model")
    _unsupported(body)
    req = GenerationRequest(chat=chat, model=model)
    if chat:
        req.messages = _messages(body)
        req.chat_template_kwargs = _template_kwargs(body)
        max_tokens = _integer(body, "max_completion_tokens", None, 1, 2**31 - 1)
        req.max_tokens = max_tokens if max_tokens is not None else _integer(body, "max_tokens", None, 1, 2**31 - 1)
        top_logprobs = _integer(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
        if _typed(body, "logprobs", (bool,), "a boolean", False):
            req.logprobs = top_logprobs or 0
        else:
            _check(top_logprobs is None, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    else:
        req.prompts = _prompts(body, vocab_size)
        req.max_tokens = _integer(body, "max_tokens", 16, 1, 2**31 - 1)
        req.logprobs = _integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
    req.n = _integer(body, "n", 1, 1, MAX_N)
    req.stream = _typed(body, "stream", (bool,), "a boolean", False)
    options = _typed(body, "stream_options", (dict,), "an object", None)
    if options is not None:
        _check(req.stream, "'stream_options' is only allowed with 'stream': true", "stream_options")
        req.include_usage = _typed(options, "include_usage", (bool,), "a boolean", False,
                                   param="stream_options.include_usage")
    req.stop = _stop(body)
    req.stop_token_ids = _stop_token_ids(body, vocab_size)
    req.temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    req.top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    top_k = _integer(body, "top_k", 0, -1, 2**31 - 1)
    req.top_k = 0 if top_k == -1 else top_k
    req.min_p = _number(body, "min_p", 0.0, 0.0, 1.0)
    req.presence_penalty = _number(body, "presence_penalty", 0.0, -2.0, 2.0)
    req.frequency_penalty = _number(body, "frequency_penalty", 0.0, -2.0, 2.0)
    req.repetition_penalty = _number(body, "repetition_penalty", 1.0, 0.0, 2.0, lo_open=True)
    req.seed = _integer(body, "seed", None, -(2**63), 2**63 - 1)
    req.logit_bias = _logit_bias(body, vocab_size)
    req.min_tokens = _integer(body, "min_tokens", 0, 0, 2**31 - 1)
    if req.max_tokens is not None:
        _check(req.min_tokens <= req.max_tokens, "'min_tokens' must not exceed 'max_tokens'", "min_tokens")
    req.ignore_eos = _typed(body, "ignore_eos", (bool,), "a boolean", False)
    req.user = _typed(body, "user", (str,), "a string", None)
    return req
