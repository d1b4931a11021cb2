"""The `nimbus` command: a dispatcher that parses arguments and imports a subcommand only when it runs.

Keeping this module free of heavy imports (torch, transformers, aiohttp) is what makes `nimbus --help`
instant; each subcommand's `run(args)` lives in its own module and is imported on use.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

# subcommand -> (module, help). The module exposes `run(args: argparse.Namespace) -> int`.
_COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("daemon.serve", "run the daemon: HTTP API, scheduler and local workers"),
    "worker": ("worker.main", "run a worker that attaches to a daemon over ZeroMQ"),
    "pull": ("daemon.models", "install a model (the default: SmolLM2-135M-Instruct) into the cache"),
}


def _add_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="checkpoint folder or a name `nimbus pull` knows")
    p.add_argument("--host", default=None, help="HTTP bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default 8000)")
    p.add_argument("--workers", type=int, default=None, help="local worker processes to start")
    p.add_argument("--config", default=None, help="TOML configuration file")
    p.add_argument("--served-model-name", default=None, help="name clients send as `model`")


def _add_worker(p: argparse.ArgumentParser) -> None:
    p.add_argument("--connect", required=True, help="daemon address, e.g. tcp://HOST:PORT or ipc://PATH")
    p.add_argument("--model", default=None, help="checkpoint folder or a name `nimbus pull` knows")
    p.add_argument("--device", default=None, help="cpu or cuda:N (default: cuda:0 if available, else cpu)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default per device)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    p.add_argument("--kv-cache-memory", default=None, help="KV cache size on CPU, e.g. 2GiB")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--max-model-len", type=int, default=None, help="cap on tokens per sequence")
    p.add_argument("--worker-id", default=None, help="identity on the wire (default host-pid)")
    p.add_argument("--null-model", action="store_true",
                   help="answer every step instantly with a fixed token (measures the daemon alone)")
    p.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)  # local workers: exit with the daemon


def _add_pull(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="model name (default: the default model)")
    p.add_argument("--cache-dir", default=None, help="model cache folder (default $NIMBUS_HOME or XDG cache)")
    p.add_argument("--force", action="store_true", help="convert again even if the folder exists")


_ARGUMENTS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "serve": _add_serve,
    "worker": _add_worker,
    "pull": _add_pull,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nimbus", description="Nimbus LLM serving system")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in _COMMANDS.items():
        _ARGUMENTS[name](sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "worker":
        # names are resolved here so the worker package never imports daemon code
        from daemon.models import resolve_model

        args.model = str(resolve_model(args.model, pull=True))
    module = importlib.import_module(_COMMANDS[args.command][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
