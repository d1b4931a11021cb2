"""`nimbus bench`: a streaming load generator for any OpenAI-compatible server (Nimbus, vLLM, SGLang, llama.cpp).

Prompts of exact token counts are cut from fixed English text with the model's tokenizer, sent on a burst,
Poisson or sweep schedule, and every streamed chunk is timed: TTFT, inter-token latency, throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import platform
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from tqdm import tqdm

from daemon.models import ModelNotFoundError

# Public domain (Lincoln, 1863; Dickens, 1859). Real prose, so a prompt tokenizes like real traffic.
CORPUS = (
    "Four score and seven years ago our fathers brought forth on this continent, a new nation, conceived in "
    "Liberty, and dedicated to the proposition that all men are created equal. Now we are engaged in a great "
    "civil war, testing whether that nation, or any nation so conceived and so dedicated, can long endure. We "
    "are met on a great battle-field of that war. We have come to dedicate a portion of that field, as a final "
    "resting place for those who here gave their lives that that nation might live. It is altogether fitting "
    "and proper that we should do this. But, in a larger sense, we can not dedicate, we can not consecrate, we "
    "can not hallow this ground. The brave men, living and dead, who struggled here, have consecrated it, far "
    "above our poor power to add or detract. The world will little note, nor long remember what we say here, "
    "but it can never forget what they did here. It is for us the living, rather, to be dedicated here to the "
    "unfinished work which they who fought here have thus far so nobly advanced. It is rather for us to be "
    "here dedicated to the great task remaining before us, that from these honored dead we take increased "
    "devotion to that cause for which they gave the last full measure of devotion, that we here highly "
    "resolve that these dead shall not have died in vain, that this nation, under God, shall have a new birth "
    "of freedom, and that government of the people, by the people, for the people, shall not perish from the "
    "earth. It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it "
    "was the season of Darkness, it was the spring of hope, it was the winter of despair, we had everything "
    "before us, we had nothing before us, we were all going direct to Heaven, we were all going direct the "
    "other way. In short, the period was so far like the present period, that some of its noisiest "
    "authorities insisted on its being received, for good or for evil, in the superlative degree of "
    "comparison only. "
)
# Offsets of successive prompts into the corpus' tokens: a prime, so they stay spread over the text.
_STRIDE = 131
WORKLOADS = ("burst", "poisson", "sweep", "shared-prefix")
ENDPOINTS = {"completions": "/completions", "chat": "/chat/completions"}


class TextTokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """What one `nimbus bench` run sends, and where."""

    base_url: str = "http://127.0.0.1:8000/v1"
    model: str | None = None  # None: the first id GET /models lists
    api_key: str | None = None
    endpoint: str = "completions"
    tokenizer: str | None = None  # folder or Nimbus model name; None: the model's folder or Nimbus' default
    workload: str = "burst"
    num_requests: int = 64
    input_len: int = 256
    output_len: int = 128
    prefix_len: int = 256  # shared-prefix only
    rate: float | None = None  # requests/s for poisson (and shared-prefix, where None means all at once)
    rates: tuple[float, ...] = ()  # sweep
    max_concurrency: int | None = None
    seed: int = 0
    ignore_eos: bool = True
    token_prompts: bool = False
    temperature: float = 0.0
    warmup: int = 0
    timeout_s: float = 600.0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}")
        if self.workload not in WORKLOADS:
            raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}")
        if min(self.num_requests, self.input_len, self.output_len, 1 if self.max_concurrency is None else self.max_concurrency) <= 0:
            raise ValueError("num_requests, input_len, output_len and max_concurrency must be positive")
        if min(self.warmup, self.prefix_len) < 0:
            raise ValueError("warmup and prefix_len must not be negative")
        if self.workload == "poisson" and not (self.rate and self.rate > 0):
            raise ValueError("the poisson workload needs --rate > 0")
        if self.workload == "sweep" and not (self.rates and min(self.rates) > 0):
            raise ValueError("the sweep workload needs --rates, e.g. 1,2,4")
        if self.token_prompts and self.endpoint != "completions":
            raise ValueError("--token-prompts works with the completions endpoint only")

    def run_rates(self) -> list[float | None]:
        """One entry per measured run: its Poisson rate, or None for all requests at once."""
        if self.workload == "sweep":
            return list(self.rates)
        return [self.rate if self.workload in ("poisson", "shared-prefix") else None]


@dataclass(frozen=True, slots=True)
class Prompt:
    text: str  # what is sent as text; re-encodes to the wanted count wherever the tokenizer allows
    token_ids: list[int]  # exactly the wanted count: sent with --token-prompts


@dataclass(slots=True)
class RequestResult:
    index: int
    ok: bool = False
    error: str | None = None
    scheduled_s: float = 0.0  # when it was due, from the run's start
    start_s: float = 0.0  # when it was sent
    ttft_s: float | None = None
    latency_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the server says it took from its prefix cache
    chunks: int = 0  # chunks that carried text
    usage_reported: bool = False


# ---------------------------------------------------------------------------------------------- statistics
def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), interpolating linearly between closest ranks (numpy's default); nan if empty."""
    if not 0 <= q <= 100:
        raise ValueError("q must be within 0..100")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution(values: Sequence[float]) -> dict[str, float]:
    mean = sum(values) / len(values) if values else math.nan
    return {"mean": mean, **{f"p{q}": percentile(values, q) for q in (50, 90, 99)}}


