"""`nimbus bench` against a fake OpenAI streaming server whose timing the test controls, plus its statistics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web

from daemon.bench import (
    BenchConfig,
    RequestResult,
    build_prompts,
    distribution,
    percentile,
    poisson_arrivals,
    run_bench,
    summarize,
)
from daemon.models import pull

ROOT = Path(__file__).resolve().parent.parent
TTFT, ITL = 0.1, 0.02


class WordTokenizer:
    """One token per space-separated word: round-trips exactly, and needs no files."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.words: list[str] = []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        out = []
        for word in text.split():
            if word not in self.ids:
                self.ids[word] = len(self.words)
                self.words.append(word)
            out.append(self.ids[word])
        return out

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return " ".join(self.words[i] for i in ids)


@dataclass
class FakeServer:
    """Streams `max_tokens` one-word chunks: the first TTFT after the request, then one every ITL."""

    fail_every: int = 0  # every n-th request gets a 500
    usage: bool = True
    bodies: list[dict] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.generate)
        app.router.add_post("/v1/chat/completions", self.generate)
        return app

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def generate(self, request: web.Request) -> web.StreamResponse:
        start = asyncio.get_running_loop().time()
        body = await request.json()
        self.bodies.append(body)
        if self.fail_every and len(self.bodies) % self.fail_every == 0:
            return web.json_response({"error": {"message": "no", "type": "server_error", "code": "boom"}},
                                     status=500)
        chat = "messages" in body
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if chat:  # like OpenAI: a first chunk with the role and no text, which must not count as a token
            await resp.write(_event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}))
        n = body["max_tokens"]
        for k in range(n):
            # absolute deadlines, so sleep overshoot does not accumulate into the measured gaps
            await asyncio.sleep(max(0.0, start + TTFT + k * ITL - asyncio.get_running_loop().time()))
            finish = "length" if k == n - 1 else None
            choice = {"index": 0, "delta": {"content": " w"}} if chat else {"index": 0, "text": " w"}
            await resp.write(_event({"choices": [{**choice, "finish_reason": finish}], "usage": None}))
        if self.usage:
            usage = {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n,
                     "prompt_tokens_details": {"cached_tokens": 3}}
            await resp.write(_event({"choices": [], "usage": usage}))
        await resp.write(b"data: [DONE]\n\n")
        return resp


def _event(body: dict) -> bytes:
    return b"data: " + json.dumps(body).encode() + b"\n\n"


