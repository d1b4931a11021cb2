"""Step overlap: the scheduler builds step N+1 while step N is in flight (its sampled tokens unknown).

Scheduler tests drive two steps in flight against test_scheduler.py's fake worker (which checks every KV
read against the sequence's prefix); process tests check a real daemon with null and real workers."""

from __future__ import annotations

import asyncio
from collections import deque

import httpx
import pytest
from hypothesis import given, settings
from server import NimbusServer
from test_engine import DEPLOYMENT, MAX_TOKENS, PROMPT, Reader, expected_tokens, harness, until
from test_engine import model as model  # the fixture
from test_scheduler import EOS, FakeWorker, check_state, make_seq, reference, scenarios
from tiny_models import make_tiny_smollm2

from daemon.replica import RequestStream
from daemon.scheduler import Scheduler, SchedulerConfig, Sequence, SequenceStatus, StepPlan
from protocol.messages import SamplingParams, StepResult, unpack_ints


def check_overlap_state(sched: Scheduler) -> None:
    """check_state's invariants, allowing for tokens that steps in flight compute or sample."""
    if not sched.num_in_flight:
        check_state(sched)
        return
    sched.blocks.check_invariants()
    for seq in sched.running:
        assert seq.status is SequenceStatus.RUNNING and 0 <= seq.num_pending_tokens <= sched.num_in_flight
        assert seq.num_computed_tokens <= seq.num_tokens + seq.num_pending_tokens
        assert len(seq.output_token_ids) + seq.num_pending_tokens <= seq.output_limit
        assert len(sched.blocks.table(seq.seq_id)) * sched.block_size >= seq.num_computed_tokens


class Pipeline:
    """Sends steps as the replica loop does: up to max_steps_in_flight ahead; the fake worker runs each
    step when it is sent, which is what running them in order means."""

    def __init__(self, sched: Scheduler, worker: FakeWorker) -> None:
        self.sched, self.worker = sched, worker
        self.flights: deque[tuple[StepPlan, StepResult]] = deque()
        self.plans: list[StepPlan] = []
        self.max_in_flight = 0

    def send(self) -> None:
        while len(self.flights) < self.sched.config.max_steps_in_flight:
            plan = self.sched.schedule()
            if plan is None:
                break
            self.plans.append(plan)
            self.flights.append((plan, self.worker.run(plan.step)))
            self.max_in_flight = max(self.max_in_flight, len(self.flights))
            check_overlap_state(self.sched)

    def receive(self):
        plan, result = self.flights.popleft()
        out = self.sched.update(plan, result)
        check_overlap_state(self.sched)
        return plan, out

    def run_to_end(self, max_steps: int = 3000) -> None:
        while self.sched.has_work or self.flights:
            assert len(self.plans) < max_steps, "the scheduler stopped making progress"
            self.send()
            assert self.flights, "work left but no step built"
            self.receive()
        assert self.sched.schedule() is None and self.sched.blocks.num_used == 0


def setup(num_blocks=64, block_size=4, max_model_len=256, eos_at=frozenset(), **config):
    # a budget small against the pool: its worth of blocks stays free, so overlapping never risks a preemption
    config.setdefault("max_num_batched_tokens", 16)
    sched = Scheduler(SchedulerConfig(**config), num_blocks, block_size, max_model_len)
    return Pipeline(sched, FakeWorker(num_blocks, block_size, max_model_len, eos_at))


# ------------------------------------------------------------------------------------------ scheduler
def test_decodes_overlap_and_outputs_match_one_at_a_time():
    p = setup(max_num_batched_tokens=16)
    seqs = [make_seq(i, [10 + i] * (3 + 5 * i), max_tokens=9) for i in range(4)]
    for seq in seqs:
        p.sched.add(seq)
    p.run_to_end()
    assert p.max_in_flight == 2
    for seq in seqs:
        assert (seq.output_token_ids, seq.finish_reason) == reference(seq, p.sched.max_seq_len)
    # a decode step computes the token the step before it samples, before its id is known here
    decode = [plan for plan in p.plans if plan.counts and all(n == 1 for n in plan.counts)]
    assert decode and len(p.plans) < 4 * 9


