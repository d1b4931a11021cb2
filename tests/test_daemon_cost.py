"""The daemon's hot path, in process and in milliseconds: pre-rendered SSE chunks say exactly what json.dumps
says, streams merge a choice's deltas until read, per-step metrics count as per-token ones did, and the
lean client of bench/daemon_cost.py reads a stream as the daemon writes it."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Histogram

from daemon.metrics import LATENCY_BUCKETS, Metrics, observe_many
from daemon.models import pull
from daemon.replica import Delta, Replica, RequestStream, Track
from daemon.requests import parse_generation
from daemon.responses import Response
from daemon.scheduler import SchedulerConfig, Sequence
from daemon.tokenizer import IncrementalDetokenizer, StopMatcher, Tokenizer
from protocol.messages import Hello, SamplingParams, StepResult, pack_ints, unpack_ints

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import daemon_cost  # noqa: E402

TEXTS = ["", "Hello", ' "quoted" \\ back\\slash', "tab\tnew\nline\x00\x1f", "Café 日本語 😀 \ufffd", "</script>\u2028"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_folder(pull())


def _response(tok: Tokenizer, chat: bool, **fields) -> Response:
    body = {"model": "m\"odel", "stream": True, **fields}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"})
    req = parse_generation(body, chat, tok.vocab_size)
    return Response(req, SimpleNamespace(tokenizer=tok), [[1, 2]], [])  # type: ignore[arg-type]


def _as_dict(resp: Response, d: Delta) -> dict:
    """The choice as the general path (json.dumps of a dict) builds it."""
    lp = resp._logprobs(d)
    if resp.req.chat:
        delta = {"content": d.text} if d.text or d.finish_reason is None else {}
        return {"index": d.index, "delta": delta, "logprobs": lp, "finish_reason": d.finish_reason}
    return {"index": d.index, "text": d.text, "logprobs": lp, "finish_reason": d.finish_reason}


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("logprobs", [None, 2])
def test_prerendered_chunks_equal_json_dumps(tok: Tokenizer, chat: bool, logprobs: int | None) -> None:
    fields = {} if logprobs is None else ({"logprobs": True, "top_logprobs": logprobs} if chat else
                                          {"logprobs": logprobs})
    for text in TEXTS:
        for finish in (None, "stop", "length"):
            # rendered twice: completions' text_offset moves on with every rendering, in both paths alike
            fast, general = _response(tok, chat, **fields), _response(tok, chat, **fields)
            general.id, general.created = fast.id, fast.created
            entries = [(1000, -0.5, [(1000, -0.5), (1001, -1.25)]), (1001, -2.0, [(7, -0.1), (8, -3e-9)])]
            deltas = [Delta(0, text, [1000, 1001], entries if logprobs else [], finish), Delta(1, text)]
            rendered = fast._chunk_head() + ",".join(fast._choice(d) for d in deltas).encode() + b"]}\n\n"
            assert rendered == general._chunk([_as_dict(general, d) for d in deltas])
            json.loads(rendered[6:])


@pytest.mark.asyncio
async def test_stream_merges_a_choices_deltas_until_read() -> None:
    stream = RequestStream(2)
    stream.push(0, "a", [1])
    stream.push(1, "x", [9])
    stream.push(0, "b", [2], [(2, -0.5, [])])
    stream.push(0, "", [3], None, "length")
    reader = asyncio.ensure_future(stream.get())
    await asyncio.sleep(0)
    assert reader.done(), "deltas were waiting: get() does not wait for a wake-up"
    first, second = reader.result()
    assert (first.text, first.token_ids, first.logprobs, first.finish_reason) == ("ab", [1, 2, 3], [(2, -0.5, [])],
                                                                                  "length")
    assert (second.index, second.text) == (1, "x") and not stream.finished
    reader = asyncio.ensure_future(stream.get())
    await asyncio.sleep(0)  # the reader waits now
    stream.push(1, "y", [10], None, "stop")  # pushed without a wake-up: the reader keeps waiting
    await asyncio.sleep(0.01)
    assert not reader.done()
    stream.wake()
    assert [d.text for d in await asyncio.wait_for(reader, 1)] == ["y"]
    assert stream.finished and await stream.get() == []


def test_observe_many_counts_as_repeated_observe() -> None:
    registry = CollectorRegistry()
    one = Histogram("one", "", buckets=LATENCY_BUCKETS, registry=registry)
    many = Histogram("many", "", buckets=LATENCY_BUCKETS, registry=registry)
    for value, count in ((0.004, 3), (0.02, 5), (0.0201, 1), (1e9, 2), (0.0, 4)):
        for _ in range(count):
            one.observe(value)
        observe_many(many, value, count)
    samples = {m.name: {(s.name.replace("many", "one"), s.labels.get("le")): s.value for s in m.samples
                        if not s.name.endswith("_created")} for m in registry.collect()}
    assert samples["many"].keys() == samples["one"].keys()
    for key, value in samples["one"].items():
        assert samples["many"][key] == pytest.approx(value), key


@pytest.mark.asyncio
async def test_lean_client_reads_what_the_daemon_streams(aiohttp_server) -> None:
    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for k in range(body["max_tokens"]):
            await resp.write(b'data: {"choices":[{"index":0,"text":"t%d"}]}\n\n' % k)
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": body["max_tokens"]}
        await resp.write(b'data: {"choices":[],"usage":' + json.dumps(usage).encode() + b"}\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    server = await aiohttp_server(app)
    spec = daemon_cost.ClientSpec(port=server.port, model="m", streams=3, requests=7, duration_s=20,
                                  max_tokens=5, prompts=[[1, 2, 3]])
    res = await daemon_cost.run_client(spec)
    assert (res.completed, res.failed, res.tokens, res.short, res.cut) == (7, 0, 35, 0, 0)
    assert res.chunks == 7 * 7  # five tokens, the usage and [DONE]


class _ScriptedWorker:
    """Answers each step at once (on the next loop turn), sequence k sampling script[k] in order."""

    def __init__(self, scripts: dict[int, list[int]]) -> None:
        self.scripts, self.sampled = scripts, {k: 0 for k in scripts}
        self.replica: Replica | None = None

    def send(self, identity: bytes, step) -> None:
        ids, tokens = [], []
        for new in step.new_seqs:
            self.sampled[new.seq_id] = len(unpack_ints(new.token_ids)) - new.num_prompt_tokens
        for sid in unpack_ints(step.seq_ids):  # one token each: prompts fit in one chunk here
            ids.append(sid)
            tokens.append(self.scripts[sid][self.sampled[sid]])
            self.sampled[sid] += 1
        result = StepResult(step.step_id, "w", 0, pack_ints(ids), pack_ints(tokens))
        asyncio.get_running_loop().call_soon(self.replica.on_result, result)


@pytest.mark.asyncio
async def test_step_loop_streams_each_sequences_text_in_order(tok: Tokenizer) -> None:
    """Ordinary tokens reach the stream as ids, turned into text when it is read; first tokens, logprobs,
    stop strings and ends take the eager path. Read at any moment, every stream's text is decode(output)
    (cut at the stop string), whichever path each token took."""
    text = "Café 日本語 😀 naïve: “quoted” — the end. "
    script = tok.encode(text * 3, add_special_tokens=False)
    hello = Hello(worker_id="w", host="h", pid=1, device="null", model="m", model_version="", dtype="none",
                  num_blocks=256, block_size=4, max_model_len=4096, vocab_size=tok.vocab_size)
    worker = _ScriptedWorker({k: script[k:] for k in range(1, 9)})
    replica = Replica(hello, b"w", worker, SchedulerConfig(), 1)  # type: ignore[arg-type]
    worker.replica = replica
    streams, expected = [], []
    for k in range(1, 9):
        stops = ["naïve"] if k == 3 else []  # one with a stop string: its tokens take the eager path
        seq = Sequence(k, [5, 6, 7], SamplingParams(), max_tokens=len(script) - 16 + k)
        stream = RequestStream(1)
        replica.add(Track(seq, 0, stream, IncrementalDetokenizer(tok, seq.prompt_token_ids),
                          StopMatcher(stops) if stops else None))
        streams.append(stream)
        full = tok.decode(script[k : k + seq.max_tokens])
        expected.append(full[: full.index("naïve")] if stops else full)
    task = asyncio.ensure_future(replica.run(lambda *a: pytest.fail(f"step error {a}")))
    texts = [""] * len(streams)

    async def read(i: int) -> None:
        for turn in range(10_000):
            deltas = await streams[i].get()
            if not deltas:
                return
            texts[i] += "".join(d.text for d in deltas)
            await asyncio.sleep(0.0005 * (turn % (i + 2)))  # readers at different paces: merged deltas

    await asyncio.wait_for(asyncio.gather(*(read(i) for i in range(len(streams)))), 30)
    assert not task.done() and replica.idle  # the loop waits for work, having ended every sequence
    task.cancel()
    assert texts == expected


@pytest.mark.asyncio
async def test_a_track_leaving_the_cohort_gets_the_time_of_its_last_token(tok: Tokenizer) -> None:
    """Steps that sample the same sequences as the one before write no track; a track that leaves (an abort)
    gets the cohort's time, and token latencies still count every token."""
    hello = Hello(worker_id="w", host="h", pid=1, device="null", model="m", model_version="", dtype="none",
                  num_blocks=256, block_size=4, max_model_len=4096, vocab_size=tok.vocab_size)
    worker = _ScriptedWorker({k: [1000 + i % 50 for i in range(500)] for k in (1, 2)})
    metrics = Metrics()
    replica = Replica(hello, b"w", worker, SchedulerConfig(), 1, metrics)  # type: ignore[arg-type]
    replica.assign("r", "m", "v")
    worker.replica = replica
    tracks = []
    for k in (1, 2):
        seq = Sequence(k, [5, 6, 7], SamplingParams(), max_tokens=400)
        tracks.append(Track(seq, 0, RequestStream(1), IncrementalDetokenizer(tok, seq.prompt_token_ids), None))
        replica.add(tracks[-1])
    task = asyncio.ensure_future(replica.run(lambda *a: pytest.fail(f"step error {a}")))
    while len(tracks[0].seq.output_token_ids) < 20:
        await asyncio.sleep(0)
    first = tracks[0].first_token
    when, in_cohort = replica.cohort_time, tracks[0].seq in replica.cohort
    replica.abort(1)
    assert in_cohort and first is not None and tracks[0].last_token == when > first
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    labels = {"deployment": "m", "version": "v"}
    tokens = metrics.registry.get_sample_value("nimbus_generation_tokens_total", labels)
    itl = metrics.registry.get_sample_value("nimbus_inter_token_latency_seconds_count", labels)
    assert tokens == sum(len(t.seq.output_token_ids) for t in tracks) and itl == tokens - 2  # all but first tokens


