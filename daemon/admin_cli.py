"""`nimbus deployments` and `nimbus rollout`: operator commands, a thin client over the daemon's admin API.

Standard library only (urllib), so the commands start in a blink. The admin key comes from --admin-key,
else $NIMBUS_ADMIN_KEY; the daemon from --url, else $NIMBUS_URL, else http://127.0.0.1:8000.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8000"


class AdminError(Exception):
    """The daemon refused (its message), or could not be reached."""


class AdminClient:
    def __init__(self, url: str, key: str | None, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.key = key
        self.timeout = timeout

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if self.key:
            request.add_header("Authorization", f"Bearer {self.key}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                message = json.loads(raw)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = raw.decode(errors="replace")[:500] or exc.reason
            raise AdminError(f"{exc.code}: {message}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise AdminError(f"cannot reach {self.url}: {getattr(exc, 'reason', exc)}") from None

    def deployment_path(self, name: str, tail: str = "") -> str:
        return "/admin/deployments/" + urllib.parse.quote(name, safe="") + tail


def _client(args: argparse.Namespace) -> AdminClient:
    return AdminClient(args.url or os.environ.get("NIMBUS_URL") or DEFAULT_URL,
                       args.admin_key or os.environ.get("NIMBUS_ADMIN_KEY"))


def _spec_file(path: str) -> dict[str, Any]:
    """A deployment spec from a .toml file (the same table as one [[deployments]] entry) or a .json file."""
    text = Path(path).read_text()
    if path.endswith(".toml"):
        raw: Any = tomllib.loads(text)
        if isinstance(raw.get("deployments"), list) and len(raw["deployments"]) == 1:
            raw = raw["deployments"][0]  # a config-style file with one [[deployments]]
    else:
        raw = json.loads(text)
    if not isinstance(raw, dict):
        raise AdminError(f"{path}: a deployment must be a table/object")
    return raw


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def format_deployments(deployments: list[dict[str, Any]]) -> str:
    rows = [["DEPLOYMENT", "VERSION", "MODEL", "WEIGHT", "REPLICAS", "ROLLOUT"]]
    for dep in deployments:
        rollout = dep.get("rollout")
        note = f"{rollout['kind']} {rollout['from_version']}->{rollout['to_version']} {rollout['state']}" \
            if rollout else "-"
        for i, v in enumerate(dep["versions"]):
            rows.append([dep["name"] if i == 0 else "", v["version"], v["model"], f"{v['weight']:g}",
                         f"{v['replicas_up']}/{v['replicas']}", note if i == 0 else ""])
    return _table(rows)


def format_rollout(dep: dict[str, Any]) -> str:
    rollout = dep.get("rollout")
    if rollout is None:
        return f"deployment {dep['name']} has had no rollout"
    lines = [f"rollout {rollout['id']}: {rollout['kind']} {rollout['from_version']} -> {rollout['to_version']}"
             f", {rollout['state']}"]
    skip = {"id", "kind", "from_version", "to_version", "state", "last_decision"}
    lines += [f"  {k}: {json.dumps(v)}" for k, v in rollout.items() if k not in skip]
    lines.append("replicas:")
    lines += [f"  {r['id']}  {r['state']}  worker {r['worker'] or '-'}" for r in dep["replicas"]]
    lines.append("decisions (newest first):")
    lines += [f"  {d['decision']}  {json.dumps(d['numbers'])}" for d in dep.get("decisions", [])[:10]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    client = _client(args)
    try:
        out = _dispatch(client, args)
    except AdminError as exc:
        print(f"nimbus: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:  # a spec file that cannot be read or parsed
        print(f"nimbus: {exc}", file=sys.stderr)
        return 1
    if out is not None:
        print(out)
    return 0


def _dispatch(client: AdminClient, args: argparse.Namespace) -> str | None:
    as_json = getattr(args, "json", False)
    if args.command == "deployments":
        action = args.action
        if action == "list":
            deployments = client.call("GET", "/admin/deployments")["deployments"]
            return json.dumps(deployments, indent=2) if as_json else format_deployments(deployments)
        if action == "show":
            return json.dumps(client.call("GET", client.deployment_path(args.name)), indent=2)
        if action == "create":
            dep = client.call("POST", "/admin/deployments", _spec_file(args.file))
            return json.dumps(dep, indent=2) if as_json else format_deployments([dep])
        if action == "update":
            dep = client.call("PUT", client.deployment_path(args.name), _spec_file(args.file))
            return json.dumps(dep, indent=2) if as_json else format_deployments([dep])
        if action == "delete":
            client.call("DELETE", client.deployment_path(args.name))
            return f"deleted {args.name}; its replicas drain"
    verb = args.action
    if verb == "start":
        version: dict[str, Any] = {"version": args.version, "model": args.model, "replicas": args.replicas}
        for key in ("dtype", "max_model_len"):
            if getattr(args, key) is not None:
                version[key] = getattr(args, key)
        body: dict[str, Any] = {"kind": args.kind, "version": version}
        if args.policy:
            body["policy"] = json.loads(args.policy)
        if args.from_version:
            body["from_version"] = args.from_version
        dep = client.call("POST", client.deployment_path(args.name, "/rollouts"), body)
    elif verb == "status":
        dep = client.call("GET", client.deployment_path(args.name))
    else:
        dep = client.call("POST", client.deployment_path(args.name, f"/rollout/{verb}"))
    return json.dumps(dep, indent=2) if as_json else format_rollout(dep)


def add_arguments(p: argparse.ArgumentParser, command: str) -> None:
    """The arguments of `nimbus deployments` or `nimbus rollout`."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=None, help=f"daemon address (default $NIMBUS_URL or {DEFAULT_URL})")
    common.add_argument("--admin-key", default=None, help="admin key (default $NIMBUS_ADMIN_KEY)")
    common.add_argument("--json", action="store_true", help="print the daemon's JSON")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    if command == "deployments":
        sub.add_parser("list", parents=[common], help="deployments, versions, weights, replicas, rollouts")
        sub.add_parser("show", parents=[common], help="one deployment in full").add_argument("name")
        create = sub.add_parser("create", parents=[common], help="add a deployment from a .toml or .json file")
        create.add_argument("file")
        update = sub.add_parser("update", parents=[common],
                                help="change weights and replica counts (or add versions) from a file")
        update.add_argument("name")
        update.add_argument("file")
        sub.add_parser("delete", parents=[common], help="remove a deployment; its replicas drain").add_argument("name")
        return
    start = sub.add_parser("start", parents=[common], help="start a rolling update or a canary to a new version")
    start.add_argument("name", help="deployment")
    start.add_argument("--version", required=True, help="the new version's name")
    start.add_argument("--model", required=True, help="its checkpoint folder or a name `nimbus pull` knows")
    start.add_argument("--replicas", type=int, default=1, help="its replicas at the end (default 1)")
    start.add_argument("--kind", choices=("rolling", "canary"), default="rolling")
    start.add_argument("--policy", default=None,
                       help='JSON, e.g. \'{"steps": [5, 25, 50, 100], "dwell_s": 300}\' or \'{"max_surge": 1}\'')
    start.add_argument("--from-version", default=None, help="the version replaced (default: the one serving)")
    start.add_argument("--dtype", default=None)
    start.add_argument("--max-model-len", type=int, default=None)
    for verb, text in (("status", "the rollout's progress, replicas and decisions"),
                       ("pause", "hold the rollout where it is (a canary still rolls back on a breach)"),
                       ("resume", "continue a paused rollout"),
                       ("abort", "roll back to the version being replaced"),
                       ("promote", "canary: skip the remaining steps and replace the stable version")):
        sub.add_parser(verb, parents=[common], help=text).add_argument("name", help="deployment")
