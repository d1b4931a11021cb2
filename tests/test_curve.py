"""Workers over TCP with CURVE: key files, the plain-TCP rules, the transport's allow-list, and a real
daemon on loopback that admits an allow-listed worker and nobody else."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import zmq
import zmq.asyncio
from server import ROOT, NimbusServer, free_port

from daemon.config import ConfigError, load_config
from protocol import keys, transport
from protocol.keys import AllowList, KeyFileError
from protocol.messages import Error
from protocol.transport import DealerEndpoint, RouterEndpoint, check_plain_link

# ------------------------------------------------------------------ key files


def make_keys(root: Path) -> dict[str, Path]:
    """A daemon's keys folder, an allow-listed worker's, and a stranger's (valid pair, not allow-listed)."""
    server, good, stranger = root / "server", root / "worker", root / "stranger"
    server_public, _ = keys.generate(server, keys.SERVER)
    (server / keys.AUTHORIZED).mkdir()
    for folder in (good, stranger):
        keys.generate(folder, keys.WORKER)
        (folder / "server.key").write_bytes(server_public.read_bytes())
    (server / keys.AUTHORIZED / "worker.key").write_bytes((good / "worker.key").read_bytes())
    return {"server": server, "good": good, "stranger": stranger}


def test_generate_writes_a_private_secret_and_refuses_to_overwrite(tmp_path):
    public, secret = keys.generate(tmp_path / "k", "worker")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o700
    assert not list((tmp_path / "k").glob(".keygen-*"))  # the temporary folder is gone
    with pytest.raises(KeyFileError, match="exists"):
        keys.generate(tmp_path / "k", "worker")


def test_loading_says_what_is_missing(tmp_path):
    folders = make_keys(tmp_path)
    server = keys.load_server(folders["server"])
    client = keys.load_client(folders["good"])
    assert client.server == server.public and len(client.secret) == 40
    (folders["good"] / "server.key").unlink()
    with pytest.raises(KeyFileError, match="copy the daemon's public server.key"):
        keys.load_client(folders["good"])
    with pytest.raises(KeyFileError, match="worker.key_secret"):
        keys.load_client(tmp_path)
    with pytest.raises(KeyFileError, match="cannot read"):
        keys.load_server(folders["good"])
    (folders["stranger"] / "server.key").write_text("public-key = \"nonsense\"\n")
    with pytest.raises(KeyFileError, match="malformed"):
        keys.load_client(folders["stranger"])


