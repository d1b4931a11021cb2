"""Faults with real processes: killed, frozen, crashing and hanging workers, and a daemon restart.

Clients must notice no more than a pause: every stream completes with exactly the text it would have
had without the fault, and only a request that keeps killing workers fails.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time

import httpx
import openai
import pytest
from server import NimbusServer, wait_for

from daemon.models import pull

CRASH_TOKEN, STALL_TOKEN = 31337, 31338  # ids no ordinary prompt here contains
CONFIG = f"""
[server]
replica_wait_s = 60.0
[scheduler]
max_num_batched_tokens = 512
[workers]
kv_cache_memory = "512MiB"
heartbeat_interval_s = 0.5
heartbeat_timeout_s = 2.0
step_timeout_s = 4.0
restart_backoff_s = 0.5
max_restarts = 50
fault = "crash-on-token={CRASH_TOKEN},stall-on-token={STALL_TOKEN}"
"""
QUESTIONS = [f"Write one sentence about the number {i}." for i in range(32)]


def _config(tmp) -> str:
    return CONFIG.replace("[workers]", f'[workers]\nruntime_dir = "{tmp}/run"')


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("failover")
    with NimbusServer(pull(), workers=2, config=_config(tmp), tmp=tmp) as srv:
        yield srv


def _both_up(server) -> bool:
    info = server.workers_info()
    return len(info) == 2 and all(w["state"] == "up" for w in info.values())


def _stream_all(server, fault=None) -> list[str]:
    """32 greedy streaming chats at once; `fault()` runs once the streams are under way."""

    async def one(client, q: str, started: asyncio.Event) -> str:
        stream = await client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": q}], max_tokens=40,
            temperature=0, stream=True)
        text = ""
        async for chunk in stream:
            text += chunk.choices[0].delta.content or ""
            if len(text) > 20:
                started.set()
        return text

    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                                      timeout=300) as client:
            started = asyncio.Event()
            tasks = [asyncio.create_task(one(client, q, started)) for q in QUESTIONS]
            if fault is not None:
                await asyncio.wait_for(started.wait(), 120)
                await asyncio.to_thread(fault)
            return await asyncio.gather(*tasks)

    return asyncio.run(main())


def test_sigkill_a_worker_mid_stream_loses_nothing(server):
    wait_for(lambda: _both_up(server), 120, "both workers up")
    reference = _stream_all(server)
    victim = server.workers_info()["local-0"]
    restarts_before = victim["restarts"]
    texts = _stream_all(server, fault=lambda: os.kill(victim["pid"], signal.SIGKILL))
    assert texts == reference
    info = wait_for(lambda: (i := server.workers_info()) and i["local-0"]["state"] == "up"
                 and i["local-0"]["pid"] != victim["pid"] and i, 120, "local-0 restarted")
    assert info["local-0"]["restarts"] == restarts_before + 1
    assert info["local-0"]["incarnation"] > victim["incarnation"]


def test_sigstop_a_worker_is_declared_dead_and_replaced(server):
    wait_for(lambda: _both_up(server), 120, "both workers up")
    reference = _stream_all(server)
    victim = server.workers_info()["local-1"]
    stopped_at = []

    def freeze():
        os.kill(victim["pid"], signal.SIGSTOP)
        stopped_at.append(time.monotonic())

    try:
        texts = _stream_all(server, fault=freeze)
        declared = wait_for(lambda: server.workers_info()["local-1"]["incarnation"] != victim["incarnation"]
                         or server.workers_info()["local-1"]["state"] != "up", 30, "local-1 declared dead")
        assert declared
        # heartbeat_timeout_s is 2 s; the health check runs every 0.2 s
        dead_after = time.monotonic() - stopped_at[0]
        assert texts == reference
        wait_for(lambda: not _pid_alive(victim["pid"]), 10, "the frozen process killed")
        assert dead_after < 60  # the streams above finished only after it was declared dead
        info = wait_for(lambda: (i := server.workers_info())["local-1"]["state"] == "up"
                     and i["local-1"]["pid"] != victim["pid"] and i, 120, "local-1 replaced")
        assert info["local-1"]["pid"] != victim["pid"]
    finally:
        if _pid_alive(victim["pid"]):
            os.kill(victim["pid"], signal.SIGKILL)


def test_sigstop_is_detected_within_the_heartbeat_timeout(server):
    wait_for(lambda: _both_up(server), 120, "both workers up")
    victim = server.workers_info()["local-0"]
    t0 = time.monotonic()
    os.kill(victim["pid"], signal.SIGSTOP)
    try:
        wait_for(lambda: server.workers_info()["local-0"]["incarnation"] != victim["incarnation"]
              or server.workers_info()["local-0"]["state"] != "up", 15, "local-0 declared dead")
        assert time.monotonic() - t0 < 2.0 + 1.5  # heartbeat_timeout_s plus a margin
    finally:
        if _pid_alive(victim["pid"]):
            os.kill(victim["pid"], signal.SIGKILL)


def test_pausing_the_whole_server_fails_nothing(server):
    """SIGSTOP to the daemon and its workers together (what `systemctl freeze` or a suspended VM does), for
    longer than the heartbeat timeout and the lease, mid-stream: after SIGCONT neither side holds the pause against the other.
    No worker is declared dead or restarted, and every stream ends as it would have without the pause."""
    wait_for(lambda: _both_up(server), 120, "both workers up")
    reference = _stream_all(server)
    before = server.workers_info()
    stalls_before = _metric(server, "nimbus_daemon_stalls_total")

    def pause() -> None:
        os.killpg(server.proc.pid, signal.SIGSTOP)
        time.sleep(6.0)  # past both heartbeat_timeout_s (2 s) and the workers' lease (lease_s, 5 s)
        os.killpg(server.proc.pid, signal.SIGCONT)

    try:
        texts = _stream_all(server, fault=pause)
    finally:
        os.killpg(server.proc.pid, signal.SIGCONT)
    assert texts == reference
    time.sleep(3.0)  # past another heartbeat timeout: a late verdict would show now
    after = server.workers_info()
    for wid, w in before.items():
        assert (after[wid]["pid"], after[wid]["incarnation"], after[wid]["restarts"], after[wid]["state"]) == \
            (w["pid"], w["incarnation"], w["restarts"], "up"), after[wid]
    assert _metric(server, "nimbus_daemon_stalls_total") == stalls_before + 1
    assert "lost the daemon" not in server.log()


def _metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=5).text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); check its state
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def _complete(server, prompt, **kw) -> httpx.Response:
    body = {"model": "SmolLM2-135M-Instruct", "prompt": prompt, "max_tokens": 8, "temperature": 0, **kw}
    return httpx.post(server.url + "/v1/completions", json=body, timeout=180)


@pytest.mark.parametrize("token,how", [(CRASH_TOKEN, "crash"), (STALL_TOKEN, "hang")])
def test_poison_request_fails_alone(server, token, how):
    wait_for(lambda: _both_up(server), 120, "both workers up")
    before = server.admin()

    async def main():
        async with httpx.AsyncClient(timeout=300) as client:
            body = {"model": "SmolLM2-135M-Instruct", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
            good = client.post(server.url + "/v1/completions", json={**body, "prompt": "A good request:"})
            bad = client.post(server.url + "/v1/completions", json={**body, "prompt": [1, 2, token, 3]})
            return await asyncio.gather(good, bad)

    good, bad = asyncio.run(main())
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 24
    assert bad.status_code == 500, bad.text
    assert "failed repeatedly" in bad.json()["error"]["message"]
    after = server.admin()
    assert after["poisoned"] == before["poisoned"] + 1
    assert after["worker_deaths"] >= before["worker_deaths"] + 2
    # the workers come back and serve
    wait_for(lambda: _both_up(server), 120, f"workers restarted after the {how}")
    assert _complete(server, "Still alive?").status_code == 200


def test_daemon_restart_keeps_workers_and_their_weights(tmp_path):
    config = _config(tmp_path).replace('fault = ', '# fault = ')
    first = NimbusServer(pull(), workers=1, config=config, tmp=tmp_path).start()
    second = None
    try:
        before = first.workers_info()["local-0"]
        assert _complete(first, "Hello").status_code == 200
        os.kill(first.proc.pid, signal.SIGKILL)  # the daemon alone: its worker lives on
        first.proc.wait(timeout=10)
        assert _pid_alive(before["pid"])
        t0 = time.monotonic()
        second = NimbusServer(pull(), workers=1, config=config, tmp=tmp_path, port=first.port).start()
        ready_after = time.monotonic() - t0
        after = second.workers_info()["local-0"]
        assert after["pid"] == before["pid"]  # adopted, not started again
        assert _complete(second, "Hello again").status_code == 200
        assert ready_after < 15, f"ready after {ready_after:.1f}s"
        # the worker wrote one "loaded" line in its life (its output still goes to the first log)
        assert len(re.findall(r"loaded \S+ on cpu", first.log_path.read_text())) == 1
        assert "started worker" not in second.log()
    finally:
        if second is not None:
            second.stop()
        first.stop()  # kills the first daemon's process group, where the adopted worker was born
