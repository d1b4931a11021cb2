"""`nimbus worker`: a worker process that loads a model and executes the steps a daemon sends over ZeroMQ."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import threading
import time

import torch
import zmq

from protocol.messages import (
    Drain,
    Error,
    Heartbeat,
    Hello,
    Load,
    ProtocolError,
    Shutdown,
    Step,
    Welcome,
)
from protocol.transport import DealerEndpoint
from worker.executor import StepError, StepExecutor
from worker.null import NullExecutor, NullRunner
from worker.runner import ModelRunner, parse_size

log = logging.getLogger("nimbus.worker")
HELLO_RETRY_S = 2.0


class Worker:
    """The message loop around a StepExecutor; a second thread and socket carry heartbeats."""

    def __init__(self, executor: StepExecutor | NullExecutor, address: str, worker_id: str, model_name: str,
                 heartbeat_interval: float = 1.0, parent_pid: int | None = None) -> None:
        self.executor = executor
        self.address = address
        self.worker_id = worker_id
        self.model_name = model_name
        self.heartbeat_interval = heartbeat_interval
        self.parent_pid = parent_pid
        self.ctx = zmq.Context()
        self.dealer = DealerEndpoint(self.ctx, worker_id.encode(), address)
        self.state = "ready"
        self.step_in_progress: int | None = None
        self.stop = threading.Event()

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
        last_hello = 0.0
        welcomed = False
        try:
            while not self.stop.is_set():
                if not welcomed and time.monotonic() - last_hello > HELLO_RETRY_S:
                    self.dealer.send(self.hello())
                    last_hello = time.monotonic()
                try:
                    msg = self.dealer.recv(timeout_ms=200)
                except ProtocolError as exc:
                    log.warning("dropping malformed frame from the daemon: %s", exc)
                    self.dealer.send(Error(code="protocol", message=str(exc)))
                    continue
                if msg is None:
                    continue
                if isinstance(msg, Welcome):
                    welcomed = True
                    self.executor.reset()  # a (re)registration starts from an empty state
                    self.executor.incarnation = msg.incarnation
                    log.info("registered with daemon epoch %s as incarnation %d", msg.epoch, msg.incarnation)
                elif isinstance(msg, Step):
                    self._execute(msg)
                elif isinstance(msg, Shutdown):
                    log.info("shutdown requested")
                    return 0
                elif isinstance(msg, Drain):
                    self.state = "draining"
                elif isinstance(msg, Load):
                    self.dealer.send(Error(code="unsupported", message="this worker serves one model"))
        finally:
            self.stop.set()
            beat.join(timeout=2)
            self.dealer.close()
            self.ctx.term()
        return 0

    def _execute(self, step: Step) -> None:
        self.step_in_progress = step.step_id
        try:
            result = self.executor.execute(step)
        except StepError as exc:
            log.warning("rejected step %d: %s", step.step_id, exc)
            self.dealer.send(Error(code="bad_step", message=str(exc), step_id=step.step_id))
            return
        except Exception as exc:  # a failing forward pass must not kill the worker silently
            log.exception("step %d failed", step.step_id)
            self.executor.reset()
            self.dealer.send(Error(code="internal", message=f"{type(exc).__name__}: {exc}", step_id=step.step_id))
            return
        finally:
            self.step_in_progress = None
        self.dealer.send(result)

    def _heartbeats(self) -> None:
        # own socket: zmq sockets are not thread-safe, and beats must flow during a long forward pass
        sock = DealerEndpoint(self.ctx, f"{self.worker_id}/hb".encode(), self.address)
        seq = 0
        try:
            while not self.stop.wait(self.heartbeat_interval):
                if self.parent_pid is not None and os.getppid() != self.parent_pid:
                    log.error("parent process %d is gone; exiting", self.parent_pid)
                    os._exit(1)
                seq += 1
                sock.send(Heartbeat(worker_id=self.worker_id, incarnation=self.executor.incarnation, seq=seq,
                                    state=self.state, step_id=self.step_in_progress))
        finally:
            sock.close()


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
    worker = Worker(executor, args.connect, worker_id,
                    model_name=str(args.model), parent_pid=args.parent_pid)
    return worker.run()
