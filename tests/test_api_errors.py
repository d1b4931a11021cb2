"""Bad input and backpressure against a real `nimbus serve`: every mistake a client can make is a 4xx in
OpenAI's error shape naming the field at fault, a full queue is a 429 with Retry-After, and the daemon and
its worker keep serving after all of it (and after a garbage ZeroMQ peer)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from dataclasses import replace

import httpx
import msgpack
import openai
import pytest
import zmq
from server import NimbusServer
from tiny_models import make_tiny_smollm2

from protocol.messages import Hello, Welcome, decode, encode

VOCAB = 49152  # SmolLM2's tokenizer
MAX_LEN = 256  # the tiny model's max_position_embeddings: the server's context length
MAX_BODY = 65536
ADMIN_KEY = "api-errors-admin-key-0123456789"
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
OMIT = object()  # a field left out of the body
ANY = object()  # an error field whose value the test does not pin down

CONFIG = """
[server]
max_body_bytes = {max_body}
max_waiting_requests = 2
admin_keys = ["{admin_key}"]
[scheduler]
max_num_seqs = 1
[workers]
kv_cache_memory = "64MiB"
threads = 1  # a tiny model gains nothing from threads, and on a busy host they make each step crawl
runtime_dir = "{run}"
"""

BASE = {
    COMPLETIONS: {"prompt": "Hello", "max_tokens": 2},
    CHAT: {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api-errors")
    folder = make_tiny_smollm2(tmp / "tiny-smollm2")
    config = CONFIG.format(max_body=MAX_BODY, admin_key=ADMIN_KEY, run=tmp / "run")
    with NimbusServer(folder, workers=1, config=config, tmp=tmp, startup_timeout=90) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def model(http):
    return http.get("/v1/models").json()["data"][0]["id"]


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def post(http: httpx.Client, path: str, body: object) -> httpx.Response:
    # json.dumps (not httpx's json=) so that NaN and Infinity reach the server as the literals they are
    return http.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})


def assert_error(r: httpx.Response, status: int, param: object = ANY, code: object = ANY,
                 match: str | None = None) -> dict:
    """`r` is OpenAI's error shape with this status (and param, code, message pattern where given)."""
    assert r.status_code == status, r.text
    body = r.json()
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"], err
    if status < 500 and status != 429:
        assert err["type"] == "invalid_request_error", err
    if param is not ANY:
        assert err["param"] == param, err
    if code is not ANY:
        assert err["code"] == code, err
    if match is not None:
        assert re.search(match, err["message"]), err["message"]
    return err


