"""`nimbus serve`: the daemon process: config, model, ZeroMQ endpoint, local workers, HTTP server.

Start-up adopts workers an earlier daemon left running (they say Hello again within seconds), starts
the missing ones, and serves. SIGTERM drains: new requests get 503, in-flight ones finish up to a
deadline, workers are told to shut down, and the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import uvloop
import zmq.asyncio
from aiohttp import web

from daemon import systemd
from daemon.api import ApiState, make_app
from daemon.auth import auth_middleware, load_keys
from daemon.config import ConfigError, NimbusConfig, ServerConfig, WorkersConfig, load_config
from daemon.control import Control
from daemon.deployments import DeploymentError, DeploymentSpec, VersionSpec
from daemon.engine import Engine, HealthConfig
from daemon.httpserver import HttpLimits, start_http
from daemon.metrics import Metrics
from daemon.models import resolve_model
from daemon.store import Store, StoreConfig, StoreError
from daemon.supervisor import LocalWorkers, plan_workers
from protocol import keys
from protocol.logs import configure as configure_logging
from protocol.transport import RouterEndpoint

log = logging.getLogger("nimbus.serve")


def runtime_dir(configured: str | None) -> Path:
    default = os.path.join(os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/nimbus-{os.getuid()}", "nimbus")
    # under systemd RuntimeDirectory=nimbus sets this to /run/nimbus, which survives a daemon restart
    path = Path(configured or os.environ.get("RUNTIME_DIRECTORY") or default)
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)  # only the service user may reach the workers' socket
    return path


def worker_endpoint(ctx: zmq.asyncio.Context, workers: WorkersConfig, socket_path: Path) -> RouterEndpoint:
    """The workers' ROUTER. With workers.keys_dir it is a CURVE server that admits the keys in
    authorized/ and the pair kept beside the ipc:// socket for local workers: CURVE is per socket, not
    per address, so local workers hold keys too (one socket keeps the engine's one endpoint)."""
    if workers.keys_dir is None:
        return RouterEndpoint(ctx)
    try:
        server = keys.load_server(workers.keys_dir)
        local = keys.ensure_local_keys(keys.local_keys_dir(socket_path), server)
    except (keys.KeyFileError, OSError) as exc:
        raise ConfigError(f"workers.keys_dir: {exc}") from None
    return RouterEndpoint(ctx, curve=server, allow=keys.AllowList(server.authorized, frozenset({local.public})))


def config_from_args(args: argparse.Namespace) -> NimbusConfig:
    return load_config(args.config, {
        "server": {"host": args.host, "port": args.port, "log_format": args.log_format},
        "model": {"model": args.model, "served_model_name": args.served_model_name},
        "workers": {"count": args.workers},
    })


def health_config(config: NimbusConfig) -> HealthConfig:
    w = config.workers
    return HealthConfig(heartbeat_interval_s=w.heartbeat_interval_s, heartbeat_timeout_s=w.heartbeat_timeout_s,
                        step_timeout_s=w.step_timeout_s, placement_timeout_s=config.server.replica_wait_s,
                        load_timeout_s=w.load_timeout_s)


def configured_deployments(config: NimbusConfig, folder: Path | None) -> tuple[DeploymentSpec, ...]:
    """[[deployments]] as written; without any, one deployment of [model]: the served name, version
    "default", one replica per planned local worker."""
    if config.deployments:
        return config.deployments
    assert folder is not None
    replicas = len(plan_workers(config.workers))
    try:
        version = VersionSpec("default", str(folder), replicas=max(replicas, 0),
                              max_model_len=config.model.max_model_len)
        return (DeploymentSpec(config.model.served_model_name or folder.name, (version,)),)
    except DeploymentError as exc:
        raise ConfigError(str(exc)) from None


def open_store(config: NimbusConfig) -> Store:
    path = StoreConfig(config.control.state_db).resolve()
    try:
        return Store(path)
    except StoreError as exc:
        raise ConfigError(f"control.state_db: {exc}") from None


def need_worker(engine: Engine, workers: LocalWorkers, settle_s: float) -> Callable[[], None]:
    """The engine's call when a replica waits for a worker: start one more local worker, if after `settle_s`
    (a control round or two: a worker may be on its way, or the replica no longer wanted) one still waits,
    no local worker is starting, and the cap allows."""
    scheduled: set[asyncio.Task] = set()

    async def later() -> None:
        await asyncio.sleep(settle_s)
        registered = {r.worker_id for r in engine.live()} | set(engine.idle)
        starting = any(wid not in registered and slot.state in ("starting", "running", "backoff")
                       for wid, slot in workers.slots.items())
        waiting = any(p.worker_id is None for p in engine.pending.values())
        if waiting and not starting and not engine.spares() and len(workers.slots) < workers.max_count:
            await workers.add()

    def need() -> None:
        if not scheduled:
            task = asyncio.get_running_loop().create_task(later(), name="add-worker")
            scheduled.add(task)
            task.add_done_callback(scheduled.discard)
    return need


async def retire_spares(engine: Engine, workers: LocalWorkers, interval_s: float) -> None:
    """A rollout's surge workers stay spare after it ends; beyond the planned count, stop them."""
    while True:
        await asyncio.sleep(interval_s)
        if engine.pending or len(workers.slots) <= workers.planned:
            continue
        spares = [wid for wid in engine.spares() if wid in workers.slots]
        if spares:
            engine.forget(spares[-1])
            await workers.retire(spares[-1])


async def adopt_running_workers(engine: Engine, wait_s: float) -> dict[str, int]:
    """Give workers left by an earlier daemon time to register again; returns {worker_id: pid}."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return {r.worker_id: r.hello.pid for r in engine.live()}


def http_auth(server: ServerConfig):
    try:
        api = load_keys(server.api_keys, server.api_key_files, env_var="NIMBUS_API_KEY")
        admin = load_keys(server.admin_keys, server.admin_key_files, env_var="NIMBUS_ADMIN_KEY")
        public = frozenset({"/health", "/ready", *(["/metrics"] if server.metrics_public else [])})
        return auth_middleware(api, admin, public)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


async def notify_ready(engine: Engine, status: str) -> None:
    """READY=1 to systemd once a worker has registered; started after the HTTP site listens."""
    while not await engine.wait_ready(60.0):
        systemd.notify("STATUS=listening; waiting for a worker to register")
    systemd.notify("READY=1", f"STATUS={status}")


async def serve(config: NimbusConfig, folder: Path | None, stop: asyncio.Event | None = None) -> None:
    auth = http_auth(config.server)  # bad keys fail before any socket is bound
    deployments = configured_deployments(config, folder)
    store = open_store(config)
    ctx = zmq.asyncio.Context()
    socket_path = runtime_dir(config.workers.runtime_dir) / f"workers-{config.server.port}.sock"
    endpoint = worker_endpoint(ctx, config.workers, socket_path)
    earlier_daemon = socket_path.exists()  # left behind when a daemon died without closing it
    address = endpoint.bind(f"ipc://{socket_path}")
    if config.workers.bind:
        try:
            remote = endpoint.bind(config.workers.bind)
        except zmq.ZMQError as exc:
            endpoint.close()
            raise ConfigError(f"cannot bind workers.bind {config.workers.bind}: {exc}") from None
        log.info("accepting remote workers on %s (%s)", remote,
                 "CURVE, allow-listed keys only" if endpoint.auth else "plain TCP, loopback")
    metrics = Metrics()
    engine = Engine(endpoint, config.scheduler, health_config(config), metrics=metrics)
    control = Control(engine, store, lambda name: resolve_model(name, pull=True))
    try:
        await control.start(deployments)
    except BaseException:  # nothing else has started yet: release what has
        endpoint.close()
        ctx.term()
        socket_path.unlink(missing_ok=True)
        store.close()
        raise
    # one local worker per replica wanted (the database's deployments included) unless workers.count says
    wanted = sum(v.replicas for d in control.deployments.values() for v in d.spec.versions)
    workers = LocalWorkers(config.workers, address, on_exit=engine.worker_exited, log_format=config.server.log_format,
                           count=wanted)
    engine.on_dead = workers.kill
    engine.on_need_worker = need_worker(engine, workers, 2 * config.control.interval_s)
    if not config.deployments:  # the one deployment of [model] also takes the workers operators attach
        control.elastic = deployments[0].name
        control.elastic_base = deployments[0].versions[0].replicas
        control.is_remote = lambda worker_id: worker_id not in workers.slots
    metrics.bind(engine, workers.status)
    tasks = [asyncio.create_task(engine.receive_loop(), name="zmq-receive"),
             asyncio.create_task(engine.health_loop(), name="health")]
    if (interval := systemd.watchdog_interval()) is not None:
        loops = list(tasks)  # WATCHDOG=1 only while the event loop runs and its core loops live
        tasks.append(asyncio.create_task(
            systemd.watchdog_loop(interval, lambda: not any(t.done() for t in loops)), name="sd-watchdog"))
    state = ApiState(engine, control, config.server.max_waiting_requests, config.server.replica_wait_s,
                     supervisor=workers, metrics=metrics, log_prompts=config.server.log_prompts)
    app = make_app(state, config.server.max_body_bytes, auth)
    s = config.server
    limits = HttpLimits(s.header_timeout_s, s.body_timeout_s, s.keepalive_timeout_s, s.max_connections, s.backlog)
    runner: web.AppRunner | None = None
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        adopted = {}
        if earlier_daemon:  # its workers re-register as soon as they see we do not know them
            adopted = await adopt_running_workers(engine, 2 * config.workers.heartbeat_interval_s + 1.0)
        control.tick()  # ask for every replica now: adopted workers holding the right model serve at once
        tasks.append(asyncio.create_task(control.run(config.control.interval_s), name="control"))
        tasks.append(asyncio.create_task(retire_spares(engine, workers, 5.0), name="retire-spares"))
        systemd.notify("STATUS=starting workers")
        await workers.start(adopted)
        runner = await start_http(app, s.host, s.port, limits, access_log=None)
        names = ", ".join(control.deployments)
        log.info("serving %s on http://%s:%d", names, config.server.host, config.server.port)
        tasks.append(asyncio.create_task(notify_ready(
            engine, f"serving {names} on http://{config.server.host}:{config.server.port}"), name="sd-ready"))
        await stop.wait()
        systemd.notify("STOPPING=1", f"STATUS=draining {engine.num_active()} requests")
        log.info("draining: refusing new requests, finishing %d in flight", engine.num_active())
        state.draining = True
        if not await engine.drain(config.server.drain_timeout_s):
            log.warning("drain deadline passed with %d requests unfinished", engine.num_active())
    finally:
        workers.stopping = True  # workers exiting now are not to be restarted
        engine.shutdown_workers()
        if runner is not None:
            await runner.cleanup()
        await workers.stop()
        for task in tasks:
            task.cancel()
        endpoint.close()
        ctx.term()
        socket_path.unlink(missing_ok=True)
        store.close()


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    configure_logging(config.server.log_format, config.server.log_level)
    # the default deployment's model is pulled before anything listens; [[deployments]] resolve their own
    folder = None if config.deployments else resolve_model(config.model.model, pull=True)
    uvloop.run(serve(config, folder))
    return 0
