"""/metrics and the request log against a real `nimbus serve` on a tiny model: every family moves by
exactly what each request did (tokens, statuses, histogram counts, steps, prefix cache, preemption,
worker failure), live gauges tell the truth while a request runs, and the request log has one line per
request, found by the client's x-request-id, without prompt text.

One server for the module. Its KV pool is tiny (160 KiB = 20 blocks of 16 tokens at 512 bytes a token)
so that two 200-token requests cannot both fit: that forces exactly one preemption. Its worker sleeps
4 ms a step, so a 200-token request runs for a second at least, long enough to be seen live, killed
in the middle or left by its client, even on a busy machine.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server import NimbusServer, wait_for
from tiny_models import make_tiny_smollm2

MODEL = "tiny-smollm2"
WORKER = "local-0"
API_KEY = "test-api-key-metrics-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CONFIG = f"""
[server]
api_keys = ["{API_KEY}"]
metrics_public = true
replica_wait_s = 60.0
max_body_bytes = 65536
[workers]
threads = 1
kv_cache_memory = "160KiB"
restart_backoff_s = 0.3
fault = "delay-ms=4"
"""
EOS = 2  # <|im_end|>, one of the tiny SmolLM2's eos ids
THE = 260  # " the": forced with logit_bias to hit a stop string
MARKER = "zebracornflake"  # in every text prompt; must never reach the log (log_prompts is off)
STATUSES = ("finished", "stopped", "length", "aborted", "error", "rejected")
# request id -> (status, prompt_tokens, output_tokens or None when only the status is known ahead)
SENT: dict[str, tuple[str, int, int | None]] = {}

pytestmark = pytest.mark.timeout(120)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("metrics")
    folder = make_tiny_smollm2(tmp / MODEL)
    with NimbusServer(folder, workers=1, config=CONFIG, tmp=tmp, startup_timeout=90) as srv:
        yield srv


@pytest.fixture(scope="module")
def version(server) -> str:
    return server.workers_info()[WORKER]["version"] or "default"


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c


# ---------------------------------------------------------------------------------------------- helpers
def scrape(server) -> Samples:
    r = httpx.get(server.url + "/metrics", timeout=10)  # no key: metrics_public
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def val(m: Samples, name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


class Delta:
    """after - before, by sample name and labels (a missing sample is 0)."""

    def __init__(self, before: Samples, after: Samples) -> None:
        self.before, self.after = before, after

    def __call__(self, name: str, **labels: str) -> float:
        return val(self.after, name, **labels) - val(self.before, name, **labels)


def req_labels(version: str) -> dict[str, str]:
    return {"deployment": MODEL, "version": version}


def statuses(d: Delta, version: str) -> dict[str, float]:
    # a rejected request has no version; its deployment is the one it named, or "" (unknown or unreadable)
    return {s: d("nimbus_requests_total", **req_labels(version), status=s) for s in STATUSES if s != "rejected"} | {
        "rejected": d("nimbus_requests_total", deployment=MODEL, version="", status="rejected")
        + d("nimbus_requests_total", deployment="", version="", status="rejected")}


def expect_statuses(d: Delta, version: str, **moved: int) -> None:
    assert statuses(d, version) == {s: moved.get(s, 0) for s in STATUSES}


def new_id(tag: str) -> str:
    return f"metrics-{tag}-{uuid.uuid4().hex[:12]}"


def complete(client: httpx.Client, body: dict, tag: str, status: str | None = None) -> httpx.Response:
    rid = new_id(tag)
    r = client.post("/v1/completions", json={"model": MODEL, **body}, headers={"x-request-id": rid})
    assert r.headers["x-request-id"] == rid
    if r.status_code == 200:
        usage = r.json()["usage"]
        SENT[rid] = (status or "length", usage["prompt_tokens"], usage["completion_tokens"])
    else:
        SENT[rid] = ("rejected", 0, 0)
    return r


def request_log(server) -> dict[str, list[dict]]:
    lines: dict[str, list[dict]] = {}
    for line in server.log_path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("logger") == "nimbus.request":
            lines.setdefault(entry.get("request_id"), []).append(entry)
    return lines


def logged(server, rid: str) -> dict:
    """The one request-log line of `rid` (waits: a stream's line follows its last chunk)."""
    entries = wait_for(lambda: request_log(server).get(rid), 10, f"the request log line of {rid}")
    assert len(entries) == 1, entries
    entry = entries[0]
    status, prompt_tokens, output_tokens = SENT[rid]
    assert entry["status"] == status and entry["prompt_tokens"] == prompt_tokens
    if output_tokens is not None:
        assert entry["output_tokens"] == output_tokens
    # a request refused before it named a deployment this server has (unknown model, unreadable body) has none
    assert entry["deployment"] == ("" if entry.get("error") in ("model_not_found", "body_too_large") else MODEL)
    return entry


def tokens(tag: int, n: int) -> list[int]:
    """A prompt of token ids no other test uses (so nothing is cached from elsewhere)."""
    return [1000 + 400 * tag + i for i in range(n)]


def assert_histograms_agree(d: Delta, labels: dict[str, str], n: int) -> None:
    """Per request: queue + prefill == ttft exactly, ttft <= e2e; every histogram's +Inf bucket is its count."""
    ttft, e2e = d("nimbus_time_to_first_token_seconds_sum", **labels), d("nimbus_e2e_request_latency_seconds_sum", **labels)
    queue, prefill = d("nimbus_request_queue_time_seconds_sum", **labels), d("nimbus_request_prefill_time_seconds_sum", **labels)
    assert 0 < ttft <= e2e and queue >= 0 and prefill > 0
    assert queue + prefill == pytest.approx(ttft, rel=1e-6, abs=1e-6)
    for name in ("time_to_first_token", "e2e_request_latency", "request_queue_time", "request_prefill_time",
                 "inter_token_latency"):
        h = f"nimbus_{name}_seconds"
        assert d(h + "_bucket", **labels, le="+Inf") == d(h + "_count", **labels)
    assert d("nimbus_time_to_first_token_seconds_count", **labels) == n


# ------------------------------------------------------------------------------------------------ tests
def test_scrape_needs_no_key_but_the_api_does(server):
    assert httpx.get(server.url + "/metrics", timeout=10).status_code == 200
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "hi"}, timeout=10)
    assert r.status_code == 401
    m = scrape(server)
    assert val(m, "nimbus_workers", state="up") == 1
    assert sum(val(m, "nimbus_workers", state=s) for s in ("up", "dead", "backoff", "crashloop")) == 1
    # an auth refusal is no request of this model: nothing counts it
    assert val(m, "nimbus_requests_total", deployment=MODEL, version="", status="rejected") == 0


