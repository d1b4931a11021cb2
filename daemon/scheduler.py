"""The per-replica scheduler: continuous batching with chunked prefill, prefix reuse and recompute
preemption, all from one rule over a token budget. Plain synchronous code; the engine only moves messages."""

from __future__ import annotations

import enum
import operator
from bisect import insort
from collections import deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from daemon.blocks import BlockManager
from protocol.messages import (
    INT32_MAX,
    MAX_ITEMS,
    NewSequence,
    SamplingParams,
    Step,
    StepResult,
    pack_ints,
    unpack_floats,
    unpack_ints,
)

_is_suspect = operator.attrgetter("suspect")
_ONE = pack_ints([1])
# A decoding sequence whose table is about to run out takes this many KV blocks at once while blocks are plentiful,
# so it leaves the steady path (Sequence.steady_until) once in that many blocks rather than at every one.
DECODE_BLOCKS_AHEAD = 4
# One sampled token's logprob, then the top alternatives (token id, logprob), best first.
Logprob = tuple[float, list[tuple[int, float]]]


def _append(appended: tuple[list[int], list[int]], seq_id: int, blocks: list[int] | None) -> None:
    """Note blocks added to seq_id's table in the step's (seq_id, block) pairs (Step.append_*)."""
    if blocks:
        appended[0].extend([seq_id] * len(blocks))
        appended[1].extend(blocks)


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 256  # running sequences at most
    max_num_batched_tokens: int = 2048  # tokens computed per step at most (the token budget)
    enable_prefix_caching: bool = True
    # Schedule and send step N+1 while the worker computes step N (its sampled tokens still unknown here),
    # so neither side waits for the other's half of the round trip.
    overlap: bool = True
    # ...except behind a step with this many prefill tokens or more (tokens past one a sequence: decodes count
    # none). Such a step is long (a prompt's worth of compute), so building the next one only when it ends
    # costs the worker one round trip, about a millisecond, while requests that arrive during it join that
    # next step instead of the one after it.
    overlap_max_prefill_tokens: int = 128
    # A stream's reader is woken at most once per this many milliseconds while steps come faster (a first token
    # and an end go out at once; fewer streams wake more often: Replica.wake_interval). Each wake-up is an SSE
    # write, a syscall that on loopback also runs the client's side of TCP: with 256 streams on a fast model,
    # 50 ms took a third of the daemon's core. 0: every step's tokens go out with it.
    stream_interval_ms: int = 100

    @property
    def max_steps_in_flight(self) -> int:
        return 2 if self.overlap else 1

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "overlap_max_prefill_tokens"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if type(self.stream_interval_ms) is not int or not 0 <= self.stream_interval_ms <= 10_000:
            raise ValueError(f"stream_interval_ms must be an int from 0 to 10000, got {self.stream_interval_ms!r}")
        for name in ("enable_prefix_caching", "overlap"):
            if type(getattr(self, name)) is not bool:
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.max_num_seqs > MAX_ITEMS:  # a Step carries at most MAX_ITEMS new sequences
            raise ValueError(f"max_num_seqs must be at most {MAX_ITEMS}")


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False, slots=True)
class Sequence:
    """The daemon's copy of one generation (one choice of a request: n=2 means two Sequences).

    The daemon keeps every token, so a sequence survives preemption and worker loss: it is recomputed
    from prompt + output. A stop token stays in output_token_ids (it counts in usage, as in vLLM); the
    API layer decides what to detokenize.
    """

    seq_id: int
    prompt_token_ids: list[int]
    sampling: SamplingParams  # sent to the worker as is (its min_tokens/stop_token_ids drive the ban)
    max_tokens: int  # output tokens at most
    stop_token_ids: frozenset[int] = frozenset()  # EOS and generation_config stop ids; empty with ignore_eos
    min_tokens: int = 0  # no stop on stop_token_ids before this many output tokens
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[Logprob] = field(default_factory=list)  # one per output token when sampling.logprobs
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose KV the worker holds (or computes in the steps in flight)
    # tokens the steps in flight sample, their ids not known here yet (at most one per step in flight):
    # a later step may compute them already, since the worker knows them by then
    num_pending_tokens: int = 0
    num_cached_tokens: int = 0  # prefix-cache hit at the first admission, for usage reporting
    num_preemptions: int = 0  # preemptions and worker losses so far
    finish_reason: str | None = None  # "stop", "length" or "abort"
    # It was in a step that killed or failed a worker: recompute it alone, until it yields a token, so a
    # second failure blames it and not the sequences that happened to share its steps.
    suspect: bool = False
    arrival: int = 0  # set by Scheduler.add: the order of fairness and of preemption
    # set by Scheduler.add: output tokens at most on that scheduler (max_tokens, or fewer where the context
    # limit comes first), so the per-token "length" check is one comparison
    output_limit: int = 0
    # Scheduler-private: while num_computed_tokens is below this, the sequence's next step is a plain decode
    # (one token, sampled, within its KV blocks, not its last, no logprobs), which schedule() does in a few
    # operations. Set by the general path when it leaves the sequence decoding; 0 (the general path every
    # step) whenever its state changes any other way.
    steady_until: int = field(default=0, repr=False)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


