"""`nimbus serve`: the daemon process: config, model, ZeroMQ endpoint, local workers, HTTP server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from pathlib import Path

import uvloop
import zmq.asyncio
from aiohttp import web

from daemon.api import ApiState, make_app
from daemon.config import NimbusConfig, load_config
from daemon.engine import Engine
from daemon.models import resolve_model
from daemon.supervisor import LocalWorkers
from daemon.tokenizer import Tokenizer
from protocol.transport import RouterEndpoint

log = logging.getLogger("nimbus.serve")


def runtime_dir(configured: str | None) -> Path:
    base = configured or os.path.join(os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/nimbus-{os.getuid()}", "nimbus")
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)  # only the service user may reach the workers' socket
    return path


def config_from_args(args: argparse.Namespace) -> NimbusConfig:
    return load_config(args.config, {
        "server": {"host": args.host, "port": args.port},
        "model": {"model": args.model, "served_model_name": args.served_model_name},
        "workers": {"count": args.workers},
    })


async def serve(config: NimbusConfig, folder: Path, stop: asyncio.Event | None = None) -> None:
    served = config.model.served_model_name or folder.name
    tokenizer = Tokenizer.from_folder(folder)
    ctx = zmq.asyncio.Context()
    endpoint = RouterEndpoint(ctx)
    address = endpoint.bind(f"ipc://{runtime_dir(config.workers.runtime_dir)}/workers-{config.server.port}.sock")
    if config.workers.bind:
        log.info("accepting remote workers on %s", endpoint.bind(config.workers.bind))
    engine = Engine(endpoint, str(folder), tokenizer, config.scheduler, config.workers.step_timeout_s,
                    config.model.max_model_len)
    receiver = asyncio.create_task(engine.receive_loop(), name="zmq-receive")
    workers = LocalWorkers(config.workers, address, str(folder), config.model.max_model_len)
    state = ApiState(engine, tokenizer, served, config.server.max_waiting_requests, config.server.replica_wait_s)
    runner = web.AppRunner(make_app(state, config.server.max_body_bytes), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.server.host, config.server.port)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await workers.start()
        await site.start()
        log.info("serving %s as '%s' on http://%s:%d", folder, served, config.server.host, config.server.port)
        await stop.wait()
        log.info("shutting down")
        state.draining = True
    finally:
        engine.shutdown_workers()
        await runner.cleanup()
        await workers.stop()
        receiver.cancel()
        endpoint.close()
        ctx.term()


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(args)
    folder = resolve_model(config.model.model, pull=True)
    uvloop.run(serve(config, folder))
    return 0