def test_tokens_latencies_and_steps_add_up(server, client, version):
    n, k = 3, 12
    before = scrape(server)
    prompts = [f"{MARKER} number {i} says" for i in range(n)]  # short: under one block, nothing to cache
    with ThreadPoolExecutor(n) as pool:
        rs = list(pool.map(lambda p: complete(client, {"prompt": p, "max_tokens": k, "ignore_eos": True}, "basic"),
                           prompts))
    d = Delta(before, scrape(server))
    usages = [r.json()["usage"] for r in rs]
    assert all(r.json()["choices"][0]["finish_reason"] == "length" for r in rs)
    prompt_tokens = sum(u["prompt_tokens"] for u in usages)
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    assert cached == 0 and all(u["completion_tokens"] == k for u in usages)

    labels = req_labels(version)
    assert d("nimbus_generation_tokens_total", **labels) == n * k
    assert d("nimbus_prompt_tokens_total", **labels) == prompt_tokens
    expect_statuses(d, version, length=n)
    for h in ("time_to_first_token", "e2e_request_latency", "request_queue_time", "request_prefill_time"):
        assert d(f"nimbus_{h}_seconds_count", **labels) == n, h
    assert d("nimbus_inter_token_latency_seconds_count", **labels) == n * (k - 1)
    assert d("nimbus_inter_token_latency_seconds_sum", **labels) > 0
    assert_histograms_agree(d, labels, n)

    steps = d("nimbus_step_duration_seconds_count", worker=WORKER)
    assert k <= steps <= n * k and d("nimbus_step_batch_tokens_count", worker=WORKER) == steps
    assert d("nimbus_step_duration_seconds_sum", worker=WORKER) > 0
    # the worker's own time is part of each step's, measured on the other side of the socket
    assert d("nimbus_step_compute_seconds_count", worker=WORKER) == steps
    compute_s = d("nimbus_step_compute_seconds_sum", worker=WORKER)
    assert 0 < compute_s <= d("nimbus_step_duration_seconds_sum", worker=WORKER)
    # every prompt token once, then each output token but the last is fed back
    assert d("nimbus_step_batch_tokens_sum", worker=WORKER) == prompt_tokens - cached + n * (k - 1)
    assert d("nimbus_prefix_cache_queries_tokens_total", worker=WORKER) == prompt_tokens
    assert d("nimbus_prefix_cache_hits_tokens_total", worker=WORKER) == 0
    assert d("nimbus_preemptions_total", worker=WORKER) == 0

    for r in rs:
        entry = logged(server, r.headers["x-request-id"])
        assert entry["worker"] == WORKER and entry["version"] == version and entry["cached_tokens"] == 0
        assert 0 <= entry["queue_time_s"] <= entry["ttft_s"] <= entry["total_time_s"]


