"""The daemon<->worker wire: round trips of every message, and a decoder that refuses anything malformed."""

from __future__ import annotations

import ast
import dataclasses
import math
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.messages import (
    _SCHEMAS,
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    Drain,
    Error,
    Heartbeat,
    Hello,
    Load,
    Message,
    NewSequence,
    ProtocolError,
    SamplingParams,
    Shutdown,
    Step,
    StepResult,
    Welcome,
    decode,
    encode,
    pack_floats,
    pack_ints,
    unpack_floats,
    unpack_ints,
)

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
INT32 = st.integers(-(2**31), 2**31 - 1)
IDS = st.integers(0, 2**31 - 1)
COUNTS = st.integers(0, 2**63 - 1)
TEXT = st.text(max_size=16)


def packed(values: st.SearchStrategy[int] = IDS, min_size: int = 0, max_size: int = 8) -> st.SearchStrategy[bytes]:
    return st.lists(values, min_size=min_size, max_size=max_size).map(pack_ints)


def floats(lo: float, hi: float, **kw: Any) -> st.SearchStrategy[float]:
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False, **kw)


sampling_params = st.builds(
    SamplingParams,
    temperature=floats(0.0, 5.0), top_p=floats(0.0, 1.0, exclude_min=True), top_k=st.integers(0, 1000),
    min_p=floats(0.0, 1.0), presence_penalty=floats(-2.0, 2.0), frequency_penalty=floats(-2.0, 2.0),
    repetition_penalty=floats(0.0, 10.0, exclude_min=True), seed=st.none() | st.integers(-(2**63), 2**63 - 1),
    logprobs=st.none() | st.integers(0, 20),
    logit_bias=st.none() | st.dictionaries(IDS, floats(-100.0, 100.0), max_size=4),
    min_tokens=st.integers(0, 100), stop_token_ids=st.lists(IDS, max_size=4).map(tuple),
)


@st.composite
def new_sequences(draw: st.DrawFn) -> NewSequence:
    tokens = draw(st.lists(INT32, min_size=1, max_size=16))
    return NewSequence(
        seq_id=draw(IDS), token_ids=pack_ints(tokens), num_prompt_tokens=draw(st.integers(0, len(tokens))),
        num_computed_tokens=draw(st.integers(0, len(tokens))), block_ids=draw(packed()),
        sampling=draw(sampling_params),
    )


@st.composite
def steps(draw: st.DrawFn, min_new: int = 0) -> Step:
    n, k = draw(st.integers(0, 6)), draw(st.integers(0, 3))
    return Step(
        step_id=draw(COUNTS), new_seqs=tuple(draw(st.lists(new_sequences(), min_size=min_new, max_size=4))),
        append_seq_ids=draw(packed(min_size=k, max_size=k)), append_block_ids=draw(packed(min_size=k, max_size=k)),
        free_seq_ids=draw(packed()), seq_ids=draw(packed(min_size=n, max_size=n)),
        num_tokens=draw(packed(st.integers(1, 2**31 - 1), min_size=n, max_size=n)),
    )


@st.composite
def step_results(draw: st.DrawFn) -> StepResult:
    n, n_lp, top_n = draw(st.integers(0, 6)), draw(st.integers(0, 4)), draw(st.integers(0, 20))
    f32 = st.floats(width=32, allow_nan=False)
    return StepResult(
        step_id=draw(COUNTS), worker_id=draw(TEXT), incarnation=draw(COUNTS),
        seq_ids=draw(packed(min_size=n, max_size=n)), token_ids=draw(packed(INT32, min_size=n, max_size=n)),
        logprobs=pack_floats(draw(st.lists(f32, min_size=n_lp, max_size=n_lp))),
        logprob_seq_ids=draw(packed(min_size=n_lp, max_size=n_lp)),
        top_token_ids=draw(packed(INT32, min_size=n_lp * top_n, max_size=n_lp * top_n)),
        top_logprobs=pack_floats(draw(st.lists(f32, min_size=n_lp * top_n, max_size=n_lp * top_n))),
        top_n=top_n, forward_s=draw(floats(0.0, 1e6)),
    )