def test_keys_command_generates_a_server_folder(tmp_path):
    out = subprocess.run([sys.executable, "-m", "daemon.cli", "keys", "generate", "--dir", str(tmp_path / "k"),
                          "--server"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "k" / "server.key_secret").exists() and (tmp_path / "k" / "authorized").is_dir()
    assert "next steps" in out.stdout and "authorized" in out.stdout


# ------------------------------------------------------------------ plain TCP rules


@pytest.mark.parametrize(("address", "allow", "ok"), [
    ("ipc:///run/nimbus/workers.sock", False, True),
    ("tcp://127.0.0.1:5555", False, False),
    ("tcp://127.0.0.1:5555", True, True),
    ("tcp://127.9.8.7:5555", True, True),
    ("tcp://[::1]:5555", True, True),
    ("tcp://localhost:5555", True, False),  # a name may resolve anywhere
    ("tcp://0.0.0.0:5555", True, False),
    ("tcp://*:5555", True, False),
    ("tcp://10.0.0.5:5555", True, False),
    ("udp://127.0.0.1:5555", True, False),
])
def test_plain_links(address, allow, ok):
    if ok:
        check_plain_link(address, allow)
    else:
        with pytest.raises(ValueError):
            check_plain_link(address, allow)


def test_config_refuses_plain_tcp_binds():
    with pytest.raises(ConfigError, match="workers.bind without workers.keys_dir"):
        load_config(None, {"workers": {"bind": "tcp://127.0.0.1:5555"}})
    with pytest.raises(ConfigError, match="loopback"):
        load_config(None, {"workers": {"bind": "tcp://0.0.0.0:5555", "allow_plain_tcp": True}})
    assert load_config(None, {"workers": {"bind": "tcp://127.0.0.1:5555", "allow_plain_tcp": True}}).workers.bind
    # with keys, any address the operator names, all interfaces included
    assert load_config(None, {"workers": {"bind": "tcp://*:5555", "keys_dir": "/etc/nimbus/keys"}}).workers.bind


# ------------------------------------------------------------------ the transport


class Link:
    """A CURVE RouterEndpoint on loopback TCP and blocking DealerEndpoints attached to it."""

    def __init__(self, folders: dict[str, Path], max_bytes: int = 1 << 20) -> None:
        self.actx = zmq.asyncio.Context()
        self.ctx = zmq.Context()
        server = keys.load_server(folders["server"])
        self.router = RouterEndpoint(self.actx, max_bytes=max_bytes, curve=server, allow=AllowList(server.authorized))
        self.address = self.router.bind("tcp://127.0.0.1:0")
        self.dealers: list[DealerEndpoint] = []

    def dealer(self, name: str, curve: keys.ClientKeys | None) -> DealerEndpoint:
        d = DealerEndpoint(self.ctx, name.encode(), self.address, curve=curve)
        self.dealers.append(d)
        return d

    async def frames(self, seconds: float) -> list[tuple[bytes, bytes]]:
        got = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                got.append(await asyncio.wait_for(self.router.recv(), left))
        return got

    def close(self) -> None:
        for d in self.dealers:
            d.close()
        self.router.close()
        self.ctx.term()
        self.actx.term()


def _watch(dealer: DealerEndpoint, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        dealer.recv(timeout_ms=50)  # runs the handshake watcher


def test_only_allow_listed_keys_get_through(tmp_path, monkeypatch):
    monkeypatch.setattr(transport, "REFUSED_RETRY_S", 0.3)
    folders = make_keys(tmp_path)

    async def main():
        link = Link(folders)
        try:
            good = link.dealer("good", keys.load_client(folders["good"]))
            stranger = link.dealer("stranger", keys.load_client(folders["stranger"]))
            plain = link.dealer("plain", None)
            for d in (good, stranger, plain):
                d.send(Error(code="x", message=d.sock.identity.decode()))
            got = await link.frames(1.5)
            assert [identity for identity, _ in got] == [b"good"]
            _watch(stranger, 0.2)
            assert stranger.refused and not good.refused
            # allow-listed later: the refused worker gets in on its next retry, without a restart
            (folders["server"] / "authorized" / "late.key").write_bytes((folders["stranger"] / "worker.key").read_bytes())
            _watch(stranger, 0.6)
            stranger.send(Error(code="x", message="late"))
            assert [identity for identity, _ in await link.frames(1.5)] == [b"stranger"]
            assert not stranger.refused
        finally:
            link.close()

    asyncio.run(main())


def test_garbage_and_oversized_frames_do_not_hurt_the_router(tmp_path):
    folders = make_keys(tmp_path)

    async def main():
        link = Link(folders, max_bytes=4096)
        try:
            host, port = link.address.removeprefix("tcp://").rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=5) as raw:
                raw.sendall(os.urandom(20000))  # not ZMTP: libzmq drops the connection
                raw.settimeout(5)
                with contextlib.suppress(OSError):
                    while raw.recv(4096):
                        pass
            big = link.dealer("big", keys.load_client(folders["good"]))
            big.sock.send(b"\x00" * 10000)  # over MAXMSGSIZE: the daemon's libzmq disconnects it
            assert await link.frames(1.0) == []
            good = link.dealer("good", keys.load_client(folders["good"]))
            good.send(Error(code="x", message="still here"))
            assert [identity for identity, _ in await link.frames(1.5)] == [b"good"]
        finally:
            link.close()

    asyncio.run(main())


# ------------------------------------------------------------------ a real daemon


class Head(NimbusServer):
    """A daemon that may start with no worker: ready once HTTP answers."""

    def ready(self) -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(self.url + "/health", timeout=2).status_code == 200
        return False


def start_worker(model: Path, address: str, worker_id: str, log: Path, *flags: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "daemon.cli", "worker", "--connect", address, "--model", str(model),
           "--worker-id", worker_id, "--null-model", "--orphan-timeout", "60", *flags]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    for proc in procs:
        proc.wait(timeout=10)


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def head_config(tmp: Path, bind: str, keys_dir: Path | None = None, plain: bool = False) -> str:
    lines = ['device = "cpu"', "null_model = true", f'bind = "{bind}"']
    lines += [f'keys_dir = "{keys_dir}"'] if keys_dir else []
    lines += ["allow_plain_tcp = true"] if plain else []
    return "[workers]\n" + "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def model():
    from daemon.models import pull

    return pull()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_remote_worker_attaches_with_curve_and_strangers_do_not(tmp_path, model):
    folders = make_keys(tmp_path / "keys")
    other_daemon = make_keys(tmp_path / "other")  # an allow-listed pair, but another daemon's server.key
    (folders["server"] / "authorized" / "other.key").write_bytes((other_daemon["good"] / "worker.key").read_bytes())
    address = f"tcp://127.0.0.1:{free_port()}"
    procs: list[subprocess.Popen] = []
    with Head(model, workers=0, config=head_config(tmp_path, address, folders["server"]), tmp=tmp_path) as head:
        try:
            procs.append(start_worker(model, address, "remote-good", tmp_path / "good.log", "--keys",
                                      str(folders["good"])))
            procs.append(start_worker(model, address, "remote-stranger", tmp_path / "stranger.log", "--keys",
                                      str(folders["stranger"])))
            procs.append(start_worker(model, address, "remote-wrong-server", tmp_path / "wrong.log", "--keys",
                                      str(other_daemon["good"])))
            procs.append(start_worker(model, address, "remote-plain", tmp_path / "plain.log", "--allow-plain-tcp"))
            assert wait_for(lambda: "remote-good" in head.workers_info(), 60), head.log()
            time.sleep(5)  # the others had as long as the good one, and more
            assert set(head.workers_info()) == {"remote-good"}, head.log()
            assert "refused this worker's key" in (tmp_path / "stranger.log").read_text()
            assert all(p.poll() is None for p in procs)  # refused workers keep retrying; nothing crashed
            # garbage on the worker port: dropped by libzmq, the daemon goes on
            host, port = address.removeprefix("tcp://").rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=5) as raw:
                raw.sendall(os.urandom(50000))
            body = {"model": "SmolLM2-135M-Instruct", "prompt": "Hello", "max_tokens": 4}
            r = httpx.post(head.url + "/v1/completions", json=body, timeout=30)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 4
            info = head.workers_info()
            assert set(info) == {"remote-good"} and info["remote-good"]["state"] == "up"
            assert info["remote-good"]["steps"] > 0
        finally:
            stop(procs)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_local_workers_use_a_generated_pair(tmp_path, model):
    folders = make_keys(tmp_path / "keys")
    config = f'[workers]\ndevice = "cpu"\nnull_model = true\nkeys_dir = "{folders["server"]}"\n'
    with NimbusServer(model, workers=1, config=config, tmp=tmp_path) as head:
        pair = tmp_path / "run" / f"workers-{head.port}.keys"
        assert stat.S_IMODE((pair / "worker.key_secret").stat().st_mode) == 0o600
        assert keys.load_client(pair).server == keys.load_server(folders["server"]).public
        body = {"model": "SmolLM2-135M-Instruct", "prompt": "Hello", "max_tokens": 4}
        r = httpx.post(head.url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text


@pytest.mark.timeout(60)
def test_worker_cli_refuses_plain_tcp(tmp_path):
    out = subprocess.run([sys.executable, "-m", "daemon.cli", "worker", "--connect", "tcp://10.0.0.5:5555"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--connect without --keys" in out.stderr
    out = subprocess.run([sys.executable, "-m", "daemon.cli", "worker", "--connect", "tcp://10.0.0.5:5555",
                          "--allow-plain-tcp"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "loopback" in out.stderr
    out = subprocess.run([sys.executable, "-m", "daemon.cli", "worker", "--connect", "tcp://10.0.0.5:5555",
                          "--keys", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "worker.key_secret" in out.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("bind", "plain", "message"), [
    ("tcp://127.0.0.1:{port}", False, "workers.bind without workers.keys_dir"),
    ("tcp://0.0.0.0:{port}", True, "loopback address only"),
    ("tcp://*:{port}", True, "loopback address only"),
])
def test_daemon_refuses_plain_tcp_binds_at_start(tmp_path, bind, plain, message):
    config = tmp_path / "nimbus.toml"
    config.write_text(head_config(tmp_path, bind.format(port=free_port()), plain=plain))
    out = subprocess.run([sys.executable, "-m", "daemon.cli", "serve", str(tmp_path), "--port", str(free_port()),
                          "--config", str(config)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and message in out.stderr


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_plain_tcp_on_loopback_when_allowed(tmp_path, model):
    address = f"tcp://127.0.0.1:{free_port()}"
    procs: list[subprocess.Popen] = []
    with Head(model, workers=0, config=head_config(tmp_path, address, plain=True), tmp=tmp_path) as head:
        try:
            procs.append(start_worker(model, address, "plain-ok", tmp_path / "plain.log", "--allow-plain-tcp"))
            assert wait_for(lambda: "plain-ok" in head.workers_info(), 60), head.log()
        finally:
            stop(procs)
