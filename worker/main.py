"""`nimbus worker`: a worker process that loads a model and executes the steps a daemon sends over ZeroMQ.

Two threads, two sockets: the main thread runs steps; the heartbeat thread beats every interval (also
during a long forward pass), watches the daemon's echoes as a lease, and flags a lost daemon so the
main thread drops its work and registers again. Only monotonic clocks are compared.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import logging
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Callable

import torch
import zmq

from protocol.keys import ClientKeys
from protocol.logs import configure as configure_logging
from protocol.messages import Drain, Error, Heartbeat, Hello, Load, ProtocolError, Shutdown, Step, Welcome
from protocol.transport import DealerEndpoint
from worker.executor import StepError, StepExecutor
from worker.faults import Faults
from worker.null import NullExecutor, NullRunner
from worker.runner import ModelRunner, parse_size

log = logging.getLogger("nimbus.worker")
HELLO_RETRY_S = 1.0
# the heartbeat thread's longest sleep (so stop and the lease are seen within it), and its poll before a Welcome
MAX_BEAT_WAIT_S = 1.0
UNWELCOMED_POLL_S = 0.1
# waking this much past its timeout means the heartbeat thread was not running meanwhile
STALL_FORGIVEN_S = 1.0
LOAD_FAILED_EXIT = 3


class Worker:
    """The message loop around a step executor."""

    def __init__(self, executor: StepExecutor | NullExecutor | None, address: str, worker_id: str, model_name: str,
                 lease_s: float = 5.0, orphan_timeout_s: float = 600.0, faults: Faults | None = None,
                 curve: ClientKeys | None = None, loader: Loader | None = None, model_version: str = "") -> None:
        self.executor = executor  # None: an idle worker, holding no model until the daemon sends Load
        self.loader = loader  # builds an executor for a Load; None: this worker serves one model only
        self.incarnation = executor.incarnation if executor is not None else 0
        self.address = address
        self.worker_id = worker_id
        self.model_name = model_name if executor is not None else ""
        self.model_version = model_version
        self.lease_s = lease_s
        self.orphan_timeout_s = orphan_timeout_s
        self.faults = faults or Faults()
        self.heartbeat_interval = 1.0
        self.ctx = zmq.Context()
        self.curve = curve  # CURVE keys for both sockets; None: a plain link (ipc://, or allowed loopback TCP)
        self.dealer = DealerEndpoint(self.ctx, worker_id.encode(), address, curve=curve)
        self.state = "ready"
        self.step_in_progress: int | None = None
        self.welcomed = threading.Event()
        self.lost = threading.Event()  # set by the heartbeat thread: the daemon no longer knows us
        self.stop = threading.Event()
        self.last_contact = time.monotonic()
        self.exit_code = 0

    def hello(self) -> Hello:
        common = dict(worker_id=self.worker_id, host=socket.gethostname(), pid=os.getpid(),
                      incarnation=self.incarnation, state=self.state)
        if self.executor is None:  # no model: the daemon sees an empty name and may send Load
            return Hello(device="none", model="", model_version="", dtype="none", num_blocks=0, block_size=1,
                         max_model_len=1, vocab_size=1, **common)
        r = self.executor.runner
        return Hello(
            device=str(r.device), model=self.model_name, model_version=self.model_version,
            dtype=str(r.dtype).removeprefix("torch."), num_blocks=r.num_blocks, block_size=r.block_size,
            max_model_len=r.max_model_len, vocab_size=r.config.vocab_size, **common,
        )

    def run(self) -> int:
        freeze_heap()
        beat = threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True)
        beat.start()
        last_hello = -HELLO_RETRY_S
        try:
            while not self.stop.is_set():
                if self.lost.is_set():
                    self.lost.clear()
                    if self.welcomed.is_set():
                        log.warning("lost the daemon (lease of %.1fs ran out); dropping work, registering again",
                                    self.lease_s)
                        self.welcomed.clear()
                        self._reset()
                        last_hello = -HELLO_RETRY_S
                if not self.welcomed.is_set() and time.monotonic() - last_hello > HELLO_RETRY_S:
                    self.dealer.send(self.hello())
                    last_hello = time.monotonic()
                try:
                    msg = self.dealer.recv(timeout_ms=100)
                except ProtocolError as exc:
                    log.warning("dropping malformed frame from the daemon: %s", exc)
                    continue
                if msg is not None:
                    self.last_contact = time.monotonic()
                    if self._handle(msg):
                        return self.exit_code
        finally:
            self.stop.set()
            beat.join(timeout=2)
            self.dealer.close(linger_ms=1000 if self.exit_code else 0)  # the Error that says why we exit
            self.ctx.term()
        return 0

    def _handle(self, msg: object) -> bool:
        """Acts on one message; True means exit."""
        if isinstance(msg, Welcome):
            self._reset()  # a (re)registration starts from an empty state
            self.incarnation = msg.incarnation
            if self.executor is not None:
                self.executor.incarnation = msg.incarnation
            self.heartbeat_interval = msg.heartbeat_interval
            self.state = "ready"
            self.welcomed.set()
            log.info("registered with daemon epoch %s as incarnation %d", msg.epoch, msg.incarnation)
        elif isinstance(msg, Step):
            # One at a time, in arrival order: with overlap the daemon sends the next step while this one
            # runs (ZeroMQ queues it), and that step computes the tokens this one samples. After a failed
            # step the executor is empty, so a queued step fails too (or holds only its new sequences,
            # which the daemon frees in the step after).
            if self.welcomed.is_set() and self.executor is not None:
                self._execute(msg)
        elif isinstance(msg, Shutdown):
            log.info("shutdown requested")
            return True
        elif isinstance(msg, Drain):
            self.state = "draining"
        elif isinstance(msg, Load):
            return not self._load(msg)
        elif isinstance(msg, Error):
            log.error("daemon refused us: %s: %s", msg.code, msg.message)
        return False

    def _reset(self) -> None:
        if self.executor is not None:
            self.executor.reset()

    def _load(self, msg: Load) -> bool:
        """Drop the model held, load the one asked for, and register again as it (the heartbeat thread
        keeps beating meanwhile, saying "loading"). On failure: Error(load_failed), then False: the process
        exits (LOAD_FAILED_EXIT), so that its supervisor's restart backoff and crash-loop detection apply
        to a model that cannot load, and no half-freed state lingers."""
        if self.loader is None:
            self.dealer.send(Error(code="unsupported", message="this worker serves one model (started with --model)"))
            return True
        log.info("loading %s as version %r", msg.model, msg.version)
        self.state = "loading"
        # free the old weights and KV pool before allocating new ones: both at once may not fit
        self.executor, self.model_name, self.model_version = None, "", ""
        gc.unfreeze()  # the old model's objects are in the frozen generation: collectable again
        gc.collect()
        started = time.monotonic()
        try:
            executor, faults = self.loader(msg, self.worker_id)
        except Exception as exc:  # a bad path, an unsupported checkpoint, out of memory: report, then exit
            log.exception("loading %s failed; exiting", msg.model)
            self.dealer.send(Error(code="load_failed", message=f"{msg.model}: {type(exc).__name__}: {exc}"))
            self.exit_code = LOAD_FAILED_EXIT
            return False
        executor.incarnation = self.incarnation
        self.executor, self.faults = executor, faults
        freeze_heap()
        self.model_name, self.model_version = msg.model, msg.version
        self.state = "ready"
        log.info("loaded %s as version %r in %.1fs", msg.model, msg.version, time.monotonic() - started)
        self.welcomed.clear()  # the loop says Hello again (as this model) until the daemon welcomes it
        return True

    def _execute(self, step: Step) -> None:
        self.step_in_progress = step.step_id
        try:
            self.faults.before_step(step)
            result = self.executor.execute(step)
        except Exception as exc:  # a bad step or a failing forward pass must not kill the worker
            if not isinstance(exc, StepError):
                log.exception("step %d failed", step.step_id)
            # our state and the daemon's may now disagree: start clean; the daemon recomputes
            self._reset()
            code = "bad_step" if isinstance(exc, StepError) else "internal"
            self.dealer.send(Error(code=code, message=f"{type(exc).__name__}: {exc}", step_id=step.step_id))
            return
        finally:
            self.step_in_progress = None
        self.dealer.send(result)

    def _heartbeats(self) -> None:
        # own socket: zmq sockets are not thread-safe, and beats must flow during a long forward pass
        sock = DealerEndpoint(self.ctx, f"{self.worker_id}/hb".encode(), self.address, curve=self.curve)
        seq = 0
        next_beat = time.monotonic()
        try:
            while not self.stop.is_set():
                now = time.monotonic()
                if self.welcomed.is_set() and now >= next_beat:
                    seq += 1
                    sock.send(Heartbeat(worker_id=self.worker_id, incarnation=self.incarnation, seq=seq,
                                        state=self.state, step_id=self.step_in_progress))
                    next_beat = now + self.heartbeat_interval
                # sleep until the next beat is due: this thread's wake-ups land on the cores the forward pass
                # runs on, and each one stalls both of its barrier-synced threads (docs/benchmarks.md)
                wait_s = next_beat - time.monotonic() if self.welcomed.is_set() else UNWELCOMED_POLL_S
                wait_ms = math.ceil(min(max(wait_s, 0.001), MAX_BEAT_WAIT_S) * 1000)
                due = time.monotonic() + wait_ms / 1000
                try:
                    msg = sock.recv(timeout_ms=wait_ms)
                except ProtocolError:
                    msg = None
                stalled = time.monotonic() - due
                if stalled > STALL_FORGIVEN_S:
                    # this process (or its host) was paused, so the daemon's silence meanwhile says nothing:
                    # it was likely paused with us; the lease runs on from now
                    log.warning("this worker did not run for %.1fs; the daemon's lease runs on from now", stalled)
                    self.last_contact += stalled
                if isinstance(msg, Heartbeat) and msg.incarnation == self.incarnation:
                    self.last_contact = time.monotonic()
                elif isinstance(msg, Error) and msg.code == "unknown_worker" and self.welcomed.is_set():
                    self.lost.set()  # the daemon restarted or declared us dead
                silent = time.monotonic() - self.last_contact
                if self.welcomed.is_set() and silent > self.lease_s:
                    self.lost.set()
                if silent > self.orphan_timeout_s:
                    log.error("no daemon for %.0fs; exiting", silent)
                    self.stop.set()
        finally:
            sock.close()


def freeze_heap() -> None:
    """Moves every object alive now (torch's modules and the model's: about 170,000) out of the collector's
    reach. A full collection walked them all in about 90 ms, and the step it landed in waited that long; what the
    steps allocate afterwards is still collected."""
    gc.collect()
    gc.freeze()
    log.info("froze %d objects out of garbage collection", gc.get_freeze_count())


Loader = Callable[[Load, str], tuple["StepExecutor | NullExecutor", Faults]]


def make_loader(args: argparse.Namespace) -> Loader:
    """How this worker builds an executor for a model: the process's flags, overridden by the Load."""
    def load(msg: Load, worker_id: str) -> tuple[StepExecutor | NullExecutor, Faults]:
        faults = Faults.parse(msg.fault if msg.fault is not None else args.fault)
        max_len = msg.max_model_len or args.max_model_len
        if args.null_model:
            return NullExecutor(NullRunner.from_folder(msg.model, max_len), worker_id=worker_id), faults
        kv_bytes = parse_size(args.kv_cache_memory) if args.kv_cache_memory else None
        runner = ModelRunner(msg.model, device=args.device, dtype=msg.dtype or args.dtype, kv_cache_bytes=kv_bytes,
                             block_size=args.block_size, max_model_len=max_len, kv_cache_dtype=args.kv_cache_dtype)
        return StepExecutor(runner, worker_id=worker_id), faults
    return load


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# allocations up to this size come from the heap and are reused there once freed
_HEAP_LIMIT = 1 << 30


