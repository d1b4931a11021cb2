"""Message types of the daemon<->worker wire, their msgpack encoding, and the one strict decoder.

Never pickle; `decode` knows every type through an explicit registry and checks every field.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Callable, Iterable
from dataclasses import MISSING, dataclass, fields
from typing import Any

import msgpack

PROTOCOL_VERSION = 2  # 2: a Step appends KV blocks as two packed arrays (append_seq_ids, append_block_ids)
MAX_FRAME_BYTES = 64 * 1024 * 1024
MAX_STR_CHARS = 4096  # names, states, ids
MAX_ERROR_CHARS = 65536  # Error.message may carry a traceback
MAX_ITEMS = 65536  # any msgpack array or map on the wire
MAX_TOP_N = 20
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MAX = 2**31 - 1  # ids that travel packed (seq ids, block ids, token ids) are int32

_BIG_ENDIAN = sys.byteorder == "big"
assert array("i").itemsize == 4 and array("f").itemsize == 4, "packed arrays assume 4-byte int and float"


class ProtocolError(ValueError):
    """A frame that is malformed, oversized, of unknown type or version, or has a bad field."""


# Packed vs msgpack int arrays, measured by hand (CPython 3.11, msgpack 1.2.4, x86-64, 2 busy cores; one
# Step of 64 NewSequence x 256 token ids + 16 block ids, median of 300 runs):
#   encode:        packed 0.34 ms from array('i') (0.62 ms packing from Python lists); lists 0.37 ms
#   strict decode: packed 0.65 ms; lists 1.70 ms (unpackb alone 0.24 vs 0.99 ms, plus a check per int)
#   to a tensor:   packed 0.006 ms (torch.frombuffer); lists 0.99 ms (torch.tensor)
#   frame size:    packed 88 KB; lists 70 KB (ids below 65536 take 3 bytes as msgpack ints)
# Packed decodes ~2.6x faster and reaches a tensor ~150x faster; encoding matches lists when the daemon
# keeps token ids in array('i') and is ~1.7x slower packing from Python lists. So ids travel packed.
def pack_ints(values: Iterable[int]) -> bytes:
    """Pack ints as little-endian int32 (OverflowError outside int32, TypeError on non-ints)."""
    return _pack("i", values)


def unpack_ints(data: bytes) -> array[int]:
    """Unpack little-endian int32 bytes into array('i'); ValueError unless len(data) % 4 == 0."""
    return _unpack_array("i", data)


def pack_floats(values: Iterable[float]) -> bytes:
    """Pack floats as little-endian float32."""
    return _pack("f", values)


def unpack_floats(data: bytes) -> array[float]:
    """Unpack little-endian float32 bytes into array('f'); ValueError unless len(data) % 4 == 0."""
    return _unpack_array("f", data)


def _pack(typecode: str, values: Iterable[Any]) -> bytes:
    packed = array(typecode, values)
    if _BIG_ENDIAN:
        packed.byteswap()
    return packed.tobytes()


def _unpack_array(typecode: str, data: bytes) -> array[Any]:
    out = array(typecode)
    out.frombytes(data)
    if _BIG_ENDIAN:
        out.byteswap()
    return out


# ---------------------------------------------------------------------------------------------- types
@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one sequence samples; sent once, inside its NewSequence."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    logprobs: int | None = None  # None = none; N = the chosen token's logprob plus the top N
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class NewSequence:
    """A sequence the worker has not seen: its tokens, its KV blocks so far, how it samples."""
    seq_id: int
    token_ids: bytes  # packed: prompt, or prompt + generated tokens after a preemption or failover
    num_prompt_tokens: int  # length of the original prompt inside token_ids (for output-token penalties)
    num_computed_tokens: int  # tokens whose KV is already in block_ids (a prefix-cache hit)
    block_ids: bytes  # packed
    sampling: SamplingParams


@dataclass(frozen=True, slots=True)
class Step:
    """daemon -> worker: one forward pass over a batch, as a diff against what the worker knows."""
    step_id: int
    new_seqs: tuple[NewSequence, ...] = ()
    # packed, in pairs: block append_block_ids[i] joins the end of sequence append_seq_ids[i]'s block table
    # (a sequence's new blocks in table order); packed because most steps append a block to some sequences
    append_seq_ids: bytes = b""
    append_block_ids: bytes = b""
    free_seq_ids: bytes = b""  # packed; forgotten by the worker before it runs the step
    seq_ids: bytes = b""  # packed; the sequences computed this step, in batch order
    num_tokens: bytes = b""  # packed; tokens of each of seq_ids to compute now (each >= 1)


@dataclass(frozen=True, slots=True)
class StepResult:
    """worker -> daemon: the token each sequence sampled in a step (and logprobs where asked)."""
    step_id: int
    worker_id: str
    incarnation: int
    seq_ids: bytes  # packed; the sequences that sampled a token this step
    token_ids: bytes  # packed; one per seq_ids entry
    logprobs: bytes = b""  # packed float32; one per logprob_seq_ids entry
    logprob_seq_ids: bytes = b""  # packed; the sequences that asked for logprobs
    top_token_ids: bytes = b""  # packed; top_n per logprob_seq_ids entry, flattened
    top_logprobs: bytes = b""  # packed float32; as top_token_ids
    top_n: int = 0
    forward_s: float = 0.0  # time the worker spent on the step


@dataclass(frozen=True, slots=True)
class Hello:
    """worker -> daemon on (re)connect: who it is, what it holds, the shape of its KV cache."""
    worker_id: str
    host: str
    pid: int
    device: str
    model: str
    model_version: str
    dtype: str
    num_blocks: int
    block_size: int
    max_model_len: int
    vocab_size: int
    incarnation: int = 0
    state: str = "ready"


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """worker -> daemon every heartbeat_interval, from its own thread, even mid-step."""
    worker_id: str
    incarnation: int
    seq: int
    state: str
    step_id: int | None = None


@dataclass(frozen=True, slots=True)
class Error:
    """Either way: a failure, tied to a step when there is one."""
    code: str
    message: str
    step_id: int | None = None


@dataclass(frozen=True, slots=True)
class Welcome:
    """daemon -> worker: the answer to Hello."""
    worker_id: str
    incarnation: int
    epoch: str
    heartbeat_interval: float = 1.0


@dataclass(frozen=True, slots=True)
class Load:
    """daemon -> worker: drop the model held (if any) and load this one, then say Hello again as `version`."""
    model: str
    version: str = ""
    dtype: str | None = None
    max_model_len: int | None = None
    fault: str | None = None  # fault injection for this version's replicas (tests and drills; worker/faults.py)


@dataclass(frozen=True, slots=True)
class Drain:
    """daemon -> worker: finish the work in hand (by the deadline), then take no more."""
    deadline_s: float | None = None


@dataclass(frozen=True, slots=True)
class Shutdown:
    """daemon -> worker: exit."""


Message = Step | StepResult | Hello | Heartbeat | Error | Welcome | Load | Drain | Shutdown

_MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.__name__: cls for cls in (Step, StepResult, Hello, Heartbeat, Error, Welcome, Load, Drain, Shutdown)
}
_NESTED_TYPES = (SamplingParams, NewSequence)


# ---------------------------------------------------------------------------------------- field checks
class _Bad(Exception):
    """A wire value failed its check; `path` grows (innermost first) as the error propagates out."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path: list[str] = []


