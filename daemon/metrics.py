"""Prometheus metrics (`/metrics`): one vocabulary, `nimbus_` prefix, units in names, few labels.

Request metrics carry `deployment` and `version` so the arms of an A/B test compare directly; worker
metrics carry `worker`. Live state (queues, KV usage, workers up) is read at scrape time by a
collector, so nothing has to keep gauges in sync by hand. The registry is per daemon, not global.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from daemon.engine import Engine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
REQUEST = ("deployment", "version")
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0,
                   5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
# how a sequence ended -> the `status` label: finished (EOS or stop token), stopped (stop string), ...
STATUS = {"stop": "finished", "stop_string": "stopped", "length": "length", "abort": "aborted", "error": "error"}


# engine.counters key -> (metric name, help)
ENGINE_COUNTERS = {
    "failovers": ("nimbus_failovers", "Sequences moved off a failed worker."),
    "worker_deaths": ("nimbus_worker_deaths", "Workers declared dead (silent, hung, exited)."),
    "poisoned": ("nimbus_poisoned_requests", "Sequences failed because their steps kept killing workers."),
    "bad_frames": ("nimbus_bad_frames", "Frames from workers that did not decode."),
    "stale_frames": ("nimbus_stale_frames", "Frames from an earlier incarnation or for a step not in flight."),
    "stalls_forgiven": ("nimbus_daemon_stalls", "Times the daemon found it had not run for over a second "
                        "(paused or blocked) and moved the health clocks on instead of failing workers."),
}


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry

        def hist(name: str, doc: str, labels: tuple[str, ...], buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r)

        self.ttft = hist("nimbus_time_to_first_token_seconds", "Arrival to first output token.", REQUEST,
                         LATENCY_BUCKETS)
        self.itl = hist("nimbus_inter_token_latency_seconds", "Time between consecutive output tokens.", REQUEST,
                        LATENCY_BUCKETS)
        self.e2e = hist("nimbus_e2e_request_latency_seconds", "Arrival to the last token of a sequence.", REQUEST,
                        LATENCY_BUCKETS)
        self.queue = hist("nimbus_request_queue_time_seconds", "Arrival to first scheduled in a step.", REQUEST,
                          LATENCY_BUCKETS)
        self.prefill = hist("nimbus_request_prefill_time_seconds", "First scheduled to first output token.",
                            REQUEST, LATENCY_BUCKETS)
        self.step = hist("nimbus_step_duration_seconds", "One step: sent to result applied.", ("worker",),
                         LATENCY_BUCKETS)
        self.compute = hist("nimbus_step_compute_seconds", "The worker's own time on one step: apply, forward, "
                            "sample.", ("worker",), LATENCY_BUCKETS)
        self.batch_tokens = hist("nimbus_step_batch_tokens", "Tokens computed in one step.", ("worker",),
                                 TOKEN_BUCKETS)
        self.requests = Counter("nimbus_requests", "Sequences (choices) by final status.", (*REQUEST, "status"),
                                registry=r)
        self.prompt_tokens = Counter("nimbus_prompt_tokens", "Prompt tokens of admitted requests.", REQUEST,
                                     registry=r)
        self.generation_tokens = Counter("nimbus_generation_tokens", "Generated tokens.", REQUEST, registry=r)
        self.preemptions = Counter("nimbus_preemptions", "Sequences preempted for lack of KV blocks.",
                                   ("worker",), registry=r)

    def for_replica(self, deployment: str, version: str, worker: str) -> ReplicaMetrics:
        return ReplicaMetrics(self, (deployment, version), worker)

    def bind(self, engine: Engine, slots: Callable[[], dict[str, dict[str, object]]] | None = None) -> None:
        self.registry.register(_LiveState(engine, slots))

    def finished(self, deployment: str, version: str, reason: str | None) -> None:
        self.requests.labels(deployment, version, STATUS.get(reason or "error", "error")).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def observe_many(histogram: Histogram, value: float, count: int) -> None:
    """`count` observations of one value in one call, as `count` calls of `observe(value)` would record
    them: the step loop gives each step's sequences one inter-token latency, mostly the same for all."""
    buckets = getattr(histogram, "_buckets", None)
    bounds = getattr(histogram, "_upper_bounds", None)
    total = getattr(histogram, "_sum", None)
    if buckets is None or bounds is None or total is None:  # another prometheus_client layout: one by one
        for _ in range(count):
            histogram.observe(value)
        return
    total.inc(value * count)
    buckets[bisect_left(bounds, value)].inc(count)  # the first bound >= value (the last one is +Inf)


