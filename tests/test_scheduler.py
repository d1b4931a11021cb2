"""Scheduler: the one rule (chunked prefill, prefix reuse, preemption), stop conditions, aborts, requeue,
driven by a pure-Python fake worker that mirrors worker/executor.py's checks and keeps a fake KV cache."""

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.scheduler import (
    DECODE_BLOCKS_AHEAD,
    Scheduler,
    SchedulerConfig,
    Sequence,
    SequenceStatus,
    StepPlan,
)
from protocol.messages import (
    NewSequence,
    SamplingParams,
    Step,
    StepResult,
    decode,
    encode,
    pack_floats,
    pack_ints,
    unpack_ints,
)

EOS = 1


def token_at(seq_id: int, pos: int) -> int:
    """The fake model: the token sampled at a position depends only on (sequence, position)."""
    return 2 + (seq_id * 131 + pos * 29) % 97


@dataclass
class WorkerSeq:
    tokens: list[int]
    computed: int
    blocks: list[int]
    logprobs: int | None


class FakeWorker:
    """Applies steps as worker/executor.py does (frees first, then new sequences, appends, chunks) with
    its checks made assertions. Each KV slot holds a value that depends on the whole prefix up to its
    position, so a block reused while still needed, or a wrong prefix hit, shows up as wrong content.
    As in the model, each layer writes the K/V of every token of the step before any attention reads: a
    sequence may read, in the step that writes them, blocks another sequence of the step computes."""

    def __init__(self, num_blocks: int, block_size: int, max_model_len: int, eos_at=frozenset()) -> None:
        self.block_size, self.max_model_len, self.eos_at = block_size, max_model_len, eos_at
        self.kv: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.seqs: dict[int, WorkerSeq] = {}

    def run(self, step: Step) -> StepResult:
        step = decode(encode(step))  # the wire accepts it
        for sid in unpack_ints(step.free_seq_ids):
            assert self.seqs.pop(sid, None) is not None, f"free of unknown sequence {sid}"
        for new in step.new_seqs:
            self._add(new)
        for sid, block in zip(unpack_ints(step.append_seq_ids), unpack_ints(step.append_block_ids), strict=True):
            self.seqs[sid].blocks.append(block)
        seq_ids, counts = list(unpack_ints(step.seq_ids)), list(unpack_ints(step.num_tokens))
        assert len(set(seq_ids)) == len(seq_ids)
        owners: dict[int, list[int]] = {}
        for other_id, other in self.seqs.items():
            for block in other.blocks:
                owners.setdefault(block, []).append(other_id)
        batch = []
        for sid, n in zip(seq_ids, counts, strict=True):  # every write of the step first...
            seq = self.seqs[sid]
            end = seq.computed + n
            assert n >= 1 and end <= len(seq.tokens) and end <= len(seq.blocks) * self.block_size
            values = prefix_values(seq.tokens[:end])
            for pos in range(seq.computed, end):
                self._write(owners, sid, seq.blocks[pos // self.block_size], pos % self.block_size, values[pos])
            batch.append((seq, values, end))
        sampled = []
        for sid, (seq, values, end) in zip(seq_ids, batch):  # ...then attention reads every position up to end
            self._check_kv(seq, values, end)
            seq.computed = end
            if end == len(seq.tokens):
                sampled.append(sid)
        tokens = [self._sample(sid) for sid in sampled]
        return StepResult(step.step_id, "fake", 0, pack_ints(sampled), pack_ints(tokens), **self._logprobs(sampled))

    def _add(self, new: NewSequence) -> None:
        tokens = list(unpack_ints(new.token_ids))
        assert new.seq_id not in self.seqs and 0 < len(tokens) < self.max_model_len
        assert 0 <= new.num_computed_tokens < len(tokens) and new.num_prompt_tokens <= len(tokens)
        # its prefix hit is checked when the step reads it (its step may be the one computing it)
        self.seqs[new.seq_id] = WorkerSeq(tokens, new.num_computed_tokens, list(unpack_ints(new.block_ids)),
                                          new.sampling.logprobs)

    def _check_kv(self, seq: WorkerSeq, values: list[int], upto: int) -> None:
        got = [self.kv[seq.blocks[p // self.block_size]][p % self.block_size] for p in range(upto)]
        assert got == values[:upto], "KV content does not match the sequence's prefix"

    def _write(self, owners: dict[int, list[int]], sid: int, block: int, offset: int, value: int) -> None:
        """A write never changes what another sequence holding the block reads there: another holder's
        prefix (a prefix-cache hit) must have the same value at that position, if it reaches it."""
        for other_id in owners[block]:
            if other_id != sid:
                other = self.seqs[other_id]
                pos = other.blocks.index(block) * self.block_size + offset
                if pos < len(other.tokens):
                    assert prefix_values(other.tokens[: pos + 1])[pos] == value, (
                        f"sequence {sid} writes block {block}, which sequence {other_id} holds other content in")
        self.kv[block][offset] = value

    def _sample(self, sid: int) -> int:
        seq = self.seqs[sid]
        pos = len(seq.tokens)
        token = EOS if (sid, pos) in self.eos_at else token_at(sid, pos)
        seq.tokens.append(token)
        return token

    def _logprobs(self, sampled: list[int]) -> dict:
        asked = [sid for sid in sampled if self.seqs[sid].logprobs is not None]
        if not asked:
            return {}
        top_n = max(self.seqs[sid].logprobs for sid in asked)
        return dict(
            logprob_seq_ids=pack_ints(asked),
            logprobs=pack_floats(fake_logprob(len(self.seqs[sid].tokens)) for sid in asked),
            top_n=top_n,
            top_token_ids=pack_ints(self.seqs[sid].tokens[-1] + j for sid in asked for j in range(top_n)),
            top_logprobs=pack_floats(-1.0 - j for _ in asked for j in range(top_n)),
        )


def fake_logprob(num_tokens: int) -> float:
    return -0.25 * (num_tokens % 8)  # exact in float32


def prefix_values(tokens: list[int]) -> list[int]:
    values, value = [], 0
    for token in tokens:
        value = hash((value, token))
        values.append(value)
    return values


def make_seq(seq_id: int, prompt: list[int], max_tokens: int = 8, **kwargs) -> Sequence:
    kwargs.setdefault("stop_token_ids", frozenset({EOS}))
    sampling = SamplingParams(logprobs=kwargs.pop("logprobs", None))
    return Sequence(seq_id, list(prompt), sampling, max_tokens, **kwargs)


def reference(seq: Sequence, max_seq_len: int, eos_at=frozenset()) -> tuple[list[int], str]:
    """The output and finish reason of a sequence run alone, without any pressure."""
    out: list[int] = []
    while True:
        pos = len(seq.prompt_token_ids) + len(out)
        token = EOS if (seq.seq_id, pos) in eos_at else token_at(seq.seq_id, pos)
        out.append(token)
        if token in seq.stop_token_ids and len(out) > seq.min_tokens:
            return out, "stop"
        if len(out) >= seq.max_tokens or pos + 1 >= max_seq_len:
            return out, "length"


def check_state(sched: Scheduler) -> None:
    sched.blocks.check_invariants()
    assert sched.num_running <= sched.config.max_num_seqs
    assert [s.arrival for s in sched.running] == sorted(s.arrival for s in sched.running)
    for seq in sched.running:
        assert seq.status is SequenceStatus.RUNNING and seq.num_computed_tokens < seq.num_tokens
        assert len(sched.blocks.table(seq.seq_id)) * sched.block_size >= seq.num_computed_tokens
    for seq in sched.waiting:
        assert seq.status is SequenceStatus.WAITING and seq.num_computed_tokens == 0
        with pytest.raises(KeyError):
            sched.blocks.table(seq.seq_id)


def step_once(sched: Scheduler, worker: FakeWorker) -> StepPlan:
    plan = sched.schedule()
    assert plan is not None
    assert 0 < plan.num_batched_tokens <= sched.config.max_num_batched_tokens
    assert len(plan.scheduled) <= sched.config.max_num_seqs
    # the plan's lists, built in one pass, say what the step says
    assert list(unpack_ints(plan.step.seq_ids)) == [s.seq_id for s in plan.seqs] == list(plan.scheduled)
    assert list(unpack_ints(plan.step.num_tokens)) == plan.counts and plan.num_batched_tokens == sum(plan.counts)
    assert plan.sample_seqs == [s for s in plan.seqs if s.num_computed_tokens == s.num_tokens]
    assert list(unpack_ints(plan.packed_sample_ids)) == plan.sample_seq_ids
    sched.update(plan, worker.run(plan.step))
    check_state(sched)
    return plan


def run_to_end(sched: Scheduler, worker: FakeWorker, max_steps: int = 2000) -> list[StepPlan]:
    plans = []
    while sched.has_work:
        assert len(plans) < max_steps, "the scheduler stopped making progress"
        plans.append(step_once(sched, worker))
    assert sched.schedule() is None and sched.blocks.num_used == 0
    return plans


def setup(num_blocks=64, block_size=4, max_model_len=256, eos_at=frozenset(), **config):
    sched = Scheduler(SchedulerConfig(**config), num_blocks, block_size, max_model_len)
    return sched, FakeWorker(num_blocks, block_size, max_model_len, eos_at)


def counts(plan: StepPlan) -> dict[int, int]:
    return {sid: n for sid, (_, n) in plan.scheduled.items()}


# ------------------------------------------------------------------------------------------ tests
def test_chunked_prefill_does_not_starve_a_decode():
    sched, worker = setup(max_num_batched_tokens=16)
    short = make_seq(1, [5, 6, 7], max_tokens=30)
    sched.add(short)
    step_once(sched, worker)
    long = make_seq(2, list(range(10, 110)), max_tokens=2)
    sched.add(long)
    prefill_steps = 0
    while long.num_computed_tokens < 100:
        before = len(short.output_token_ids)
        plan = step_once(sched, worker)
        assert counts(plan) == {1: 1, 2: min(15, 100 - 15 * prefill_steps)}
        assert len(short.output_token_ids) == before + 1  # the decode got its token
        assert (2 in plan.sample_seq_ids) == (long.num_computed_tokens == 100)
        assert sum(n.seq_id == 2 for n in plan.step.new_seqs) == (prefill_steps == 0)
        prefill_steps += 1
    assert prefill_steps == 7 and len(long.output_token_ids) == 1
    run_to_end(sched, worker)
    for seq in (short, long):
        assert (seq.output_token_ids, seq.finish_reason) == reference(seq, sched.max_seq_len)


def test_max_num_seqs_and_budget():
    sched, worker = setup(max_num_seqs=2, max_num_batched_tokens=8)
    seqs = [make_seq(i, [3] * (i + 2), max_tokens=5) for i in range(5)]
    for seq in seqs:
        sched.add(seq)
    plans = run_to_end(sched, worker)  # step_once checks the budget and max_num_seqs
    assert max(len(p.scheduled) for p in plans) == 2
    for seq in seqs:
        assert (seq.output_token_ids, seq.finish_reason) == reference(seq, sched.max_seq_len)


def test_prefix_reuse_shares_blocks():
    sched, worker = setup()
    first = make_seq(1, list(range(20, 34)), max_tokens=20)  # 3 full blocks + 2 tokens
    sched.add(first)
    step_once(sched, worker)
    second = make_seq(2, list(range(20, 32)) + [90, 91, 92])
    sched.add(second)
    plan = step_once(sched, worker)
    (new,) = plan.step.new_seqs
    assert second.num_cached_tokens == 12 and new.num_computed_tokens == 12
    assert counts(plan) == {1: 1, 2: 3}
    assert list(unpack_ints(new.block_ids))[:3] == sched.blocks.table(1)[:3]
    assert sched.blocks.prefix_hits == 12
    assert sched.prefix_match_tokens(list(range(20, 34)) + [0]) >= 12
    run_to_end(sched, worker)
    for seq in (first, second):
        assert (seq.output_token_ids, seq.finish_reason) == reference(seq, sched.max_seq_len)


def test_a_prefix_is_shared_in_the_step_that_computes_it():
    """Requests arriving together with a common prefix compute it once: the first one's prompt blocks are
    cached when its step is built, so the others, admitted into the same step, hit them. The fake worker
    checks each one reads the prefix content the first one writes in that step."""
    sched, worker = setup(max_num_batched_tokens=64)
    prefix = list(range(20, 32))  # 3 full blocks
    seqs = [make_seq(i, prefix + [90 + i, 91 + i], max_tokens=6) for i in range(1, 5)]
    for seq in seqs:
        sched.add(seq)
    plan = step_once(sched, worker)
    assert [new.num_computed_tokens for new in plan.step.new_seqs] == [0, 12, 12, 12]
    assert counts(plan) == {1: 14, 2: 2, 3: 2, 4: 2} and sched.blocks.prefix_hits == 36
    tables = [list(unpack_ints(new.block_ids)) for new in plan.step.new_seqs]
    assert all(table[:3] == tables[0][:3] for table in tables)
    run_to_end(sched, worker)
    for seq in seqs:
        assert (seq.output_token_ids, seq.finish_reason) == reference(seq, sched.max_seq_len)


def test_a_decodes_blocks_are_cached_a_few_at_a_time_and_all_when_it_finishes():
    sched, worker = setup(num_blocks=256, max_num_batched_tokens=16)
    seq = make_seq(1, list(range(20, 26)), max_tokens=60)
    sched.add(seq)
    counts_seen = []
    while sched.has_work:
        plan = sched.schedule()
        assert plan is not None
        # nothing is cached past the ids the daemon knows (a token being sampled has no id here yet)
        assert sched.blocks.num_cached * sched.block_size <= seq.num_tokens
        sched.update(plan, worker.run(plan.step))
        counts_seen.append(sched.blocks.num_cached)
        check_state(sched)
    assert counts_seen[0] == 1  # the prompt's full block, with the step computing it
    increments = [b - a for a, b in zip(counts_seen, counts_seen[1:]) if b != a]
    # a few blocks at a time: the steady path is left once in DECODE_BLOCKS_AHEAD blocks, not at every one
    assert len(increments) <= -(-(counts_seen[-1] - counts_seen[0]) // DECODE_BLOCKS_AHEAD)
    # finished: every full block but the one with the last token (its K/V was never computed) is cached
    tokens = seq.prompt_token_ids + seq.output_token_ids
    assert sched.prefix_match_tokens(tokens + [0]) == (len(tokens) - 1) // 4 * 4 == 64


def test_preemption_takes_the_youngest_and_loses_nothing():
    sched, worker = setup(num_blocks=6, block_size=4)
    seqs = [make_seq(i, [4 + i] * 6, max_tokens=12) for i in range(3)]  # each grows to 5 blocks
    for seq in seqs:
        sched.add(seq)
    victims = []
    while sched.has_work:
        running = [s.seq_id for s in sched.running]
        plan = step_once(sched, worker)
        if plan.preempted_seq_ids:
            assert plan.preempted_seq_ids[0] == running[-1]  # the youngest running one
            assert set(plan.preempted_seq_ids) <= set(unpack_ints(plan.step.free_seq_ids))
            assert not plan.step.new_seqs  # nobody is admitted under pressure
            victims += plan.preempted_seq_ids
    assert victims and all(seq.num_preemptions > 0 for seq in seqs if seq.seq_id in victims)
    for seq in seqs:
        alone, alone_worker = setup(num_blocks=64)
        copy = make_seq(seq.seq_id, seq.prompt_token_ids, max_tokens=12)
        alone.add(copy)
        run_to_end(alone, alone_worker)
        assert (seq.output_token_ids, seq.finish_reason) == (copy.output_token_ids, copy.finish_reason)
        assert seq.finish_reason == "length" and len(seq.output_token_ids) == 12


def test_a_preempted_sequence_caches_what_it_computed_and_resumes_from_it():
    """Blocks a decode filled since it last left the steady path are cached when it is preempted, so its
    recompute starts from all of them (here the pool runs out after both took blocks ahead while plentiful)."""
    sched, worker = setup(num_blocks=21, block_size=4, max_num_batched_tokens=8)
    old, young = make_seq(1, [5, 6, 7, 8], max_tokens=40), make_seq(2, [9, 10], max_tokens=40)
    sched.add(old)
    sched.add(young)
    computed_when_preempted, resumed_from = None, []
    while sched.has_work:
        computed = young.num_computed_tokens
        plan = step_once(sched, worker)
        if 2 in plan.preempted_seq_ids:
            computed_when_preempted = computed
        resumed_from += [new.num_computed_tokens for new in plan.step.new_seqs if new.seq_id == 2]
    assert computed_when_preempted == 40 and resumed_from == [0, 40]
    for seq in (old, young):
        assert (seq.output_token_ids, seq.finish_reason) == reference(seq, sched.max_seq_len)


def test_a_long_prefill_chunk_shrinks_to_the_blocks_at_hand():
    sched, worker = setup(num_blocks=4, block_size=4, max_num_batched_tokens=64)
    small = make_seq(1, [9] * 3, max_tokens=2)
    sched.add(small)
    step_once(sched, worker)
    sched.add(make_seq(2, [8] * 15, max_tokens=1))  # needs 4 blocks: waits for small to finish
    plan = step_once(sched, worker)
    assert counts(plan) == {1: 1} and sched.num_waiting == 1
    run_to_end(sched, worker)


def test_abort_frees_blocks_and_tells_the_worker():
    sched, worker = setup()
    a, b, c = make_seq(1, [5] * 9), make_seq(2, [6] * 9), make_seq(3, [7] * 3)
    for seq in (a, b):
        sched.add(seq)
    step_once(sched, worker)
    used = sched.blocks.num_used
    assert sched.abort(1) is a and a.finish_reason == "abort" and a.is_finished
    assert sched.abort(1) is None and sched.abort(99) is None
    assert sched.blocks.num_used == used - 3
    sched.add(c)
    assert sched.abort(3, reason="stop") is c and c.finish_reason == "stop"  # never sent: nothing to free
    plan = step_once(sched, worker)
    assert list(unpack_ints(plan.step.free_seq_ids)) == [1] and 1 not in worker.seqs
    # Aborted while its step is in flight: the result's token for it is ignored.
    plan = sched.schedule()
    sched.abort(2)
    before = list(b.output_token_ids)
    assert len(sched.update(plan, worker.run(plan.step))) == 0 and b.output_token_ids == before
    assert not sched.has_work and sched.schedule() is None  # the pending free waits for a next plan
    sched.add(make_seq(4, [1, 2]))
    plan = step_once(sched, worker)
    assert list(unpack_ints(plan.step.free_seq_ids)) == [2]


def test_stop_token_respects_min_tokens():
    prompt = [3, 3]
    eos_at = frozenset({(1, 2), (1, 3), (1, 5), (2, 3)})  # positions 2.. are outputs 1..
    sched, worker = setup(eos_at=eos_at)
    seq = make_seq(1, prompt, max_tokens=10, min_tokens=2)
    ignore_eos = make_seq(2, prompt, max_tokens=3, stop_token_ids=frozenset())
    sched.add(seq)
    sched.add(ignore_eos)
    run_to_end(sched, worker)
    # Outputs 1 and 2 are EOS but below min_tokens; output 4 is EOS and stops (kept in the output).
    assert seq.output_token_ids == [EOS, EOS, token_at(1, 4), EOS] and seq.finish_reason == "stop"
    assert ignore_eos.output_token_ids == [token_at(2, 2), EOS, token_at(2, 4)]
    assert ignore_eos.finish_reason == "length"


def test_max_tokens_and_context_limit_end_with_length():
    sched, worker = setup(max_model_len=12)
    capped = make_seq(1, [5] * 3, max_tokens=4)
    context = make_seq(2, [6] * 8, max_tokens=100)
    sched.add(capped)
    sched.add(context)
    run_to_end(sched, worker)
    assert len(capped.output_token_ids) == 4 and capped.finish_reason == "length"
    assert context.num_tokens == 12 and context.finish_reason == "length"


def test_the_pool_is_a_context_limit():
    sched, worker = setup(num_blocks=3, block_size=4, max_model_len=100)
    assert sched.max_seq_len == 13
    seq = make_seq(1, [5] * 10, max_tokens=50)
    sched.add(seq)
    run_to_end(sched, worker)
    assert seq.num_tokens == 13 and seq.finish_reason == "length"
    with pytest.raises(ValueError):
        sched.add(make_seq(2, [5] * 13))


def test_requeue_all_keeps_output_and_resumes():
    sched, worker = setup(max_num_batched_tokens=8)
    seqs = [make_seq(i, [10 + i] * 10, max_tokens=6) for i in range(3)]
    for seq in seqs:
        sched.add(seq)
    for _ in range(4):
        step_once(sched, worker)
    outputs = {s.seq_id: list(s.output_token_ids) for s in seqs}
    assert any(outputs.values())
    plan = sched.schedule()  # in flight when the worker dies
    queued = sched.requeue_all()
    assert [s.seq_id for s in queued] == [0, 1, 2] and sched.blocks.num_used == 0
    assert all(s.status is SequenceStatus.WAITING and s.num_computed_tokens == 0 for s in seqs)
    assert {s.seq_id: s.output_token_ids for s in seqs} == outputs
    with pytest.raises(ValueError):
        sched.update(plan, worker.run(plan.step))  # a late result from the lost worker
    worker = FakeWorker(64, 4, 256)
    plan = step_once(sched, worker)
    assert not plan.step.free_seq_ids
    new = plan.step.new_seqs[0]
    assert list(unpack_ints(new.token_ids)) == seqs[0].prompt_token_ids + outputs[0]
    assert new.num_prompt_tokens == 10
    run_to_end(sched, worker)
    for seq in seqs:
        assert (seq.output_token_ids, seq.finish_reason) == reference(seq, sched.max_seq_len)


def test_logprobs_are_unpacked_per_token():
    sched, worker = setup()
    asked, plain = make_seq(1, [5, 6, 7], max_tokens=3, logprobs=2), make_seq(2, [5], max_tokens=3, logprobs=None)
    sched.add(asked)
    sched.add(plain)
    plan = sched.schedule()
    out = sched.update(plan, worker.run(plan.step))
    assert plain in out.seqs and asked in out.seqs and plain.seq_id not in out.logprobs
    assert out.logprobs[asked.seq_id] == asked.logprobs[0]
    run_to_end(sched, worker)
    assert not plain.logprobs and len(asked.logprobs) == 3
    for i, (value, top) in enumerate(asked.logprobs):
        token = asked.output_token_ids[i]
        assert value == fake_logprob(3 + i + 1) and top == [(token, -1.0), (token + 1, -2.0)]


def test_contract_violations_raise():
    sched, worker = setup(overlap=False)  # one step in flight at most (test_overlap.py: two)
    sched.add(make_seq(1, [5, 6]))
    plan = sched.schedule()
    with pytest.raises(RuntimeError):
        sched.schedule()
    result = worker.run(plan.step)
    with pytest.raises(ValueError):
        sched.update(plan, StepResult(plan.step.step_id + 1, "fake", 0, result.seq_ids, result.token_ids))
    with pytest.raises(ValueError):  # a live sampled sequence without its token
        sched.update(plan, StepResult(plan.step.step_id, "fake", 0, b"", b""))
    sched.update(plan, result)
    assert sched.schedule().step.step_id == plan.step.step_id + 1


@pytest.mark.parametrize("bad", [
    lambda: make_seq(1, []),
    lambda: make_seq(1, [5] * 64),
    lambda: make_seq(1, [5], max_tokens=0),
    lambda: make_seq(-1, [5]),
])
def test_add_rejects_what_cannot_run(bad):
    sched = Scheduler(SchedulerConfig(), 64, 4, 64)
    with pytest.raises(ValueError):
        sched.add(bad())


def test_add_rejects_duplicates_and_config_checks():
    sched = Scheduler(SchedulerConfig(), 64, 4, 64)
    sched.add(make_seq(1, [5]))
    with pytest.raises(ValueError):
        sched.add(make_seq(1, [6]))
    assert sched.queued_tokens == 1 and sched.num_waiting == 1 and sched.kv_usage == 0.0
    for bad in ({"max_num_seqs": 0}, {"max_num_batched_tokens": 0}, {"max_num_seqs": 1.5}):
        with pytest.raises(ValueError):
            SchedulerConfig(**bad)


# ------------------------------------------------------------------------------ property tests
@st.composite
def scenarios(draw):
    base = draw(st.lists(st.integers(2, 4), max_size=12))  # a shared prefix, from a tiny vocabulary
    seqs = draw(st.lists(st.tuples(
        st.integers(0, len(base)),  # how much of the shared prefix the prompt starts with
        st.lists(st.integers(2, 4), max_size=8),  # the rest of the prompt
        st.integers(1, 10),  # max_tokens
        st.integers(0, 3),  # min_tokens
        st.integers(0, 8),  # the step at which it arrives
    ), min_size=1, max_size=6))
    return dict(
        block_size=draw(st.sampled_from([1, 2, 4])),
        num_blocks=draw(st.integers(3, 16)),
        config=SchedulerConfig(
            max_num_seqs=draw(st.integers(1, 4)),
            max_num_batched_tokens=draw(st.integers(1, 24)),
            enable_prefix_caching=draw(st.booleans()),
        ),
        prompts=[(base[:k] + rest or [2], max_tokens, min_tokens, at) for k, rest, max_tokens, min_tokens, at in seqs],
        eos_at=frozenset(draw(st.sets(st.tuples(st.integers(0, 5), st.integers(0, 40)), max_size=10))),
        aborts=draw(st.dictionaries(st.integers(0, 5), st.integers(0, 30), max_size=2)),  # seq -> step
        requeue_at=draw(st.sets(st.integers(0, 30), max_size=2)),
    )


@settings(max_examples=150, deadline=None)
@given(scenarios())
def test_random_workloads_keep_invariants_and_outputs(sc):
    max_model_len = 48
    sched = Scheduler(sc["config"], sc["num_blocks"], sc["block_size"], max_model_len)
    worker = FakeWorker(sc["num_blocks"], sc["block_size"], max_model_len, sc["eos_at"])
    seqs = [
        make_seq(i, prompt[: sched.max_seq_len - 1], max_tokens=max_tokens, min_tokens=min_tokens)
        for i, (prompt, max_tokens, min_tokens, _) in enumerate(sc["prompts"])
    ]
    arrivals = {i: at for i, (*_, at) in enumerate(sc["prompts"])}
    step = 0
    while sched.has_work or arrivals:
        assert step < 3000, "the scheduler stopped making progress"
        for i in [i for i, at in arrivals.items() if at <= step]:
            sched.add(seqs[i])
            del arrivals[i]
        for i in [i for i, at in sc["aborts"].items() if at == step]:
            sched.abort(i)
        if step in sc["requeue_at"]:
            sched.requeue_all()
            worker = FakeWorker(sc["num_blocks"], sc["block_size"], max_model_len, sc["eos_at"])
            check_state(sched)
        if sched.has_work:
            step_once(sched, worker)
        step += 1
    assert sched.blocks.num_used == 0
    for seq in seqs:
        expected, reason = reference(seq, sched.max_seq_len, sc["eos_at"])
        if seq.finish_reason == "abort":
            assert seq.output_token_ids == expected[: len(seq.output_token_ids)]
        else:
            assert (seq.output_token_ids, seq.finish_reason) == (expected, reason)


def test_no_admission_in_a_step_that_preempts():
    # No cache and a budget of 2: the preempted sequence's 1-token first chunk would fit at once.
    sched, worker = setup(num_blocks=4, block_size=4, max_num_batched_tokens=2, enable_prefix_caching=False)
    old, young = make_seq(1, [5] * 3, max_tokens=12), make_seq(2, [6] * 3, max_tokens=12)
    for seq in (old, young):
        sched.add(seq)
    plan = step_once(sched, worker)
    while not plan.preempted_seq_ids:
        plan = step_once(sched, worker)
    assert plan.preempted_seq_ids == [2] and sched.blocks.num_free > 0  # young could come back...
    assert not plan.step.new_seqs and sched.waiting[0] is young  # ...but waits for the next step
    run_to_end(sched, worker)
    assert young.output_token_ids == reference(young, sched.max_seq_len)[0]


def test_an_id_freed_and_added_in_one_step():
    sched, worker = setup()
    sched.add(make_seq(1, [5, 6, 7]))
    step_once(sched, worker)
    sched.abort(1)
    again = make_seq(1, [8, 9])
    sched.add(again)
    plan = step_once(sched, worker)  # the worker applies frees before new sequences
    assert list(unpack_ints(plan.step.free_seq_ids)) == [1] and plan.step.new_seqs[0].seq_id == 1
    run_to_end(sched, worker)
    assert again.output_token_ids == reference(again, sched.max_seq_len)[0]


def test_a_suspect_is_computed_alone_until_it_yields_a_token():
    sched, worker = setup(max_num_batched_tokens=8)
    first = make_seq(1, [5, 6, 7], max_tokens=20)
    sched.add(first)
    step_once(sched, worker)
    suspect = make_seq(2, list(range(10, 30)), max_tokens=20, suspect=True)  # 20 tokens: 3 chunks of 8
    later = make_seq(3, [40, 41], max_tokens=20)
    sched.add(suspect)
    sched.add(later)
    solo = [step_once(sched, worker) for _ in range(3)]
    assert [counts(p) for p in solo] == [{2: 8}, {2: 8}, {2: 4}]  # nobody else in its steps
    assert not suspect.suspect and len(suspect.output_token_ids) == 1
    shared = step_once(sched, worker)
    assert set(counts(shared)) == {1, 2, 3}  # back to ordinary batching
    run_to_end(sched, worker)
    for seq in (first, suspect, later):
        assert (seq.output_token_ids, seq.finish_reason) == reference(seq, sched.max_seq_len)
