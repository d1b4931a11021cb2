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
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from daemon.engine import Engine
from daemon.metrics import CONTENT_TYPE, STATUS, Metrics
from daemon.replica import RequestStream, Track
from daemon.requests import APIError, GenerationRequest, parse_generation
from daemon.responses import Response
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
    tokenizer: Tokenizer
    served_model_name: str
    max_waiting_requests: int = 512
    replica_wait_s: float = 30.0
    supervisor: LocalWorkers | None = None
    metrics: Metrics | None = None
    log_prompts: bool = False  # put prompt and output text in the request log (off: they may be private)
    draining: bool = False


STATE = web.AppKey("state", ApiState)
REQUEST_ID = "request_id"
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
    app.router.add_get("/metrics", metrics)
    return app


async def _echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    if REQUEST_ID in request:
        response.headers["x-request-id"] = request[REQUEST_ID]


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.metrics is None:
        raise APIError("metrics are disabled", status=404, code="not_found")
    return web.Response(body=state.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    state = request.app[STATE]
    ok = state.engine.ready and not state.draining
    replicas = sum(r.alive for r in state.engine.replicas.values())
    return web.json_response({"ready": ok, "replicas": replicas}, status=200 if ok else 503)


async def admin_workers(request: web.Request) -> web.Response:
    state = request.app[STATE]
    engine = state.engine
    now = time.monotonic()
    rows = {}
    for r in engine.replicas.values():
        rows[r.worker_id] = {
            "id": r.worker_id, "host": r.hello.host, "pid": r.hello.pid, "device": r.hello.device,
            "model": r.hello.model, "version": r.hello.model_version, "state": "up" if r.alive else "dead",
            "incarnation": r.incarnation, "last_heartbeat_s_ago": round(now - r.last_heartbeat, 3),
            "running": r.scheduler.num_running, "waiting": r.scheduler.num_waiting,
            "kv_usage": round(r.scheduler.kv_usage, 4), "steps": r.steps,
            "num_blocks": r.hello.num_blocks, "block_size": r.hello.block_size, "restarts": 0,
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
    state = request.app[STATE]
    card = {"id": state.served_model_name, "object": "model", "created": 0, "owned_by": "nimbus",
            "max_model_len": state.engine.max_model_len or None}
    return web.json_response({"object": "list", "data": [card]})


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


async def _tokenize(state: ApiState, req: GenerationRequest) -> list[list[int]]:
    tok = state.tokenizer
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
        req, prompts, max_tokens = await _admit(request, state, chat)
    except APIError as exc:
        if state.metrics is not None:  # refused before admission: bad input, full queue, draining, no worker
            state.metrics.requests.labels(state.served_model_name, "", "rejected").inc()
        _log_rejected(request, state, exc, arrival)
        raise exc from None
    total = len(prompts) * req.n
    stream = RequestStream(total)
    tracks: list[Track] = []
    try:
        for i, prompt in enumerate(prompts):
            for j in range(req.n):
                seq = _sequence(req, prompt, max_tokens, state.tokenizer, j, state.engine.new_seq_id())
                tracks.append(state.engine.submit(stream, prompt, seq, req.stop, i * req.n + j, arrival))
        if state.metrics is not None:
            state.metrics.prompt_tokens.labels(state.served_model_name, tracks[0].version).inc(
                sum(len(p) for p in prompts))
        response = Response(req, state, prompts, [t.seq for t in tracks])
        if req.stream:
            return await response.stream(request, stream)
        return await response.collect(stream)
    finally:
        for track in tracks:  # a client that left (or an error) frees its sequences at the next step
            if track.seq.finish_reason is None:
                state.engine.abort(track.seq.seq_id)
        _account(request, state, req, prompts, tracks, stream, arrival)


async def _admit(request: web.Request, state: ApiState, chat: bool) -> tuple[GenerationRequest, list[list[int]], int]:
    """Validate, tokenize and admit, or raise APIError: nothing is queued before this returns."""
    if state.draining:
        raise APIError("the server is shutting down", status=503, code="draining", headers={"Retry-After": "5"})
    req = parse_generation(await _read_json(request), chat, state.tokenizer.vocab_size)
    if req.model != state.served_model_name:
        raise APIError(f"The model '{req.model}' does not exist; this server serves "
                       f"'{state.served_model_name}'", status=404, param="model", code="model_not_found")
    if not state.engine.ready and not await state.engine.wait_ready(state.replica_wait_s):
        raise APIError("no worker is ready to serve this model", status=503, code="no_replica",
                       headers={"Retry-After": "5"})
    prompts = await _tokenize(state, req)
    max_tokens = _limit_tokens(req, prompts, state.engine.max_model_len)
    total = len(prompts) * req.n
    if total > state.max_waiting_requests:  # a 429 would never clear for this one: say why instead
        raise APIError(f"this request asks for {total} completions (prompts x n), more than the "
                       f"{state.max_waiting_requests} this server queues", param="n", code="invalid_value")
    if state.engine.num_waiting() + total > state.max_waiting_requests:
        raise APIError("too many requests waiting; retry shortly", status=429, code="queue_full",
                       headers={"Retry-After": "1"})
    return req, prompts, max_tokens


def _final_reason(track: Track, stream: RequestStream) -> str:
    reason = track.seq.finish_reason
    if track.stops is not None and track.stops.matched_stop is not None:
        return "stop_string"  # also when it matched on the last token allowed ("length"): the client saw "stop"
    if stream.error is not None and reason in (None, "abort"):
        return "error"
    return reason or "abort"


def _account(request: web.Request, state: ApiState, req: GenerationRequest, prompts: list[list[int]],
             tracks: list[Track], stream: RequestStream, arrival: float) -> None:
    """Final status counters and the one structured log line of a finished request."""
    reasons = [_final_reason(t, stream) for t in tracks]
    if state.metrics is not None:
        for track, reason in zip(tracks, reasons):
            state.metrics.finished(state.served_model_name, track.version, reason)
    statuses = [STATUS.get(r, "error") for r in reasons]  # the log says what nimbus_requests_total says
    first = tracks[0] if tracks else None

    def since(t: float | None) -> float | None:
        return None if t is None else round(t - arrival, 4)

    fields = {
        "request_id": request[REQUEST_ID], "deployment": state.served_model_name,
        "version": first.version if first else "", "worker": first.worker_id if first else "",
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
        fields["output"] = [state.tokenizer.decode(t.seq.output_token_ids) for t in tracks]
    request_log.info("request finished", extra={"fields": fields})


def _log_rejected(request: web.Request, state: ApiState, exc: APIError, arrival: float) -> None:
    """The request log line of a request refused before admission (same fields, nothing computed)."""
    fields = {
        "request_id": request[REQUEST_ID], "deployment": state.served_model_name, "version": "", "worker": "",
        "status": "rejected", "http_status": exc.status, "error": exc.code,
        "prompt_tokens": 0, "output_tokens": 0, "cached_tokens": 0, "queue_time_s": None, "ttft_s": None,
        "total_time_s": round(time.monotonic() - arrival, 4),
    }
    request_log.info("request rejected", extra={"fields": fields})