def test_contract_with_two_steps_in_flight():
    p = setup()
    p.sched.add(make_seq(1, [5, 6]))
    first = p.sched.schedule()
    second = p.sched.schedule()  # computes the token the first samples
    assert second is not None and list(unpack_ints(second.step.num_tokens)) == [1]
    with pytest.raises(RuntimeError):
        p.sched.schedule()
    r1, r2 = p.worker.run(first.step), p.worker.run(second.step)
    with pytest.raises(ValueError):  # results are applied in the order the steps were made
        p.sched.update(second, r2)
    p.sched.update(first, r1)
    p.sched.update(second, r2)
    assert p.sched.get(1).output_token_ids == reference(p.sched.get(1), p.sched.max_seq_len)[0][:2]


def test_a_stop_token_wastes_the_next_steps_token_which_is_never_counted():
    p = setup(eos_at=frozenset({(1, 4)}))  # the token sampled at position 4 (the 2nd output) is EOS
    seq = make_seq(1, [5, 6, 7], max_tokens=20)
    p.sched.add(seq)
    p.send()
    p.receive()
    p.send()  # two in flight: one samples EOS, the other already computes past it
    assert len(p.flights) == 2
    _, out = p.receive()
    assert seq.finish_reason == "stop" and seq.output_token_ids[-1] == EOS and list(out.tokens) == [EOS]
    assert p.sched.blocks.num_used == 0  # its blocks are free while the wasted step is still in flight
    _, wasted = p.receive()
    assert len(wasted) == 0 and len(seq.output_token_ids) == 2  # its extra token is discarded
    p.sched.add(make_seq(2, [8, 9]))
    plan = p.sched.schedule()
    assert list(unpack_ints(plan.step.free_seq_ids)) == [1]  # freed in the next step sent
    p.flights.append((plan, p.worker.run(plan.step)))
    p.run_to_end()
    assert 1 not in p.worker.seqs


def test_length_limits_are_never_scheduled_past():
    p = setup()
    seq = make_seq(1, [5, 6, 7], max_tokens=3)
    p.sched.add(seq)
    p.run_to_end()
    assert len(seq.output_token_ids) == 3 and seq.finish_reason == "length"
    # prompt 3, three outputs: the steps compute the prompt and then the first two outputs, nothing more
    assert sum(sum(plan.counts) for plan in p.plans) == 5
    short = Scheduler(SchedulerConfig(), 64, 4, 6)  # max_model_len 6: three outputs fit
    p = Pipeline(short, FakeWorker(64, 4, 6))
    seq = make_seq(1, [5, 6, 7], max_tokens=50)
    short.add(seq)
    p.run_to_end()
    assert len(seq.output_token_ids) == 3 and seq.finish_reason == "length"


def test_abort_with_two_steps_in_flight():
    p = setup()
    seq, other = make_seq(1, [5, 6, 7], max_tokens=20), make_seq(2, [8, 9], max_tokens=6)
    p.sched.add(seq)
    p.sched.add(other)
    p.send()
    assert len(p.flights) == 2
    p.sched.abort(1)
    _, out = p.receive()
    _, out2 = p.receive()
    assert seq not in out.seqs and seq not in out2.seqs and seq.output_token_ids == []
    p.run_to_end()
    assert other.output_token_ids == reference(other, p.sched.max_seq_len)[0]


def test_no_step_is_queued_behind_a_long_prefill_so_arrivals_join_the_next_one():
    p = setup(max_num_batched_tokens=64, overlap_max_prefill_tokens=32)
    p.sched.add(make_seq(1, [5] * 40, max_tokens=4))  # 39 tokens past one a sequence: over the limit of 32
    prefill = p.sched.schedule()
    assert prefill is not None and p.sched.schedule() is None  # nothing is built behind it...
    p.sched.add(make_seq(2, [6] * 3, max_tokens=4))  # ...so a request arriving now
    p.sched.update(prefill, p.worker.run(prefill.step))
    after = p.sched.schedule()
    assert sorted(seq.seq_id for seq in after.seqs) == [1, 2]  # joins the very next step
    # that step (seq 1's decode beside seq 2's 3-token prompt: 2 tokens past one a sequence) is short, so the
    # next one is built behind it as before
    assert p.sched.schedule() is not None


def test_short_prefills_still_overlap():
    p = setup(max_num_batched_tokens=64, overlap_max_prefill_tokens=32)
    p.sched.add(make_seq(1, [5] * 20, max_tokens=4))  # 19 prefill tokens
    assert p.sched.schedule() is not None and p.sched.schedule() is not None