# A checker takes one decoded wire value and returns the value to store, or raises _Bad. Checkers test
# types and ranges only; they never dispatch on data. Error paths are built only when something fails.
Checker = Callable[[object], Any]


def _type_name(value: object) -> str:
    return type(value).__name__


def _short(value: object) -> str:
    """A bounded repr of a wire value, for error messages."""
    if isinstance(value, str | bytes):
        return repr(value[:64])
    return repr(value) if isinstance(value, int | float | None) else _type_name(value)


def _int(lo: int = 0, hi: int = INT64_MAX) -> Checker:
    def check(value: object) -> int:
        if type(value) is not int:  # rejects bool, which is a subclass of int
            raise _Bad(f"expected int, got {_type_name(value)}")
        if not lo <= value <= hi:
            raise _Bad(f"{value} outside [{lo}, {hi}]")
        return value

    return check


def _float(lo: float = 0.0, hi: float = 1e12, *, lo_open: bool = False) -> Checker:
    def check(value: object) -> float:
        if type(value) is int and INT64_MIN <= value <= INT64_MAX:  # a client may send 1 for 1.0
            value = float(value)
        if type(value) is not float:
            raise _Bad(f"expected float, got {_type_name(value)}")
        if not (lo < value if lo_open else lo <= value) or not value <= hi:  # NaN fails both
            raise _Bad(f"{value} outside {'(' if lo_open else '['}{lo}, {hi}]")
        return value

    return check


