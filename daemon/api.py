"""The OpenAI-compatible HTTP API (aiohttp): completions and chat, streaming or not, models, health.

Every handler validates and admits a request before anything is queued, and its `finally` is the one
place where a vanished client's sequences are aborted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from daemon.control import Control, UnknownDeployment
from daemon.deployments import DeploymentError
from daemon.engine import Engine
from daemon.metrics import CONTENT_TYPE, STATUS, Metrics
from daemon.replica import RequestStream, Track
from daemon.requests import APIError, GenerationRequest, parse_generation
from daemon.responses import Response
from daemon.rollouts import RolloutError
from daemon.routing import VARIANT_HEADER, VERSION_HEADER, sticky_key
from daemon.scheduler import Sequence
from daemon.supervisor import LocalWorkers
from daemon.tokenizer import ChatTemplateError, Tokenizer
from protocol.messages import SamplingParams

log = logging.getLogger("nimbus.api")
# prompts longer than this are tokenized on a thread so the event loop keeps serving
INLINE_TOKENIZE_CHARS = 2048


@dataclass(slots=True)
class ApiState:
    engine: Engine
    control: Control
    max_waiting_requests: int = 512
    replica_wait_s: float = 30.0
    supervisor: LocalWorkers | None = None
    metrics: Metrics | None = None
    log_prompts: bool = False  # put prompt and output text in the request log (off: they may be private)
    draining: bool = False


@dataclass(slots=True)
class Routed:
    """Where one request goes: the deployment it named, the version chosen for it, and that version's tokenizer."""

    deployment: str
    version: str
    tokenizer: Tokenizer


STATE = web.AppKey("state", ApiState)
REQUEST_ID = "request_id"
VERSION = "nimbus_version"  # request key: the version that served it, sent back as x-nimbus-version
DEPLOYMENT = "nimbus_deployment"
UNKNOWN_VOCAB = 2**31 - 1  # validates token ids of a request for a model that does not exist (then 404s)
request_log = logging.getLogger("nimbus.request")


@web.middleware
async def errors_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Turns every failure into OpenAI's error shape; nothing a client sends escapes as a 500 traceback."""
    supplied = request.headers.get("x-request-id", "")
    request[REQUEST_ID] = supplied if 0 < len(supplied) <= 128 and supplied.isprintable() else uuid.uuid4().hex
    try:
        return await handler(request)
    except APIError as exc:
        return web.json_response(exc.body(), status=exc.status, headers=exc.headers)
    except web.HTTPRequestEntityTooLarge:
        err = APIError(f"request body too large (limit {request.client_max_size} bytes)", status=413,
                       code="body_too_large")
        return web.json_response(err.body(), status=413)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        err = APIError(exc.reason, status=exc.status, code=exc.reason.lower().replace(" ", "_"))
        return web.json_response(err.body(), status=exc.status)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("internal error on %s", request.path)
        err = APIError("internal server error", status=500, code="internal_error")
        return web.json_response(err.body(), status=500)


def make_app(state: ApiState, max_body_bytes: int = 4 * 1024 * 1024, auth: Middleware | None = None) -> web.Application:
    # auth first: nothing runs before a request is authorised
    middlewares = [errors_middleware] if auth is None else [auth, errors_middleware]
    app = web.Application(client_max_size=max_body_bytes, middlewares=middlewares)
    app[STATE] = state
    app.on_response_prepare.append(_echo_request_id)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/admin/workers", admin_workers)
    app.router.add_get("/admin/deployments", admin_list)
    app.router.add_post("/admin/deployments", admin_create)
    app.router.add_get("/admin/deployments/{name:.+?}/rollout", admin_show)  # the rollout is part of the view
    app.router.add_post("/admin/deployments/{name:.+?}/rollouts", admin_rollout)
    app.router.add_post("/admin/deployments/{name:.+?}/rollout/{verb}", admin_command)
    app.router.add_get("/admin/deployments/{name:.+}", admin_show)
    app.router.add_put("/admin/deployments/{name:.+}", admin_update)
    app.router.add_delete("/admin/deployments/{name:.+}", admin_delete)
    app.router.add_get("/metrics", metrics)
    return app


