"""A two-byte KV cache under a float32 model (`[workers] kv_cache_dtype`): the configuration's check, the daemon's
flag to its workers, and the pool the worker builds from it. The kernel's arithmetic over it is tested in
test_attention_kernel.py, and the default model's logits with it in test_smollm2.py."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny_checkpoint

from daemon.cli import build_parser
from daemon.config import ConfigError, WorkersConfig
from daemon.supervisor import LocalWorkers
from protocol.messages import Load
from worker.main import make_loader
from worker.runner import ModelRunner


def test_config_takes_the_model_dtype_or_bfloat16_under_float32():
    for ok in (dict(), dict(kv_cache_dtype="bfloat16"), dict(dtype="float32", kv_cache_dtype="bfloat16"),
               dict(dtype="bfloat16", kv_cache_dtype="bfloat16"), dict(dtype="float16", kv_cache_dtype="float16")):
        WorkersConfig(**ok)
    for bad, match in ((dict(kv_cache_dtype="fp8"), "must be auto"),
                       (dict(kv_cache_dtype="float16"), "for a float32 model, 'bfloat16'"),
                       (dict(dtype="bfloat16", kv_cache_dtype="float32"), "for a float32 model, 'bfloat16'")):
        with pytest.raises(ConfigError, match=match):
            WorkersConfig(**bad)


def test_the_daemon_hands_it_to_its_workers():
    def command(**kw) -> list[str]:
        local = LocalWorkers(WorkersConfig(count=1, device="cpu", **kw), "ipc:///tmp/nimbus-test.sock")
        return local.command(next(iter(local.slots.values())).spec)

    cmd = command(kv_cache_dtype="bfloat16")
    assert cmd[cmd.index("--kv-cache-dtype") + 1] == "bfloat16"
    assert "--kv-cache-dtype" not in command()  # auto: the worker's own default


def test_the_worker_flag_builds_a_bfloat16_pool_of_twice_the_blocks(tmp_path):
    make_tiny_checkpoint("llama", tmp_path / "m")
    args = build_parser().parse_args(["worker", "--connect", "ipc:///tmp/nimbus-test.sock", "--device", "cpu",
                                      "--kv-cache-memory", "4MiB", "--kv-cache-dtype", "bfloat16"])
    executor, _ = make_loader(args)(Load(model=str(tmp_path / "m")), "w")
    runner = executor.runner
    assert (runner.dtype, runner.kv_cache.dtype) == (torch.float32, torch.bfloat16)
    plain = ModelRunner(tmp_path / "m", device="cpu", kv_cache_bytes=4 * 2**20)
    assert plain.kv_cache.dtype == torch.float32
    assert runner.num_blocks in (2 * plain.num_blocks, 2 * plain.num_blocks + 1)
    with pytest.raises(ValueError, match="kv_cache_dtype 'float32' with a bfloat16 model"):
        ModelRunner(tmp_path / "m", device="cpu", dtype="bfloat16", kv_cache_dtype="float32")
