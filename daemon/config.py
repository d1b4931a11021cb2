"""Nimbus configuration: small frozen dataclasses, one per component, read from one TOML file.

Precedence: built-in defaults < the TOML file (`--config`) < command-line flags. Each component
receives only its own section.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from daemon.deployments import DeploymentError, DeploymentSpec, parse_deployments
from daemon.scheduler import SchedulerConfig
from protocol.transport import check_plain_link


class ConfigError(ValueError):
    """The configuration file or a flag holds something Nimbus cannot use."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 4 * 1024 * 1024
    # requests waiting for a slot, per model, before new ones get 429
    max_waiting_requests: int = 512
    # a request that finds no live replica (or loses its worker) waits this long for one before 503
    replica_wait_s: float = 30.0
    # SIGTERM: in-flight requests get this long to finish before the daemon exits
    drain_timeout_s: float = 30.0
    log_format: str = "json"  # or "text"
    log_level: str = "INFO"
    log_prompts: bool = False  # prompt and output text in the request log: off, they may be private
    # auth (daemon/auth.py); prefer key files readable only by the service user
    api_keys: tuple[str, ...] = ()  # none (and no file, no $NIMBUS_API_KEY): everything but /admin is open
    api_key_files: tuple[str, ...] = ()
    admin_keys: tuple[str, ...] = ()  # none (and no file, no $NIMBUS_ADMIN_KEY): the admin API answers 403
    admin_key_files: tuple[str, ...] = ()
    metrics_public: bool = False  # /metrics without a key
    # slow, idle and too many clients (daemon/httpserver.py)
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    keepalive_timeout_s: float = 75.0
    max_connections: int = 1024
    backlog: int = 512

    def __post_init__(self) -> None:
        _positive(self, "port", "max_body_bytes", "max_waiting_requests", "header_timeout_s", "body_timeout_s",
                  "keepalive_timeout_s", "max_connections", "backlog", "drain_timeout_s")
        if not 0 < self.port < 65536:
            raise ConfigError(f"server.port {self.port} is not a TCP port")
        for name in ("api_keys", "api_key_files", "admin_keys", "admin_key_files"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"server.{name} must be a list of strings")
            object.__setattr__(self, name, tuple(value))


@dataclass(frozen=True, slots=True)
class ModelConfig:
    model: str | None = None  # a checkpoint folder or a name `nimbus pull` knows; None = the default
    served_model_name: str | None = None  # default: the folder's name
    max_model_len: int | None = None  # default: what the workers report


@dataclass(frozen=True, slots=True)
class WorkersConfig:
    count: int | None = None  # local worker processes; None = one per GPU, or 1 on a CPU-only host
    device: str | None = None  # cpu, cuda (one worker per visible GPU) or cuda:N
    dtype: str | None = None
    kv_cache_memory: str = "2GiB"  # per worker, on CPU; GPUs use a fraction of free memory
    # "auto": the model's dtype; "bfloat16" under a float32 model holds twice the sequences (vLLM's kv_cache_dtype)
    kv_cache_dtype: str = "auto"
    threads: int | None = None  # torch threads per CPU worker; None = the cores split between workers
    block_size: int = 16
    runtime_dir: str | None = None  # where the ipc:// socket lives; default $XDG_RUNTIME_DIR/nimbus
    bind: str | None = None  # extra tcp://HOST:PORT for workers on other hosts; none by default
    # CURVE on the workers' socket: server.key_secret plus authorized/ (allowed worker public keys) in here
    keys_dir: str | None = None
    allow_plain_tcp: bool = False  # lets `bind` go without keys, on a loopback address only (tests, one box)
    startup_timeout_s: float = 300.0
    null_model: bool = False  # workers answer instantly with a fixed token: measures the daemon alone
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 5.0  # silent this long: declared dead
    step_timeout_s: float = 120.0  # one step running this long while heartbeats flow: hung, declared dead
    lease_s: float = 5.0  # a worker without the daemon's echo this long drops its work and registers again
    orphan_timeout_s: float = 600.0  # a worker without any daemon this long exits
    max_restarts: int = 5  # quick failures in a row before a local worker is left down (crash loop)
    restart_backoff_s: float = 1.0  # first restart delay, doubled per quick failure (at most 30 s)
    fault: str | None = None  # fault injection for tests and drills (see worker/faults.py)
    # local workers a rollout may start beyond `count` (surge replicas); None: 1 on a CPU host, 0 on GPUs
    max_extra: int | None = None
    load_timeout_s: float = 300.0  # a worker told to load a model must serve it within this

    def __post_init__(self) -> None:
        if self.max_extra is not None and self.max_extra < 0:
            raise ConfigError("workers.max_extra must be >= 0")
        if self.count is not None and self.count < 0:
            raise ConfigError("workers.count must be >= 0")
        _positive(self, "block_size", "startup_timeout_s", "step_timeout_s", "heartbeat_interval_s", "load_timeout_s",
                  "heartbeat_timeout_s", "lease_s", "orphan_timeout_s", "restart_backoff_s")
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ConfigError("workers.heartbeat_timeout_s must exceed workers.heartbeat_interval_s")
        if self.bind is not None:
            _check_bind(self.bind, self.keys_dir, self.allow_plain_tcp)
        _check_kv_dtype(self.kv_cache_dtype, self.dtype)