def test_stop_string_eos_and_length_statuses(server, client, version):
    before = scrape(server)
    # " the" forced first, and the stop string "the" cuts there: stopped after one token
    stopped = complete(client, {"prompt": f"{MARKER} a", "max_tokens": 20, "temperature": 0,
                                "logit_bias": {str(THE): 100}, "stop": ["the"]}, "stop", "stopped")
    # the stop string matches on the very last token allowed: still a stop string (the client sees "stop")
    stopped_last = complete(client, {"prompt": f"{MARKER} b", "max_tokens": 1, "temperature": 0,
                                     "logit_bias": {str(THE): 100}, "stop": ["the"]}, "stoplast", "stopped")
    # EOS forced as soon as min_tokens allows: it ends by its stop token after 3 + 1 tokens
    eos = complete(client, {"prompt": f"{MARKER} c", "max_tokens": 20, "temperature": 0, "min_tokens": 3,
                            "logit_bias": {str(EOS): 100}}, "eos", "finished")
    d = Delta(before, scrape(server))
    for r in (stopped, stopped_last, eos):
        assert r.json()["choices"][0]["finish_reason"] == "stop", r.json()
    assert stopped.json()["usage"]["completion_tokens"] == 1 and stopped.json()["choices"][0]["text"] == " "
    assert eos.json()["usage"]["completion_tokens"] == 4
    expect_statuses(d, version, stopped=2, finished=1)
    labels = req_labels(version)
    assert d("nimbus_generation_tokens_total", **labels) == 1 + 1 + 4
    assert d("nimbus_e2e_request_latency_seconds_count", **labels) == 3
    assert d("nimbus_inter_token_latency_seconds_count", **labels) == 0 + 0 + 3
    for r in (stopped, stopped_last, eos):
        logged(server, r.headers["x-request-id"])


def test_bad_input_unknown_model_and_huge_body_are_rejected(server, client, version):
    before = scrape(server)
    bad = complete(client, {"prompt": f"{MARKER} hot", "temperature": 9}, "badtemp")
    unknown = client.post("/v1/completions", json={"model": "no-such-model", "prompt": f"{MARKER} who"},
                          headers={"x-request-id": (rid := new_id("unknown"))})
    SENT[rid] = ("rejected", 0, 0)
    huge = complete(client, {"prompt": MARKER * 5000}, "huge")  # over max_body_bytes
    d = Delta(before, scrape(server))
    assert (bad.status_code, unknown.status_code, huge.status_code) == (400, 404, 413)
    assert huge.json()["error"]["code"] == "body_too_large"
    expect_statuses(d, version, rejected=3)
    assert d("nimbus_prompt_tokens_total", **req_labels(version)) == 0
    assert d("nimbus_step_duration_seconds_count", worker=WORKER) == 0
    entry = logged(server, bad.headers["x-request-id"])
    assert entry["http_status"] == 400 and entry["output_tokens"] == 0 and entry["ttft_s"] is None
    assert logged(server, rid)["error"] == "model_not_found"
    assert logged(server, huge.headers["x-request-id"])["http_status"] == 413


def test_client_disconnect_counts_aborted(server, version):
    before = scrape(server)
    rid = new_id("abort")
    body = {"model": MODEL, "prompt": tokens(6, 10), "max_tokens": 240, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers={**AUTH, "x-request-id": rid},
                      timeout=30) as r:
        assert r.status_code == 200 and r.headers["x-request-id"] == rid
        for i, _ in enumerate(r.iter_lines()):
            if i >= 4:
                break
    labels = req_labels(version)
    after = wait_for(lambda: (m := scrape(server)) and val(m, "nimbus_requests_total", **labels, status="aborted")
                     > val(before, "nimbus_requests_total", **labels, status="aborted") and m, 15, "the abort")
    SENT[rid] = ("aborted", 10, None)
    entry = logged(server, rid)
    d = Delta(before, after)
    expect_statuses(d, version, aborted=1)
    assert 1 <= entry["output_tokens"] < 240
    assert d("nimbus_generation_tokens_total", **labels) == entry["output_tokens"]
    assert d("nimbus_time_to_first_token_seconds_count", **labels) == 1
    assert d("nimbus_e2e_request_latency_seconds_count", **labels) == 0  # only sequences the engine ended
    m = wait_for(lambda: (m := scrape(server)) and val(m, "nimbus_running_sequences", worker=WORKER) == 0 and m,
                 10, "the aborted sequence to leave the batch")
    assert val(m, "nimbus_kv_cache_usage_ratio", worker=WORKER) == 0