def workers(http: httpx.Client) -> list[dict]:
    """The daemon's own workers (peers a test attaches stay listed, as dead, after they go)."""
    r = http.get("/admin/workers", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 200, r.text
    return [w for w in r.json()["workers"] if w["id"].startswith("local-")]


def assert_serving(http: httpx.Client, model: str) -> None:
    """A good request still succeeds: the daemon and its worker are alive."""
    r = post(http, COMPLETIONS, {"model": model, "prompt": "Hello there", "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3 and r.json()["choices"][0]["finish_reason"] == "length"


def case(name: str, fields: dict, param: object, code: object = "invalid_value", match: str | None = None,
         path: str = COMPLETIONS, status: int = 400):
    return pytest.param(path, fields, status, param, code, match, id=name)


def types(path: str, name: str, *values: object):
    """One case per wrong-typed value of field `name`."""
    prefix = "chat-" if path == CHAT else ""
    return [case(f"{prefix}{name}-{type(v).__name__}-{i}", {name: v}, name, "invalid_type", path=path)
            for i, v in enumerate(values)]


def user(content: object) -> list[dict]:
    return [{"role": "user", "content": content}]


MISSING = [
    case("missing-model", {"model": OMIT}, "model", "missing_required_parameter", "'model' is required"),
    case("null-model", {"model": None}, "model", "missing_required_parameter"),
    case("model-not-a-string", {"model": 7}, "model", "invalid_type"),
    case("empty-model", {"model": ""}, "model"),
    case("unknown-model", {"model": "gpt-5"}, "model", "model_not_found", "'gpt-5' does not exist", status=404),
    case("unknown-model-chat", {"model": "gpt-5"}, "model", "model_not_found", path=CHAT, status=404),
    case("missing-prompt", {"prompt": OMIT}, "prompt", "missing_required_parameter", "'prompt' is required"),
    case("null-prompt", {"prompt": None}, "prompt", "missing_required_parameter"),
    case("missing-messages", {"messages": OMIT}, "messages", "missing_required_parameter",
         "'messages' is required", path=CHAT),
]

WRONG_TYPES = [
    *types(COMPLETIONS, "prompt", 42, {"text": "hi"}, ["a", 1], [[1, 2], "a"], [True, False], [1.5], [[]]),
    *types(COMPLETIONS, "max_tokens", "5", 2.5, True, [2]),
    *types(CHAT, "max_tokens", "5", True),
    *types(CHAT, "max_completion_tokens", "5", False),
    *types(COMPLETIONS, "temperature", "hot", True, [1]),
    *types(COMPLETIONS, "top_p", "high", {}),
    *types(COMPLETIONS, "n", "2", 2.0, True),
    *types(COMPLETIONS, "stop", 5, [1, 2], {"a": 1}, ["a", None]),
    *types(COMPLETIONS, "seed", "1", 1.5),
    *types(COMPLETIONS, "stream", "yes", 1),
    *types(COMPLETIONS, "logprobs", "3", True, 1.5),
    *types(CHAT, "logprobs", 3, "true"),
    *types(CHAT, "top_logprobs", "3"),
    *types(COMPLETIONS, "logit_bias", [1, 2], "x"),
    case("logit_bias-key-not-an-id", {"logit_bias": {"abc": 1}}, "logit_bias", match="not a token id"),
    case("logit_bias-value-str", {"logit_bias": {"5": "1"}}, "logit_bias", match=r"\[-100, 100\]"),
    *types(COMPLETIONS, "presence_penalty", "x", [0.5]),
    *types(COMPLETIONS, "frequency_penalty", "x"),
    *types(COMPLETIONS, "repetition_penalty", "x"),
    *types(COMPLETIONS, "top_k", "x", 1.5),
    *types(COMPLETIONS, "min_p", "x"),
    *types(COMPLETIONS, "min_tokens", "x"),
    *types(COMPLETIONS, "user", 5),
    *types(COMPLETIONS, "ignore_eos", "yes"),
    *types(COMPLETIONS, "best_of", "3"),
    *types(COMPLETIONS, "stop_token_ids", "x", 5),
    case("stop_token_ids-items", {"stop_token_ids": ["x"]}, "stop_token_ids"),
    *types(COMPLETIONS, "stream_options", "x", [1]),
    case("include_usage-str", {"stream": True, "stream_options": {"include_usage": "yes"}},
         "stream_options.include_usage", "invalid_type"),
    *types(CHAT, "chat_template_kwargs", "x", [1]),
    *types(CHAT, "messages", "hi", {"role": "user", "content": "hi"}),
    case("messages-item-str", {"messages": ["hi"]}, "messages[0]", "invalid_type", path=CHAT),
    case("second-message-null", {"messages": [*user("hi"), None]}, "messages[1]", "invalid_type", path=CHAT),
    case("role-int", {"messages": [{"role": 5, "content": "hi"}]}, "messages[0].role", "invalid_type",
         path=CHAT),
    case("role-list", {"messages": [{"role": ["user"], "content": "hi"}]}, "messages[0].role", "invalid_type",
         path=CHAT),
    case("role-object", {"messages": [{"role": {"a": 1}, "content": "hi"}]}, "messages[0].role",
         "invalid_type", path=CHAT),
    case("content-int", {"messages": user(5)}, "messages[0].content", "invalid_type", path=CHAT),
    case("content-part-str", {"messages": user(["hi"])}, "messages[0].content", "invalid_type", path=CHAT),
]

OUT_OF_RANGE = [
    case("temperature-2.5", {"temperature": 2.5}, "temperature", match=r"\[0\.0, 2\.0\].*2\.5"),
    case("temperature-negative", {"temperature": -0.1}, "temperature"),
    case("temperature-nan", {"temperature": float("nan")}, "temperature"),
    case("temperature-inf", {"temperature": float("inf")}, "temperature"),
    case("temperature-huge-int", {"temperature": 10**400}, "temperature"),
    case("top_p-0", {"top_p": 0}, "top_p", match=r"\(0\.0, 1\.0\]"),
    case("top_p-1.5", {"top_p": 1.5}, "top_p"),
    case("n-0", {"n": 0}, "n", match=r"\[1, 16\]"),
    case("n-1000", {"n": 1000}, "n", match="1000"),
    case("max_tokens-0", {"max_tokens": 0}, "max_tokens"),
    case("max_tokens-negative", {"max_tokens": -5}, "max_tokens"),
    case("max_tokens-2**40", {"max_tokens": 2**40}, "max_tokens"),
    case("chat-max_tokens-0", {"max_tokens": 0}, "max_tokens", path=CHAT),
    case("max_completion_tokens-0", {"max_completion_tokens": 0}, "max_completion_tokens", path=CHAT),
    case("presence_penalty-3", {"presence_penalty": 3}, "presence_penalty", match=r"\[-2\.0, 2\.0\]"),
    case("frequency_penalty--3", {"frequency_penalty": -3}, "frequency_penalty"),
    case("repetition_penalty-0", {"repetition_penalty": 0}, "repetition_penalty"),
    case("top_k--2", {"top_k": -2}, "top_k"),
    case("min_p-1.5", {"min_p": 1.5}, "min_p"),
    case("min_tokens-negative", {"min_tokens": -1}, "min_tokens"),
    case("min_tokens-over-max_tokens", {"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    case("logprobs-21", {"logprobs": 21}, "logprobs", match=r"\[0, 20\]"),
    case("logprobs-negative", {"logprobs": -1}, "logprobs"),
    case("top_logprobs-21", {"logprobs": True, "top_logprobs": 21}, "top_logprobs", path=CHAT),
    case("top_logprobs-without-logprobs", {"top_logprobs": 2}, "top_logprobs", match="logprobs", path=CHAT),
    case("top_logprobs-with-logprobs-false", {"logprobs": False, "top_logprobs": 2}, "top_logprobs",
         path=CHAT),
    case("logit_bias-key-vocab", {"logit_bias": {str(VOCAB): 1}}, "logit_bias", match="vocabulary"),
    case("logit_bias-key-negative", {"logit_bias": {"-1": 1}}, "logit_bias"),
    case("logit_bias-value-200", {"logit_bias": {"5": 200}}, "logit_bias", match=r"\[-100, 100\]"),
    case("logit_bias-value--101", {"logit_bias": {"5": -101}}, "logit_bias"),
    case("logit_bias-value-nan", {"logit_bias": {"5": float("nan")}}, "logit_bias"),
    case("logit_bias-too-many", {"logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias", match="1024"),
    case("stop-5-strings", {"stop": ["a", "b", "c", "d", "e"]}, "stop", match="at most 4"),
    case("stop-empty-string", {"stop": ""}, "stop", match="must not be empty"),
    case("stop-empty-in-list", {"stop": ["a", ""]}, "stop"),
    case("prompt-id-vocab", {"prompt": [5, VOCAB]}, "prompt", match="vocabulary"),
    case("prompt-id-negative", {"prompt": [-1, 5]}, "prompt"),
    case("prompt-id-huge", {"prompt": [[1], [2**70]]}, "prompt"),
    case("prompt-empty-list", {"prompt": []}, "prompt"),
    case("prompt-empty-string", {"prompt": ""}, "prompt", "empty_prompt"),
    case("seed-2**64", {"seed": 2**64}, "seed"),
    case("stop_token_ids-vocab", {"stop_token_ids": [VOCAB]}, "stop_token_ids"),
    case("stop_token_ids-too-many", {"stop_token_ids": [2] * 1025}, "stop_token_ids", match="1024"),
    case("messages-empty", {"messages": []}, "messages", path=CHAT),
    case("role-unknown", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", path=CHAT,
         match="must be one of"),
    case("user-content-null", {"messages": user(None)}, "messages[0].content", path=CHAT),
]

CONTEXT = [
    case("prompt-ids-over-context", {"prompt": [1] * 300}, "prompt", "context_length_exceeded",
         rf"maximum context length is {MAX_LEN} tokens.*prompt has 300 tokens"),
    case("prompt-ids-at-context", {"prompt": [1] * MAX_LEN}, "prompt", "context_length_exceeded",
         rf"{MAX_LEN}.*{MAX_LEN}"),
    case("prompt-text-over-context", {"prompt": "hello " * 300}, "prompt", "context_length_exceeded",
         rf"{MAX_LEN} tokens.*prompt has \d+ tokens"),
    case("messages-over-context", {"messages": user("hello " * 300)}, "messages", "context_length_exceeded",
         path=CHAT),
    case("prompt-plus-max_tokens", {"prompt": [1] * 100, "max_tokens": 200}, "max_tokens",
         "context_length_exceeded", rf"{MAX_LEN} tokens.*requested 300 tokens \(100 in the prompt, 200 for"),
    case("one-of-two-prompts-too-long", {"prompt": [[1] * 10, [1] * 100], "max_tokens": 200}, "max_tokens",
         "context_length_exceeded", "300"),
    case("chat-prompt-plus-max_tokens", {"max_tokens": MAX_LEN - 1}, "max_tokens", "context_length_exceeded",
         path=CHAT),
]

UNSUPPORTED = [
    case("echo", {"echo": True}, "echo", "unsupported"),
    case("best_of-3", {"best_of": 3}, "best_of", "unsupported"),
    case("suffix", {"suffix": "and so on"}, "suffix", "unsupported"),
    case("response_format-json", {"response_format": {"type": "json_object"}}, "response_format", "unsupported",
         path=CHAT),
    case("stream_options-without-stream", {"stream_options": {"include_usage": True}}, "stream_options",
         match="stream"),
    case("stream_options-with-stream-false", {"stream": False, "stream_options": {"include_usage": True}},
         "stream_options", path=CHAT),
    case("image-content-part", {"messages": user([{"type": "image_url", "image_url": {"url": "http://x/y.png"}}])},
         "messages", ANY, "image_url", path=CHAT),
    case("text-part-without-text", {"messages": user([{"type": "text"}])}, "messages", ANY, path=CHAT),
    case("template-kwargs-add_generation_prompt", {"chat_template_kwargs": {"add_generation_prompt": False}},
         "chat_template_kwargs", ANY, "add_generation_prompt", path=CHAT),
    case("template-kwargs-messages", {"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs", ANY,
         path=CHAT),
]


@pytest.mark.parametrize(("path", "fields", "status", "param", "code", "match"),
                         [*MISSING, *WRONG_TYPES, *OUT_OF_RANGE, *CONTEXT, *UNSUPPORTED])
def test_bad_field(http, model, path, fields, status, param, code, match):
    body = {"model": model, **BASE[path], **fields}
    body = {k: v for k, v in body.items() if v is not OMIT}
    assert_error(post(http, path, body), status, param, code, match)
    assert_serving(http, model)


@pytest.mark.parametrize("raw", [
    pytest.param(b'{"model": "m", "prompt": ', id="truncated"),
    pytest.param(b'{"model": "m"} trailing', id="trailing-garbage"),
    pytest.param(b"", id="empty"),
    pytest.param(b"{'model': 'm'}", id="single-quotes"),
    pytest.param(b'\xff\xfe{"model": 1}', id="not-utf8"),
])
def test_malformed_json(http, model, raw):
    assert_error(http.post(COMPLETIONS, content=raw), 400, None, "invalid_json", "malformed JSON")
    assert_serving(http, model)


@pytest.mark.parametrize("raw", [
    pytest.param(b"[1, 2]", id="array"),
    pytest.param(b'"hello"', id="string"),
    pytest.param(b"null", id="null"),
    pytest.param(b"42", id="number"),
    pytest.param(b"true", id="bool"),
])
@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_body_not_an_object(http, model, raw, path):
    assert_error(http.post(path, content=raw), 400, None, "invalid_type", "must be a JSON object")
    assert_serving(http, model)


def test_deeply_nested_json_is_400(http, model):
    assert_error(http.post(COMPLETIONS, content=b"[" * 50_000), 400, None, "invalid_json")
    assert_serving(http, model)


def test_huge_integer_literal_is_400(http, model):
    raw = b'{"model": "%s", "prompt": "hi", "seed": %s}' % (model.encode(), b"9" * 5000)
    assert_error(http.post(COMPLETIONS, content=raw), 400)
    assert_serving(http, model)


def test_body_over_the_limit_is_413(http, model):
    r = post(http, COMPLETIONS, {"model": model, "prompt": "x" * (MAX_BODY + 1000)})
    assert_error(r, 413, None, "body_too_large", str(MAX_BODY))
    assert_serving(http, model)


def test_more_choices_than_the_queue_holds_is_400(http, model):
    # max_waiting_requests is 2: three choices can never be admitted, so retrying (429) cannot help
    assert_error(post(http, COMPLETIONS, {"model": model, "prompt": "Hi", "n": 3}), 400, "n")
    assert_serving(http, model)


def test_openai_client_maps_errors(client, model, http):
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=model, prompt="Hi", temperature=2.5)
    assert exc.value.status_code == 400 and exc.value.param == "temperature" and exc.value.code == "invalid_value"
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=model, messages=[{"role": "wizard", "content": "hi"}])
    assert exc.value.param == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=model, prompt=[1] * 300)
    assert exc.value.code == "context_length_exceeded" and "300" in exc.value.message
    with pytest.raises(openai.NotFoundError) as exc:
        client.completions.create(model="no-such-model", prompt="Hi")
    assert exc.value.status_code == 404 and exc.value.code == "model_not_found" and exc.value.param == "model"
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert exc.value.code == "model_not_found"
    assert_serving(http, model)


def test_full_queue_answers_429_and_admitted_requests_finish(server, http, model):
    """max_num_seqs 1 and max_waiting_requests 2: of a burst, at most three are admitted while the first of
    them generates its 200 tokens; the rest get 429 queue_full with Retry-After, and nothing is lost."""
    prompt = "Tell me a story."
    body = {"model": model, "prompt": prompt, "max_tokens": 200, "ignore_eos": True}

    async def burst():
        async with (httpx.AsyncClient(base_url=server.url, timeout=120) as ahttp,
                    openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                                       timeout=120) as aclient):
            async def sdk():
                try:
                    return await aclient.completions.create(model=model, prompt=prompt, max_tokens=200,
                                                            extra_body={"ignore_eos": True})
                except openai.RateLimitError as exc:
                    return exc

            return await asyncio.gather(*(ahttp.post(COMPLETIONS, json=body) for _ in range(10)),
                                        *(sdk() for _ in range(4)))

    results = asyncio.run(burst())
    raw, sdk = results[:10], results[10:]
    assert all(r.status_code in (200, 429) for r in raw), [r.text for r in raw]
    admitted = [r.json() for r in raw if r.status_code == 200]
    admitted += [r.model_dump() for r in sdk if not isinstance(r, openai.RateLimitError)]
    rejected = [r for r in raw if r.status_code == 429]
    limited = [r for r in sdk if isinstance(r, openai.RateLimitError)]
    assert admitted and rejected and limited, (len(admitted), len(rejected), len(limited))
    assert len(admitted) <= 3 + 1  # 1 running + 2 waiting (+1 should the first finish within the burst)
    for r in rejected:
        assert_error(r, 429, None, "queue_full", "too many requests")
        assert int(r.headers["Retry-After"]) >= 1
    for exc in limited:
        assert exc.status_code == 429 and exc.code == "queue_full"
        assert int(exc.response.headers["Retry-After"]) >= 1
    for done in admitted:
        assert done["usage"]["completion_tokens"] == 200 and done["choices"][0]["finish_reason"] == "length"
    assert [(w["running"], w["waiting"]) for w in workers(http)] == [(0, 0)]
    assert_serving(http, model)


def test_health_ready_and_models(http, model):
    assert http.get("/health").json() == {"status": "ok"}
    r = http.get("/ready")
    assert r.status_code == 200 and r.json() == {"ready": True, "replicas": 1, "deployments_waiting": []}
    r = http.get("/v1/models")
    assert r.status_code == 200 and r.json()["data"][0]["max_model_len"] == MAX_LEN


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/v1/nothing-here", 404),
    ("POST", "/v2/completions", 404),
    ("GET", "/", 404),
    ("GET", COMPLETIONS, 405),
    ("GET", CHAT, 405),
    ("DELETE", "/v1/models", 405),
    ("POST", "/health", 405),
])
def test_unknown_route_and_wrong_method(http, model, method, path, status):
    assert_error(http.request(method, path), status, None, "not_found" if status == 404 else "method_not_allowed")
    assert_serving(http, model)


def test_garbage_zmq_peer_does_not_crash_the_daemon(server, http, model):
    """Frames from a peer that is no worker are logged and dropped; a Hello for another model is refused."""
    address = f"ipc://{server.tmp}/run/workers-{server.port}.sock"
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, b"garbage-peer")
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        sock.send(os.urandom(4096))
        sock.send(b"")
        sock.send_multipart([b"two", b"frames"])
        sock.send(b"\xc1")  # never used in msgpack
        sock.send(msgpack.packb([1, 2, 3]))
        sock.send(msgpack.packb({"type": "LaunchMissiles", "v": 1}))
        sock.send(msgpack.packb({"type": "Hello", "v": 99}))
        sock.send(msgpack.packb({"type": "Heartbeat", "v": 1, "worker_id": "local-0", "incarnation": 1, "seq": 1,
                                 "state": "ready", "junk": b"\0" * (32 << 20)}))  # huge, under MAX_FRAME_BYTES
        sock.send(msgpack.packb({"type": "StepResult", "v": 1, "step_id": 1, "worker_id": "local-0",
                                 "incarnation": 1, "seq_ids": b"\1\0\0\0", "token_ids": b"\5\0\0\0"}))
        sock.send(msgpack.packb({"type": "Error", "v": 1, "code": "boom", "message": "x", "step_id": 1}))
        hello = Hello(worker_id="garbage-peer", host="nowhere", pid=1, device="cpu", model="/not/this/model",
                      model_version="", dtype="float32", num_blocks=4, block_size=16, max_model_len=64,
                      vocab_size=VOCAB)
        sock.send(encode(hello))
        # the daemon handles one peer's frames in order: the answer to the Hello means it read them all
        assert sock.poll(10_000), "no answer to the Hello"
        reply = decode(sock.recv())
        # another model is no reason to refuse a worker: it registers as a spare (and may be told to load)
        assert isinstance(reply, Welcome) and reply.worker_id == "garbage-peer"
        # a peer gone before its answer: the daemon's send fails (EHOSTUNREACH) and must not take it down
        for i in range(3):
            gone = ctx.socket(zmq.DEALER)
            gone.setsockopt(zmq.IDENTITY, b"gone-%d" % i)
            gone.connect(address)
            gone.send(encode(replace(hello, worker_id=f"gone-{i}")))
            gone.close(linger=1000)
    finally:
        sock.close()
        ctx.term()
    assert server.proc.poll() is None
    assert [(w["id"], w["state"]) for w in workers(http)] == [("local-0", "up")]
    assert "bad frame" in server.log_path.read_text()
    assert_serving(http, model)
    # the peers that registered never beat: declared dead, and the deployment is back to its one replica
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        dep = http.get("/admin/deployments", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
        replicas = dep["deployments"][0]["replicas"]
        if [(r["state"], r["worker"]) for r in replicas] == [("up", "local-0")]:
            break
        time.sleep(0.3)
    assert [(r["state"], r["worker"]) for r in replicas] == [("up", "local-0")], replicas
    assert_serving(http, model)


def test_still_serving_at_the_end(server, http, model):
    assert server.proc.poll() is None
    r = post(http, CHAT, {"model": model, "messages": user("Hi"), "max_tokens": 4, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
    deadline = time.monotonic() + 5
    while (rows := workers(http))[0]["running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [(w["state"], w["running"], w["waiting"]) for w in rows] == [("up", 0, 0)]
    assert_serving(http, model)