def test_no_overlap_when_a_step_might_preempt():
    # 6 blocks of 4: two sequences growing to 20 tokens each cannot both fit, so someone is preempted,
    # and never while a step is in flight (the scheduler asserts it)
    p = setup(num_blocks=6, block_size=4, max_num_batched_tokens=4, enable_prefix_caching=False)
    seqs = [make_seq(i, [5 + i] * 3, max_tokens=16) for i in (1, 2)]
    for seq in seqs:
        p.sched.add(seq)
    p.run_to_end()
    assert any(plan.preempted_seq_ids for plan in p.plans) and p.max_in_flight == 2
    for seq in seqs:
        assert (seq.output_token_ids, seq.finish_reason) == reference(seq, p.sched.max_seq_len)


def test_requeue_with_two_steps_in_flight_frees_what_the_later_step_may_have_added():
    p = setup()
    old = make_seq(1, [5, 6, 7], max_tokens=10)
    p.sched.add(old)
    p.send()
    p.receive()
    p.send()  # step A: old decodes; step B: old decodes again
    new = make_seq(2, [8, 9], max_tokens=4)
    p.sched.add(new)
    p.flights.clear()
    p.sched.requeue_all()  # step A failed (the worker reset itself); B admitted nobody new
    plan = p.sched.schedule()
    assert not plan.step.free_seq_ids
    p.sched.requeue_all()
    # a later step in flight made only of new sequences succeeds on a worker that reset: free them
    first = p.sched.schedule()
    p.sched.add(make_seq(3, [4, 4], max_tokens=4))
    second = p.sched.schedule()
    assert [n.seq_id for n in second.step.new_seqs] == [3]
    p.sched.requeue_all()
    plan = p.sched.schedule()
    assert list(unpack_ints(plan.step.free_seq_ids)) == [3]
    assert first is not None


def test_a_sequence_moved_off_a_dead_worker_mid_flight_resumes_from_its_known_tokens():
    p = setup(max_num_batched_tokens=4)  # its prompt takes two chunks on the new scheduler
    seq = make_seq(1, [5, 6, 7, 8, 9, 10, 11], max_tokens=12)
    p.sched.add(seq)
    while not seq.output_token_ids:
        p.send()
        p.receive()
    p.send()  # two in flight, each sampling a token for it, when the worker dies
    assert seq.num_pending_tokens == 2
    known = list(seq.output_token_ids)
    moved = setup(max_num_batched_tokens=4)
    moved.sched.add(seq)  # the engine hands the sequence to another replica as it is
    assert seq.num_pending_tokens == 0 and moved.sched.queued_tokens == 7 + len(known)
    moved.run_to_end()
    assert (seq.output_token_ids, seq.finish_reason) == reference(seq, moved.sched.max_seq_len)


@settings(max_examples=150, deadline=None)
@given(scenarios())
def test_random_workloads_with_overlap_keep_invariants_and_outputs(sc):
    max_model_len = 48
    sched = Scheduler(sc["config"], sc["num_blocks"], sc["block_size"], max_model_len)
    p = Pipeline(sched, FakeWorker(sc["num_blocks"], sc["block_size"], max_model_len, sc["eos_at"]))
    seqs = [
        make_seq(i, prompt[: sched.max_seq_len - 1], max_tokens=max_tokens, min_tokens=min_tokens)
        for i, (prompt, max_tokens, min_tokens, _) in enumerate(sc["prompts"])
    ]
    arrivals = {i: at for i, (*_, at) in enumerate(sc["prompts"])}
    step = 0
    while sched.has_work or arrivals or p.flights:
        assert step < 3000, "the scheduler stopped making progress"
        for i in [i for i, at in arrivals.items() if at <= step]:
            sched.add(seqs[i])
            del arrivals[i]
        for i in [i for i, at in sc["aborts"].items() if at == step]:
            sched.abort(i)
        if step in sc["requeue_at"]:  # the worker is lost with whatever is in flight
            p.flights.clear()
            sched.requeue_all()
            p.worker = FakeWorker(sc["num_blocks"], sc["block_size"], max_model_len, sc["eos_at"])
            check_state(sched)
        p.send()
        if p.flights:
            p.receive()
        step += 1
    assert sched.blocks.num_used == 0
    for seq in seqs:
        expected, reason = reference(seq, sched.max_seq_len, sc["eos_at"])
        if seq.finish_reason == "abort":
            assert seq.output_token_ids == expected[: len(seq.output_token_ids)]
        else:
            assert (seq.output_token_ids, seq.finish_reason) == (expected, reason)


