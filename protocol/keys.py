"""CURVE keys for the daemon-worker link: making key pairs, loading them, and the daemon's allow-list.

A keys folder holds, on the daemon's host, `server.key` + `server.key_secret` and `authorized/`, one
public key (`*.key`) per worker allowed in; on a worker's host, its own pair (`worker.key` +
`worker.key_secret`) and a copy of the daemon's public `server.key`. Files are zmq.auth certificates.
"""

from __future__ import annotations

import argparse
import logging
import os
import stat
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import zmq.auth
from zmq.utils import z85

log = logging.getLogger("nimbus.keys")
SERVER = "server"
WORKER = "worker"
AUTHORIZED = "authorized"
REFUSAL_LOG_S = 10.0


class KeyFileError(ValueError):
    """A key file or keys folder is missing, unreadable or not a CURVE certificate."""


@dataclass(frozen=True, slots=True)
class ServerKeys:
    public: bytes  # z85, 40 bytes
    secret: bytes
    authorized: Path  # the allow-list folder


@dataclass(frozen=True, slots=True)
class ClientKeys:
    public: bytes
    secret: bytes
    server: bytes  # the daemon's public key: a worker talks to that daemon only


def generate(directory: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Writes `<name>.key` (public, 0644) and `<name>.key_secret` (0600) into `directory` (made 0700)."""
    folder = Path(directory)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise KeyFileError(f"{path} exists; remove it first to replace that key pair")
    # made in a private temporary folder and moved in: the secret is never readable by others, not even briefly
    with tempfile.TemporaryDirectory(dir=folder, prefix=".keygen-") as tmp:
        made_public, made_secret = map(Path, zmq.auth.create_certificates(tmp, name))
        made_secret.chmod(0o600)
        made_public.chmod(0o644)
        os.replace(made_secret, secret)
        os.replace(made_public, public)
    return public, secret


def _load(path: Path, want_secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise KeyFileError(f"{path} is not a CURVE certificate: {exc}") from None
    for key in (public, secret):
        if key is not None and not _is_z85_key(key):
            raise KeyFileError(f"{path} holds a malformed CURVE key")
    if want_secret and secret is None:
        raise KeyFileError(f"{path} holds no secret key (a .key_secret file is needed)")
    if want_secret and path.stat().st_mode & stat.S_IROTH:
        log.warning("%s is readable by every user: chmod o-r it", path)
    return public, secret


def _is_z85_key(key: bytes) -> bool:
    try:
        return len(key) == 40 and len(z85.decode(key)) == 32
    except (ValueError, KeyError):
        return False


def load_server(directory: str | os.PathLike) -> ServerKeys:
    """The daemon's pair and allow-list folder from a keys folder."""
    folder = Path(directory)
    public, secret = _load(folder / f"{SERVER}.key_secret", want_secret=True)
    authorized = folder / AUTHORIZED
    if not authorized.is_dir():
        log.warning("%s does not exist: no remote worker can attach until it holds their public keys", authorized)
    assert secret is not None
    return ServerKeys(public, secret, authorized)


def load_client(directory: str | os.PathLike) -> ClientKeys:
    """A worker's pair (`worker.key_secret`, else the folder's only other `*.key_secret`) and `server.key`."""
    folder = Path(directory)
    if not folder.is_dir():
        raise KeyFileError(f"keys folder {folder} does not exist")
    mine = folder / f"{WORKER}.key_secret"
    if not mine.exists():
        others = sorted(p for p in folder.glob("*.key_secret") if p.name != f"{SERVER}.key_secret")
        if len(others) != 1:
            found = ", ".join(p.name for p in others) or "none"
            raise KeyFileError(f"{folder} needs this worker's key pair as {WORKER}.key_secret (found: {found}); "
                               f"make one with `nimbus keys generate --dir {folder}`")
        mine = others[0]
    public, secret = _load(mine, want_secret=True)
    server_path = folder / f"{SERVER}.key"
    if not server_path.exists():
        raise KeyFileError(f"{server_path} is missing: copy the daemon's public server.key there")
    server, _ = _load(server_path, want_secret=False)
    assert secret is not None
    return ClientKeys(public, secret, server)


def local_keys_dir(socket_path: str | os.PathLike) -> Path:
    """Where the daemon keeps the pair its local workers use: beside their ipc:// socket."""
    return Path(socket_path).with_suffix(".keys")


def ensure_local_keys(folder: Path, server: ServerKeys) -> ClientKeys:
    """The local workers' pair, made once and kept, so workers adopted after a daemon restart still fit."""
    if not (folder / f"{WORKER}.key_secret").exists():
        generate(folder, WORKER)
    _write_public(folder / f"{SERVER}.key", server.public)
    return load_client(folder)


def _write_public(path: Path, key: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f'# ZeroMQ CURVE public certificate\nmetadata\ncurve\n    public-key = "{key.decode()}"\n')
    tmp.chmod(0o644)
    os.replace(tmp, path)


class AllowList:
    """Which worker public keys may attach: the `*.key` files in a folder, re-read at every handshake (so
    adding or removing a file takes effect without a restart), plus fixed keys (the local workers')."""

    def __init__(self, folder: Path | None, fixed: frozenset[bytes] = frozenset()) -> None:
        self.folder = folder
        self.fixed = fixed
        self.refused = 0
        self._last_warning = -REFUSAL_LOG_S

    def keys(self) -> set[bytes]:
        keys = set(self.fixed)
        if self.folder is None or not self.folder.is_dir():
            return keys
        for path in self.folder.glob("*.key"):
            try:
                keys.add(_load(path, want_secret=False)[0])
            except KeyFileError as exc:
                log.warning("allow-list: skipping %s", exc)
        return keys

    def callback(self, domain: str, key: bytes) -> bool:
        """zmq.auth's credentials provider; runs on the authenticator's thread and must never raise."""
        try:
            allowed = key in self.keys()
        except Exception:  # an exception would end the ZAP thread and stall every later handshake
            log.exception("allow-list check failed; refusing %r", key)
            return False
        if not allowed:
            self.refused += 1
            if time.monotonic() - self._last_warning >= REFUSAL_LOG_S:  # a stranger retrying must not flood the log
                self._last_warning = time.monotonic()
                log.warning("refused a worker: public key %s is not in the allow-list (%d refusals so far)",
                            key.decode(errors="replace"), self.refused)
        return allowed


def run(args: argparse.Namespace) -> int:
    """`nimbus keys generate`: make a key pair and say where each half goes."""
    if args.server and args.name not in (None, SERVER):
        print(f"nimbus keys: the daemon loads its pair as {SERVER}.key_secret; drop --name", file=sys.stderr)
        return 2
    name = args.name or (SERVER if args.server else WORKER)
    folder = Path(args.dir)
    try:
        public, secret = generate(folder, name)
    except (KeyFileError, OSError) as exc:
        print(f"nimbus keys: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {public} (public) and {secret} (secret, mode 0600)")
    if args.server:
        (folder / AUTHORIZED).mkdir(mode=0o700, exist_ok=True)
        print(f"""next steps:
  1. in the daemon's config, [workers]:  keys_dir = "{folder.resolve()}"
     and  bind = "tcp://<this host's address>:5555"
  2. copy {public} (public) into each worker host's keys folder, as server.key
  3. put each worker's public key into {folder.resolve() / AUTHORIZED}/ as <worker host>.key
  4. the daemon must be able to read {secret}; nobody else should""")
    else:
        print(f"""next steps:
  1. copy {public} (public) to the daemon host, into <keys_dir>/{AUTHORIZED}/<this host>.key
  2. copy the daemon's public server.key into {folder}
  3. nimbus worker --connect tcp://<daemon address>:<port> --keys {folder}""")
    return 0