def keep_freed_memory() -> bool:
    """Makes glibc keep freed memory for reuse instead of handing it back to the kernel; returns whether it could.

    A step's activations are tensors of megabytes (a 2,048-token prefill's MLP output alone is 25 MB). By default
    glibc maps each from the kernel afresh and unmaps it when freed, so every step paid for page faults and zeroing:
    about 30,000 faults and 0.1 s of system time per prefill step of the default model on CPU
    (docs/benchmarks.md). Kept, the worker's resident memory stays at its largest step's workspace, which the
    step budget bounds; the KV pool (above the limit) is still mapped on its own."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _HEAP_LIMIT) and libc.mallopt(_M_TRIM_THRESHOLD, _HEAP_LIMIT))
    except (OSError, AttributeError):  # not glibc: its own defaults stay
        return False


def run(args: argparse.Namespace) -> int:
    configure_logging(args.log_format)
    if not keep_freed_memory():
        log.info("allocator left at its defaults (no glibc mallopt here)")
    if os.environ.get("NIMBUS_SUPERVISED"):
        # Ctrl-C in a terminal reaches the whole process group; the daemon decides how its workers stop
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if args.threads:
        torch.set_num_threads(args.threads)
    worker_id = args.worker_id or f"{socket.gethostname()}-{os.getpid()}"
    loader = make_loader(args)
    executor, faults = (None, Faults.parse(args.fault)) if args.model is None else \
        loader(Load(model=str(args.model)), worker_id)
    worker = Worker(executor, args.connect, worker_id, model_name=str(args.model or ""), lease_s=args.lease,
                    orphan_timeout_s=args.orphan_timeout, faults=faults, curve=getattr(args, "curve", None),
                    loader=loader)
    return worker.run()