def poisson_arrivals(n: int, rate: float | None, seed: int = 0) -> list[float]:
    """Send times (s from the start) of n requests: all at 0 for rate None, else a seeded Poisson process."""
    if rate is None or math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    times, now = [], 0.0
    for _ in range(n):
        times.append(now)
        now += rng.expovariate(rate)  # exponential gaps: a Poisson process of `rate` per second
    return times


def time_per_output_token(r: RequestResult) -> float | None:
    """Decode time per token after the first; unlike ITL, unaffected by how the server groups tokens in chunks."""
    if r.ttft_s is None or r.latency_s is None or r.output_tokens < 2:
        return None
    return (r.latency_s - r.ttft_s) / (r.output_tokens - 1)


def summarize(results: Sequence[RequestResult], duration_s: float, output_len: int | None = None) -> dict[str, Any]:
    """The run's numbers: counts, throughputs over `duration_s`, and latency distributions of completed requests."""
    done = [r for r in results if r.ok]
    output = sum(r.output_tokens for r in done)
    prompt = sum(r.prompt_tokens for r in done)
    per = duration_s if duration_s > 0 else math.nan
    tpot = [t for r in done if (t := time_per_output_token(r)) is not None]
    return {
        "duration_s": duration_s, "completed": len(done), "failed": len(results) - len(done),
        "failure_reasons": dict(Counter(r.error or "unknown" for r in results if not r.ok)),
        # a server that ignores ignore_eos stops early and looks faster per request: say so
        "short_outputs": sum(r.output_tokens < output_len for r in done) if output_len else 0,
        "prompt_tokens": prompt, "output_tokens": output, "cached_prompt_tokens": sum(r.cached_tokens for r in done),
        "request_throughput": len(done) / per, "output_throughput": output / per,
        "total_token_throughput": (prompt + output) / per,
        "ttft_s": distribution([r.ttft_s for r in done if r.ttft_s is not None]),
        "itl_s": distribution([x for r in done for x in r.itl_s]),
        "tpot_s": distribution(tpot),
        "e2e_latency_s": distribution([r.latency_s for r in done if r.latency_s is not None]),
    }


# ------------------------------------------------------------------------------------------------- prompts
def _cycled(source: Sequence[int], offset: int, n: int) -> list[int]:
    return [source[(offset + j) % len(source)] for j in range(max(n, 0))]


def exact_prompt(tok: TextTokenizer, head: Prompt, source: Sequence[int], offset: int, n: int) -> Prompt:
    """`head` followed by `n` tokens of `source` (cycled from `offset`), as ids and as text.

    Decoding and re-encoding may merge or split tokens at the cuts, so the text's slice of the source is
    lengthened or shortened until the text encodes to len(head) + n tokens again.
    """
    total = len(head.token_ids) + n
    k, best = n, None
    for _ in range(8):
        text = head.text + tok.decode(_cycled(source, offset, k))
        got = len(tok.encode(text, add_special_tokens=False))
        if best is None or abs(got - total) < abs(best[1] - total):
            best = (text, got)
        if got == total:
            break
        k += total - got
    return Prompt(best[0], head.token_ids + _cycled(source, offset, n))


