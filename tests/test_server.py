"""`nimbus serve` with two local CPU workers as real processes, driven by the official openai client."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from server import NimbusServer

from daemon.models import pull

CONFIG = """
[scheduler]
max_num_batched_tokens = 512
[workers]
kv_cache_memory = "512MiB"
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = pull()
    tmp = tmp_path_factory.mktemp("serve")
    config = CONFIG.replace("[workers]", f'[workers]\nruntime_dir = "{tmp}/run"')
    with NimbusServer(folder, workers=2, config=config, tmp=tmp) as srv:
        yield srv


@pytest.fixture(scope="module")
def model(server):
    return httpx.get(server.url + "/v1/models").json()["data"][0]["id"]


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(pull())


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def run_async(server, body):
    """Runs `body(client)` with an AsyncOpenAI client that lives and dies inside one event loop."""

    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                                      timeout=300) as client:
            return await body(client)

    return asyncio.run(main())


def test_models_lists_the_served_name(server, model):
    assert model == "SmolLM2-135M-Instruct"


def test_completion_stream_and_plain_agree(client, model, hf_tokenizer):
    args = dict(model=model, prompt="The three primary colors are", max_tokens=24, temperature=0)
    plain = client.completions.create(**args)
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert plain.choices[0].text and streamed == plain.choices[0].text
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert plain.usage.prompt_tokens == len(hf_tokenizer.encode(args["prompt"]))
    assert plain.choices[0].finish_reason in ("length", "stop")


def test_chat_stream_and_plain_agree(client, model):
    args = dict(model=model, messages=[{"role": "user", "content": "Name a fruit."}], max_tokens=20, temperature=0)
    plain = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(**args, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert plain.choices[0].message.content and streamed == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason


def test_n2_gives_two_choices(client, model, hf_tokenizer):
    r = client.completions.create(model=model, prompt="My favourite animal is", max_tokens=12, n=2, seed=3,
                                  temperature=1.0)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.choices[0].text != r.choices[1].text
    assert r.usage.completion_tokens == 24  # no EOS within 12 tokens for this prompt and seed: 2 x 12
    assert r.usage.prompt_tokens == len(hf_tokenizer.encode("My favourite animal is"))  # once, not per choice


def test_stop_string_cuts_the_text(client, model):
    args = dict(model=model, prompt="Count: one, two, three, four, five,", max_tokens=20, temperature=0)
    full = client.completions.create(**args).choices[0].text
    cut_at = full.index(",", 2)  # a stop string that first appears after some text
    stop = full[cut_at : cut_at + 2]
    r = client.completions.create(**args, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[: full.index(stop)]
    streamed = "".join(c.choices[0].text for c in client.completions.create(**args, stop=[stop], stream=True))
    assert streamed == r.choices[0].text


def test_logprobs(client, model):
    r = client.completions.create(model=model, prompt="Once upon a time", max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == r.usage.completion_tokens
    assert "".join(lp.tokens) == r.choices[0].text
    for chosen, token, top in zip(lp.token_logprobs, lp.tokens, lp.top_logprobs):
        assert len(top) == 3 and chosen <= 0
        assert max(top.values()) == pytest.approx(chosen, abs=1e-5) and top[token] == pytest.approx(chosen)
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          logprobs=True, top_logprobs=2, temperature=0)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)


def test_seeded_sampling_is_reproducible(client, model):
    args = dict(model=model, prompt="Write a word:", max_tokens=16, temperature=1.0, top_p=0.95)
    a = client.completions.create(**args, seed=1234).choices[0].text
    b = client.completions.create(**args, seed=1234).choices[0].text
    c = client.completions.create(**args, seed=99).choices[0].text
    assert a == b
    assert a != c


def test_64_concurrent_streams_complete(server, model):
    async def one(aclient, i: int) -> tuple[str, str]:
        stream = await aclient.completions.create(model=model, prompt=f"Fact number {i}:", max_tokens=12,
                                                  temperature=0.7, seed=i, stream=True)
        text, finish = "", None
        async for chunk in stream:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def body(aclient):
        return await asyncio.gather(*(one(aclient, i) for i in range(64)))

    results = run_async(server, body)
    assert len(results) == 64 and all(finish in ("stop", "length") for _, finish in results)
    assert sum(bool(text) for text, _ in results) >= 60


def test_continuous_batching_short_request_overtakes(server, model):
    async def timed(aclient, max_tokens: int, delay: float) -> float:
        await asyncio.sleep(delay)
        await aclient.completions.create(model=model, prompt="Tell me a story.", max_tokens=max_tokens,
                                         temperature=0, extra_body={"ignore_eos": True})
        return time.monotonic()

    async def body(aclient):
        return await asyncio.gather(timed(aclient, 256, 0), timed(aclient, 8, 0.5))

    long_done, short_done = run_async(server, body)
    assert short_done < long_done


def test_concurrent_requests_are_batched(server, model):
    args = dict(model=model, prompt="List some colors:", max_tokens=32, temperature=0, extra_body={"ignore_eos": True})

    async def body(aclient):
        t0 = time.monotonic()
        await aclient.completions.create(**args)
        one = time.monotonic() - t0
        t0 = time.monotonic()
        await asyncio.gather(*(aclient.completions.create(**args) for _ in range(32)))
        return one, time.monotonic() - t0

    one, many = run_async(server, body)
    assert many < 8 * one, f"32 requests took {many:.2f}s, one took {one:.2f}s"


def test_prefix_cache_hit_is_reported_and_faster(client, model):
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu", "nu", "xi", "omicron", "pi", "rho", "sigma", "tau", "upsilon", "phi", "chi", "psi", "omega"]
    prefix = " ".join(words[i % len(words)] + str(i) for i in range(70))

    def ttft(prompt: str) -> tuple[float, int]:
        t0 = time.monotonic()
        stream = client.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0, stream=True,
                                           stream_options={"include_usage": True})
        first = None
        usage = None
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].text:
                first = time.monotonic() - t0
            usage = chunk.usage or usage
        return first or time.monotonic() - t0, usage.prompt_tokens_details.cached_tokens

    cold, cached_cold = ttft(prefix + " first question?")
    warm, cached_warm = ttft(prefix + " second question?")
    assert cached_cold == 0
    assert cached_warm >= 192
    assert warm < cold


