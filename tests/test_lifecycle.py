"""The daemon's life: SIGTERM drains (503 for newcomers, in-flight finish, exit 0) and a worker that
cannot start is left down as crash-looping instead of being restarted forever."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import pytest
from server import NimbusServer
from tiny_models import make_tiny_smollm2

MODEL = "tiny-smollm2"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_smollm2(tmp_path_factory.mktemp("lifecycle") / MODEL)


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_sigterm_drains_in_flight_requests_and_exits_zero(tiny, tmp_path):
    config = """
[server]
drain_timeout_s = 30.0
[workers]
threads = 1
kv_cache_memory = "64MiB"
fault = "delay-ms=15"
"""
    server = NimbusServer(tiny, workers=1, config=config, tmp=tmp_path).start()
    try:
        worker_pid = server.workers_info()["local-0"]["pid"]

        async def main():
            async with httpx.AsyncClient(timeout=60) as client:
                body = {"model": MODEL, "prompt": "Go", "max_tokens": 150, "ignore_eos": True, "stream": True}
                got_first = asyncio.Event()

                async def in_flight() -> tuple[int, str]:
                    async with client.stream("POST", server.url + "/v1/completions", json=body) as r:
                        text = ""
                        async for line in r.aiter_lines():
                            text += line + "\n"
                            got_first.set()
                        return r.status_code, text

                task = asyncio.create_task(in_flight())
                await asyncio.wait_for(got_first.wait(), 30)
                server.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                late = await client.post(server.url + "/v1/completions",
                                         json={"model": MODEL, "prompt": "late", "max_tokens": 2})
                return await task, late

        (status, text), late = asyncio.run(main())
        assert status == 200 and text.rstrip().endswith("data: [DONE]")
        assert '"finish_reason":"length"' in text  # all 150 tokens, not cut off
        assert late.status_code == 503 and late.headers.get("Retry-After")
        assert late.json()["error"]["code"] == "draining"
        assert server.proc.wait(timeout=30) == 0
        deadline = time.monotonic() + 10
        while _pid_alive(worker_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _pid_alive(worker_pid)  # the daemon shut its worker down
    finally:
        server.stop()


def test_a_worker_that_cannot_start_is_left_down(tiny, tmp_path):
    # 64 KiB holds fewer than the 256 tokens one sequence of this model needs: every start fails
    config = """
[server]
replica_wait_s = 1.0
[workers]
threads = 1
kv_cache_memory = "64KiB"
restart_backoff_s = 0.1
max_restarts = 2
"""
    server = NimbusServer(tiny, workers=1, config=config, tmp=tmp_path, wait_ready=False).start()
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            info = server.workers_info().get("local-0", {})
            if info.get("state") == "crashloop":
                break
            time.sleep(0.3)
        assert info["state"] == "crashloop" and info["restarts"] == 2
        assert "one sequence of max length 256" in server.log()
        assert httpx.get(server.url + "/ready").status_code == 503
        r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "hi"}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_replica"
        time.sleep(2)  # left down: no further restarts
        assert server.workers_info()["local-0"]["restarts"] == 2
    finally:
        server.stop()