@pytest.mark.asyncio
async def test_a_stream_reads_its_sequences_output_and_settles_it_before_an_eager_push(tok: Tokenizer) -> None:
    ids = tok.encode("日本語 text, and more", add_special_tokens=False)
    stream = RequestStream(1)
    detok = IncrementalDetokenizer(tok)
    output: list[int] = []  # the sequence's own output list: only the scheduler appends to it
    source = stream.attach(0, output, detok)
    output.extend(ids[:3])
    (delta,) = await stream.get()  # a read decodes what the list holds past the source's mark
    assert delta.token_ids == ids[:3] and source.read == 3
    output.extend(ids[3:])
    source.settle(stream, len(ids) - 1)  # the eager path: earlier tokens' text first...
    source.read = len(ids)  # ...then its own token, pushed by itself
    stream.push(0, detok.add([ids[-1]]) + detok.flush(), [ids[-1]], None, "stop")
    (delta,) = await stream.get()
    assert (delta.text, delta.token_ids, delta.finish_reason) == (tok.decode(ids[3:]), ids[3:], "stop")
    assert stream.finished and await stream.get() == []


@pytest.mark.asyncio
@pytest.mark.parametrize("interval_ms", [0, 5])
async def test_stream_readers_wake_once_per_interval_while_steps_come_faster(tok: Tokenizer,
                                                                          interval_ms: int) -> None:
    """[scheduler] stream_interval_ms bounds how often a stream's reader wakes (each wake-up is an SSE write):
    0 wakes it every step, 5 at most once per 5 ms however fast the steps come; no token is lost either way."""
    hello = Hello(worker_id="w", host="h", pid=1, device="null", model="m", model_version="", dtype="none",
                  num_blocks=4096, block_size=4, max_model_len=4096, vocab_size=tok.vocab_size)
    script = [1000 + i % 50 for i in range(400)]
    streams_n = 16  # 16 x 400 us per stream = 6.4 ms: the 5 ms setting is what binds
    worker = _ScriptedWorker({k: script for k in range(1, streams_n + 1)})
    replica = Replica(hello, b"w", worker, SchedulerConfig(stream_interval_ms=interval_ms), 1)  # type: ignore[arg-type]
    worker.replica = replica
    streams = []
    for k in range(1, streams_n + 1):
        seq = Sequence(k, [5, 6, 7], SamplingParams(), max_tokens=len(script))
        streams.append(RequestStream(1))
        replica.add(Track(seq, 0, streams[-1], IncrementalDetokenizer(tok, seq.prompt_token_ids), None))
    interval = interval_ms / 1000
    assert replica.wake_interval() == interval
    reads, tokens = [0] * len(streams), [0] * len(streams)

    async def read(i: int) -> None:
        while deltas := await streams[i].get():
            reads[i] += 1
            tokens[i] += sum(len(d.token_ids) for d in deltas)

    loop = asyncio.get_running_loop()
    start = loop.time()
    task = asyncio.ensure_future(replica.run(lambda *a: pytest.fail(f"step error {a}")))
    await asyncio.wait_for(asyncio.gather(*(read(i) for i in range(len(streams)))), 60)
    elapsed = loop.time() - start
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert tokens == [len(script)] * len(streams)
    if interval_ms == 0:
        assert min(reads) >= len(script) // 4, reads  # a read every step or two (two steps are in flight)
    else:
        assert replica.steps > 2 * elapsed / interval, "steps were not faster than the interval: nothing tested"
        assert max(reads) <= elapsed / interval + 3, (reads, elapsed)  # + the first token, the end, and rounding


def test_stream_interval_is_checked_and_the_example_config_states_its_default() -> None:
    from daemon.config import load_config

    for bad in (-1, 10_001, 0.5, True, "100"):
        with pytest.raises(ValueError, match="stream_interval_ms"):
            SchedulerConfig(stream_interval_ms=bad)  # type: ignore[arg-type]
    example = Path(__file__).resolve().parents[1] / "systemd" / "nimbus.toml"
    assert load_config(example).scheduler.stream_interval_ms == SchedulerConfig().stream_interval_ms == 100
