"""`zamba2 serve` end to end: a real server in a subprocess on 127.0.0.1, a tiny random checkpoint, the official
openai client for the happy paths and raw httpx for errors, concurrency, disconnects and back-pressure."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from zamba2.config import Zamba2Config  # noqa: E402
from zamba2.model import Zamba2ForCausalLM  # noqa: E402
from zamba2.tokenizer import Tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "mistral-v0.1-tokenizer.model"
KEY = "test-key"
NAME = "tiny-zamba2"
CHATML = (
    "{{ bos_token }}{% for message in messages %}\n"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}\n<|im_start|>assistant\n{% endif %}"
)
CHAT_TOKENS = {
    "32000": {"content": "<|im_start|>", "special": True},
    "32001": {"content": "<|im_end|>", "special": True},
}
MAX_CONCURRENCY, MAX_QUEUE, LIMIT = 8, 4, 2048  # the tiny model's context: 4096 tokens


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random Zamba2 (vocab 32002: Mistral's 32000 + the two ChatML tokens) with its tokenizer."""
    root = tmp_path_factory.mktemp("serve")
    source = root / "tokenizer-source"
    source.mkdir()
    shutil.copy(FIXTURE, source / "tokenizer.model")
    config = {"chat_template": CHATML, "added_tokens_decoder": CHAT_TOKENS, "pad_token": None}
    (source / "tokenizer_config.json").write_text(json.dumps(config))
    folder = root / "model"
    torch.manual_seed(0)
    Zamba2ForCausalLM(Zamba2Config.preset("tiny", vocab_size=32002)).save_pretrained(folder)
    Tokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, limit: float = 120) -> None:
    """Until the server at `url` answers /health with 200; fails with its log if it exits or takes too long."""
    deadline = time.monotonic() + limit
    while True:
        assert proc.poll() is None, "server exited: " + log.read_text()
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"server did not become healthy within {limit:.0f} s"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def server(checkpoint: Path):
    port = free_port()
    log = open(checkpoint.parent / "server.log", "w")  # a file, not a pipe: a full pipe would block the server
    argv = [
        sys.executable, "-m", "zamba2.serve", "--model", str(checkpoint), "--served-model-name", NAME,
        "--port", str(port), "--api-key", KEY, "--max-concurrency", str(MAX_CONCURRENCY),
        "--max-queue", str(MAX_QUEUE), "--max-tokens-limit", str(LIMIT), "--prefill-chunk", "64",
        "--prompt-cache-mb", "64", "--log-level", "warning", "--threads", "1",
    ]  # fmt: skip
    # One torch thread: tiny ops gain nothing from more, and a shared machine punishes oversubscription.
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, checkpoint.parent / "server.log")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        log.close()


@pytest.fixture(scope="module")
def client(server: str):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local(checkpoint: Path):
    """The same checkpoint in this process: what a request must give when served alone."""
    return Zamba2ForCausalLM.from_pretrained(checkpoint), Tokenizer.from_pretrained(checkpoint)


def greedy_text(local, ids: list[int], n: int) -> str:
    model, tok = local
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, eos_token_id=[])
    return tok.decode(out[0, len(ids) :].tolist(), skip_special_tokens=True)


def completion_text(local, ids: list[int], n: int) -> str:
    """A completion's text: the new tokens read after the prompt (a leading space is kept)."""
    model, tok = local
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, eos_token_id=[])[0].tolist()
    return tok.decode(out, skip_special_tokens=True)[len(tok.decode(ids, skip_special_tokens=True)) :]


def chat_ids(local, messages: list[dict]) -> list[int]:
    return local[1].apply_chat_template(messages, tokenize=True)


AUTH = {"Authorization": f"Bearer {KEY}"}
NO_EOS = {"ignore_eos": True}