def test_disconnect_frees_the_sequence(server, model):
    """A client that leaves mid-stream frees its sequence, and is an ordinary event: no error, no traceback in
    the daemon's log (a burst's clients leaving at once made one each)."""
    logged_before = server.log_path.read_text()
    body = {"model": model, "prompt": "Go on forever:", "max_tokens": 2000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 6:
                break
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        workers = server.admin()["workers"]
        if all(w["running"] == 0 and w["waiting"] == 0 for w in workers):
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"sequence still running after the client left: {workers}")
    deadline = time.monotonic() + 10
    while '"status": "aborted"' not in (logged := server.log_path.read_text()[len(logged_before):]):
        assert time.monotonic() < deadline, logged[-3000:]
        time.sleep(0.1)
    time.sleep(0.3)  # an error, were one logged for the leaving client, would follow the request's own line
    logged = server.log_path.read_text()[len(logged_before):]
    assert "Traceback" not in logged and '"level": "error"' not in logged, logged[-3000:]


def test_greedy_equals_transformers(client, model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = pull()
    tok = AutoTokenizer.from_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    questions = ["What is 2+2?", "Name a planet.", "What color is the sky?", "Say something kind."]
    for q in questions:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
        out = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)
        expected = tok.decode(out[0, len(ids):], skip_special_tokens=True)
        got = client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}],
                                             max_tokens=32, temperature=0).choices[0].message.content
        assert got == expected, q


def test_a_prompt_longer_than_the_step_budget_is_prefilled_in_chunks(client, model, hf_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    # max_num_batched_tokens is 512 here: this prompt takes three steps of prefill before its first token
    prompt = " ".join(f"item {i} is {'red' if i % 3 else 'blue'};" for i in range(170))
    ids = hf_tokenizer.encode(prompt)
    assert len(ids) > 1024
    hf = AutoModelForCausalLM.from_pretrained(pull(), dtype=torch.float32).eval()
    expected = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):]
    got = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
    assert got.usage.prompt_tokens == len(ids)
    assert got.choices[0].text == hf_tokenizer.decode(expected, skip_special_tokens=True)