# ------------------------------------------------------------------------------------------ processes
@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_a_stopped_sequences_extra_token_never_reaches_the_client(tmp_path, model):
    """A real engine and replica loop against the null model: the step after the one that samples the stop
    token computes one more token for the sequence (overlap), which the client never sees."""
    async with harness(tmp_path, model) as h:
        a = await h.registered("A")
        a.delay_s = 0.005
        expected = expected_tokens(PROMPT, MAX_TOKENS)
        stop = expected[5]
        seq = Sequence(seq_id=h.engine.new_seq_id(), prompt_token_ids=list(PROMPT),
                       sampling=SamplingParams(temperature=0.0, stop_token_ids=(stop,)), max_tokens=MAX_TOKENS,
                       stop_token_ids=frozenset({stop}))
        stream = RequestStream(1)
        h.engine.submit(stream, DEPLOYMENT, "default", PROMPT, seq, [], 0)
        out = await Reader(stream).finish()
        assert out.tokens == expected[:6] and out.finish_reason == "stop" and out.error is None
        assert seq.output_token_ids == expected[:6]
        # six sampling steps, and a seventh built before the stop was known: its token was discarded
        def steps():
            return [step for step in a.steps if seq.seq_id in unpack_ints(step.seq_ids)]
        await until(lambda: len(steps()) == 7 and a.results[-1].step_id == steps()[-1].step_id,
                    what="the extra step to be answered")
        await asyncio.sleep(0.05)
        assert len(steps()) == 7 and seq.output_token_ids == expected[:6] and not stream._pending

        # another request: the next step sent frees the stopped sequence on the worker
        reader, other, _ = h.submit(PROMPT, max_tokens=3)
        assert (await reader.finish()).tokens == expected_tokens(PROMPT, 3)
        assert any(seq.seq_id in unpack_ints(step.free_seq_ids) for step in a.steps)
        assert seq.seq_id not in a.executor.seqs


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_overlap_off_sends_one_step_at_a_time(tmp_path, model):
    async with harness(tmp_path, model, SchedulerConfig(overlap=False)) as h:
        a = await h.registered("A")
        reader, seq, _ = h.submit(PROMPT, max_tokens=6)
        assert (await reader.finish()).tokens == expected_tokens(PROMPT, 6)
        steps = [step for step in a.steps if seq.seq_id in unpack_ints(step.seq_ids)]
        assert len(steps) == 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_smollm2(tmp_path_factory.mktemp("overlap") / "tiny-smollm2")


def _greedy_outputs(tiny, tmp, overlap: bool) -> tuple[list[str], str]:
    config = f"""
[scheduler]
overlap = {str(overlap).lower()}
max_num_batched_tokens = 64
[workers]
threads = 1
kv_cache_memory = "64MiB"
"""
    with NimbusServer(tiny, workers=1, config=config, tmp=tmp) as srv:
        async def main():
            async with httpx.AsyncClient(timeout=120) as client:
                async def one(i: int) -> str:
                    body = {"model": "tiny-smollm2", "prompt": f"Count to {i}: " + "one two " * i,
                            "max_tokens": 24 + i, "temperature": 0}
                    r = await client.post(srv.url + "/v1/completions", json=body)
                    assert r.status_code == 200, r.text
                    return r.json()["choices"][0]["text"]
                return await asyncio.gather(*(one(i) for i in range(8)))
        outputs = asyncio.run(main())
        metrics = httpx.get(srv.url + "/metrics", timeout=10).text
    return outputs, metrics


def test_real_tiny_model_greedy_output_is_the_same_with_and_without_overlap(tiny, tmp_path):
    """Eight greedy requests of different lengths (chunked prefill under a 64-token budget) through a real
    daemon and worker: the text is identical with overlap on and off."""
    (tmp_path / "on").mkdir()
    (tmp_path / "off").mkdir()
    with_overlap, metrics = _greedy_outputs(tiny, tmp_path / "on", True)
    without, _ = _greedy_outputs(tiny, tmp_path / "off", False)
    assert with_overlap == without and all(with_overlap)
    assert "nimbus_step_duration_seconds_count" in metrics