def post(url: str, path: str, body, headers: dict | None = None, timeout: float = 60) -> httpx.Response:
    content = body if isinstance(body, str | bytes) else json.dumps(body)
    return httpx.post(url + path, content=content, headers={**AUTH, **(headers or {})}, timeout=timeout)


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", headers=AUTH, timeout=10).text
    values = [float(m[1]) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
    assert values, f"{name} not in /metrics"
    return sum(values)


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# ---- happy paths with the openai client ----------------------------------------------------------


def test_health_models_and_auth(server: str, client):
    assert httpx.get(f"{server}/health").json()["status"] == "ok"  # no key needed
    assert [m.id for m in client.models.list().data] == [NAME]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        r = httpx.get(f"{server}/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=NAME, prompt="hi", max_tokens=1)


def test_chat_completion_equals_generate(client, local):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0,
                                       extra_body=NO_EOS)  # fmt: skip
    ids = chat_ids(local, messages)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == greedy_text(local, ids, 12)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 12, len(ids) + 12)
    assert r.model == NAME and r.object == "chat.completion" and r.id.startswith("chatcmpl-")


def test_completion_and_stream_with_usage(client, local):
    prompt = "Once upon a time"
    whole = client.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0, extra_body=NO_EOS)
    ids = local[1].encode(prompt)
    assert whole.choices[0].text == completion_text(local, ids, 10)
    stream = client.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body=NO_EOS)  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == len(ids)
    # token ids work as a prompt too
    by_ids = client.completions.create(model=NAME, prompt=ids, max_tokens=10, temperature=0, extra_body=NO_EOS)
    assert by_ids.choices[0].text == whole.choices[0].text


def test_chat_stream_equals_whole(client):
    messages = [{"role": "user", "content": "Tell me a story."}]
    kw = dict(model=NAME, messages=messages, max_tokens=15, temperature=0, extra_body=NO_EOS)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_strings(client):
    kw = dict(model=NAME, prompt="The weather today", max_tokens=24, temperature=0, extra_body=NO_EOS)
    full = client.completions.create(**kw).choices[0].text
    stop = full[12:15]
    expected = full[: full.find(stop)]
    cut = client.completions.create(**kw, stop=[stop, "never-appears-here"])
    assert cut.choices[0].text == expected and cut.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(**kw, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_seed_reproducibility(client, local):
    kw = dict(model=NAME, prompt="Pick a number", max_tokens=10, temperature=1.0, top_p=0.95, extra_body=NO_EOS)
    a = client.completions.create(**kw, seed=1234).choices[0].text
    b = client.completions.create(**kw, seed=1234).choices[0].text
    c = client.completions.create(**kw, seed=99).choices[0].text
    assert a == b and a != c
    model, tok = local
    ids = tok.encode("Pick a number")
    out = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=True, temperature=1.0, top_p=0.95,
                         seed=1234, eos_token_id=[])  # fmt: skip
    assert a == tok.decode(out[0].tolist(), skip_special_tokens=True)[len(tok.decode(ids, skip_special_tokens=True)) :]


def test_logprobs(client, local):
    messages = [{"role": "user", "content": "Count to three."}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=3, extra_body=NO_EOS)  # fmt: skip
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    model, tok = local
    ids = chat_ids(local, messages)
    new = model.generate(torch.tensor([ids]), max_new_tokens=5, eos_token_id=[])[0]
    with torch.no_grad():
        expected = torch.log_softmax(model(new[None]).logits[0, len(ids) - 1 : -1].float(), -1)  # (5, V)
    for t, entry in enumerate(content):
        token = int(new[len(ids) + t])
        assert abs(entry.logprob - expected[t, token].item()) < 1e-4, f"token {t}"
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob == entry.logprob  # greedy = best
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    text = client.completions.create(model=NAME, prompt="Count", max_tokens=4, temperature=0, logprobs=2,
                                     extra_body=NO_EOS)  # fmt: skip
    lp = text.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert all(len(top) <= 2 for top in lp.top_logprobs) and lp.text_offset[0] == 0


def test_tokenize_detokenize(server: str, local):
    tok = local[1]
    r = post(server, "/tokenize", {"model": NAME, "prompt": "Hello world"})
    assert r.json()["tokens"] == tok.encode("Hello world") and r.json()["count"] == len(tok.encode("Hello world"))
    messages = [{"role": "user", "content": "hi"}]
    assert post(server, "/tokenize", {"messages": messages}).json()["tokens"] == chat_ids(local, messages)
    assert post(server, "/detokenize", {"tokens": tok.encode("Hello world")}).json()["prompt"] == "<s> Hello world"
    assert post(server, "/detokenize", {"tokens": [10**7]}).json()["error"]["param"] == "tokens"


