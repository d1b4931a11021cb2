"""The daemon's step loop in one process, for measuring its per-step cost without sockets or other processes.

One `Replica` runs its real loop (schedule, send, update, emit) against the null model's executor, which answers
each step on the next loop turn through the real wire encoding (msgpack both ways, as a worker would). Readers
take every stream's deltas and render them as SSE chunks (`Response`), but write them nowhere: what is left out
is the HTTP server, ZeroMQ's sockets and the other processes, which `bench/daemon_cost.py` measures for real.

    .venv/bin/python bench/daemon_loop.py [--sequences 256] [--steps 2000] [--profile OUT.txt]

Prints the daemon's CPU time per step (process time less the null worker's, so another process on the machine
barely moves it).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.metrics import Metrics  # noqa: E402
from daemon.models import resolve_model  # noqa: E402
from daemon.replica import Replica, RequestStream, Track  # noqa: E402
from daemon.requests import parse_generation  # noqa: E402
from daemon.responses import Response  # noqa: E402
from daemon.scheduler import SchedulerConfig, Sequence  # noqa: E402
from daemon.tokenizer import IncrementalDetokenizer, Tokenizer  # noqa: E402
from protocol.messages import Hello, SamplingParams, decode, encode  # noqa: E402
from worker.config import ModelConfig  # noqa: E402
from worker.null import NullExecutor, NullRunner  # noqa: E402


class LoopbackWorker:
    """The endpoint a Replica sends to: a null executor answering on the next loop turn, over the real wire."""

    def __init__(self, executor: NullExecutor) -> None:
        self.executor = executor
        self.replica: Replica | None = None
        self.steps = 0
        self.cpu_s = 0.0  # the worker's share of this process' time

    def send(self, identity: bytes, step) -> None:
        frame = encode(step)  # the daemon's half of the wire: encode the step, decode the result
        t0 = time.process_time()  # the worker's half is left out of the daemon's time
        answer = encode(self.executor.execute(decode(frame)))
        self.cpu_s += time.process_time() - t0
        self.steps += 1
        asyncio.get_running_loop().call_soon(self._answer, answer)

    def _answer(self, frame: bytes) -> None:
        assert self.replica is not None
        self.replica.on_result(decode(frame))


async def run(tok: Tokenizer, folder: str, sequences: int, steps: int, prompt_len: int) -> dict[str, float]:
    runner = NullRunner(ModelConfig.from_folder(folder))
    worker = LoopbackWorker(NullExecutor(runner, "w", 1))
    hello = Hello(worker_id="w", host="h", pid=1, device="null", model="m", model_version="", dtype="none",
                  num_blocks=runner.num_blocks, block_size=runner.block_size, max_model_len=runner.max_model_len,
                  vocab_size=tok.vocab_size)
    replica = Replica(hello, b"w", worker, SchedulerConfig(), 1, Metrics())  # type: ignore[arg-type]
    replica.assign("r0", "m", "v1")  # serving, so the step loop observes its metrics as in the daemon
    worker.replica = replica
    max_tokens = min(steps + 256, runner.max_model_len - prompt_len - 1)
    body = {"model": "m", "prompt": "x", "stream": True, "max_tokens": max_tokens, "ignore_eos": True}
    req = parse_generation(body, False, tok.vocab_size)
    readers = []
    for k in range(sequences):
        prompt = [1000 + k, *range(2000, 2000 + prompt_len - 1)]
        seq = Sequence(k + 1, prompt, SamplingParams(temperature=0.0), max_tokens=max_tokens)
        stream = RequestStream(1)
        replica.add(Track(seq, 0, stream, IncrementalDetokenizer(tok, prompt), None))
        response = Response(req, SimpleNamespace(tokenizer=tok), [prompt], [seq])  # type: ignore[arg-type]
        readers.append(asyncio.ensure_future(read(response, stream)))
    loop_task = asyncio.ensure_future(replica.run(lambda *a: print("step error", a)))
    while worker.steps < 64:  # past admission and the prefills: measure steady decode
        await asyncio.sleep(0.001)
    s0, c0, w0 = worker.steps, time.process_time(), worker.cpu_s
    while worker.steps < s0 + steps:
        await asyncio.sleep(0.005)
    s1, c1, w1 = worker.steps, time.process_time(), worker.cpu_s
    loop_task.cancel()
    for reader in readers:
        reader.cancel()
    await asyncio.gather(loop_task, *readers, return_exceptions=True)
    n = s1 - s0
    return {"steps": n, "cpu_ms_per_step": 1000 * (c1 - c0 - (w1 - w0)) / n,
            "worker_ms_per_step": 1000 * (w1 - w0) / n, "running": len(replica.tracks)}


async def read(response: Response, stream: RequestStream) -> int:
    """What Response.stream does with each read, less the socket write; returns the bytes it would write."""
    head, size = response._chunk_head(), 0
    while deltas := await stream.get():
        choices = [response._choice(d) for d in deltas if d.text or d.finish_reason is not None or d.logprobs]
        if choices:
            size += len(head + ",".join(choices).encode() + b"]}\n\n")
    return size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", default=None, help="cProfile one more round; its stats to this file")
    args = parser.parse_args()
    import uvloop

    folder = str(resolve_model(None))
    tok = Tokenizer.from_folder(folder)
    for _ in range(args.rounds):
        r = uvloop.run(run(tok, folder, args.sequences, args.steps, args.prompt_len))
        print(f"{r['steps']} steps, {args.sequences} sequences: {r['cpu_ms_per_step']:.3f} ms CPU a step "
              f"(the null worker's {r['worker_ms_per_step']:.3f} left out), {r['running']} running at the end", flush=True)
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        uvloop.run(run(tok, folder, args.sequences, args.steps, args.prompt_len))
        prof.disable()
        with open(args.profile, "w") as out:
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(40)
    return 0


if __name__ == "__main__":
    sys.exit(main())