def test_prefix_cache_hits_are_counted(server, client, version):
    prefix = tokens(1, 64)
    first_prompt, second_prompt = prefix + [5000, 5001, 5002], prefix + [6000, 6001]
    k = 4
    before = scrape(server)
    first = complete(client, {"prompt": first_prompt, "max_tokens": k, "ignore_eos": True}, "prefix1")
    mid = scrape(server)
    second = complete(client, {"prompt": second_prompt, "max_tokens": k, "ignore_eos": True}, "prefix2")
    after = scrape(server)
    assert first.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    hit = second.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert hit == 64  # four full blocks of the shared prefix
    d1, d2, d = Delta(before, mid), Delta(mid, after), Delta(before, after)
    assert d1("nimbus_prefix_cache_queries_tokens_total", worker=WORKER) == len(first_prompt)
    assert d1("nimbus_prefix_cache_hits_tokens_total", worker=WORKER) == 0
    assert d2("nimbus_prefix_cache_queries_tokens_total", worker=WORKER) == len(second_prompt)
    assert d2("nimbus_prefix_cache_hits_tokens_total", worker=WORKER) == hit
    # cached tokens are not computed again
    assert d("nimbus_step_batch_tokens_sum", worker=WORKER) == len(first_prompt) + len(second_prompt) - hit + 2 * (k - 1)
    assert d("nimbus_prompt_tokens_total", **req_labels(version)) == len(first_prompt) + len(second_prompt)
    expect_statuses(d, version, length=2)
    assert logged(server, second.headers["x-request-id"])["cached_tokens"] == hit


def test_kv_pressure_preempts_exactly_once(server, client, version):
    assert server.workers_info()[WORKER]["num_blocks"] == 20  # the premise: 2 x 14 blocks do not fit
    n, k = 2, 200
    prompts = [tokens(2, 10), tokens(3, 10)]
    before = scrape(server)
    with ThreadPoolExecutor(n) as pool:
        rs = list(pool.map(lambda p: complete(client, {"prompt": p, "max_tokens": k, "ignore_eos": True}, "preempt"),
                           prompts))
    d = Delta(before, scrape(server))
    assert all(r.json()["usage"]["completion_tokens"] == k for r in rs)
    labels = req_labels(version)
    # the younger yields to the older once and waits for it to finish: it never fits beside it again
    assert d("nimbus_preemptions_total", worker=WORKER) == 1
    expect_statuses(d, version, length=n)
    assert d("nimbus_generation_tokens_total", **labels) == n * k
    assert d("nimbus_prompt_tokens_total", **labels) == 20
    assert d("nimbus_inter_token_latency_seconds_count", **labels) == n * (k - 1)
    assert d("nimbus_request_queue_time_seconds_count", **labels) == n  # first scheduled once, not per admission
    assert_histograms_agree(d, labels, n)
    # the preempted one is looked up and computed again (less what it finds cached); a readmission
    # computes the token it had sampled last instead of one decode step
    queries, hits = (d("nimbus_prefix_cache_queries_tokens_total", worker=WORKER),
                     d("nimbus_prefix_cache_hits_tokens_total", worker=WORKER))
    assert queries > 20
    assert d("nimbus_step_batch_tokens_sum", worker=WORKER) == queries - hits + n * (k - 1) - 1
    for r in rs:
        logged(server, r.headers["x-request-id"])


def _stream(server, body: dict, rid: str) -> tuple[str | None, dict | None]:
    """Streams a completion to its end; returns (finish_reason, usage)."""
    finish, usage = None, None
    body = {"model": MODEL, **body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers={**AUTH, "x-request-id": rid},
                      timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                usage = chunk.get("usage") or usage
                for choice in chunk["choices"]:
                    finish = choice["finish_reason"] or finish
    return finish, usage


class Scraper:
    """Scrapes /metrics in a thread every 20 ms while in its `with` block; `on_sample(m)` sees each sample.
    What the server does, not what a lagging client has read so far, decides what is live."""

    def __init__(self, server, on_sample=None) -> None:
        self.server, self.on_sample, self.samples = server, on_sample, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            m = scrape(self.server)
            self.samples.append(m)
            if self.on_sample is not None:
                self.on_sample(m)
            time.sleep(0.02)

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)


