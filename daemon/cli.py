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
    "bench": ("daemon.bench", "load-test an OpenAI-compatible server: TTFT, inter-token latency, throughput"),
    "keys": ("protocol.keys", "make CURVE key pairs for daemon-worker links over TCP"),
    "deployments": ("daemon.admin_cli", "list, show, create, update and delete deployments (admin API)"),
    "rollout": ("daemon.admin_cli", "start a rolling update or canary; status, pause, resume, abort, promote"),
}


def _add_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="checkpoint folder or a name `nimbus pull` knows")
    p.add_argument("--host", default=None, help="HTTP bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default 8000)")
    p.add_argument("--workers", type=int, default=None, help="local worker processes to start")
    p.add_argument("--config", default=None, help="TOML configuration file")
    p.add_argument("--served-model-name", default=None, help="name clients send as `model`")
    p.add_argument("--log-format", choices=("json", "text"), default=None, help="log lines as JSON (default) or text")


def _add_worker(p: argparse.ArgumentParser) -> None:
    p.add_argument("--connect", required=True, help="daemon address, e.g. tcp://HOST:PORT or ipc://PATH")
    p.add_argument("--model", default=None, help="checkpoint folder or a name `nimbus pull` knows")
    p.add_argument("--idle", action="store_true",
                   help="start holding no model: the daemon sends the model to load (what its deployments need)")
    p.add_argument("--device", default=None, help="cpu or cuda:N (default: cuda:0 if available, else cpu)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default per device)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    p.add_argument("--kv-cache-memory", default=None, help="KV cache size on CPU, e.g. 2GiB")
    p.add_argument("--kv-cache-dtype", default=None,
                   help="auto (the model's dtype) or, for a float32 model, bfloat16: half the KV bytes")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--max-model-len", type=int, default=None, help="cap on tokens per sequence")
    p.add_argument("--worker-id", default=None, help="identity on the wire (default host-pid)")
    p.add_argument("--null-model", action="store_true",
                   help="answer every step instantly with a fixed token (measures the daemon alone)")
    p.add_argument("--lease", type=float, default=5.0,
                   help="seconds without the daemon's heartbeat echo before dropping work and registering again")
    p.add_argument("--orphan-timeout", type=float, default=600.0,
                   help="seconds without any daemon before exiting")
    p.add_argument("--log-format", choices=("json", "text"), default="json", help="log lines as JSON or text")
    p.add_argument("--keys", default=None, metavar="DIR",
                   help="CURVE keys: this worker's pair (worker.key_secret) and the daemon's server.key")
    p.add_argument("--allow-plain-tcp", action="store_true",
                   help="connect over tcp:// without --keys (unencrypted; loopback addresses only)")
    p.add_argument("--fault", default=None, help=argparse.SUPPRESS)  # fault injection for tests (worker/faults.py)


def _add_pull(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="model name (default: the default model)")
    p.add_argument("--cache-dir", default=None, help="model cache folder (default $NIMBUS_HOME or XDG cache)")
    p.add_argument("--force", action="store_true", help="convert again even if the folder exists")


def _add_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="server's OpenAI API root")
    p.add_argument("--model", default=None, help="model to request (default: the first id of GET /models)")
    p.add_argument("--api-key", default=None, help="sent as a Bearer token")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder or Nimbus model name used to build prompts (default: the served "
                        "model's folder if it is local, else the Nimbus default model)")
    p.add_argument("--workload", choices=("burst", "poisson", "sweep", "shared-prefix"), default="burst",
                   help="burst: all at once; poisson: --rate; sweep: a poisson run per --rates; "
                        "shared-prefix: one --prefix-len prefix, own suffixes (at --rate, else all at once)")
    p.add_argument("--num-requests", type=int, default=64, help="requests per run")
    p.add_argument("--input-len", type=int, default=256, help="prompt tokens (after the prefix)")
    p.add_argument("--output-len", type=int, default=128, help="output tokens (max_tokens)")
    p.add_argument("--prefix-len", type=int, default=256, help="shared prefix tokens (shared-prefix)")
    p.add_argument("--rate", type=float, default=None, help="Poisson request rate, requests/s")
    p.add_argument("--rates", default=None, help="sweep rates, e.g. 1,2,4")
    p.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    p.add_argument("--seed", type=int, default=0, help="seeds arrivals and prompt offsets")
    p.add_argument("--warmup", type=int, default=0, help="requests sent (and not measured) first")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a stream may stay silent")
    p.add_argument("--no-ignore-eos", action="store_true",
                   help="do not send ignore_eos/min_tokens (for servers that reject unknown fields)")
    p.add_argument("--token-prompts", action="store_true", help="send prompts as token ids (completions)")
    p.add_argument("--json", default=None, metavar="OUT", help="write numbers, config and per-request rows")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="write a figure (needs matplotlib)")


def _add_keys(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("generate",), help="generate: write a new key pair")
    p.add_argument("--dir", required=True, help="keys folder (made with mode 0700 if missing)")
    p.add_argument("--name", default=None, help="file name of the pair (default: worker, or server with --server)")
    p.add_argument("--server", action="store_true",
                   help="the daemon's pair; also makes the authorized/ folder for worker public keys")


def _add_admin(command: str) -> Callable[[argparse.ArgumentParser], None]:
    def add(p: argparse.ArgumentParser) -> None:
        from daemon.admin_cli import add_arguments  # standard library only: keeps --help instant

        add_arguments(p, command)
    return add


_ARGUMENTS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "serve": _add_serve,
    "worker": _add_worker,
    "pull": _add_pull,
    "bench": _add_bench,
    "keys": _add_keys,
    "deployments": _add_admin("deployments"),
    "rollout": _add_admin("rollout"),
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
        # the link is checked before a model is pulled: a refused worker should fail in a second
        args.curve = _worker_link(parser, args)
        # names are resolved here so the worker package never imports daemon code
        from daemon.models import resolve_model

        if args.idle and args.model:
            parser.error("--idle and --model exclude each other")
        args.model = None if args.idle else str(resolve_model(args.model, pull=True))
    module = importlib.import_module(_COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except Exception as exc:
        # bad settings get their message, not a traceback; looked up, not imported (`nimbus worker` never
        # imports daemon code): an error raised before the config module loaded is not one of its errors
        config = sys.modules.get("daemon.config")
        if config is None or not isinstance(exc, config.ConfigError):
            raise
        print(f"nimbus {args.command}: {exc}", file=sys.stderr)
        return 2


def _worker_link(parser: argparse.ArgumentParser, args: argparse.Namespace) -> object:
    """The worker's CURVE keys (None for a plain link the rules allow); exits with a usage error otherwise."""
    from protocol.keys import KeyFileError, load_client
    from protocol.transport import check_plain_link

    try:
        if args.keys:
            return load_client(args.keys)
        check_plain_link(args.connect, args.allow_plain_tcp)
    except KeyFileError as exc:
        parser.error(f"--keys: {exc}")
    except ValueError as exc:
        parser.error(f"--connect without --keys: {exc} (flags: --keys DIR, --allow-plain-tcp)")
    return None


if __name__ == "__main__":
    sys.exit(main())