class TokenIds:
    """A sequence's prompt + output ids, sliced without joining them (a block's hash needs one block's ids)."""

    __slots__ = ("prompt", "output")

    def __init__(self, seq: Sequence) -> None:
        self.prompt, self.output = seq.prompt_token_ids, seq.output_token_ids

    def __len__(self) -> int:
        return len(self.prompt) + len(self.output)

    def __getitem__(self, where: slice) -> list[int]:
        """`where` is [start:stop] with 0 <= start <= stop <= len(self) (a block's span)."""
        start, stop = where.start, where.stop
        p = len(self.prompt)
        if stop <= p:
            return self.prompt[start:stop]
        if start >= p:
            return self.output[start - p : stop - p]
        return self.prompt[start:] + self.output[: stop - p]


@dataclass(eq=False)
class StepPlan:
    """One step: the message for the worker and what update() needs to apply its result."""

    step: Step
    seqs: list[Sequence]  # the batch, in batch order
    counts: list[int]  # tokens each of seqs computes in this step
    sample_seqs: list[Sequence]  # those whose chunk reaches their last known token: they sample
    preempted_seq_ids: list[int] = field(default_factory=list)
    # sample_seqs' ids packed as a StepResult's seq_ids: the usual answer, recognised with one comparison
    packed_sample_ids: bytes = b""
    asks_logprobs: bool = False  # some sampling sequence wants logprobs
    num_batched_tokens: int = 0
    # a sequence was aborted or finished while this plan was in flight: update() must skip whoever is no
    # longer running (a finished sequence's token from a later step is discarded, never counted)
    aborted: bool = False

    @property
    def scheduled(self) -> dict[int, tuple[Sequence, int]]:
        """seq_id -> (sequence, tokens computed), in batch order (built on demand: the hot path needs none)."""
        return {seq.seq_id: (seq, n) for seq, n in zip(self.seqs, self.counts)}

    @property
    def sample_seq_ids(self) -> list[int]:
        return [seq.seq_id for seq in self.sample_seqs]