messages: st.SearchStrategy[Message] = st.one_of(
    steps(),
    step_results(),
    st.builds(Hello, worker_id=TEXT, host=TEXT, pid=COUNTS, device=TEXT, model=TEXT, model_version=TEXT,
              dtype=TEXT, num_blocks=COUNTS, block_size=st.integers(1, 2**20), max_model_len=st.integers(1, 2**20),
              vocab_size=st.integers(1, 2**31 - 1), incarnation=COUNTS, state=TEXT),
    st.builds(Heartbeat, worker_id=TEXT, incarnation=COUNTS, seq=COUNTS, state=TEXT,
              step_id=st.none() | COUNTS),
    st.builds(Error, code=TEXT, message=st.text(max_size=200), step_id=st.none() | COUNTS),
    st.builds(Welcome, worker_id=TEXT, incarnation=COUNTS, epoch=TEXT,
              heartbeat_interval=floats(0.0, 60.0, exclude_min=True)),
    st.builds(Load, model=TEXT, version=TEXT, dtype=st.none() | TEXT, max_model_len=st.none() | st.integers(1, 2**63 - 1),
              fault=st.none() | TEXT),
    st.builds(Drain, deadline_s=st.none() | floats(0.0, 1e6)),
    st.just(Shutdown()),
)


def raw(type_name: str = "Shutdown", **fields: Any) -> bytes:
    """A frame written by hand, bypassing encode()."""
    return msgpack.packb({"type": type_name, "v": PROTOCOL_VERSION, **fields}, use_bin_type=True)


def as_map(msg: Any) -> dict[str, Any]:
    return msgpack.unpackb(encode(msg), strict_map_key=False)


def sampling_map(**changes: Any) -> dict[str, Any]:
    return {**dataclasses.asdict(SamplingParams()), "stop_token_ids": [], **changes}


def new_seq_map(**changes: Any) -> dict[str, Any]:
    return {"seq_id": 1, "token_ids": pack_ints([5, 6, 7]), "num_prompt_tokens": 3, "num_computed_tokens": 0,
            "block_ids": pack_ints([0]), "sampling": sampling_map(), **changes}


def decodes_or_refuses(frame: bytes) -> None:
    """Hostile input either decodes to a valid message (which then round-trips) or raises ProtocolError."""
    try:
        msg = decode(frame)
    except ProtocolError:
        return
    assert decode(encode(msg)) == msg


# ------------------------------------------------------------------------------------------ round trips
@FAST
@given(messages)
def test_every_message_round_trips(msg: Message) -> None:
    assert decode(encode(msg)) == msg


@settings(FAST, max_examples=15)
@given(steps(min_new=2))
def test_step_with_several_new_sequences_round_trips(step: Step) -> None:
    decoded = decode(encode(step))
    assert decoded == step
    assert all(type(seq.sampling) is SamplingParams for seq in decoded.new_seqs)


def test_schemas_list_exactly_the_dataclass_fields() -> None:
    for cls, schema in _SCHEMAS.items():
        assert list(schema) == [f.name for f in dataclasses.fields(cls)], cls.__name__
        assert not {"type", "v"} & set(schema)


def test_envelope_and_defaults() -> None:
    frame = msgpack.unpackb(encode(Drain()))
    assert frame == {"type": "Drain", "v": PROTOCOL_VERSION, "deadline_s": None}
    assert decode(raw("Step", step_id=3)) == Step(step_id=3)  # fields with defaults may be left out
    assert decode(bytearray(encode(Shutdown()))) == Shutdown()
    assert decode(memoryview(encode(Shutdown()))) == Shutdown()
    with pytest.raises(ProtocolError, match="frame must be bytes"):
        decode("Shutdown")  # type: ignore[arg-type]


def test_int_is_accepted_where_float_is_expected() -> None:
    welcome = decode(raw("Welcome", worker_id="w", incarnation=0, epoch="e", heartbeat_interval=2))
    assert welcome.heartbeat_interval == 2.0 and type(welcome.heartbeat_interval) is float


def test_encode_refuses_what_is_not_a_message() -> None:
    with pytest.raises(TypeError):
        encode(SamplingParams())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        encode({"type": "Shutdown"})  # type: ignore[arg-type]


@given(st.lists(INT32, max_size=64))
def test_pack_unpack_ints(values: list[int]) -> None:
    data = pack_ints(values)
    assert len(data) == 4 * len(values)
    assert unpack_ints(data).tolist() == values and unpack_ints(data).typecode == "i"


@given(st.lists(st.floats(width=32), max_size=64))
def test_pack_unpack_floats(values: list[float]) -> None:
    out = unpack_floats(pack_floats(values)).tolist()
    assert len(out) == len(values)
    assert all(a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(out, values))


