"""Builds and loads the worker's C++ CPU kernels (worker/csrc: paged attention, fused elementwise ops, float32
linear) at first use, one library per source file, cached on disk.

The build is tuned for the CPU it runs on (-march=native), so the cache key holds the source, the flags,
the torch version and this CPU's feature flags: a cache copied to another machine is rebuilt, not reused.
A file lock serialises workers that start together; the first builds, the others load its result.

    python -m worker.kernels    # build now (make install does this) and print where and how long
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "paged_attention.cpp"
FUSED_SOURCE = Path(__file__).parent / "csrc" / "fused_ops.cpp"
LINEAR_SOURCE = Path(__file__).parent / "csrc" / "linear.cpp"
# -fopenmp: at::parallel_for is a header template that runs serially unless the extension itself is built with
# OpenMP; the libgomp it links is the one torch has loaded already (same soname), so there is one thread pool
CFLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fopenmp")
LDFLAGS = ("-fopenmp",)


def cache_root() -> Path:
    """$NIMBUS_HOME/kernels, else $XDG_CACHE_HOME/nimbus/kernels, else ~/.cache/nimbus/kernels."""
    if home := os.environ.get("NIMBUS_HOME"):
        return Path(home) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nimbus" / "kernels"


def cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):  # x86, Arm
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def build_key(source: Path = SOURCE) -> str:
    h = hashlib.sha256(source.read_bytes())
    for header in sorted(source.parent.glob("*.h")):  # the sources include these
        h.update(header.read_bytes())
    for part in (*CFLAGS, *LDFLAGS, torch.__version__, str(torch.compiled_with_cxx11_abi()), platform.machine(),
                 cpu_flags(), os.environ.get("CXX", "c++")):
        h.update(b"\0" + part.encode())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """torch runs `ninja` from PATH; the pip-installed one sits beside this interpreter, maybe not on PATH."""
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), old])
    try:
        yield
    finally:
        os.environ["PATH"] = old


def build(source: Path = SOURCE, root: Path | None = None) -> Path:
    """Returns the shared library for `source`, building it first unless the cache already holds it."""
    name = f"nimbus_{source.stem}_{build_key(source)}"
    folder = (root or cache_root()) / name
    lib = folder / f"{name}.so"
    if lib.exists():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if lib.exists():  # another worker built it while we waited
            return lib
        from torch.utils import cpp_extension

        t0 = time.perf_counter()
        work = folder / "build"
        shutil.rmtree(work, ignore_errors=True)  # leftovers of a build that died half way
        work.mkdir()
        with _ninja_on_path():
            built = cpp_extension.load(name, [str(source)], extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS),
                                       build_directory=str(work),
                                       is_python_module=False, verbose=False)
        # publish atomically: a library that exists is complete
        os.replace(built, lib)
        log.info("built %s in %.1f s", lib, time.perf_counter() - t0)
    return lib


def _load(source: Path, op: str) -> Callable[..., None]:
    """torch.ops.nimbus.<op>, building and loading `source`'s library first unless this process has it."""
    lib = build(source)
    if not hasattr(torch.ops.nimbus, op):  # load() has loaded it already when it built it
        torch.ops.load_library(str(lib))
    return getattr(torch.ops.nimbus, op)


@functools.cache
def paged_attention() -> Callable[..., None]:
    """torch.ops.nimbus.paged_attention, building and loading its library once per process.

    (out, q, k, v, kv_cache, slot_mapping, block_tables, query_start, context_lens, scale) -> None;
    see worker/csrc/paged_attention.cpp for the layouts."""
    return _load(SOURCE, "paged_attention")


@functools.cache
def fused_ops() -> Any:
    """torch.ops.nimbus, once worker/csrc/fused_ops.cpp is built and loaded: rms_norm, fused_add_rms_norm,
    silu_and_mul and rotary (see that file for their contracts)."""
    _load(FUSED_SOURCE, "fused_add_rms_norm")
    return torch.ops.nimbus


@functools.cache
def linear_ops() -> Any:
    """torch.ops.nimbus, once worker/csrc/linear.cpp is built and loaded: pack_linear and linear (see that file)."""
    _load(LINEAR_SOURCE, "pack_linear")
    return torch.ops.nimbus


def main() -> int:
    """Builds every kernel library; exits 1 if one could not be built (workers then use the torch paths)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    failed = 0
    for source in (SOURCE, FUSED_SOURCE, LINEAR_SOURCE):
        t0 = time.perf_counter()
        try:
            lib = build(source)
        except Exception as e:  # report each library: one failing must not hide whether the other built
            print(f"{source.name} not built: {e}", file=sys.stderr)
            failed = 1
            continue
        print(f"{lib} ready in {time.perf_counter() - t0:.1f} s")
    return failed


if __name__ == "__main__":
    raise SystemExit(main())