def build_prompts(tok: TextTokenizer, count: int, input_len: int, prefix_len: int = 0, seed: int = 0) -> list[Prompt]:
    """`count` distinct prompts of input_len tokens, each after the same prefix_len-token prefix (if any).

    Each starts (after the prefix) with a label naming its seed and index, such as "Reading 3 of set 0:",
    when that takes at most half its tokens: the corpus is short, so without it prompts of two runs would
    begin alike and a prefix cache would serve the later run from the earlier one.
    """
    source = tok.encode(CORPUS, add_special_tokens=False)
    shared = exact_prompt(tok, Prompt("", []), source, 0, prefix_len) if prefix_len else Prompt("", [])
    prompts = []
    for i in range(count):
        label = f"{' ' if shared.text else ''}Reading {i + 1} of set {seed}:"
        label_ids = tok.encode(label, add_special_tokens=False)
        head = shared
        if 2 * len(label_ids) <= input_len:
            head = Prompt(shared.text + label, shared.token_ids + label_ids)
        offset = (seed * 7919 + (i + 1) * _STRIDE) % len(source)
        if head.text:  # a passage that starts inside a word would merge with the head's last token
            offset = _word_start(tok, source, offset)
        prompts.append(exact_prompt(tok, head, source, offset, input_len - (len(head.token_ids) - prefix_len)))
    return prompts


def _word_start(tok: TextTokenizer, source: Sequence[int], offset: int) -> int:
    """The first offset from `offset` on whose token begins with a space (byte-level BPE and sentencepiece)."""
    for o in range(offset, offset + len(source)):
        if tok.decode([source[o % len(source)]]).startswith(" "):
            return o
    return offset


def load_tokenizer(name: str | None, model: str) -> Any:
    """The tokenizer of a folder or Nimbus model name; else the served model's folder (vLLM and SGLang name a
    local model by its path); else Nimbus' default model."""
    from daemon.models import resolve_model
    from daemon.tokenizer import Tokenizer  # tokenizers + jinja2: only when a tokenizer is needed

    if name is not None:
        folder = Path(name).expanduser() if Path(name).expanduser().is_dir() else resolve_model(name)
    elif (Path(model).expanduser() / "tokenizer.json").is_file():
        folder = Path(model).expanduser()
    else:
        folder = resolve_model(None)
    print(f"nimbus bench: tokenizer from {folder}", file=sys.stderr)
    return Tokenizer.from_folder(folder)


# --------------------------------------------------------------------------------------------------- client
def request_body(cfg: BenchConfig, model: str, prompt: Prompt) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": cfg.output_len, "temperature": cfg.temperature,
                            "stream": True, "stream_options": {"include_usage": True}}
    if cfg.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt.text}]
    else:
        body["prompt"] = prompt.token_ids if cfg.token_prompts else prompt.text
    if cfg.ignore_eos:  # a fixed output length: vLLM, SGLang and Nimbus take both fields
        body.update(ignore_eos=True, min_tokens=cfg.output_len)
    return body