def test_packing_is_little_endian_int32() -> None:
    assert pack_ints([1, -1]) == b"\x01\x00\x00\x00\xff\xff\xff\xff"
    assert pack_floats([1.0]) == b"\x00\x00\x80\x3f"
    with pytest.raises(OverflowError):
        pack_ints([2**31])
    with pytest.raises(ValueError):
        unpack_ints(b"\x00" * 5)


# ------------------------------------------------------------------------------------------ hostile input
def test_protocol_error_is_a_value_error() -> None:
    assert issubclass(ProtocolError, ValueError)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_decode_or_raise_protocol_error(data: bytes) -> None:
    decodes_or_refuses(data)


@FAST
@given(messages, st.data())
def test_corrupted_frames_decode_or_raise_protocol_error(msg: Message, data: st.DataObject) -> None:
    frame = bytearray(encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        frame[data.draw(st.integers(0, len(frame) - 1))] = data.draw(st.integers(0, 255))
    decodes_or_refuses(bytes(frame))


WIRE_INTS = st.integers(-(2**63), 2**64 - 1)  # what msgpack can carry
msgpack_values = st.recursive(
    st.none() | st.booleans() | WIRE_INTS | st.floats() | TEXT | st.binary(max_size=9),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT | WIRE_INTS, inner, max_size=4),
    max_leaves=12,
)


@FAST
@given(st.sampled_from(sorted({cls.__name__ for cls in _SCHEMAS} | {"Nope"})), st.data())
def test_random_fields_decode_or_raise_protocol_error(type_name: str, data: st.DataObject) -> None:
    names = list(next((s for c, s in _SCHEMAS.items() if c.__name__ == type_name), {})) + ["extra"]
    fields = data.draw(st.dictionaries(st.sampled_from(names), msgpack_values, max_size=len(names)))
    decodes_or_refuses(raw(type_name, **fields))


def test_truncated_frames_are_refused() -> None:
    step = Step(step_id=7, new_seqs=(decode(raw("Step", step_id=0, new_seqs=[new_seq_map()])).new_seqs[0],),
                seq_ids=pack_ints([1]), num_tokens=pack_ints([3]))
    frame = encode(step)
    assert decode(frame) == step
    for end in range(len(frame)):
        with pytest.raises(ProtocolError):
            decode(frame[:end])
    with pytest.raises(ProtocolError, match="msgpack"):
        decode(frame + b"\x00")  # trailing bytes