async def _echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    if REQUEST_ID in request:
        response.headers["x-request-id"] = request[REQUEST_ID]
    if VERSION in request:  # every response of a routed request, streams and errors included
        response.headers[VERSION_HEADER] = request[VERSION]


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.metrics is None:
        raise APIError("metrics are disabled", status=404, code="not_found")
    return web.Response(body=state.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """Ready when every deployment has a replica up (and the daemon is not draining)."""
    state = request.app[STATE]
    ok = state.control.ready and not state.draining
    replicas = sum(1 for r in state.engine.replicas.values() if r.alive and r.replica_id is not None)
    waiting = sorted(n for n in state.control.deployments if not state.engine.versions_up(n))
    return web.json_response({"ready": ok, "replicas": replicas, "deployments_waiting": waiting},
                             status=200 if ok else 503)


async def admin_workers(request: web.Request) -> web.Response:
    state = request.app[STATE]
    engine = state.engine
    now = time.monotonic()
    rows = {}
    loading = {p.worker_id: p.replica_id for p in engine.pending.values() if p.worker_id}
    for r in engine.replicas.values():
        role = "draining" if r.draining else "serving" if r.replica_id else "spare"
        rows[r.worker_id] = {
            "id": r.worker_id, "host": r.hello.host, "pid": r.hello.pid, "device": r.hello.device,
            "model": r.hello.model, "version": r.labels[1] or r.hello.model_version, "deployment": r.labels[0],
            "replica": r.replica_id, "role": role if r.worker_id not in loading else "loading",
            "state": "up" if r.alive else "dead",
            "incarnation": r.incarnation, "last_heartbeat_s_ago": round(now - r.last_heartbeat, 3),
            "running": r.scheduler.num_running, "waiting": r.scheduler.num_waiting,
            "kv_usage": round(r.scheduler.kv_usage, 4), "steps": r.steps,
            "num_blocks": r.hello.num_blocks, "block_size": r.hello.block_size, "restarts": 0,
        }
    for w in engine.idle.values():
        rows[w.worker_id] = {
            "id": w.worker_id, "host": w.hello.host, "pid": w.hello.pid, "device": w.hello.device, "model": "",
            "version": "", "deployment": "", "replica": loading.get(w.worker_id),
            "role": "loading" if w.worker_id in loading else "idle", "state": "up", "incarnation": w.incarnation,
            "last_heartbeat_s_ago": round(now - w.last_heartbeat, 3), "running": 0, "waiting": 0, "steps": 0,
            "restarts": 0,
        }
    for worker_id, slot in (state.supervisor.status() if state.supervisor else {}).items():
        row = rows.setdefault(worker_id, {"id": worker_id, "state": slot["state"]})
        row["restarts"] = slot["restarts"]
        row["process"] = slot["state"]
        if slot["state"] in ("backoff", "crashloop", "stopped"):
            row["state"] = slot["state"]
    return web.json_response({"epoch": engine.epoch, "workers": list(rows.values()),
                              "orphaned_sequences": len(engine.orphans), **engine.counters})


async def models(request: web.Request) -> web.Response:
    """Deployments, as OpenAI model cards (with the versions serving them)."""
    state = request.app[STATE]
    cards = []
    for name, dep in state.control.deployments.items():
        up = state.engine.versions_up(name)
        lens = [state.engine.max_model_len(name, v) for v in up]
        cards.append({"id": name, "object": "model", "created": 0, "owned_by": "nimbus",
                      "max_model_len": min(lens) if lens else None,
                      "versions": [v.version for v in dep.spec.versions if v.version in up]})
    return web.json_response({"object": "list", "data": cards})


# ---------------------------------------------------------------------------------------------- admin
async def _admin_body(request: web.Request) -> Any:
    body = await _read_json(request)
    if not isinstance(body, dict):
        raise APIError("the body must be a JSON object", code="invalid_value")
    return body


async def _admin(call: Callable[[], Any]) -> web.Response:
    """Runs an admin operation (plain or async) with its errors in the OpenAI error shape: bad input 400,
    conflicts 409, unknown deployment 404."""
    try:
        value = call()
        if asyncio.iscoroutine(value):
            value = await value
    except UnknownDeployment as exc:
        raise APIError(f"no deployment named {exc.args[0]!r}", status=404, code="deployment_not_found") from None
    except RolloutError as exc:
        raise APIError(str(exc), status=409, code="conflict") from None
    except DeploymentError as exc:
        raise APIError(str(exc), code="invalid_deployment") from None
    return web.json_response(value)


async def admin_list(request: web.Request) -> web.Response:
    control = request.app[STATE].control
    return await _admin(lambda: {"deployments": control.list()})


async def admin_show(request: web.Request) -> web.Response:
    control = request.app[STATE].control
    return await _admin(lambda: control.view(request.match_info["name"]))


async def admin_create(request: web.Request) -> web.Response:
    control = request.app[STATE].control
    body = await _admin_body(request)
    return await _admin(lambda: control.create(body))


async def admin_update(request: web.Request) -> web.Response:
    control = request.app[STATE].control
    body = await _admin_body(request)
    name = request.match_info["name"]
    if body.get("name", name) != name:
        raise APIError("a deployment cannot be renamed", param="name", code="invalid_value")
    body.pop("name", None)
    return await _admin(lambda: control.update(name, body))


async def admin_delete(request: web.Request) -> web.Response:
    control = request.app[STATE].control
    name = request.match_info["name"]
    return await _admin(lambda: _deleted(control, name))


async def _deleted(control: Control, name: str) -> dict[str, str]:
    await control.delete(name)
    return {"deleted": name}


async def admin_rollout(request: web.Request) -> web.Response:
    control = request.app[STATE].control
    body = await _admin_body(request)
    return await _admin(lambda: control.start_rollout(request.match_info["name"], body))


async def admin_command(request: web.Request) -> web.Response:
    control = request.app[STATE].control
    return await _admin(lambda: control.command(request.match_info["name"], request.match_info["verb"]))


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


async def _read_json(request: web.Request) -> Any:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:  # an APIError here, so it is counted and logged as rejected
        raise APIError(f"request body too large (limit {request.client_max_size} bytes)", status=413,
                       code="body_too_large") from None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, absurd nesting or integer sizes
        raise APIError(f"malformed JSON body: {exc}", code="invalid_json") from None


async def _tokenize(tok: Tokenizer, req: GenerationRequest) -> list[list[int]]:
    if req.chat:
        try:
            text = tok.apply_chat_template(req.messages, add_generation_prompt=True, **req.chat_template_kwargs)
        except (ChatTemplateError, ValueError) as exc:
            raise APIError(f"cannot apply the chat template: {exc}", param="messages") from None
        texts: list[str | list[int]] = [text]
        special = False  # the template already wrote every special token
    else:
        texts, special = req.prompts, True
    out = []
    for item in texts:
        if isinstance(item, list):
            out.append(item)
        elif len(item) > INLINE_TOKENIZE_CHARS:
            out.append(await asyncio.to_thread(tok.encode, item, special))
        else:
            out.append(tok.encode(item, special))
    return out


def _limit_tokens(req: GenerationRequest, prompts: list[list[int]], max_len: int) -> int:
    longest = max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise APIError("the prompt is empty", param="prompt", code="empty_prompt")
    if longest >= max_len:
        raise APIError(f"This model's maximum context length is {max_len} tokens, but the prompt has "
                       f"{longest} tokens.", param="messages" if req.chat else "prompt", code="context_length_exceeded")
    if req.max_tokens is None:
        return max_len - longest
    if longest + req.max_tokens > max_len:
        raise APIError(f"This model's maximum context length is {max_len} tokens. However, you requested "
                       f"{longest + req.max_tokens} tokens ({longest} in the prompt, {req.max_tokens} for the "
                       f"completion).", param="max_tokens", code="context_length_exceeded")
    return req.max_tokens


def _sequence(req: GenerationRequest, prompt: list[int], max_tokens: int, tok: Tokenizer, choice: int,
              seq_id: int) -> Sequence:
    stop_ids = set(req.stop_token_ids) | (set() if req.ignore_eos else set(tok.eos_token_ids))
    seed = None if req.seed is None else (req.seed + choice + 2**63) % 2**64 - 2**63
    sampling = SamplingParams(
        temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty, seed=seed, logprobs=req.logprobs,
        logit_bias=req.logit_bias, min_tokens=req.min_tokens, stop_token_ids=tuple(sorted(stop_ids)),
    )

    return Sequence(seq_id=seq_id, prompt_token_ids=list(prompt), sampling=sampling, max_tokens=max_tokens,
                    stop_token_ids=frozenset(stop_ids), min_tokens=req.min_tokens)


async def _generate(request: web.Request, chat: bool) -> web.StreamResponse:
    state = request.app[STATE]
    arrival = time.monotonic()
    try:
        req, routed, prompts, max_tokens = await _admit(request, state, chat)
    except APIError as exc:
        if state.metrics is not None:  # refused before admission: bad input, full queue, draining, no worker
            # no version served it; the deployment is the one it named ("" for an unknown or unreadable one)
            state.metrics.requests.labels(request.get(DEPLOYMENT, ""), "", "rejected").inc()
        _log_rejected(request, exc, arrival)
        raise exc from None
    total = len(prompts) * req.n
    stream = RequestStream(total)
    tracks: list[Track] = []
    try:
        for i, prompt in enumerate(prompts):
            for j in range(req.n):
                seq = _sequence(req, prompt, max_tokens, routed.tokenizer, j, state.engine.new_seq_id())
                tracks.append(state.engine.submit(stream, routed.deployment, routed.version, prompt, seq, req.stop,
                                                  i * req.n + j, arrival))
        if state.metrics is not None:
            state.metrics.prompt_tokens.labels(routed.deployment, routed.version).inc(sum(len(p) for p in prompts))
        response = Response(req, routed, prompts, [t.seq for t in tracks])  # type: ignore[arg-type]
        if req.stream:
            return await response.stream(request, stream)
        return await response.collect(stream)
    finally:
        for track in tracks:  # a client that left (or an error) frees its sequences at the next step
            if track.seq.finish_reason is None:
                state.engine.abort(track.seq.seq_id)
        _account(request, state, req, routed, prompts, tracks, stream, arrival)


async def _admit(request: web.Request, state: ApiState,
                 chat: bool) -> tuple[GenerationRequest, Routed, list[list[int]], int]:
    """Validate, route to a version, tokenize and admit, or raise APIError: nothing is queued before this
    returns."""
    if state.draining:
        raise APIError("the server is shutting down", status=503, code="draining", headers={"Retry-After": "5"})
    body = await _read_json(request)
    model = body.get("model") if isinstance(body, dict) else None
    control = state.control
    if not isinstance(model, str) or model not in control.deployments:
        parse_generation(body, chat, UNKNOWN_VOCAB)  # a malformed body says what is wrong with it first
        served = ", ".join(f"'{name}'" for name in control.deployments) or "none"
        raise APIError(f"The model '{model}' does not exist; this server serves {served}", status=404,
                       param="model", code="model_not_found")
    request[DEPLOYMENT] = model
    user = body.get("user")
    key = sticky_key(request.headers.get(VARIANT_HEADER), user if isinstance(user, str) else None)
    version = control.route(model, key)
    if version is None:
        if await state.engine.wait_ready(state.replica_wait_s, model):
            version = control.route(model, key)
        if version is None:
            raise APIError(f"no replica of '{model}' is ready to serve", status=503, code="no_replica",
                           headers={"Retry-After": "5"})
    request[VERSION] = version
    routed = Routed(model, version, state.engine.targets[(model, version)].tokenizer)
    req = parse_generation(body, chat, routed.tokenizer.vocab_size)
    prompts = await _tokenize(routed.tokenizer, req)
    max_tokens = _limit_tokens(req, prompts, state.engine.max_model_len(model, version))
    total = len(prompts) * req.n
    if total > state.max_waiting_requests:  # a 429 would never clear for this one: say why instead
        raise APIError(f"this request asks for {total} completions (prompts x n), more than the "
                       f"{state.max_waiting_requests} this server queues", param="n", code="invalid_value")
    if state.engine.num_waiting(model) + total > state.max_waiting_requests:
        raise APIError("too many requests waiting; retry shortly", status=429, code="queue_full",
                       headers={"Retry-After": "1"})
    return req, routed, prompts, max_tokens


def _final_reason(track: Track, stream: RequestStream) -> str:
    reason = track.seq.finish_reason
    if track.stops is not None and track.stops.matched_stop is not None:
        return "stop_string"  # also when it matched on the last token allowed ("length"): the client saw "stop"
    if stream.error is not None and reason in (None, "abort"):
        return "error"
    return reason or "abort"


def _account(request: web.Request, state: ApiState, req: GenerationRequest, routed: Routed,
             prompts: list[list[int]], tracks: list[Track], stream: RequestStream, arrival: float) -> None:
    """Final status counters, the canary's sample, and the one structured log line of a finished request."""
    reasons = [_final_reason(t, stream) for t in tracks]
    if state.metrics is not None:
        for reason in reasons:
            state.metrics.finished(routed.deployment, routed.version, reason)
    statuses = [STATUS.get(r, "error") for r in reasons]  # the log says what nimbus_requests_total says
    first = tracks[0] if tracks else None

    def since(t: float | None) -> float | None:
        return None if t is None else round(t - arrival, 4)

    # A canary is judged on server-side failures only ("error": a worker failure, poison, no replica in
    # time), and on latency: TTFT, and each sequence's mean gap between tokens.
    itl = [(t.last_token - t.first_token) / (len(t.seq.output_token_ids) - 1) for t in tracks
           if t.first_token is not None and t.last_token is not None and len(t.seq.output_token_ids) > 1]
    ttft = None if first is None or first.first_token is None else first.first_token - arrival
    state.control.record(routed.deployment, routed.version, "error" not in reasons, ttft, itl)
    fields = {
        "request_id": request[REQUEST_ID], "deployment": routed.deployment,
        "version": routed.version, "worker": first.worker_id if first else "",
        "status": statuses[0] if len(set(statuses)) == 1 else ",".join(statuses),
        "prompt_tokens": sum(len(p) for p in prompts),
        "output_tokens": sum(len(t.seq.output_token_ids) for t in tracks),
        "cached_tokens": sum(t.seq.num_cached_tokens for t in tracks[:: req.n]),
        "queue_time_s": since(first.first_scheduled if first else None),
        "ttft_s": since(first.first_token if first else None),
        "total_time_s": round(time.monotonic() - arrival, 4),
    }
    if state.log_prompts:
        fields["prompt"] = req.messages if req.chat else req.prompts
        fields["output"] = [routed.tokenizer.decode(t.seq.output_token_ids) for t in tracks]
    request_log.info("request finished", extra={"fields": fields})


def _log_rejected(request: web.Request, exc: APIError, arrival: float) -> None:
    """The request log line of a request refused before admission (same fields, nothing computed)."""
    fields = {
        "request_id": request[REQUEST_ID], "deployment": request.get(DEPLOYMENT, ""),
        "version": request.get(VERSION, ""), "worker": "",
        "status": "rejected", "http_status": exc.status, "error": exc.code,
        "prompt_tokens": 0, "output_tokens": 0, "cached_tokens": 0, "queue_time_s": None, "ttft_s": None,
        "total_time_s": round(time.monotonic() - arrival, 4),
    }
    request_log.info("request rejected", extra={"fields": fields})