def _str(max_chars: int = MAX_STR_CHARS) -> Checker:
    def check(value: object) -> str:
        if type(value) is not str:
            raise _Bad(f"expected str, got {_type_name(value)}")
        if len(value) > max_chars:
            raise _Bad(f"string of {len(value)} chars exceeds {max_chars}")
        return value

    return check


def _packed(lo: int | None = None) -> Checker:
    """Packed 4-byte values; with `lo`, int32 entries that must all be >= lo (ids, counts)."""

    def check(value: object) -> bytes:
        if type(value) is not bytes:
            raise _Bad(f"expected packed bin, got {_type_name(value)}")
        if len(value) % 4:
            raise _Bad(f"packed length {len(value)} is not a multiple of 4")
        if lo is not None and value and min(unpack_ints(value)) < lo:
            raise _Bad(f"entries must be >= {lo}")
        return value

    return check


def _optional(inner: Checker) -> Checker:
    return lambda value: None if value is None else inner(value)


def _nested(cls: type) -> Checker:
    return lambda value: _decode_fields(cls, value)


def _tuple_of(item: Checker) -> Checker:
    def check(value: object) -> tuple[Any, ...]:
        if type(value) is not list:
            raise _Bad(f"expected array, got {_type_name(value)}")
        out = []
        for i, v in enumerate(value):
            try:
                out.append(item(v))
            except _Bad as exc:
                exc.path.append(f"[{i}]")
                raise
        return tuple(out)

    return check


def _logit_bias(value: object) -> dict[int, float]:
    if type(value) is not dict:
        raise _Bad(f"expected map, got {_type_name(value)}")
    out = {}
    for token, bias in value.items():
        try:
            out[_ID(token)] = _BIAS(bias)
        except _Bad as exc:
            exc.path.append(f"[{_short(token)}]")
            raise
    return out


_ID = _int(0, INT32_MAX)  # ids that also travel packed as int32
_COUNT = _int()
_STR = _str()
_BIAS = _float(-100.0, 100.0)
_PACKED = _packed()  # token ids (range-checked by the worker, which knows vocab_size) and float32
_IDS = _packed(0)