def test_oversized_frames_are_refused() -> None:
    frame = encode(Error(code="big", message="x" * 1000))
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        decode(frame, max_bytes=999)
    assert decode(frame, max_bytes=len(frame)).code == "big"
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        decode(b"\x00" * (MAX_FRAME_BYTES + 1))


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (raw("Pickle"), "unknown message type"),
        (raw("__init__"), "unknown message type"),
        (raw("SamplingParams"), "unknown message type"),  # nested types are no messages
        (msgpack.packb({"v": PROTOCOL_VERSION}), "message type must be a string"),
        (msgpack.packb({"type": b"Shutdown", "v": PROTOCOL_VERSION}), "message type must be a string"),
        (msgpack.packb({"type": "Shutdown", "v": PROTOCOL_VERSION + 1}),
         f"unsupported protocol version {PROTOCOL_VERSION + 1}"),
        (msgpack.packb({"type": "Shutdown", "v": PROTOCOL_VERSION - 1}),
         f"unsupported protocol version {PROTOCOL_VERSION - 1}"),
        (msgpack.packb({"type": "Shutdown", "v": "1"}), "unsupported protocol version"),
        (msgpack.packb({"type": "Shutdown", "v": True}), "unsupported protocol version"),
        (msgpack.packb({"type": "Shutdown"}), "no protocol version"),
        (msgpack.packb(["Shutdown", 1]), "must be a msgpack map"),
        (msgpack.packb(None), "must be a msgpack map"),
        (b"", "msgpack"),
        (b"\xc1", "msgpack"),  # a byte msgpack never uses
        (b"\x91" * 5000 + b"\xc0", "msgpack"),  # nested deeper than the unpacker's stack
        (b"\xdd\xff\xff\xff\xff", "msgpack"),  # an array claiming 4 billion items
        (raw(**{"extra": 1}), r"Shutdown: unknown field\(s\) 'extra'"),
        (raw(**{"1": 1}), "unknown field"),
        (msgpack.packb({"type": "Shutdown", "v": PROTOCOL_VERSION, 5: 1}), "unknown field"),
        (raw("Drain", deadline_s=msgpack.ExtType(1, b"x")), "msgpack"),
        (raw("Drain", deadline_s=msgpack.Timestamp(1, 0)), "msgpack"),
    ],
)
def test_malformed_frames_are_refused(frame: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode(frame)


def test_zero_length_ext_is_refused() -> None:
    frame = b"\x83\xa4type\xa5Drain\xa1v\x01\xaadeadline_s\xc7\x00\x05"
    with pytest.raises(ProtocolError, match="ext type 5"):
        decode(frame)


def test_deeply_nested_value_in_a_field_is_refused() -> None:
    value: Any = 1.0
    for _ in range(500):
        value = [value]
    with pytest.raises(ProtocolError, match="Drain.deadline_s: expected float, got list"):
        decode(raw("Drain", deadline_s=value))


HELLO = as_map(Hello(worker_id="w0", host="h", pid=1, device="cpu", model="m", model_version="1", dtype="bf16",
                     num_blocks=10, block_size=16, max_model_len=2048, vocab_size=100))


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("pid", "1", "Hello.pid: expected int, got str"),
        ("pid", True, "Hello.pid: expected int, got bool"),
        ("pid", 1.0, "Hello.pid: expected int, got float"),
        ("pid", None, "Hello.pid: expected int, got NoneType"),
        ("pid", -1, r"Hello.pid: -1 outside \[0, "),
        ("pid", 2**64 - 1, "outside"),
        ("block_size", 0, "Hello.block_size: 0 outside"),
        ("worker_id", 7, "Hello.worker_id: expected str, got int"),
        ("worker_id", b"w0", "Hello.worker_id: expected str, got bytes"),
        ("worker_id", "w" * 4097, "exceeds 4096"),
        ("vocab_size", 2**31, "outside"),
    ],
)
def test_mistyped_fields_are_refused(field: str, value: Any, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode(msgpack.packb({**HELLO, field: value}, use_bin_type=True))


def test_missing_and_extra_fields_are_refused() -> None:
    with pytest.raises(ProtocolError, match="Hello: missing field.* pid"):
        decode(msgpack.packb({k: v for k, v in HELLO.items() if k != "pid"}))
    with pytest.raises(ProtocolError, match="unknown field.*'gpu'"):
        decode(msgpack.packb({**HELLO, "gpu": 0}))
    with pytest.raises(ProtocolError, match=r"Step.new_seqs\[0\].sampling: unknown field.*'beam_width'"):
        decode(raw("Step", step_id=0, new_seqs=[new_seq_map(sampling=sampling_map(beam_width=4))]))
    with pytest.raises(ProtocolError, match=r"Step.new_seqs\[0\]: missing field.* sampling"):
        decode(raw("Step", step_id=0, new_seqs=[{k: v for k, v in new_seq_map().items() if k != "sampling"}]))


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"seq_ids": [1, 2]}, "Step.seq_ids: expected packed bin, got list"),
        ({"seq_ids": "abcd"}, "expected packed bin, got str"),
        ({"seq_ids": b"\x00" * 6, "num_tokens": b"\x01" * 6}, "Step.seq_ids: packed length 6 is not a multiple of 4"),
        ({"free_seq_ids": pack_ints([-1])}, "Step.free_seq_ids: entries must be >= 0"),
        ({"seq_ids": pack_ints([1, 2]), "num_tokens": pack_ints([1])}, "2 seq_ids but 1 num_tokens"),
        ({"seq_ids": pack_ints([1]), "num_tokens": pack_ints([0])}, "Step.num_tokens: entries must be >= 1"),
        ({"new_seqs": {}}, "Step.new_seqs: expected array, got dict"),
        ({"new_seqs": [new_seq_map(), 3]}, r"Step.new_seqs\[1\]: expected map, got int"),
        ({"new_seqs": [new_seq_map(token_ids=b"")]}, r"new_seqs\[0\]: a new sequence needs at least one token"),
        ({"new_seqs": [new_seq_map(num_computed_tokens=4)]}, "exceed the 3 token_ids"),
        ({"new_seqs": [new_seq_map(num_prompt_tokens=4)]}, "exceed the 3 token_ids"),
        ({"new_seqs": [new_seq_map(seq_id=2**31)]}, r"new_seqs\[0\].seq_id: 2147483648 outside"),
        ({"new_seqs": [new_seq_map(block_ids=pack_ints([3, -2]))]}, r"new_seqs\[0\].block_ids: entries must be"),
        ({"append_seq_ids": b"\x00"}, r"Step.append_seq_ids: packed length 1"),
        ({"append_seq_ids": pack_ints([1, 2]), "append_block_ids": pack_ints([3])},
         "2 append_seq_ids but 1 append_block_ids"),
        ({"append_block_ids": pack_ints([-3])}, "Step.append_block_ids: entries must be"),
        ({"step_id": -1}, "Step.step_id: -1 outside"),
    ],
)
def test_malformed_steps_are_refused(fields: dict[str, Any], match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode(raw("Step", **{"step_id": 0, **fields}))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"temperature": -0.1}, "sampling.temperature: -0.1 outside"),
        ({"temperature": float("nan")}, "sampling.temperature: nan outside"),
        ({"temperature": float("inf")}, "outside"),
        ({"temperature": "hot"}, "sampling.temperature: expected float, got str"),
        ({"temperature": True}, "sampling.temperature: expected float, got bool"),
        ({"top_p": 0.0}, r"sampling.top_p: 0.0 outside \(0.0, 1.0\]"),
        ({"top_p": 1.5}, "top_p: 1.5 outside"),
        ({"top_k": -1}, "top_k: -1 outside"),
        ({"min_p": 1.01}, "min_p"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"seed": 2**63}, "seed"),
        ({"logprobs": 21}, "logprobs: 21 outside"),
        ({"logprobs": -1}, "logprobs"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"logit_bias": {"5": 1.0}}, r"sampling.logit_bias\['5'\]: expected int, got str"),
        ({"logit_bias": {5: 101.0}}, r"sampling.logit_bias\[5\]: 101.0 outside"),
        ({"logit_bias": {-5: 1.0}}, r"logit_bias\[-5\]: -5 outside"),
        ({"logit_bias": [[5, 1.0]]}, "logit_bias: expected map, got list"),
        ({"stop_token_ids": [1, "2"]}, r"stop_token_ids\[1\]: expected int, got str"),
        ({"stop_token_ids": pack_ints([1])}, "stop_token_ids: expected array, got bytes"),
    ],
)
def test_out_of_range_sampling_is_refused(changes: dict[str, Any], match: str) -> None:
    frame = raw("Step", step_id=0, new_seqs=[new_seq_map(sampling=sampling_map(**changes))])
    with pytest.raises(ProtocolError, match=r"^Step\.new_seqs\[0\]\.sampling\.") as info:
        decode(frame)
    assert info.match(match)