@contextlib.asynccontextmanager
async def serving(server: FakeServer) -> AsyncIterator[str]:
    runner = web.AppRunner(server.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()


def bench(server: FakeServer, **config) -> dict:
    async def main() -> dict:
        async with serving(server) as url:
            cfg = BenchConfig(base_url=url, progress=False, **config)
            return await run_bench(cfg, tokenizer=WordTokenizer())

    return asyncio.run(main())


# ------------------------------------------------------------------------------------------- statistics
def test_percentile_matches_numpy_linear_interpolation():
    rng = random.Random(1)
    for n in (1, 2, 5, 100):
        values = [rng.expovariate(1.0) for _ in range(n)]
        for q in (0, 1, 50, 90, 99, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0  # sorts its input
    assert percentile([1.0, 2.0], 50) == 1.5
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_distribution_of_nothing_is_nan():
    d = distribution([])
    assert set(d) == {"mean", "p50", "p90", "p99"} and all(math.isnan(v) for v in d.values())
    assert distribution([1.0, 3.0])["mean"] == 2.0


def test_poisson_arrivals_mean_gap_is_one_over_rate_and_seeded():
    times = poisson_arrivals(20000, 4.0, seed=3)
    gaps = np.diff(times)
    assert times[0] == 0.0 and (gaps > 0).all()
    assert gaps.mean() == pytest.approx(1 / 4.0, rel=0.03)
    assert gaps.std() == pytest.approx(1 / 4.0, rel=0.05)  # exponential: std equals mean
    assert poisson_arrivals(50, 4.0, seed=3) == times[:50]
    assert poisson_arrivals(50, 4.0, seed=4) != times[:50]
    assert poisson_arrivals(3, None) == [0.0, 0.0, 0.0]


def test_summarize_counts_throughput_and_failures():
    ok = [RequestResult(i, ok=True, ttft_s=0.1, latency_s=1.1, itl_s=[0.1] * 10, prompt_tokens=5,
                        output_tokens=11) for i in range(3)]
    bad = [RequestResult(3, error="HTTP 500"), RequestResult(4, error="HTTP 500"), RequestResult(5, error="timeout")]
    s = summarize(ok + bad, duration_s=2.0, output_len=12)
    assert (s["completed"], s["failed"]) == (3, 3)
    assert s["failure_reasons"] == {"HTTP 500": 2, "timeout": 1}
    assert s["output_throughput"] == pytest.approx(33 / 2) and s["request_throughput"] == pytest.approx(1.5)
    assert s["total_token_throughput"] == pytest.approx(48 / 2)
    assert s["tpot_s"]["mean"] == pytest.approx(0.1) and s["ttft_s"]["p99"] == pytest.approx(0.1)
    assert s["short_outputs"] == 3


# ---------------------------------------------------------------------------------------- prompts
def test_prompts_have_exact_token_counts_with_the_real_tokenizer():
    from daemon.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(pull())
    prompts = build_prompts(tok, 40, 256)
    assert all(len(tok.encode(p.text, add_special_tokens=False)) == 256 == len(p.token_ids) for p in prompts)
    assert len({p.text for p in prompts}) == 40
    assert len({tuple(p.token_ids[:16]) for p in prompts}) == 40  # no two share a first KV block
    shared = build_prompts(tok, 10, 32, prefix_len=128)
    encoded = [tok.encode(p.text, add_special_tokens=False) for p in shared]
    assert all(len(e) == 160 for e in encoded)
    assert len({tuple(e[:128]) for e in encoded}) == 1 and len({tuple(e[128:]) for e in encoded}) == 10
    other = build_prompts(tok, 40, 256, seed=1)  # another run's prompts: no first block in common either
    assert not {tuple(p.token_ids[:16]) for p in prompts} & {tuple(p.token_ids[:16]) for p in other}
    assert prompts[0].text.startswith("Reading 1 of set 0: ")
    assert build_prompts(tok, 3, 64) == build_prompts(tok, 3, 64)


# ------------------------------------------------------------------------------------- against a server
def test_burst_measures_ttft_itl_and_throughput():
    server = FakeServer()
    report = bench(server, num_requests=8, input_len=16, output_len=20)
    s = report["runs"][0]["summary"]
    assert (s["completed"], s["failed"]) == (8, 0) and report["config"]["model"] == "fake-model"
    assert s["ttft_s"]["p50"] == pytest.approx(TTFT, abs=0.03)
    assert s["itl_s"]["mean"] == pytest.approx(ITL, rel=0.15) and s["itl_s"]["p50"] == pytest.approx(ITL, rel=0.25)
    assert s["tpot_s"]["mean"] == pytest.approx(ITL, rel=0.15)
    duration = TTFT + 19 * ITL
    assert s["output_throughput"] == pytest.approx(8 * 20 / duration, rel=0.2)
    assert s["output_tokens"] == 160 and s["prompt_tokens"] == 8 * 7  # from the usage chunk
    assert s["cached_prompt_tokens"] == 8 * 3
    assert s["short_outputs"] == 0
    rows = report["runs"][0]["requests"]
    assert all(len(r["itl_s"]) == 19 and r["usage_reported"] for r in rows)
    body = server.bodies[0]
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["min_tokens"] == 20 and body["max_tokens"] == 20
    assert len(body["prompt"].split()) == 16 and len({b["prompt"] for b in server.bodies}) == 8


def test_server_errors_are_counted_with_their_reason():
    report = bench(FakeServer(fail_every=4), num_requests=8, input_len=8, output_len=5)
    s = report["runs"][0]["summary"]
    assert (s["completed"], s["failed"]) == (6, 2)
    assert s["failure_reasons"] == {"HTTP 500: boom": 2}
    assert s["output_tokens"] == 30


def test_without_usage_tokens_are_counted_from_chunks_and_fields_can_be_left_out():
    server = FakeServer(usage=False)
    report = bench(server, num_requests=3, input_len=8, output_len=6, ignore_eos=False, endpoint="chat")
    s = report["runs"][0]["summary"]
    assert s["completed"] == 3 and s["output_tokens"] == 18  # the role chunk carries no token
    assert s["ttft_s"]["p50"] == pytest.approx(TTFT, abs=0.03)
    assert "ignore_eos" not in server.bodies[0] and "min_tokens" not in server.bodies[0]
    assert server.bodies[0]["messages"][0]["role"] == "user"


def test_sweep_runs_once_per_rate_with_fresh_prompts():
    server = FakeServer()
    report = bench(server, workload="sweep", rates=(50.0, 100.0), num_requests=4, input_len=8, output_len=3,
                   token_prompts=True, warmup=1)
    assert [r["rate"] for r in report["runs"]] == [50.0, 100.0]
    assert all(r["summary"]["completed"] == 4 for r in report["runs"])
    assert len(server.bodies) == 9 and len({tuple(b["prompt"]) for b in server.bodies}) == 9
    starts = [r["start_s"] for r in report["runs"][0]["requests"]]
    assert starts[0] < 0.02 < starts[-1]  # Poisson arrivals, not a burst


def test_cli_prints_the_table_and_writes_json_and_plot(tmp_path):
    folder = pull()

    async def main() -> tuple[int, str, str]:
        async with serving(FakeServer(fail_every=3)) as url:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "daemon.cli", "bench", "--base-url", url, "--tokenizer", str(folder),
                "--num-requests", "6", "--input-len", "32", "--output-len", "4", "--workload", "poisson",
                "--rate", "100", "--json", str(tmp_path / "out.json"), "--plot", str(tmp_path / "out.png"),
                cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await proc.communicate()
            return proc.returncode, out.decode(), err.decode()

    code, out, err = asyncio.run(main())
    assert code == 0, err
    assert "TTFT p99 (ms)" in out and "output tokens/s" in out and "HTTP 500: boom" in out
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["config"]["workload"] == "poisson" and report["config"]["rate"] == 100
    run = report["runs"][0]
    assert run["summary"]["failed"] == 2 and len(run["requests"]) == 6
    assert (tmp_path / "out.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("bad", [dict(workload="poisson"), dict(workload="sweep"), dict(endpoint="chat", token_prompts=True),
                                 dict(max_concurrency=0), dict(num_requests=0), dict(workload="nope")])
def test_config_refuses_what_cannot_run(bad):
    with pytest.raises(ValueError):
        BenchConfig(**bad)
