"""`zamba2 serve` under hostile input and faults (issue 17): a real server in a subprocess on 127.0.0.1, raw HTTP
over httpx and sockets, and the openai client. After each case the server must still serve a normal request at
its full concurrency, with no leaked slot in /metrics.

The checkpoint is a tiny random untied model whose embedding of one token (BAD) is NaN: the greedy continuation
of FAIL_PROMPT produces it as its third token, so that request breaks in its third decode step with real NaN
logits in its own batch row, the failure a bad request or a broken kernel causes in production. Every other
generation here uses prompts checked to stay clear of BAD.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from test_serve import wait_healthy  # noqa: E402

from zamba2.cache import HybridCache  # noqa: E402
from zamba2.config import Zamba2Config  # noqa: E402
from zamba2.model import Zamba2ForCausalLM  # noqa: E402
from zamba2.tokenizer import Tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "mistral-v0.1-tokenizer.model"
KEY = "hostile-key"
NAME = "tiny"
AUTH = {"Authorization": f"Bearer {KEY}"}
CONCURRENCY, QUEUE, CONTEXT, MAX_BYTES = 4, 8, 512, 4 << 20
HEAVY_BYTES = 768 << 10  # text to tokenise: about 1 s of CPU here, which the event loop must not wait for
HEADER_TIMEOUT, BODY_TIMEOUT, MAX_CONNECTIONS, PROMPT_CACHE_MB = 1.0, 1.0, 24, 16
CHATML = (
    "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 32000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, eos_token_id=[])
    return out[0, len(prompt) :].tolist()


class Setup:
    """The poisoned checkpoint, its local twin and the prompts the tests use."""

    def __init__(self, root: Path) -> None:
        torch.manual_seed(0)
        config = Zamba2Config.preset("tiny", vocab_size=32002, tie_word_embeddings=False)
        self.model = Zamba2ForCausalLM(config).eval()
        self.fail_prompt = ids(12, 1)
        self.bad = greedy(self.model, self.fail_prompt, 3)[2]
        assert self.bad not in self.fail_prompt + greedy(self.model, self.fail_prompt, 2)
        with torch.no_grad():
            self.model.model.embed_tokens.weight[self.bad] = float("nan")
        self.folder = root / "model"
        self.model.save_pretrained(self.folder)
        source = root / "tokenizer-source"
        source.mkdir()
        shutil.copy(FIXTURE, source / "tokenizer.model")
        tokens = {"32000": {"content": "<|im_start|>", "special": True},
                  "32001": {"content": "<|im_end|>", "special": True}}  # fmt: skip
        (source / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML,
                                                                  "added_tokens_decoder": tokens}))  # fmt: skip
        self.tokenizer = Tokenizer.from_pretrained(source)
        self.tokenizer.save_pretrained(self.folder)
        self.normal = [self.clean(6 + i, 100 + i, 8) for i in range(CONCURRENCY)]  # (prompt, expected text)

    def clean(self, n: int, seed: int, new: int) -> tuple[list[int], str]:
        """A prompt whose greedy continuation of `new` tokens stays clear of BAD, and that continuation's text."""
        while True:
            prompt = ids(n, seed)
            out = greedy(self.model, prompt, new)
            if self.bad not in prompt + out:
                return prompt, self.tokenizer.decode(out, skip_special_tokens=True).lstrip()  # compared lstripped
            seed += 1000


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    return Setup(tmp_path_factory.mktemp("hostile"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    def __init__(self, setup: Setup, log: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self.log = open(log, "w")  # a file, not a pipe: a full pipe would block the server
        argv = [
            sys.executable, "-m", "zamba2.serve", "--model", str(setup.folder), "--served-model-name", NAME,
            "--port", str(self.port), "--api-key", KEY, "--max-concurrency", str(CONCURRENCY),
            "--max-queue", str(QUEUE), "--max-model-len", str(CONTEXT), "--max-tokens-limit", "512",
            "--max-request-bytes", str(MAX_BYTES), "--header-timeout", str(HEADER_TIMEOUT),
            "--body-timeout", str(BODY_TIMEOUT), "--max-connections", str(MAX_CONNECTIONS),
            "--prefill-chunk", "32", "--prompt-cache-mb", str(PROMPT_CACHE_MB), "--threads", "1",
            "--log-level", "info", *extra,
        ]  # fmt: skip
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        wait_healthy(self.proc, self.url, log)

    def text(self) -> str:
        return self.log_path.read_text()

    def status(self, field: str) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
        raise AssertionError(f"{field} not in /proc/{self.proc.pid}/status")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture(scope="module")
def server(setup: Setup, tmp_path_factory):
    proc = Proc(setup, tmp_path_factory.mktemp("log") / "server.log")
    yield proc
    proc.close()


def post(url: str, path: str, body, headers: dict | None = None, timeout: float = 60) -> httpx.Response:
    content = body if isinstance(body, str | bytes) else json.dumps(body)
    return httpx.post(url + path, content=content, headers={**AUTH, **(headers or {})}, timeout=timeout)


def metric(url: str, name: str, labels: str = "") -> float:
    """The sum of a metric's series whose labels contain `labels`."""
    text = httpx.get(f"{url}/metrics", headers=AUTH, timeout=10).text
    series = re.finditer(rf"^{name}(?:{{([^}}]*)}})? (\S+)$", text, re.M)
    return sum(float(m[2]) for m in series if labels in (m[1] or ""))


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def complete(url: str, prompt: list[int], n: int, **extra) -> httpx.Response:
    body = {"model": NAME, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True, **extra}
    return post(url, "/v1/completions", body)


def assert_serves(server: Proc, setup: Setup) -> None:
    """Full concurrency still works, each answer equal to the model alone, and no slot is left behind."""
    results: list[httpx.Response | None] = [None] * CONCURRENCY

    def one(i: int) -> None:
        results[i] = complete(server.url, setup.normal[i][0], 8)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(CONCURRENCY)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for r, (_, expected) in zip(results, setup.normal, strict=True):
        assert r is not None and r.status_code == 200, r and r.text
        assert r.json()["choices"][0]["text"].lstrip() == expected
    wait_until(lambda: metric(server.url, "zamba2_outstanding_requests") == 0, 10, "no outstanding request")
    assert metric(server.url, "zamba2_untracked_requests") == 0
    health = httpx.get(f"{server.url}/health", timeout=5).json()
    assert health["status"] == "ok" and health["untracked"] == 0, health


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    return r.json()["error"]


# ---- 1, 2: failures are contained -----------------------------------------------------------------


def test_1_tiny_temperature_never_leaks_a_slot(server: Proc, setup: Setup):
    prompt, expected = setup.normal[0]
    for _ in range(CONCURRENCY + QUEUE + 2):  # one leaked slot each would wedge the server before the end
        r = complete(server.url, prompt, 8, temperature=1e-40, seed=3)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"].lstrip() == expected  # temperature -> 0 is greedy
    assert_serves(server, setup)


def test_2_a_request_failing_mid_decode_fails_alone(server: Proc, setup: Setup):
    """A greedy stream runs while a request that breaks mid-decode joins its batch: the stream's text is the
    text it has alone; the broken request gets a 500 in OpenAI's shape with a request id and no internals."""
    prompt, expected = setup.clean(10, 7, 40)
    body = {"model": NAME, "prompt": prompt, "max_tokens": 40, "temperature": 0, "ignore_eos": True, "stream": True}
    text, failed = "", None
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=60) as stream:
        lines = stream.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                text += json.loads(line[6:])["choices"][0]["text"]
                break
        failed = complete(server.url, setup.fail_prompt, 20)  # joins the running batch
        for line in lines:
            if line.startswith("data: {"):
                text += json.loads(line[6:])["choices"][0]["text"]
    assert text.lstrip() == expected
    error = error_of(failed, 500)
    rid = failed.headers["x-request-id"]
    assert error["type"] == "server_error" and rid in error["message"]
    assert "finite" not in error["message"] and "NaN" not in error["message"]
    wait_until(lambda: rid in server.text(), 5, "the request id in the log")
    assert re.search(rf"{rid}.*not finite", server.text())  # the detail is in the log only
    # the same failure in a stream: an error event, then [DONE]
    body = {"model": NAME, "prompt": setup.fail_prompt, "max_tokens": 20, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=60) as stream:
        events = [line for line in stream.iter_lines() if line.startswith("data: ")]
    assert json.loads(events[-2][6:])["error"]["type"] == "server_error" and events[-1] == "data: [DONE]"
    assert metric(server.url, "zamba2_failed_requests_total") >= 2
    assert_serves(server, setup)


# ---- 3: context and body limits -------------------------------------------------------------------


def raw_exchange(server: Proc, data: bytes, wait: float = 10.0) -> bytes:
    """Send raw bytes on a fresh connection; everything the server answers until it closes (or `wait` s)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=wait) as sock:
        sock.sendall(data)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return out


def test_3_context_and_body_limits(server: Proc, setup: Setup):
    error = error_of(complete(server.url, ids(CONTEXT, 2), 1), 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert str(CONTEXT) in error["message"]
    error = error_of(complete(server.url, ids(CONTEXT - 100, 3), 200), 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "max_tokens"
    assert f"{CONTEXT - 100 + 200} tokens" in error["message"]
    # without max_tokens a chat answer gets what the context leaves: prompt + answer <= CONTEXT
    long_chat = {"model": NAME, "messages": [{"role": "user", "content": "word " * 450}], "ignore_eos": True}
    r = post(server.url, "/v1/chat/completions", long_chat)
    assert r.status_code == 200 and r.json()["usage"]["total_tokens"] <= CONTEXT, r.text
    # a body past --max-request-bytes: refused from its Content-Length, before a byte of it is read
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {10**9}\r\n\r\n").encode()  # fmt: skip
    answer = raw_exchange(server, head)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"--max-request-bytes" in answer and b'"request_too_large"' in answer
    # a chunked body (no Content-Length) is cut when it passes the limit
    def chunks():
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(MAX_BYTES // 65536 + 2):
            yield b"a" * 65536
    r = httpx.post(f"{server.url}/tokenize", content=chunks(), headers=AUTH, timeout=60)
    assert error_of(r, 413)["code"] == "request_too_large"
    rss = server.status("VmRSS")
    r = post(server.url, "/tokenize", {"prompt": "x" * (50 << 20)})  # the 50 MB body of the issue
    assert error_of(r, 413)["code"] == "request_too_large"
    assert server.status("VmRSS") < rss + (64 << 20)
    assert_serves(server, setup)


# ---- 4: fair prefill -----------------------------------------------------------------------------


def test_4_a_short_request_behind_a_long_prompt_starts_at_once(server: Proc, setup: Setup):
    long_prompt, _ = ids(CONTEXT - 8, 4), None
    short_prompt, short_text = setup.normal[1]
    body = {"model": NAME, "prompt": long_prompt, "max_tokens": 2, "temperature": 0, "stream": True}
    times: dict[str, float] = {}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=120) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line) == ": keep-alive"  # the long prompt is being prefilled
        start = time.monotonic()
        r = complete(server.url, short_prompt, 8)
        times["short"] = time.monotonic() - start
        for line in lines:
            if line.startswith("data: {"):
                times["long"] = time.monotonic() - start
                break
        for _ in lines:
            pass
    assert r.status_code == 200 and r.json()["choices"][0]["text"].lstrip() == short_text
    # first come, first served it would wait for the whole long prompt (16 chunks of 32); now it shares them
    assert times["short"] < times["long"], times
    assert_serves(server, setup)


# ---- 5: CPU work off the event loop -----------------------------------------------------------------


def health_latencies(server: Proc, work) -> tuple[list[float], object]:
    """Poll /health every 20 ms while `work()` runs in a thread; the latencies and work's result."""
    out: list = []
    worker = threading.Thread(target=lambda: out.append(work()))
    lat: list[float] = []
    with httpx.Client(timeout=10) as client:
        client.get(f"{server.url}/health")
        worker.start()
        time.sleep(0.2)  # the body is on its way and being worked on
        while worker.is_alive():
            t = time.monotonic()
            assert client.get(f"{server.url}/health").status_code == 200
            lat.append(time.monotonic() - t)
            time.sleep(0.02)
    worker.join()
    return lat, out[0]


@pytest.mark.parametrize("what", ["tokenize", "chat", "json"])
def test_5_health_answers_during_cpu_heavy_requests(server: Proc, setup: Setup, what: str):
    text = "hello world, this is a test of the tokenizer. " * (HEAVY_BYTES // 46)
    body = {
        "tokenize": ("/tokenize", {"prompt": text}),
        "chat": ("/tokenize", {"messages": [{"role": "user", "content": text}]}),
        "json": ("/v1/completions", {"model": NAME, "prompt": [5] * (MAX_BYTES // 4), "max_tokens": 1}),
    }[what]
    lat, r = health_latencies(server, lambda: post(server.url, *body, timeout=300))
    assert r.status_code == (400 if what == "json" else 200), r.text  # the id list is past the context
    lat.sort()
    print(f"{what}: {len(lat)} polls, median {lat[len(lat) // 2] * 1e3:.1f} ms, max {lat[-1] * 1e3:.1f} ms")
    assert len(lat) >= 3 and lat[len(lat) // 2] < 0.1, lat
    assert_serves(server, setup)


# ---- 6: every error in OpenAI's shape -----------------------------------------------------------------


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", '{"model": "tiny", "prompt": "a\\udfff", "max_tokens": 1}', "prompt"),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff"}]}',
     "messages[0].content"),
    ("/v1/chat/completions", '{"model": "t\\ud800", "messages": [{"role": "user", "content": "hi"}]}', "model"),
    ("/tokenize", '{"prompt": "\\udfffx"}', "prompt"),
    ("/v1/completions", '{"model": "tiny", "prompt": "hi", "user": {"a": ["\\udc00"]}}', "user.a[0]"),
])  # fmt: skip
def test_6_lone_surrogates_are_a_400_naming_the_field(server: Proc, setup: Setup, path, body, param):
    error = error_of(post(server.url, path, body), 400)
    assert error["param"] == param and "surrogate" in error["message"], error
    assert_serves(server, setup)


def test_6_deep_json_and_the_catch_all(server: Proc, setup: Setup):
    error = error_of(post(server.url, "/v1/completions", "[" * 100_000 + "]" * 100_000), 400)
    assert error["code"] == "invalid_json"
    deep = '{"model": "tiny", "prompt": "hi", "extra": ' + '{"a": ' * 80 + "1" + "}" * 80 + "}"
    error = error_of(post(server.url, "/v1/completions", deep), 400)
    assert error["code"] == "invalid_json" and "nested deeper" in error["message"]
    error = error_of(post(server.url, "/nowhere", {}), 404)
    assert error["code"] == "not_found"
    assert "Traceback" not in server.text()
    assert_serves(server, setup)


def test_6_a_handler_exception_is_a_generic_500_with_the_request_id():
    """guard.Guard around a real Starlette app whose endpoint raises."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from zamba2.serve.guard import Guard
    from zamba2.serve.metrics import ServerMetrics

    async def boom(request):
        raise RuntimeError("secret internal detail")

    metrics = ServerMetrics(lambda: None)
    guard = Middleware(Guard, metrics=metrics, endpoints={"/boom"}, max_body=100, body_timeout=5.0)
    app = Starlette(routes=[Route("/boom", boom, methods=["POST"])], middleware=[guard])  # as create_app has it
    client = TestClient(app, raise_server_exceptions=False)
    r = client.post("/boom", content=b"{}", headers={"X-Request-Id": "abc-123"})
    error = error_of(r, 500)
    assert error["type"] == "server_error" and "abc-123" in error["message"] and "secret" not in r.text
    assert r.headers["x-request-id"] == "abc-123"
    assert error_of(client.post("/boom", content=b"x" * 101), 413)["code"] == "request_too_large"
    assert error_of(client.post("/boom", content=b"{}", headers={"Content-Type": "text/plain"}), 415)
    assert 'zamba2_requests_total{endpoint="/boom",status="500"} 1.0' in metrics.render().decode()


# ---- 7: slow clients ----------------------------------------------------------------------------------


def closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    sock.settimeout(seconds)
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
        return True, data
    except ConnectionResetError:
        return True, data
    except TimeoutError:
        return False, data


def test_7_slow_clients_are_timed_out_and_connections_capped(server: Proc, setup: Setup):
    silent = socket.create_connection(("127.0.0.1", server.port))
    partial = socket.create_connection(("127.0.0.1", server.port))
    partial.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # headers never finished, no API key
    slow_body = socket.create_connection(("127.0.0.1", server.port))
    slow_body.sendall(b"POST /tokenize HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                      + b"\r\nContent-Length: 100\r\n\r\n{\"prompt\": ")  # fmt: skip
    for sock in (silent, partial):
        closed, data = closed_within(sock, HEADER_TIMEOUT + 5)
        assert closed and data == b""
    closed, data = closed_within(slow_body, BODY_TIMEOUT + 5)
    assert closed and data.startswith(b"HTTP/1.1 408") and b"--body-timeout" in data, data
    # more connections than --max-connections: the extra ones are closed at once
    held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(MAX_CONNECTIONS)]
    extra = socket.create_connection(("127.0.0.1", server.port))
    closed, _ = closed_within(extra, 0.5)
    assert closed
    for sock in [*held, extra, silent, partial, slow_body]:
        sock.close()
    time.sleep(0.2)
    assert_serves(server, setup)


# ---- 9: the smaller items -------------------------------------------------------------------------------


def test_9_disconnect_mid_upload_is_no_error(server: Proc, setup: Setup):
    before = metric(server.url, "zamba2_requests_total", 'status="500"')
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                     + b"\r\nContent-Length: 1000\r\n\r\n{\"model\": ")  # fmt: skip
        time.sleep(0.2)
    wait_until(lambda: metric(server.url, "zamba2_requests_total", 'status="499"') >= 1, 5, "a 499")
    assert metric(server.url, "zamba2_requests_total", 'status="500"') == before
    assert "Traceback" not in server.text() and "ERROR" not in server.text().split("not finite")[-1]
    assert_serves(server, setup)


@pytest.mark.parametrize("change,param", [
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"best_of": 3}, "best_of"),
    ({"suffix": "the end"}, "suffix"),
])  # fmt: skip
def test_9_fields_that_change_the_meaning_are_refused(server: Proc, change: dict, param: str):
    r = post(server.url, "/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 1, **change})
    assert error_of(r, 400)["param"] == param


def test_9_image_parts_content_type_and_load_failure_text(server: Proc, setup: Setup, tmp_path: Path):
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    r = post(server.url, "/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": [image]}]})
    error = error_of(r, 400)
    assert error["param"] == "messages[0].content" and "'image_url' part" in error["message"], error
    r = post(server.url, "/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 1},
             headers={"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert error_of(r, 415)["code"] == "unsupported_media_type"
    r = post(server.url, "/v1/completions", {"model": NAME, "prompt": setup.normal[0][0], "max_tokens": 1},
             headers={"Content-Type": "application/json; charset=utf-8"})  # fmt: skip
    assert r.status_code == 200
    # a failed load: /health (no API key) and the endpoints say so without the exception's text
    from starlette.testclient import TestClient

    from zamba2.serve.app import create_app
    from zamba2.serve.command import build_parser

    secret = tmp_path / "secret-folder-name"
    with TestClient(create_app(build_parser().parse_args(["--model", str(secret)]))) as client:
        wait_until(lambda: client.get("/health").json()["status"] == "error", 30, "the load to fail")
        assert "secret" not in client.get("/health").text
        r = client.post("/v1/completions", json={"model": str(secret), "prompt": "hi"})
        assert error_of(r, 503)["code"] == "model_not_ready" and "secret" not in r.text
    assert_serves(server, setup)


def test_9_an_identical_prompt_resent_hits_the_prompt_cache(server: Proc, setup: Setup):
    prompt, _ = setup.clean(40, 9, 6)
    first = complete(server.url, prompt, 6)
    hits = metric(server.url, "zamba2_prompt_cache_hits_total")
    second = complete(server.url, prompt, 6)
    assert metric(server.url, "zamba2_prompt_cache_hits_total") == hits + 1
    assert second.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == len(prompt)
    assert second.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]


# ---- memory: a burst of maximal requests -------------------------------------------------------------


def test_memory_stays_under_the_readme_bound(server: Proc, setup: Setup):
    """README: RSS <= idle RSS (weights + runtime) + 2 x max-concurrency x one request's full-context cache
    (states + K/V) + --prompt-cache-mb + 256 MiB of working memory (activations of a prefill chunk, request
    bodies, allocator slack)."""
    config = setup.model.config
    per_request = HybridCache(config, 1, CONTEXT, dtype=torch.float32, device="meta").memory_bytes()
    idle = server.status("VmRSS")
    bound = idle + 2 * CONCURRENCY * per_request + (PROMPT_CACHE_MB << 20) + (256 << 20)
    results: list[int] = []

    def one(i: int) -> None:
        prompt = [t if t != setup.bad else 5 for t in ids(CONTEXT - 16, 200 + i)]
        body = {"model": NAME, "prompt": prompt, "max_tokens": 16, "ignore_eos": True, "temperature": 0.5}
        results.append(post(server.url, "/v1/completions", body, timeout=600).status_code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(CONCURRENCY + QUEUE)]
    for t in threads:
        t.start()
    peak = idle
    while any(t.is_alive() for t in threads):
        peak = max(peak, server.status("VmRSS"))
        time.sleep(0.05)
    print(f"idle RSS {idle / 2**20:.0f} MiB, burst peak {peak / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB")
    assert sorted(results) == [200] * (CONCURRENCY + QUEUE)
    assert peak <= bound
    assert_serves(server, setup)


# ---- 8: graceful shutdown (its own server) -----------------------------------------------------------


def test_8_sigterm_finishes_short_requests_and_ends_long_ones_cleanly(setup: Setup, tmp_path: Path):
    # Long requests that cannot finish within the grace period even on a fast machine (500 tokens once did).
    proc = Proc(setup, tmp_path / "server.log", "--shutdown-grace", "3", "--max-model-len", "4096",
                "--max-tokens-limit", "4000")  # fmt: skip
    try:
        short_prompt, short_text = setup.normal[2]
        out: dict[str, object] = {}

        def long_stream() -> None:
            body = {"model": NAME, "prompt": setup.normal[0][0], "max_tokens": 3500, "ignore_eos": True,
                    "temperature": 0, "stream": True}  # fmt: skip
            with httpx.stream("POST", f"{proc.url}/v1/completions", json=body, headers=AUTH, timeout=60) as r:
                out["stream"] = [line for line in r.iter_lines() if line.startswith("data: ")]

        def long_whole() -> None:
            out["whole"] = complete(proc.url, setup.normal[1][0], 3500)

        def short() -> None:
            time.sleep(0.3)  # in flight when the signal comes, done well within the grace period
            out["short"] = complete(proc.url, short_prompt, 8)

        threads = [threading.Thread(target=f) for f in (long_stream, long_whole, short)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        proc.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        assert out["short"].status_code == 200 and out["short"].json()["choices"][0]["text"].lstrip() == short_text
        events = out["stream"]
        assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["error"]["code"] == "server_shutting_down"
        assert error_of(out["whole"], 503)["code"] == "server_shutting_down"
        proc.proc.wait(timeout=20)
        assert "Traceback" not in proc.text()
    finally:
        proc.close()