def test_live_gauges_while_a_request_runs(server, version):
    rid = new_id("gauges")
    with Scraper(server) as scraper:
        finish, usage = _stream(server, {"prompt": tokens(4, 10), "max_tokens": 200, "ignore_eos": True}, rid)
    assert finish == "length" and usage["completion_tokens"] == 200
    SENT[rid] = ("length", 10, 200)
    during = [m for m in scraper.samples if val(m, "nimbus_running_sequences", worker=WORKER) == 1]
    assert during, "no scrape saw the request running"
    for m in scraper.samples:
        assert val(m, "nimbus_running_sequences", worker=WORKER) in (0, 1)
        assert val(m, "nimbus_waiting_sequences", worker=WORKER) == 0
        assert val(m, "nimbus_workers", state="up") == 1
    for m in during:
        assert 0 < val(m, "nimbus_kv_cache_usage_ratio", worker=WORKER) <= 1
    logged(server, rid)
    m = wait_for(lambda: (m := scrape(server)) and val(m, "nimbus_running_sequences", worker=WORKER) == 0 and m,
                 10, "the batch to empty")
    assert val(m, "nimbus_waiting_sequences", worker=WORKER) == 0
    assert val(m, "nimbus_kv_cache_usage_ratio", worker=WORKER) == 0
    assert val(m, "nimbus_workers", state="up") == 1


def test_worker_killed_mid_request_fails_over_and_is_counted(server, version):
    before = scrape(server)
    pid = server.admin()["workers"][0]["pid"]
    rid = new_id("failover")
    labels = req_labels(version)
    outage: list[Samples] = []

    def kill_mid_request(m: Samples) -> None:  # once the sequence is decoding: kill, then watch the outage
        if outage:
            outage.append(m)
        elif (val(m, "nimbus_running_sequences", worker=WORKER) == 1
              and val(m, "nimbus_generation_tokens_total", **labels)
              - val(before, "nimbus_generation_tokens_total", **labels) >= 5):
            os.kill(pid, signal.SIGKILL)
            outage.append(m)

    k = 200
    with Scraper(server, kill_mid_request):
        finish, usage = _stream(server, {"prompt": tokens(5, 10), "max_tokens": k, "ignore_eos": True}, rid)
    assert outage, "the request ended before the scraper saw it running"
    assert finish == "length" and usage["completion_tokens"] == k  # nothing lost
    SENT[rid] = ("length", 10, k)
    after = wait_for(lambda: (m := scrape(server)) and val(m, "nimbus_workers", state="up") == 1 and m, 60,
                     "the worker to come back")
    d = Delta(before, after)
    moved = {name: d(f"nimbus_{name}_total") for name in ("worker_deaths", "failovers", "poisoned_requests")}
    moved["worker_restarts"] = d("nimbus_worker_restarts_total", worker=WORKER)
    assert moved == {"worker_deaths": 1, "failovers": 1, "poisoned_requests": 0, "worker_restarts": 1}, \
        server.log()
    assert server.admin()["workers"][0]["pid"] != pid
    expect_statuses(d, version, length=1)
    assert d("nimbus_generation_tokens_total", **labels) == k
    assert d("nimbus_inter_token_latency_seconds_count", **labels) == k - 1
    assert_histograms_agree(d, labels, 1)
    # prefix-cache counters survive the worker's death (they add over its lives), and the step lost in
    # the kill is not counted, so the readmission accounts like a preemption
    queries, hits = (d("nimbus_prefix_cache_queries_tokens_total", worker=WORKER),
                     d("nimbus_prefix_cache_hits_tokens_total", worker=WORKER))
    assert queries > 10 and hits == 0
    assert d("nimbus_step_batch_tokens_sum", worker=WORKER) == queries + (k - 1) - 1
    # the workers gauge during the outage: one worker, counted once, in whatever state
    by_state = [tuple(val(m, "nimbus_workers", state=s) for s in ("up", "dead", "backoff", "crashloop"))
                for m in outage]
    assert all(sum(states) == 1 for states in by_state), by_state
    logged(server, rid)


def test_request_log_has_every_request_once_and_no_prompt_text(server):
    text = server.log_path.read_text()
    assert MARKER not in text
    lines = request_log(server)
    assert SENT and set(SENT) <= set(lines)
    for rid in SENT:
        assert len(lines[rid]) == 1, lines[rid]
        entry = lines[rid][0]
        assert entry["status"] == SENT[rid][0]
        for field in ("ts", "level", "msg", "request_id", "deployment", "version", "worker", "status",
                      "prompt_tokens", "output_tokens", "cached_tokens", "queue_time_s", "ttft_s", "total_time_s"):
            assert field in entry, (field, entry)
        assert "prompt" not in entry and "output" not in entry