def _carries_text(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta")
        if choice.get("text") or (delta and (delta.get("content") or delta.get("reasoning_content"))):
            return True
    return False


def _error_reason(prefix: str, body: str | bytes) -> str:
    """`prefix` plus the OpenAI error code (or type) the body carries, so failures group by cause."""
    with contextlib.suppress(ValueError, KeyError, TypeError):
        error = json.loads(body)["error"]
        code = (error.get("code") or error.get("type")) if isinstance(error, dict) else None
        if code:
            return f"{prefix}: {code}"
    return prefix


async def send_request(session: aiohttp.ClientSession, url: str, headers: dict[str, str], body: dict[str, Any],
                       result: RequestResult, t0: float) -> None:
    """Send one streaming request and fill `result` with its timings and token counts."""
    start = time.perf_counter()
    result.start_s = start - t0
    last = start
    try:
        async with session.post(url, json=body, headers=headers) as resp:
            if resp.status != 200:
                result.error = _error_reason(f"HTTP {resp.status}", await resp.read())
                return
            async for line in resp.content:  # SSE: "data: {...}" lines between blank ones
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                now = time.perf_counter()
                if "error" in chunk:
                    result.error = _error_reason("stream error", data)
                    return
                if usage := chunk.get("usage"):
                    result.usage_reported = True
                    result.prompt_tokens = usage.get("prompt_tokens") or result.prompt_tokens
                    result.output_tokens = usage.get("completion_tokens") or 0
                    result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                if _carries_text(chunk):
                    if result.ttft_s is None:
                        result.ttft_s = now - start
                    else:
                        result.itl_s.append(now - last)
                    last = now
                    result.chunks += 1
    except TimeoutError:
        result.error = "timeout"
        return
    except (aiohttp.ClientError, ValueError) as exc:  # ValueError: malformed JSON or an oversized line
        result.error = f"{type(exc).__name__}"
        return
    result.latency_s = time.perf_counter() - start
    if not result.usage_reported:
        result.output_tokens = result.chunks  # the best a server without usage lets us do
    result.ok = result.chunks > 0
    result.error = None if result.ok else "no output"


async def run_schedule(session: aiohttp.ClientSession, cfg: BenchConfig, model: str, prompts: Sequence[Prompt],
                       arrivals: Sequence[float], bar: Any = None) -> tuple[list[RequestResult], float]:
    """Send prompts[i] at arrivals[i] (at most max_concurrency in flight); return results and the duration."""
    url = cfg.base_url.rstrip("/") + ENDPOINTS[cfg.endpoint]
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limit = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else contextlib.nullcontext()
    results = [RequestResult(i, prompt_tokens=len(p.token_ids)) for i, p in enumerate(prompts)]
    t0 = time.perf_counter()

    async def one(i: int) -> None:
        if (delay := arrivals[i] - (time.perf_counter() - t0)) > 0:
            await asyncio.sleep(delay)
        results[i].scheduled_s = arrivals[i]
        async with limit:
            await send_request(session, url, headers, request_body(cfg, model, prompts[i]), results[i], t0)
        if bar is not None:
            bar.update(1)

    await asyncio.gather(*(one(i) for i in range(len(prompts))))
    return results, time.perf_counter() - t0


async def first_model(session: aiohttp.ClientSession, cfg: BenchConfig) -> str:
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    async with session.get(cfg.base_url.rstrip("/") + "/models", headers=headers) as resp:
        resp.raise_for_status()
        return (await resp.json())["data"][0]["id"]


def _row(r: RequestResult) -> dict[str, Any]:
    row = asdict(r)
    row["itl_s"] = [round(x, 6) for x in r.itl_s]
    return row


async def run_bench(cfg: BenchConfig, tokenizer: TextTokenizer | None = None) -> dict[str, Any]:
    """Run the configured workload; return the report (config, one summary and request rows per run)."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=cfg.timeout_s)
    connector = aiohttp.TCPConnector(limit=0)  # the workload, not the client, decides concurrency
    async with aiohttp.ClientSession(timeout=timeout, connector=connector, read_bufsize=1 << 20) as session:
        model = cfg.model or await first_model(session, cfg)
        tok = tokenizer or load_tokenizer(cfg.tokenizer, model)
        rates = cfg.run_rates()
        prefix = cfg.prefix_len if cfg.workload == "shared-prefix" else 0
        # every run gets prompts of its own, so no run is served from a cache an earlier one filled
        prompts = build_prompts(tok, cfg.warmup + cfg.num_requests * len(rates), cfg.input_len, prefix, cfg.seed)
        if cfg.warmup:
            await run_schedule(session, cfg, model, prompts[: cfg.warmup], [0.0] * cfg.warmup)
        total = cfg.num_requests * len(rates)
        bar = tqdm(total=total, file=sys.stderr, unit="req", disable=not (cfg.progress and sys.stderr.isatty()))
        runs = []
        with bar:
            for k, rate in enumerate(rates):
                mine = prompts[cfg.warmup + k * cfg.num_requests:][: cfg.num_requests]
                arrivals = poisson_arrivals(len(mine), rate, cfg.seed + k)
                results, duration = await run_schedule(session, cfg, model, mine, arrivals, bar)
                runs.append({"rate": rate, "summary": summarize(results, duration, cfg.output_len if
                                                                cfg.ignore_eos else None),
                             "requests": [_row(r) for r in results]})
    return {"config": {**asdict(cfg), "model": model, "api_key": None}, "runs": runs,
            "environment": {"python": platform.python_version(), "aiohttp": aiohttp.__version__,
                            "host": platform.node(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}}


# -------------------------------------------------------------------------------------------------- report
def format_report(report: dict[str, Any]) -> str:
    """A plain-text table: one column per run."""
    runs = report["runs"]
    rows: list[tuple[str, list[str]]] = [("request rate (req/s)", [_rate(r["rate"]) for r in runs])]
    s = [r["summary"] for r in runs]
    rows += [
        ("duration (s)", [f"{x['duration_s']:.2f}" for x in s]),
        ("completed / failed", [f"{x['completed']} / {x['failed']}" for x in s]),
        ("requests/s", [f"{x['request_throughput']:.2f}" for x in s]),
        ("output tokens/s", [f"{x['output_throughput']:.1f}" for x in s]),
        ("total tokens/s", [f"{x['total_token_throughput']:.1f}" for x in s]),
    ]
    if any(x["cached_prompt_tokens"] for x in s):  # prefix-cache hits the server reported
        rows.append(("cached / prompt tokens", [f"{x['cached_prompt_tokens']} / {x['prompt_tokens']}" for x in s]))
    for key, label in (("ttft_s", "TTFT"), ("itl_s", "ITL"), ("tpot_s", "TPOT"), ("e2e_latency_s", "E2E")):
        for stat in ("mean", "p50", "p90", "p99"):
            rows.append((f"{label} {stat} (ms)", [f"{x[key][stat] * 1000:.1f}" for x in s]))
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  " + "  ".join(f"{v:>12}" for v in vals) for name, vals in rows]
    for x, run in zip(s, runs):
        if x["failure_reasons"]:
            lines.append(f"failures at {_rate(run['rate'])}: {x['failure_reasons']}")
        if x["short_outputs"]:
            lines.append(f"{x['short_outputs']} outputs shorter than requested (ignore_eos not honoured?)")
    return "\n".join(lines)


def _rate(rate: float | None) -> str:
    return "all at once" if rate is None else f"{rate:g}"


def plot_report(report: dict[str, Any], path: str | Path) -> None:
    """A sweep: latency percentiles and throughput against rate; a single run: TTFT and ITL histograms."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    runs = report["runs"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    if len(runs) > 1:
        rates = [r["rate"] for r in runs]
        for key, label in (("ttft_s", "TTFT"), ("itl_s", "ITL"), ("e2e_latency_s", "E2E")):
            for stat, style in (("p50", "-o"), ("p99", "--o")):
                left.plot(rates, [r["summary"][key][stat] * 1000 for r in runs], style, label=f"{label} {stat}")
        left.set(xlabel="request rate (req/s)", ylabel="latency (ms)", yscale="log", title="latency")
        left.legend(fontsize=7)
        right.plot(rates, [r["summary"]["output_throughput"] for r in runs], "-o", label="output tokens/s")
        right.plot(rates, [r["summary"]["total_token_throughput"] for r in runs], "-o", label="total tokens/s")
        right.set(xlabel="request rate (req/s)", ylabel="tokens/s", title="throughput")
        right.legend(fontsize=7)
    else:
        rows = [q for q in runs[0]["requests"] if q["ok"]]
        left.hist([q["ttft_s"] * 1000 for q in rows], bins=30)
        left.set(xlabel="TTFT (ms)", ylabel="requests", title="time to first token")
        right.hist([x * 1000 for q in rows for x in q["itl_s"]], bins=50)
        right.set(xlabel="ITL (ms)", ylabel="chunks", title="inter-token latency")
    cfg = report["config"]
    fig.suptitle(f"{cfg['model']} · {cfg['workload']} · {cfg['input_len']} in / {cfg['output_len']} out", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def without_nan(x: Any) -> Any:
    """The report with nan (a statistic of nothing) as null: JSON has no NaN."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: without_nan(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [without_nan(v) for v in x]
    return x


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    rates = tuple(float(x) for x in args.rates.split(",") if x.strip()) if args.rates else ()
    return BenchConfig(
        base_url=args.base_url, model=args.model, api_key=args.api_key, endpoint=args.endpoint,
        tokenizer=args.tokenizer, workload=args.workload, num_requests=args.num_requests,
        input_len=args.input_len, output_len=args.output_len, prefix_len=args.prefix_len, rate=args.rate,
        rates=rates, max_concurrency=args.max_concurrency, seed=args.seed, ignore_eos=not args.no_ignore_eos,
        token_prompts=args.token_prompts, temperature=args.temperature, warmup=args.warmup,
        timeout_s=args.timeout,
    )


def run(args: argparse.Namespace) -> int:
    """`nimbus bench`: run the workload, print the table, write --json and --plot."""
    import uvloop  # a cheaper event loop: the client shares the machine with the server it measures

    try:
        cfg = config_from_args(args)
        report = uvloop.run(run_bench(cfg))
    except (ValueError, LookupError, aiohttp.ClientError, OSError, ModelNotFoundError) as exc:
        print(f"nimbus bench: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(without_nan(report), indent=1) + "\n")
    if args.plot:
        plot_report(report, args.plot)
    return 0 if any(r["summary"]["completed"] for r in report["runs"]) else 1
