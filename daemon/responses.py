"""OpenAI response bodies and SSE chunks for completions and chat completions, built from output deltas."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from typing import TYPE_CHECKING, Any

from aiohttp import web

from daemon.replica import Delta, RequestStream
from daemon.requests import APIError, GenerationRequest
from daemon.scheduler import Sequence

if TYPE_CHECKING:
    from daemon.api import ApiState

# json.dumps' own string encoder (ASCII-only, as json.dumps writes by default): same bytes, no dict walk
_json_string = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]


class Response:
    """Turns deltas into OpenAI completion / chat completion bodies and SSE chunks."""

    def __init__(self, req: GenerationRequest, state: ApiState, prompts: list[list[int]],
                 seqs: list[Sequence]) -> None:
        self.req, self.state, self.prompts, self.seqs = req, state, prompts, seqs
        self.id = ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if req.chat else "text_completion"
        self.text_offset = [0] * (len(prompts) * req.n)

    def usage(self) -> dict[str, Any]:
        prompt_tokens = sum(len(p) for p in self.prompts)
        completion = sum(len(s.output_token_ids) for s in self.seqs)
        cached = sum(s.num_cached_tokens for s in self.seqs[:: self.req.n])
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion, "prompt_tokens_details": {"cached_tokens": cached}}

    def _logprobs(self, delta: Delta) -> dict[str, Any] | None:
        if self.req.logprobs is None:
            return None
        tok = self.state.tokenizer
        n = self.req.logprobs
        ids = [t for t, _, _ in delta.logprobs]
        names = tok.token_strings(ids)
        if self.req.chat:
            content = []
            for (token, lp, top), name in zip(delta.logprobs, names):
                top_names = tok.token_strings([t for t, _ in top[:n]])
                content.append({"token": name, "logprob": lp, "bytes": tok.token_bytes(token),
                                 "top_logprobs": [{"token": tn, "logprob": tlp, "bytes": tok.token_bytes(t)}
                                                  for (t, tlp), tn in zip(top[:n], top_names)]})
            return {"content": content}
        offsets = []
        for name in names:
            offsets.append(self.text_offset[delta.index])
            self.text_offset[delta.index] += len(name)
        tops = [dict(zip(tok.token_strings([t for t, _ in top[:n]]), [lp for _, lp in top[:n]]))
                for _, _, top in delta.logprobs]
        return {"tokens": names, "token_logprobs": [lp for _, lp, _ in delta.logprobs],
                "top_logprobs": tops, "text_offset": offsets}

    def _merge_logprobs(self, parts: list[dict[str, Any] | None]) -> dict[str, Any] | None:
        parts = [p for p in parts if p]
        if self.req.logprobs is None:
            return None
        if self.req.chat:
            return {"content": [c for p in parts for c in p["content"]]}
        return {k: [x for p in parts for x in p[k]] for k in ("tokens", "token_logprobs", "top_logprobs",
                                                              "text_offset")}

    async def collect(self, stream: RequestStream) -> web.Response:
        total = len(self.prompts) * self.req.n
        texts = [""] * total
        finish: list[str | None] = [None] * total
        logprobs: list[list[dict[str, Any] | None]] = [[] for _ in range(total)]
        while deltas := await stream.get():
            for d in deltas:
                texts[d.index] += d.text
                finish[d.index] = d.finish_reason or finish[d.index]
                logprobs[d.index].append(self._logprobs(d))
        if stream.error:
            raise APIError(stream.error, status=stream.error_status, code="generation_failed")
        choices = []
        for i in range(total):
            lp = self._merge_logprobs(logprobs[i])
            if self.req.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": texts[i]},
                                "logprobs": lp, "finish_reason": finish[i]})
            else:
                choices.append({"index": i, "text": texts[i], "logprobs": lp, "finish_reason": finish[i]})
        return web.json_response({"id": self.id, "object": self.object, "created": self.created,
                                  "model": self.req.model, "choices": choices, "usage": self.usage()})

    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
        body: dict[str, Any] = {"id": self.id, "object": self.object + (".chunk" if self.req.chat else ""),
                                "created": self.created, "model": self.req.model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"

    def _chunk_head(self) -> bytes:
        """`data: {"id":...,"choices":[` of this response's chunks: the same in every chunk, rendered once."""
        body = json.dumps({"id": self.id, "object": self.object + (".chunk" if self.req.chat else ""),
                           "created": self.created, "model": self.req.model}, separators=(",", ":"))
        return b"data: " + body[:-1].encode() + b',"choices":['

    def _choice(self, d: Delta) -> str:
        """One delta as a chunk's choice: what json.dumps gives for the dict `_chunk` would hold, built
        directly (this runs for every delta of every stream)."""
        lp = "null" if self.req.logprobs is None else json.dumps(self._logprobs(d), separators=(",", ":"))
        finish = "null" if d.finish_reason is None else _json_string(d.finish_reason)
        if not self.req.chat:
            return (f'{{"index":{d.index},"text":{_json_string(d.text)},"logprobs":{lp},'
                    f'"finish_reason":{finish}}}')
        delta = f'{{"content":{_json_string(d.text)}}}' if d.text or d.finish_reason is None else "{}"
        return f'{{"index":{d.index},"delta":{delta},"logprobs":{lp},"finish_reason":{finish}}}'

    async def stream(self, request: web.Request, stream: RequestStream) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        # A client that leaves is an ordinary end (the caller aborts its sequences and logs it as aborted). Raised
        # on, aiohttp would log an error with a traceback for each one; returned, it ends the response quietly.
        with contextlib.suppress(ConnectionResetError):
            await self._write_stream(request, resp, stream)
        return resp

    async def _write_stream(self, request: web.Request, resp: web.StreamResponse, stream: RequestStream) -> None:
        await resp.prepare(request)
        if self.req.chat:
            first = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for i in range(len(self.prompts) * self.req.n)]
            await resp.write(self._chunk(first))
        head = self._chunk_head()
        while deltas := await stream.get():
            # text held back (a partial character or a possible stop string) makes no chunk
            choices = [self._choice(d) for d in deltas if d.text or d.finish_reason is not None or d.logprobs]
            if choices:
                await resp.write(head + ",".join(choices).encode() + b"]}\n\n")
        if stream.error:
            err = APIError(stream.error, status=stream.error_status, code="generation_failed").body()
            await resp.write(b"data: " + json.dumps(err).encode() + b"\n\n")
        elif self.req.include_usage:
            await resp.write(self._chunk([], self.usage()))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