@dataclass(frozen=True, slots=True)
class ControlConfig:
    """Deployments' control loop and state (daemon/control.py)."""

    state_db: str | None = None  # SQLite file; default $STATE_DIRECTORY/nimbus.db or ~/.local/state/nimbus/nimbus.db
    interval_s: float = 1.0  # how often rollouts step and replicas are reconciled

    def __post_init__(self) -> None:
        _positive(self, "interval_s")


@dataclass(frozen=True, slots=True)
class NimbusConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    # [[deployments]]: what to serve; none configured = one deployment of [model] (daemon/serve.py)
    deployments: tuple[DeploymentSpec, ...] = ()


_SECTIONS = {f.name: f.default_factory for f in fields(NimbusConfig) if f.name != "deployments"}  # type: ignore[misc]


def _check_kv_dtype(kv: str, dtype: str | None) -> None:
    """The worker's rule (worker/runner.py kv_dtype), checked at start: the model's dtype, or bfloat16 under
    float32 (an unset dtype is float32 on CPU and bfloat16 on GPU: bfloat16 suits both)."""
    if kv not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"workers.kv_cache_dtype must be auto, float32, bfloat16 or float16, not {kv!r}")
    if kv not in ("auto", dtype) and not (kv == "bfloat16" and dtype in (None, "float32")):
        raise ConfigError(f"workers.kv_cache_dtype = {kv!r} with workers.dtype = {dtype or 'the default'!r}: "
                          f"use 'auto' (the model's dtype) or, for a float32 model, 'bfloat16'")


def _check_bind(bind: str, keys_dir: str | None, allow_plain_tcp: bool) -> None:
    """A remote-worker address: tcp:// (any address the operator names, wildcards included) with keys;
    without keys, only ipc:// or a loopback address with allow_plain_tcp."""
    if not isinstance(bind, str) or not bind.startswith(("tcp://", "ipc://")):
        raise ConfigError(f"workers.bind must be tcp://HOST:PORT (or ipc://PATH), not {bind!r}")
    if keys_dir is None:
        try:
            check_plain_link(bind, allow_plain_tcp)
        except ValueError as exc:
            raise ConfigError(f"workers.bind without workers.keys_dir: {exc} "
                              "(settings: workers.keys_dir, workers.allow_plain_tcp)") from None


def _positive(obj: object, *names: str) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise ConfigError(f"{type(obj).__name__}.{name} must be positive")


def _section(cls: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown setting(s) in [{where}]: {', '.join(sorted(unknown))}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:  # a missing or extra field, or a value its own checks refuse
        raise ConfigError(f"[{where}]: {exc}") from None


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, dict[str, Any]] | None = None) -> NimbusConfig:
    """Defaults, then the TOML file, then `overrides` ({section: {key: value}}, None values ignored)."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from None
    try:
        deployments = parse_deployments(raw.pop("deployments", []))
    except DeploymentError as exc:
        raise ConfigError(f"[[deployments]]: {exc}") from None
    unknown = set(raw) - set(_SECTIONS)
    if unknown:
        raise ConfigError(f"unknown section(s): {', '.join(sorted(unknown))} "
                          f"(known: {', '.join(_SECTIONS)}, deployments)")
    sections = {}
    for name, factory in _SECTIONS.items():
        values = dict(raw.get(name, {}))
        values.update({k: v for k, v in (overrides or {}).get(name, {}).items() if v is not None})
        default = factory()
        sections[name] = _section(type(default), values, name) if values else default
    return NimbusConfig(**sections, deployments=deployments)


def with_overrides(config: NimbusConfig, section: str, **values: Any) -> NimbusConfig:
    return replace(config, **{section: replace(getattr(config, section), **values)})