class ReplicaMetrics:
    """One replica's labelled series, looked up once: the step loop observes them for every token."""

    def __init__(self, metrics: Metrics, labels: tuple[str, str], worker: str) -> None:
        self.ttft, self.itl = metrics.ttft.labels(*labels), metrics.itl.labels(*labels)
        self.e2e, self.queue = metrics.e2e.labels(*labels), metrics.queue.labels(*labels)
        self.prefill = metrics.prefill.labels(*labels)
        self.generation_tokens = metrics.generation_tokens.labels(*labels)
        self.step, self.batch_tokens = metrics.step.labels(worker), metrics.batch_tokens.labels(worker)
        self.compute = metrics.compute.labels(worker)
        self.preemptions = metrics.preemptions.labels(worker)


class _LiveState(Collector):
    """Read at scrape time from the engine: queues, KV usage, prefix cache, workers by state."""

    def __init__(self, engine: Engine, slots: Callable[[], dict[str, dict[str, object]]] | None) -> None:
        self.engine = engine
        self.slots = slots

    def collect(self) -> Iterable[Metric]:
        running = GaugeMetricFamily("nimbus_running_sequences", "Sequences in the running batch.", labels=["worker"])
        waiting = GaugeMetricFamily("nimbus_waiting_sequences", "Sequences waiting for a slot.", labels=["worker"])
        kv = GaugeMetricFamily("nimbus_kv_cache_usage_ratio", "Fraction of KV blocks in use.", labels=["worker"])
        queries = CounterMetricFamily("nimbus_prefix_cache_queries_tokens", "Prompt tokens looked up in the "
                                      "prefix cache.", labels=["worker"])
        hits = CounterMetricFamily("nimbus_prefix_cache_hits_tokens", "Prompt tokens found in the prefix cache.",
                                   labels=["worker"])
        states: dict[str, int] = {"up": 0, "dead": 0, "backoff": 0, "crashloop": 0}
        state_of: dict[str, str] = {}  # one state per worker, so the states add up to the workers
        for replica in self.engine.replicas.values():
            wid, sched = replica.worker_id, replica.scheduler
            state_of[wid] = "up" if replica.alive else "dead"
            if replica.alive:
                running.add_metric([wid], sched.num_running)
                waiting.add_metric([wid], sched.num_waiting)
                kv.add_metric([wid], sched.kv_usage)
        for wid, (q, h) in self.engine.prefix_totals().items():
            queries.add_metric([wid], q)
            hits.add_metric([wid], h)
        restarts = CounterMetricFamily("nimbus_worker_restarts", "Local worker processes restarted.",
                                       labels=["worker"])
        for wid, slot in (self.slots() if self.slots else {}).items():
            restarts.add_metric([wid], float(slot["restarts"]))  # type: ignore[arg-type]
            if slot["state"] in ("backoff", "crashloop"):  # its process is down: this says more than "dead"
                state_of[wid] = str(slot["state"])
        for state in state_of.values():
            states[state] += 1
        workers = GaugeMetricFamily("nimbus_workers", "Workers by state.", labels=["state"])
        for state, n in states.items():
            workers.add_metric([state], n)
        yield from (running, waiting, kv, queries, hits, workers, restarts)
        for key, (name, doc) in ENGINE_COUNTERS.items():
            yield CounterMetricFamily(name, doc, value=self.engine.counters[key])
