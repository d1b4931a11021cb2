"""`nimbus pull`: converting the default model once, the cache's idempotence, and model name resolution."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon import models
from daemon.models import DEFAULT_MODEL, ModelNotFoundError, pull, resolve_model

NIMBUS = Path(sys.executable).parent / "nimbus"


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real conversion per test session, into a private cache."""
    cache = tmp_path_factory.mktemp("models")
    pull(cache=cache)
    return cache


def _snapshot(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_pull_writes_a_complete_folder(cache: Path) -> None:
    folder = cache / DEFAULT_MODEL
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
        models.MARKER,
    ):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True
    assert config["max_position_embeddings"] == 8192
    assert "quantization_config" not in config
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_cfg["chat_template"]
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    gen = json.loads((folder / "generation_config.json").read_text())
    assert gen["eos_token_id"][0] == 2 and gen["pad_token_id"] == 2
    assert json.loads((folder / models.MARKER).read_text())["version"] == "0.1.2"
    assert not [p for p in cache.iterdir() if p.name.endswith(".partial")]


def test_chat_template_has_default_system_prompt(cache: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cache / DEFAULT_MODEL)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n")


def test_second_pull_is_instant_and_touches_nothing(cache: Path) -> None:
    folder = cache / DEFAULT_MODEL
    before = _snapshot(folder)
    start = time.monotonic()
    assert pull("smollm2-135m-instruct", cache) == folder
    assert time.monotonic() - start < 1.0
    assert _snapshot(folder) == before


def test_cli_prints_the_folder(cache: Path) -> None:
    out = subprocess.run(
        [str(NIMBUS), "pull", "--cache-dir", str(cache)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [str(cache / DEFAULT_MODEL)]


def test_resolve_model(cache: Path, tmp_path: Path) -> None:
    folder = cache / DEFAULT_MODEL
    assert resolve_model(None, cache) == folder
    assert resolve_model("SMOLLM2-135M-INSTRUCT", cache) == folder
    assert resolve_model(str(folder)) == folder.resolve()
    with pytest.raises(ModelNotFoundError, match="nimbus pull SmolLM2-135M-Instruct"):
        resolve_model(DEFAULT_MODEL, tmp_path / "empty-cache")
    with pytest.raises(ModelNotFoundError, match=DEFAULT_MODEL):
        resolve_model("no-such-model", cache)
    with pytest.raises(ModelNotFoundError, match="no such checkpoint folder"):
        resolve_model(str(tmp_path / "missing"), cache)
    (tmp_path / "weights-only").mkdir()
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_model(str(tmp_path / "weights-only"), cache)


def test_unknown_name_is_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="unknown model"):
        pull("gpt-5", tmp_path)
    assert not any(tmp_path.iterdir())


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NIMBUS_HOME", str(tmp_path / "home"))
    assert models.cache_dir() == tmp_path / "home" / "models"
    monkeypatch.delenv("NIMBUS_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "nimbus" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert models.cache_dir() == Path.home() / ".cache" / "nimbus" / "models"


def test_failed_conversion_leaves_no_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bogus = tmp_path / "broken.gguf"
    bogus.write_bytes(b"not a gguf file")
    monkeypatch.setattr(models, "_find_gguf", lambda source: bogus)
    cache = tmp_path / "models"
    with pytest.raises(ModelNotFoundError, match="failed"):
        pull(cache=cache)
    assert sorted(p.name for p in cache.iterdir()) == [".pull.lock"]


def test_models_module_stays_light() -> None:
    code = "import sys, daemon.models; sys.exit(sorted({'torch', 'transformers'} & set(sys.modules)) or 0)"
    assert subprocess.run([sys.executable, "-c", code], timeout=30).returncode == 0