# The explicit schema of every type: field name -> checker, exactly the dataclass fields in order
# (tests/test_protocol.py checks that), none named like the envelope keys "type" and "v".
_SCHEMAS: dict[type, dict[str, Checker]] = {
    SamplingParams: {
        "temperature": _float(0.0), "top_p": _float(0.0, 1.0, lo_open=True), "top_k": _COUNT,
        "min_p": _float(0.0, 1.0), "presence_penalty": _float(-2.0, 2.0),
        "frequency_penalty": _float(-2.0, 2.0), "repetition_penalty": _float(0.0, lo_open=True),
        "seed": _optional(_int(INT64_MIN)), "logprobs": _optional(_int(0, MAX_TOP_N)),
        "logit_bias": _optional(_logit_bias), "min_tokens": _COUNT, "stop_token_ids": _tuple_of(_ID),
    },
    NewSequence: {
        "seq_id": _ID, "token_ids": _PACKED, "num_prompt_tokens": _COUNT, "num_computed_tokens": _COUNT,
        "block_ids": _IDS, "sampling": _nested(SamplingParams),
    },
    Step: {
        "step_id": _COUNT, "new_seqs": _tuple_of(_nested(NewSequence)),
        "append_seq_ids": _IDS, "append_block_ids": _IDS, "free_seq_ids": _IDS, "seq_ids": _IDS,
        "num_tokens": _packed(1),
    },
    StepResult: {
        "step_id": _COUNT, "worker_id": _STR, "incarnation": _COUNT, "seq_ids": _IDS, "token_ids": _PACKED,
        "logprobs": _PACKED, "logprob_seq_ids": _IDS, "top_token_ids": _PACKED, "top_logprobs": _PACKED,
        "top_n": _int(0, MAX_TOP_N), "forward_s": _float(),
    },
    Hello: {
        "worker_id": _STR, "host": _STR, "pid": _COUNT, "device": _STR, "model": _STR,
        "model_version": _STR, "dtype": _STR, "num_blocks": _COUNT, "block_size": _int(1),
        "max_model_len": _int(1), "vocab_size": _int(1, INT32_MAX), "incarnation": _COUNT, "state": _STR,
    },
    Heartbeat: {
        "worker_id": _STR, "incarnation": _COUNT, "seq": _COUNT, "state": _STR,
        "step_id": _optional(_COUNT),
    },
    Error: {"code": _STR, "message": _str(MAX_ERROR_CHARS), "step_id": _optional(_COUNT)},
    Welcome: {
        "worker_id": _STR, "incarnation": _COUNT, "epoch": _STR,
        "heartbeat_interval": _float(0.0, lo_open=True),
    },
    Load: {"model": _STR, "version": _STR, "dtype": _optional(_STR), "max_model_len": _optional(_int(1)),
           "fault": _optional(_STR)},
    Drain: {"deadline_s": _optional(_float())},
    Shutdown: {},
}

# Fields without a default must be present on the wire; computed once from our own classes.
_REQUIRED: dict[type, frozenset[str]] = {
    cls: frozenset(f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING)
    for cls in _SCHEMAS
}


def _decode_fields(cls: type, data: object, skip: frozenset[str] = frozenset()) -> Any:
    if type(data) is not dict:
        raise _Bad(f"expected map, got {_type_name(data)}")
    schema = _SCHEMAS[cls]
    extra = data.keys() - schema.keys() - skip
    if extra:
        raise _Bad(f"unknown field(s) {', '.join(sorted(map(_short, extra))[:5])}")
    missing = _REQUIRED[cls] - data.keys()
    if missing:
        raise _Bad(f"missing field(s) {', '.join(sorted(missing))}")
    kwargs = {}
    for name, check in schema.items():
        if name in data:
            try:
                kwargs[name] = check(data[name])
            except _Bad as exc:
                exc.path.append(f".{name}")
                raise
    obj = cls(**kwargs)  # kwargs holds only schema fields, each one checked above
    invariant = _INVARIANTS.get(cls)
    if invariant is not None:
        invariant(obj)
    return obj


# -------------------------------------------------------------------------------- structural invariants
def _n(packed: bytes) -> int:
    return len(packed) // 4


def _check_new_sequence(seq: NewSequence) -> None:
    n = _n(seq.token_ids)
    if n == 0:
        raise _Bad("a new sequence needs at least one token")
    if seq.num_prompt_tokens > n or seq.num_computed_tokens > n:
        raise _Bad(f"num_prompt_tokens/num_computed_tokens exceed the {n} token_ids")


def _check_step(step: Step) -> None:
    if len(step.seq_ids) != len(step.num_tokens):
        raise _Bad(f"{_n(step.seq_ids)} seq_ids but {_n(step.num_tokens)} num_tokens")
    if len(step.append_seq_ids) != len(step.append_block_ids):
        raise _Bad(f"{_n(step.append_seq_ids)} append_seq_ids but {_n(step.append_block_ids)} append_block_ids")


