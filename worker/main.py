"""`nimbus worker`: a worker process that loads a model and executes the steps a daemon sends over ZeroMQ.

Two threads, two sockets: the main thread runs steps; the heartbeat thread beats every interval (also
during a long forward pass), watches the daemon's echoes as a lease, and flags a lost daemon so the
main thread drops its work and registers again. Only monotonic clocks are compared.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
import time

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


class Worker:
    """The message loop around a step executor."""

    def __init__(self, executor: StepExecutor | NullExecutor, address: str, worker_id: str, model_name: str,
                 lease_s: float = 5.0, orphan_timeout_s: float = 600.0, faults: Faults | None = None,
                 curve: ClientKeys | None = None) -> None:
        self.executor = executor
        self.address = address
        self.worker_id = worker_id
        self.model_name = model_name
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

    def hello(self) -> Hello:
        r = self.executor.runner
        return Hello(
            worker_id=self.worker_id, host=socket.gethostname(), pid=os.getpid(), device=str(r.device),
            model=self.model_name, model_version="", dtype=str(r.dtype).removeprefix("torch."),
            num_blocks=r.num_blocks, block_size=r.block_size, max_model_len=r.max_model_len,
            vocab_size=r.config.vocab_size, incarnation=self.executor.incarnation, state=self.state,
        )

    def run(self) -> int:
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
                        self.executor.reset()
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
                        return 0
        finally:
            self.stop.set()
            beat.join(timeout=2)
            self.dealer.close()
            self.ctx.term()
        return 0

    def _handle(self, msg: object) -> bool:
        """Acts on one message; True means exit."""
        if isinstance(msg, Welcome):
            self.executor.reset()  # a (re)registration starts from an empty state
            self.executor.incarnation = msg.incarnation
            self.heartbeat_interval = msg.heartbeat_interval
            self.state = "ready"
            self.welcomed.set()
            log.info("registered with daemon epoch %s as incarnation %d", msg.epoch, msg.incarnation)
        elif isinstance(msg, Step):
            if self.welcomed.is_set():
                self._execute(msg)
        elif isinstance(msg, Shutdown):
            log.info("shutdown requested")
            return True
        elif isinstance(msg, Drain):
            self.state = "draining"
        elif isinstance(msg, Load):
            self.dealer.send(Error(code="unsupported", message="this worker serves one model"))
        elif isinstance(msg, Error):
            log.error("daemon refused us: %s: %s", msg.code, msg.message)
        return False

    def _execute(self, step: Step) -> None:
        self.step_in_progress = step.step_id
        try:
            self.faults.before_step(step)
            result = self.executor.execute(step)
        except Exception as exc:  # a bad step or a failing forward pass must not kill the worker
            if not isinstance(exc, StepError):
                log.exception("step %d failed", step.step_id)
            # our state and the daemon's may now disagree: start clean; the daemon recomputes
            self.executor.reset()
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
                    sock.send(Heartbeat(worker_id=self.worker_id, incarnation=self.executor.incarnation, seq=seq,
                                        state=self.state, step_id=self.step_in_progress))
                    next_beat = now + self.heartbeat_interval
                try:
                    msg = sock.recv(timeout_ms=100)
                except ProtocolError:
                    msg = None
                if isinstance(msg, Heartbeat) and msg.incarnation == self.executor.incarnation:
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


def run(args: argparse.Namespace) -> int:
    configure_logging(args.log_format)
    if os.environ.get("NIMBUS_SUPERVISED"):
        # Ctrl-C in a terminal reaches the whole process group; the daemon decides how its workers stop
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if args.threads:
        torch.set_num_threads(args.threads)
    worker_id = args.worker_id or f"{socket.gethostname()}-{os.getpid()}"
    executor: StepExecutor | NullExecutor
    if args.null_model:
        executor = NullExecutor(NullRunner.from_folder(args.model, args.max_model_len), worker_id=worker_id)
    else:
        kv_bytes = parse_size(args.kv_cache_memory) if args.kv_cache_memory else None
        runner = ModelRunner(args.model, device=args.device, dtype=args.dtype, kv_cache_bytes=kv_bytes,
                             block_size=args.block_size, max_model_len=args.max_model_len)
        executor = StepExecutor(runner, worker_id=worker_id)
    worker = Worker(executor, args.connect, worker_id, model_name=str(args.model), lease_s=args.lease,
                    orphan_timeout_s=args.orphan_timeout, faults=Faults.parse(args.fault),
                    curve=getattr(args, "curve", None))
    return worker.run()