def test_logit_bias_with_int_keys_is_accepted() -> None:
    frame = raw("Step", step_id=0, new_seqs=[new_seq_map(sampling=sampling_map(logit_bias={5: -100, 7: 2.5}))])
    assert decode(frame).new_seqs[0].sampling.logit_bias == {5: -100.0, 7: 2.5}


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"token_ids": pack_ints([1, 2])}, "1 seq_ids but 2 token_ids"),
        ({"logprob_seq_ids": pack_ints([1])}, "1 logprob_seq_ids but 0 logprobs"),
        ({"logprob_seq_ids": pack_ints([1]), "logprobs": pack_floats([-0.5]), "top_n": 2,
          "top_token_ids": pack_ints([1, 2]), "top_logprobs": pack_floats([-1.0])}, "1 top_logprobs, expected"),
        ({"top_n": 21}, "StepResult.top_n: 21 outside"),
        ({"forward_s": -1.0}, "StepResult.forward_s"),
    ],
)
def test_malformed_step_results_are_refused(fields: dict[str, Any], match: str) -> None:
    base = {"step_id": 0, "worker_id": "w", "incarnation": 0, "seq_ids": pack_ints([1]), "token_ids": pack_ints([9])}
    with pytest.raises(ProtocolError, match=match):
        decode(raw("StepResult", **{**base, **fields}))


def test_protocol_package_never_imports_pickle_and_only_allowed_modules() -> None:
    allowed = set(sys.stdlib_module_names) - {"pickle", "_pickle", "pickletools", "marshal", "shelve", "copyreg"}
    allowed |= {"msgpack", "zmq", "protocol"}
    sources = sorted((Path(__file__).parent.parent / "protocol").glob("**/*.py"))
    assert sources
    for path in sources:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = [(node.module or "").split(".")[0]]
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in {"eval", "exec", "__import__"}:
                raise AssertionError(f"{path}: calls {node.func.id}")  # type: ignore[attr-defined]
            else:
                continue
            assert set(roots) <= allowed, f"{path}:{node.lineno} imports {roots}"
        assert "pickle" not in {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