@dataclass(slots=True)
class StepOutput:
    """What one step did: each live sampled sequence (batch order) and the token appended to it.

    A sequence in `seqs` that hit a stop condition is finished already (`is_finished`, `finish_reason`);
    `logprobs` holds the new entry of each sequence that asked for logprobs (keyed by seq_id).
    """

    seqs: Seq[Sequence] = ()
    tokens: Seq[int] = ()
    logprobs: dict[int, Logprob] = field(default_factory=dict)
    num_finished: int = 0  # how many of seqs this step finished

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    """Decides every step of one replica and owns its block tables.

    Up to config.max_steps_in_flight plans are in flight: schedule() -> send plan.step -> [schedule() ->
    send] -> update(oldest plan, its result) -> schedule() ... Results are applied in the order the steps
    were made. With two in flight, the second computes the tokens the first samples (the worker knows
    them by then): a sampling sequence counts one pending token per step in flight. A sequence that
    finishes in the first step wastes its token of the second, which update() discards. Length limits
    are known in advance, so no step runs past them. Nobody is preempted while a step is in flight: a
    step that might need to is not built until the one in flight is done.

    Frees (finished, aborted, preempted sequences) ride on the next plan's free_seq_ids; when nothing
    is left to compute schedule() returns None and they wait for the next plan, which is harmless: the
    worker only keeps their token lists. An id freed and added again goes out freed and new in one
    step; the worker applies frees first.
    """

    def __init__(self, config: SchedulerConfig, num_blocks: int, block_size: int, max_model_len: int) -> None:
        if max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {max_model_len}")
        self.config = config
        self.block_size = block_size
        self.blocks = BlockManager(num_blocks, block_size, config.enable_prefix_caching)
        # The pool is one more context limit: a sequence that could not fit alone would starve, so
        # sequences end with "length" at whichever is smaller (L tokens need KV for L-1 positions).
        self.max_seq_len = min(max_model_len, num_blocks * block_size + 1)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # sorted by arrival
        self._live: dict[int, Sequence] = {}  # waiting + running
        self._on_worker: set[int] = set()  # sequences the worker knows (sent, not yet freed)
        self._pending_frees: list[int] = []
        self._in_flight: deque[StepPlan] = deque()  # oldest first
        self._next_step_id = 0
        self._next_arrival = 0
        # Some sequence here may be suspect (one came in, or the worker failed and the engine marked some):
        # while this holds, every step looks for them. Cleared once none is left.
        self._maybe_suspect = False
        self._last_batch: tuple[list[Sequence], bytes] = ([], b"")  # the last plan's seqs and their packed ids
        # a whole token budget's worth of blocks: kept free beyond the running sequences' own growth before a
        # step overlaps another or a decode takes blocks ahead
        self._reserve_blocks = -(-config.max_num_batched_tokens // block_size)

    # ----------------------------------------------------------------------------------- queries
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def has_work(self) -> bool:
        return bool(self._live)

    @property
    def kv_usage(self) -> float:
        return self.blocks.usage

    @property
    def queued_tokens(self) -> int:
        """Tokens still to compute over waiting and running sequences (a load signal for the router)."""
        return sum(s.num_tokens + s.num_pending_tokens - s.num_computed_tokens for s in self._live.values())

    def prefix_match_tokens(self, token_ids: Seq[int]) -> int:
        return self.blocks.prefix_match_tokens(token_ids)

    def get(self, seq_id: int) -> Sequence | None:
        return self._live.get(seq_id)

    # ----------------------------------------------------------------------------- sequence verbs
    def add(self, seq: Sequence) -> None:
        """Queue a sequence (new, or moved here with its output so far); ValueError if it cannot run."""
        if seq.seq_id in self._live or not 0 <= seq.seq_id <= INT32_MAX:
            raise ValueError(f"sequence id {seq.seq_id} is in use or outside int32")
        if not seq.prompt_token_ids or seq.is_finished:
            raise ValueError("a sequence needs a non-empty prompt and must not be finished")
        if seq.num_tokens >= self.max_seq_len:
            raise ValueError(f"{seq.num_tokens} tokens leave no room below the limit of {self.max_seq_len}")
        if len(seq.output_token_ids) >= seq.max_tokens:
            raise ValueError(f"max_tokens {seq.max_tokens} already reached")
        seq.status, seq.num_computed_tokens, seq.arrival = SequenceStatus.WAITING, 0, self._next_arrival
        seq.num_pending_tokens = seq.steady_until = 0  # moved off a dead worker: what its steps sampled is lost
        seq.output_limit = min(seq.max_tokens, self.max_seq_len - len(seq.prompt_token_ids))
        self._next_arrival += 1
        self._maybe_suspect |= seq.suspect
        self.waiting.append(seq)
        self._live[seq.seq_id] = seq

    def abort(self, seq_id: int, reason: str = "abort") -> Sequence | None:
        """Finish a sequence now (client gone, or a stop string matched by the API with reason="stop").
        Its blocks are freed, the worker forgets it with the next step, a late result for it is ignored.
        Returns it, or None if it is unknown or already finished."""
        seq = self._live.get(seq_id)
        if seq is None:
            return None
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self._finish(seq, reason)
        return seq

    def requeue_all(self) -> list[Sequence]:
        """The worker is gone: every running sequence goes back to the front of the waiting queue (in
        arrival order, output kept, to be recomputed), the block manager is reset and the worker is
        taken to know nothing. Returns every unfinished sequence, in queue order.

        The worker reset itself when the oldest step failed, but went on to the later steps in flight: one
        made only of new sequences succeeds there, so the next step frees those (freeing an unknown id is
        harmless)."""
        later = [new.seq_id for plan in list(self._in_flight)[1:] for new in plan.step.new_seqs]
        self._in_flight.clear()
        self._maybe_suspect = True  # the caller marks the failed step's sequences suspect
        self._pending_frees = later
        self._on_worker.clear()
        self.blocks.reset()
        for seq in reversed(self.running):
            self._to_waiting(seq)
        self.running.clear()
        return list(self.waiting)

    # ------------------------------------------------------------------------------------ schedule
    def schedule(self) -> StepPlan | None:
        """Build the next step, or None when nothing is left to compute or when the next step must wait
        for the one in flight (it might have to preempt, or a suspect sequence must run alone)."""
        if len(self._in_flight) >= self.config.max_steps_in_flight:
            raise RuntimeError(f"step {self._in_flight[-1].step.step_id} is still in flight")
        plan = StepPlan(Step(step_id=self._next_step_id), [], [], [])  # its step is filled in below
        appended: tuple[list[int], list[int]] = ([], [])  # (seq_id, block) pairs, as Step.append_* say
        budget = self.config.max_num_batched_tokens
        suspect = self._find_suspect() if self._maybe_suspect else None
        if self._in_flight and not self._may_overlap(suspect):
            return None
        if suspect is not None:
            budget = self._schedule_running(plan, appended, budget, [suspect])
            new_seqs: list[NewSequence] = []
        elif self.waiting and self.waiting[0].suspect:  # admitted into a step of its own
            new_seqs, budget = self._admit_waiting(plan, budget, limit=1)
        else:
            budget = self._schedule_running(plan, appended, budget, self.running)
            # As in vLLM: under block pressure admit nobody, or the preempted would only thrash.
            new_seqs, budget = ([], budget) if plan.preempted_seq_ids else self._admit_waiting(plan, budget)
        if not plan.seqs:
            return None
        # most steps compute the batch of the step before, one token each: reuse its packed ids
        batch, packed = self._last_batch
        if plan.seqs != batch:  # a C-level comparison (by identity first)
            packed = pack_ints([seq.seq_id for seq in plan.seqs])
            self._last_batch = (plan.seqs, packed)
        seq_ids = packed
        num_batched = self.config.max_num_batched_tokens - budget
        plan.step = Step(
            step_id=self._next_step_id,
            new_seqs=tuple(new_seqs),
            append_seq_ids=pack_ints(appended[0]),
            append_block_ids=pack_ints(appended[1]),
            free_seq_ids=pack_ints(self._pending_frees),  # the worker applies frees first
            seq_ids=seq_ids,
            num_tokens=_ONE * num_batched if num_batched == len(plan.seqs) else pack_ints(plan.counts),
        )
        # the usual step: every sequence samples, so the answer's ids are the batch's
        sample = plan.sample_seqs
        plan.packed_sample_ids = seq_ids if len(sample) == len(plan.seqs) else pack_ints([s.seq_id for s in sample])
        plan.num_batched_tokens = num_batched
        self._next_step_id += 1
        self._pending_frees = []
        self._in_flight.append(plan)
        return plan

    def _find_suspect(self) -> Sequence | None:
        """The oldest running suspect, if any; clears _maybe_suspect once no sequence here is suspect."""
        suspect = next(filter(_is_suspect, self.running), None)
        if suspect is None and not any(map(_is_suspect, self.waiting)):
            self._maybe_suspect = False
        return suspect

    def _may_overlap(self, suspect: Sequence | None) -> bool:
        """Whether a step may be built while one is in flight: no suspect is involved (it runs alone, so a
        failure blames it only), the step in flight is not a long prefill (overlap_max_prefill_tokens), and
        the free blocks cover the worst case of the running sequences' growth (one block each, plus a whole
        token budget's worth), so nobody needs preempting."""
        if suspect is not None or (self.waiting and self.waiting[0].suspect):
            return False
        limit = self.config.overlap_max_prefill_tokens
        if any(plan.num_batched_tokens - len(plan.seqs) >= limit for plan in self._in_flight):
            return False
        worst = len(self.running) + self._reserve_blocks
        return self.blocks.num_free >= worst

    def _schedule_running(self, plan: StepPlan, appended: tuple[list[int], list[int]], budget: int,
                          candidates: list[Sequence]) -> int:
        """Running sequences first, oldest first (`candidates` is self.running, or the one suspect); returns
        the budget left. One pass does everything per sequence (this runs for every sequence of every step):
        the chunk, its blocks, whether it samples, and counting its tokens as computed (the worker computes
        them, or fails and everything is recomputed). plan.counts and plan.sample_seqs are filled at the end:
        most sequences compute one token and sample it, so only the others are noted on the way."""
        seqs, size, tables = plan.seqs, self.block_size, self.blocks.tables
        start = len(seqs)
        cap = start + budget  # len(seqs) at which the budget is spent, were every chunk one token
        odd: dict[int, int] = {}  # index in seqs -> tokens, of chunks other than one token
        silent: set[int] = set()  # index in seqs of chunks that do not sample
        # whether the plain decodes may spend the budget: more candidates left than budget (never, usually)
        tight = len(candidates) >= budget
        # Preemption only removes the youngest running sequences (never one scheduled already, all older), so
        # iterating self.running while it shrinks at the end simply stops before the preempted ones.
        for seq in candidates:
            computed = seq.num_computed_tokens
            if computed < seq.steady_until:  # a plain decode (see Sequence.steady_until): most of every step
                seq.num_computed_tokens = computed + 1
                seq.num_pending_tokens += 1
                seqs.append(seq)
                if tight and len(seqs) >= cap:
                    break
                continue
            total = known = len(seq.prompt_token_ids) + len(seq.output_token_ids)
            if seq.num_pending_tokens:
                if len(seq.output_token_ids) + seq.num_pending_tokens >= seq.output_limit:
                    continue  # its last token is being sampled already: it ends with "length"
                total += seq.num_pending_tokens
            budget = cap - len(seqs)
            n = total - computed if total - computed < budget else budget
            end = computed + n
            if end > len(tables[seq.seq_id]) * size:  # its blocks run out: the usual case is that they don't
                n = self._grow(seq, n, appended, plan.preempted_seq_ids)
                if n == 0:
                    break
                end = computed + n
            if n != 1:
                odd[len(seqs)] = n
                cap -= n - 1
                tight = True
            seq.num_computed_tokens = end
            seq.steady_until = 0
            if end == total:
                seq.num_pending_tokens += 1
                if seq.sampling.logprobs is not None:
                    plan.asks_logprobs = True
                else:
                    seq.steady_until = self._steady_until(seq, end, appended)
            else:
                silent.add(len(seqs))
            seqs.append(seq)
            self._cache_blocks(seq, min(end, known))  # not past its known ids: one may still be being sampled
            if len(seqs) >= cap:
                break
        added = len(seqs) - start
        plan.counts.extend([1] * added)
        for i, n in odd.items():
            plan.counts[i] = n
        plan.sample_seqs.extend(seqs[start:] if not silent else
                                [seq for i, seq in enumerate(seqs[start:], start) if i not in silent])
        return cap - len(seqs)

    def _steady_until(self, seq: Sequence, computed: int, appended: tuple[list[int], list[int]]) -> int:
        """Sequence.steady_until for a sequence that decodes from `computed` tokens: its next steps are plain
        decodes while each one's end, computed + 1, stays within its blocks and at or below its last token
        (len(prompt) + output_limit - 1: the end of the step that samples its last output token). A table with
        less than a block of room left takes up to DECODE_BLOCKS_AHEAD more now if blocks are plentiful (every
        running sequence could still take as many, and a whole token budget more); else the general path grows
        it when it runs out (and may preempt then)."""
        size, table = self.block_size, self.blocks.tables[seq.seq_id]
        last = len(seq.prompt_token_ids) + seq.output_limit - 1
        if (len(table) * size - computed < size and computed < last and self.blocks.num_free
                >= len(self.running) * DECODE_BLOCKS_AHEAD + self._reserve_blocks):
            _append(appended, seq.seq_id, self.blocks.ensure(seq.seq_id, min(last, computed + DECODE_BLOCKS_AHEAD * size)))
        return min(len(table) * size, last)

    def _grow(self, seq: Sequence, n: int, appended: tuple[list[int], list[int]], preempted: list[int]) -> int:
        """Give seq the blocks for its next n tokens, or for as many as can be had (0: seq yielded)."""
        new_blocks = self.blocks.ensure(seq.seq_id, seq.num_computed_tokens + n)
        if new_blocks is None:
            n = self._shrink_or_preempt(seq, n, preempted)
            if n == 0:
                return 0
            new_blocks = self.blocks.ensure(seq.seq_id, seq.num_computed_tokens + n)
            assert new_blocks is not None  # n is within reach
        _append(appended, seq.seq_id, new_blocks)
        return n

    def _shrink_or_preempt(self, seq: Sequence, n: int, preempted: list[int]) -> int:
        """The free blocks cannot hold seq's next n tokens: returns how many they can hold (at least one)
        after preempting the youngest as needed, or 0 when seq itself had to yield (it was the youngest)."""
        reach = self.blocks.reachable_tokens(seq.seq_id) - seq.num_computed_tokens
        # Not one more token fits: preempt the youngest. Everyone scheduled so far is older than
        # seq, so the victim is never already in the batch; if seq is the youngest it yields.
        while reach < 1 and self.running[-1] is not seq:
            self._preempt(self.running[-1], preempted)
            reach = self.blocks.reachable_tokens(seq.seq_id) - seq.num_computed_tokens
        if reach < 1:
            assert len(self.running) > 1, "max_seq_len guarantees a sequence alone fits the pool"
            self._preempt(seq, preempted)
            return 0
        # A chunk shrinks to the blocks at hand rather than preempting anyone for the rest.
        return min(n, reach)

    def _admit_waiting(self, plan: StepPlan, budget: int, limit: int | None = None) -> tuple[list[NewSequence], int]:
        """Waiting sequences in FIFO order, each only if the blocks for its first chunk are free; returns them
        and the budget left."""
        new_seqs: list[NewSequence] = []
        size = self.block_size
        while (self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs
               and (limit is None or len(new_seqs) < limit)):
            seq = self.waiting[0]
            token_ids = seq.all_token_ids
            num_cached = self.blocks.allocate_prompt(seq.seq_id, token_ids, budget)
            if num_cached is None:
                break  # the head waits for blocks; nobody overtakes it
            self.waiting.popleft()
            n = min(len(token_ids) - num_cached, budget)
            self._start(seq, num_cached)
            new_seqs.append(NewSequence(
                seq_id=seq.seq_id,
                token_ids=pack_ints(token_ids),
                num_prompt_tokens=len(seq.prompt_token_ids),
                num_computed_tokens=num_cached,
                block_ids=pack_ints(self.blocks.table(seq.seq_id)),
                sampling=seq.sampling,
            ))
            end = seq.num_computed_tokens = num_cached + n
            plan.seqs.append(seq)
            plan.counts.append(n)
            if end == len(token_ids):
                plan.sample_seqs.append(seq)
                seq.num_pending_tokens = 1
                plan.asks_logprobs = plan.asks_logprobs or seq.sampling.logprobs is not None
            if num_cached // size != end // size:
                self._cache_blocks(seq, end)
            budget -= n
        return new_seqs, budget

    def _cache_blocks(self, seq: Sequence, end: int) -> None:
        """Cache the full blocks of seq's first `end` tokens (their ids known, their K/V computed by a step sent
        already or by the one being built). Sequences admitted later, into this step too, may share them: a
        worker writes a step's K/V before any of its attention reads, and runs steps in order. A step that fails
        requeues everything and resets the cache. Prompt blocks are cached with the chunk that computes them;
        a decode's, when it next takes the general path (every few blocks), finishes or is preempted."""
        if self.config.enable_prefix_caching:
            self.blocks.commit_full_blocks(seq.seq_id, TokenIds(seq), end)

    def _start(self, seq: Sequence, num_cached: int) -> None:
        seq.status, seq.num_computed_tokens, seq.steady_until = SequenceStatus.RUNNING, num_cached, 0
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = num_cached
        insort(self.running, seq, key=lambda s: s.arrival)
        self._on_worker.add(seq.seq_id)

    def _preempt(self, seq: Sequence, preempted: list[int]) -> None:
        assert not self._in_flight, "preempting while a step is in flight (_may_overlap should prevent it)"
        self._cache_blocks(seq, seq.num_computed_tokens)  # every step is done: its recompute may hit them
        self.running.remove(seq)
        self._release(seq)
        self._to_waiting(seq)
        preempted.append(seq.seq_id)

    def _to_waiting(self, seq: Sequence) -> None:
        seq.status, seq.num_computed_tokens, seq.num_pending_tokens = SequenceStatus.WAITING, 0, 0
        seq.steady_until = 0
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        """Free the sequence's blocks here, and on the worker with the next step."""
        self.blocks.free(seq.seq_id)
        if seq.seq_id in self._on_worker:
            self._on_worker.discard(seq.seq_id)
            self._pending_frees.append(seq.seq_id)

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        del self._live[seq.seq_id]
        self._release(seq)
        for plan in self._in_flight:  # it may be in a later step: that step's token for it is discarded
            plan.aborted = True

    # -------------------------------------------------------------------------------------- update
    def update(self, plan: StepPlan, result: StepResult) -> StepOutput:
        """Apply the worker's result to the oldest plan in flight: append sampled tokens, cache the blocks
        that became full, finish sequences that hit a stop condition.

        ValueError means the result breaks the contract (wrong step, missing or unasked sequences); the
        plan then stays in flight and the caller should treat the worker as failed (requeue_all).
        """
        if not self._in_flight or plan is not self._in_flight[0] or result.step_id != plan.step.step_id:
            raise ValueError(f"result for step {result.step_id} does not match the oldest plan in flight")
        running = SequenceStatus.RUNNING  # not running: aborted (or finished) since the plan was made
        logprobs: dict[int, Logprob] = {}
        seqs: Seq[Sequence]
        tokens: Seq[int]
        if result.seq_ids == plan.packed_sample_ids:  # the usual answer: every sampled sequence, in order
            seqs, tokens = plan.sample_seqs, unpack_ints(result.token_ids)
            if len(tokens) != len(seqs):
                raise ValueError("result's token_ids and seq_ids disagree in length")
            if plan.aborted:
                kept = [(s, t) for s, t in zip(seqs, tokens) if s.status is running]
                seqs, tokens = [s for s, _ in kept], [t for _, t in kept]
            if plan.asks_logprobs or result.logprob_seq_ids:
                logprobs = self._sampled_logprobs(plan, result, [s.seq_id for s in seqs])
        else:
            scheduled = plan.scheduled
            live = [s.seq_id for s in plan.sample_seqs if s.status is running]
            by_id = self._sampled_tokens(plan, result, live)
            logprobs = self._sampled_logprobs(plan, result, live, scheduled)
            seqs, tokens = [scheduled[sid][0] for sid in live], [by_id[sid] for sid in live]
        self._in_flight.popleft()
        num_finished = 0
        if self._maybe_suspect:
            for seq in seqs:
                seq.suspect = False  # it computed a step alone without killing anyone
        for seq, token in zip(seqs, tokens):  # inline: this loop runs for every sequence of every step
            output = seq.output_token_ids
            output.append(token)
            seq.num_pending_tokens -= 1
            # The worker bans stop ids while fewer than min_tokens outputs precede the sample; mirror it.
            if token in seq.stop_token_ids and len(output) > seq.min_tokens:
                self._finish_sampled(seq, "stop")
                num_finished += 1
            elif len(output) >= seq.output_limit:  # max_tokens, or the context limit
                self._finish_sampled(seq, "length")
                num_finished += 1
        if logprobs:
            for seq in seqs:
                if (logprob := logprobs.get(seq.seq_id)) is not None:
                    seq.logprobs.append(logprob)
        if num_finished:
            self.running = [s for s in self.running if s.status is running]
        return StepOutput(seqs, tokens, logprobs, num_finished)

    def _sampled_tokens(self, plan: StepPlan, result: StepResult, live: list[int]) -> dict[int, int]:
        seq_ids = unpack_ints(result.seq_ids)
        tokens = dict(zip(seq_ids, unpack_ints(result.token_ids), strict=True))
        if len(tokens) != len(seq_ids) or not tokens.keys() <= set(plan.sample_seq_ids):
            raise ValueError("result has repeated sequences or sequences the plan did not sample")
        if not set(live) <= tokens.keys():  # aborted ones may be missing, live ones may not
            raise ValueError("result lacks a token for a sequence the plan sampled")
        return tokens

    def _sampled_logprobs(self, plan: StepPlan, result: StepResult, live: list[int],
                          scheduled: dict[int, tuple[Sequence, int]] | None = None) -> dict[int, Logprob]:
        scheduled = plan.scheduled if scheduled is None else scheduled
        seq_ids, top_n = unpack_ints(result.logprob_seq_ids), result.top_n
        values = unpack_floats(result.logprobs)
        top_ids, top_values = unpack_ints(result.top_token_ids), unpack_floats(result.top_logprobs)
        if len(values) != len(seq_ids) or not len(top_ids) == len(top_values) == len(seq_ids) * top_n:
            raise ValueError("result's logprob arrays disagree in length")
        out: dict[int, Logprob] = {}
        for i, sid in enumerate(seq_ids):
            if sid in scheduled:
                k = min(scheduled[sid][0].sampling.logprobs or 0, top_n)
                tops = zip(top_ids[i * top_n : i * top_n + k], top_values[i * top_n : i * top_n + k])
                out[sid] = (values[i], list(tops))
        asked = [sid for sid in live if scheduled[sid][0].sampling.logprobs is not None]
        if not set(asked) <= out.keys():
            raise ValueError("result lacks logprobs a sequence asked for")
        return out

    def _finish_sampled(self, seq: Sequence, reason: str) -> None:
        """Finish a sequence on the token its step just sampled: every earlier token's K/V is computed, so its
        full blocks are cached first (a follow-up turn of a conversation shares them)."""
        self._cache_blocks(seq, seq.num_tokens - 1)
        self._finish(seq, reason)