def _check_step_result(result: StepResult) -> None:
    n_logprobs = _n(result.logprob_seq_ids)
    if len(result.token_ids) != len(result.seq_ids):
        raise _Bad(f"{_n(result.seq_ids)} seq_ids but {_n(result.token_ids)} token_ids")
    if _n(result.logprobs) != n_logprobs:
        raise _Bad(f"{n_logprobs} logprob_seq_ids but {_n(result.logprobs)} logprobs")
    for name, packed in (("top_token_ids", result.top_token_ids), ("top_logprobs", result.top_logprobs)):
        if _n(packed) != n_logprobs * result.top_n:
            raise _Bad(f"{_n(packed)} {name}, expected {n_logprobs} logprob_seq_ids x top_n {result.top_n}")


_INVARIANTS: dict[type, Callable[[Any], None]] = {
    NewSequence: _check_new_sequence,
    Step: _check_step,
    StepResult: _check_step_result,
}


# ------------------------------------------------------------------------------------- encode / decode
def _nested_to_map(obj: object) -> dict[str, object]:
    # msgpack calls this for objects it cannot pack itself; only our nested types are allowed.
    if type(obj) in _NESTED_TYPES:
        return {name: getattr(obj, name) for name in _SCHEMAS[type(obj)]}
    raise TypeError(f"cannot encode {_type_name(obj)} on the Nimbus wire")


def encode(msg: Message) -> bytes:
    """Encode a message as one msgpack frame: {"type": class name, "v": PROTOCOL_VERSION, **fields}."""
    cls = type(msg)
    if _MESSAGE_TYPES.get(cls.__name__) is not cls:
        raise TypeError(f"not a Nimbus message: {cls.__name__}")
    frame: dict[str, object] = {"type": cls.__name__, "v": PROTOCOL_VERSION}
    for name in _SCHEMAS[cls]:
        frame[name] = getattr(msg, name)
    return msgpack.packb(frame, use_bin_type=True, default=_nested_to_map)


def _reject_ext(code: int, data: bytes) -> object:
    raise ProtocolError(f"msgpack ext type {code} is not allowed")


def _unpack(frame: bytes | bytearray | memoryview, max_bytes: int) -> object:
    try:
        return msgpack.unpackb(
            frame, raw=False, use_list=True, strict_map_key=False, ext_hook=_reject_ext, max_ext_len=0,
            max_bin_len=max_bytes, max_str_len=min(max_bytes, 4 * MAX_ERROR_CHARS),
            max_array_len=MAX_ITEMS, max_map_len=MAX_ITEMS,
        )
    except ProtocolError:
        raise
    except Exception as exc:  # ExtraData, FormatError, StackError, OutOfData, ValueError, TypeError, ...
        raise ProtocolError(f"not a valid msgpack frame: {type(exc).__name__}: {exc}") from None


_ENVELOPE = frozenset({"type", "v"})


def decode(frame: bytes | bytearray | memoryview, max_bytes: int = MAX_FRAME_BYTES) -> Message:
    """Decode and validate one frame; anything malformed raises ProtocolError, never anything else."""
    if not isinstance(frame, bytes | bytearray | memoryview):
        raise ProtocolError(f"frame must be bytes, got {_type_name(frame)}")
    size = memoryview(frame).nbytes
    if size > max_bytes:
        raise ProtocolError(f"frame of {size} bytes exceeds the limit of {max_bytes}")
    data = _unpack(frame, max_bytes)
    if type(data) is not dict:
        raise ProtocolError(f"frame must be a msgpack map, got {_type_name(data)}")
    if "v" not in data:
        raise ProtocolError("frame has no protocol version 'v'")
    if type(data["v"]) is not int or data["v"] != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {_short(data['v'])} (this side speaks {PROTOCOL_VERSION})")
    type_name = data.get("type")
    if type(type_name) is not str:  # also when absent
        raise ProtocolError(f"message type must be a string, got {_type_name(type_name)}")
    cls = _MESSAGE_TYPES.get(type_name)
    if cls is None:
        raise ProtocolError(f"unknown message type {_short(type_name)}")
    try:
        return _decode_fields(cls, data, skip=_ENVELOPE)
    except _Bad as exc:
        raise ProtocolError(f"{type_name}{''.join(reversed(exc.path))}: {exc.reason}") from None