# ---- errors, raw HTTP ----------------------------------------------------------------------------

CHAT = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
BAD = [  # (body changes, param named in the error)
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": 3}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": 2.5}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"presence_penalty": -3}, "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": LIMIT + 1}, "max_tokens"),
    ({"max_completion_tokens": "many"}, "max_completion_tokens"),
    ({"n": 2}, "n"),
    ({"seed": "x"}, "seed"),
    ({"stop": [1, 2]}, "stop"),
    ({"stop": ["a"] * 17}, "stop"),
    ({"stream": "yes"}, "stream"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": None}, "messages"),
    ({"model": 7}, "model"),
]


@pytest.mark.parametrize("change,param", BAD, ids=[p for _, p in BAD])
def test_invalid_chat_parameters(server: str, change: dict, param: str):
    r = post(server, "/v1/chat/completions", {**CHAT, **change})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert param.split("[")[0].split(".")[0] in error["message"]


def test_other_errors(server: str, client):
    r = post(server, "/v1/chat/completions", "{not json")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert post(server, "/v1/chat/completions", "[1, 2]").status_code == 400
    r = post(server, "/v1/chat/completions", {**CHAT, "model": "gpt-5"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-5", prompt="hi", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="n"):
        client.completions.create(model=NAME, prompt="hi", max_tokens=1, n=3)
    r = post(server, "/v1/completions", {"model": NAME, "prompt": [5, 40000], "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = post(server, "/v1/completions", {"model": NAME, "prompt": [], "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = post(server, "/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 1, "unknown": {"x": 1}})
    assert r.status_code == 200  # unknown fields are ignored
    r = httpx.get(f"{server}/v1/nowhere", headers=AUTH)
    assert r.status_code == 404 and "error" in r.json()


# ---- concurrency, cancellation, back-pressure, keep-alive, prompt cache --------------------------


def test_eight_concurrent_streams_equal_sequential(server: str, local):
    prompts = [f"Story number {i}: once" + " upon" * i for i in range(8)]
    n = 48
    steps_before = metric(server, "zamba2_decode_steps_total")

    async def stream(c, prompt: str) -> str:
        chunks = await c.completions.create(model=NAME, prompt=prompt, max_tokens=n, temperature=0, stream=True,
                                            extra_body=NO_EOS)  # fmt: skip
        return "".join([ch.choices[0].text async for ch in chunks if ch.choices])

    async def all_at_once() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120) as c:
            return await asyncio.gather(*(stream(c, p) for p in prompts))

    texts = asyncio.run(all_at_once())
    steps = metric(server, "zamba2_decode_steps_total") - steps_before
    for prompt, text in zip(prompts, texts, strict=True):
        assert text == completion_text(local, local[1].encode(prompt), n), prompt
    # sequences shared decode steps: alone they would need 8 * (n - 1) steps
    assert steps < 8 * (n - 1) / 2, f"{steps} decode steps for 8 streams of {n} tokens"
    assert metric(server, "zamba2_active_sequences") == 0


def test_disconnect_frees_the_slot(server: str):
    cancelled = metric(server, "zamba2_cancelled_requests_total")
    body = {"model": NAME, "prompt": "Go on forever", "max_tokens": LIMIT, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers=AUTH, timeout=30) as r:
        lines = r.iter_lines()
        for _ in range(6):  # a few chunks arrive, then the client goes away mid-stream
            assert next(lines) is not None
        assert metric(server, "zamba2_active_sequences") == 1
    wait_until(lambda: metric(server, "zamba2_active_sequences") == 0, 10, "the streaming slot to be freed")
    assert metric(server, "zamba2_cancelled_requests_total") == cancelled + 1
    # a non-streaming client that gives up is cancelled too
    with pytest.raises(httpx.ReadTimeout):
        post(server, "/v1/completions", {**body, "stream": False}, timeout=1.5)
    wait_until(lambda: metric(server, "zamba2_active_sequences") == 0, 10, "the non-streaming slot to be freed")
    assert metric(server, "zamba2_cancelled_requests_total") == cancelled + 2


def test_burst_past_the_queue_gets_429_and_server_stays_healthy(server: str, client):
    burst = MAX_CONCURRENCY + MAX_QUEUE + 8
    # long enough that the first requests are still running when the last of the burst arrives
    body = {"model": NAME, "prompt": "Burst", "max_tokens": 256, "temperature": 0, "ignore_eos": True}

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=burst)) as c:
            return await asyncio.gather(
                *(c.post(f"{server}/v1/completions", json=body, headers=AUTH) for _ in range(burst))
            )

    codes = [r.status_code for r in asyncio.run(fire())]
    rejected = [r for r in codes if r == 429]
    assert set(codes) <= {200, 429} and codes.count(200) >= MAX_CONCURRENCY, codes
    assert len(rejected) >= 1, codes
    r = post(server, "/v1/completions", body)  # a refused request looks like OpenAI's
    assert httpx.get(f"{server}/health").status_code == 200 and r.status_code == 200
    assert client.completions.create(model=NAME, prompt="after", max_tokens=2).choices[0].text is not None


def test_burst_429_shape(server: str):
    """While the queue is full, a refusal carries Retry-After and the OpenAI error body."""
    hold = {"model": NAME, "prompt": "hold", "max_tokens": LIMIT, "ignore_eos": True, "stream": True}
    streams = []
    try:
        for _ in range(MAX_CONCURRENCY + MAX_QUEUE):
            streams.append(httpx.stream("POST", f"{server}/v1/completions", json=hold, headers=AUTH, timeout=30))
            streams[-1].__enter__()
        r = post(server, "/v1/completions", {**hold, "stream": False, "max_tokens": 1})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
    finally:
        for s in streams:
            s.__exit__(None, None, None)
    wait_until(lambda: metric(server, "zamba2_active_sequences") + metric(server, "zamba2_queue_depth") == 0, 20,
               "the held streams to be cancelled")  # fmt: skip


def test_keep_alive_while_a_long_prompt_prefills(server: str):
    ids = torch.randint(3, 32000, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    body = {"model": NAME, "prompt": ids, "max_tokens": 2, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    # 300 tokens in chunks of 64: four chunks finish before the prompt does
    assert lines.count(": keep-alive") >= 4
    assert lines[-1] == "data: [DONE]"


def test_second_chat_turn_resumes_from_the_prompt_cache(server: str, client, local):
    hits = metric(server, "zamba2_prompt_cache_hits_total")
    turn1 = [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "A fruit?"}]
    first = client.chat.completions.create(model=NAME, messages=turn1, max_tokens=6, temperature=0)
    answer = first.choices[0].message.content
    turn2 = turn1 + [{"role": "assistant", "content": answer}, {"role": "user", "content": "Another one?"}]
    second = client.chat.completions.create(model=NAME, messages=turn2, max_tokens=8, temperature=0,
                                            extra_body=NO_EOS)  # fmt: skip
    assert metric(server, "zamba2_prompt_cache_hits_total") >= hits + 1
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    assert second.choices[0].message.content == greedy_text(local, chat_ids(local, turn2), 8)


# ---- in-process: loading state, CORS, command line ----------------------------------------------


def test_health_is_503_while_loading_and_cors(checkpoint: Path):
    from starlette.testclient import TestClient

    from zamba2.serve.app import create_app
    from zamba2.serve.command import build_parser

    args = build_parser().parse_args(["--model", str(checkpoint), "--cors-origins", "http://ui.example"])
    client = TestClient(create_app(args))  # outside `with`: no lifespan, so the model never loads
    r = client.get("/health")
    assert r.status_code == 503 and r.json() == {"status": "loading"}
    r = client.post("/v1/completions", json={"model": str(checkpoint), "prompt": "hi"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
    r = client.options("/v1/chat/completions", headers={"Origin": "http://ui.example",
                                                        "Access-Control-Request-Method": "POST"})  # fmt: skip
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://ui.example"
    assert "zamba2_active_sequences 0.0" in client.get("/metrics").text


def test_main_exits_nonzero_when_the_model_cannot_load(tmp_path: Path):
    from zamba2.serve import main

    assert main(["--model", str(tmp_path / "missing"), "--port", str(free_port()), "--log-level", "critical"]) == 1
