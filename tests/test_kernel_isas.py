"""The C++ kernels compile for the instruction sets this machine lacks: their AVX-512, AVX512-BF16 and AMX branches
(#ifdef'd on the compiler's target macros) are built only where a worker runs on such a CPU, so without this check
an edit could break them unseen. A syntax-only compile (templates instantiated, nothing generated or run)."""

from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
from torch.utils import cpp_extension

from worker import kernels

# -march -> the target macros it must define, so the branches behind them are the ones compiled: Sapphire Rapids
# has AVX-512 with the bfloat16 dot products and the AMX tiles, the widest set of branches (AVX-512 without them
# compiles the branches this machine's AVX2 build compiles, at 16 floats a vector)
TARGETS = {"sapphirerapids": ("__AVX512F__", "__AVX512BF16__", "__AMX_BF16__")}
# the sources with code of their own for AVX-512 (the bfloat16 products; 8-row blocks of the panel matmul), compiled
# side by side (about 12 s each here); fused_ops.cpp differs there only by vec.h's width, which these include too
SOURCES = (kernels.SOURCE, kernels.LINEAR_SOURCE)
COMPILER = os.environ.get("CXX", "c++")  # the one torch's cpp_extension builds the kernels with


def target_macros(march: str) -> set[str] | None:
    """The macros `COMPILER -march=<march>` predefines, or None if it does not know that target."""
    proc = subprocess.run([COMPILER, f"-march={march}", "-dM", "-E", "-x", "c++", os.devnull],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode:
        return None
    return {line.split()[1] for line in proc.stdout.splitlines() if line.startswith("#define ")}


@pytest.mark.skipif(shutil.which(COMPILER) is None, reason=f"no C++ compiler ({COMPILER})")
def test_kernels_compile_for_avx512():
    jobs = []
    for march, required in TARGETS.items():
        macros = target_macros(march)
        if macros is None:
            pytest.skip(f"{COMPILER} does not know -march={march}")
        assert set(required) <= macros, f"-march={march} lacks {set(required) - macros}"
        # the worker's flags, with the target in place of this machine's (last, so it wins whatever they hold)
        flags = [*(f for f in kernels.CFLAGS if not f.startswith("-march=")), f"-march={march}"]
        includes = [arg for path in cpp_extension.include_paths() for arg in ("-isystem", path)]
        # -std=c++20: what torch 2.13's cpp_extension passes (its headers need it)
        jobs += [(march, src.name, [COMPILER, "-std=c++20", "-fsyntax-only", *flags, *includes,
                                    "-DTORCH_EXTENSION_NAME=isa_check", str(src)]) for src in SOURCES]

    def compile_one(cmd: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(pool.map(compile_one, [cmd for _, _, cmd in jobs]))
    failed = [f"-march={march} {name}:\n{proc.stderr[-3000:]}"
              for (march, name, _), proc in zip(jobs, results) if proc.returncode]
    assert not failed, "\n\n".join(failed)
