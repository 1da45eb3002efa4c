"""`zamba2 serve`: an OpenAI-compatible HTTP server in front of the batching engine.

    POST /v1/chat/completions   messages rendered with the tokenizer's chat template
    POST /v1/completions        a prompt (string or token ids) or a list of them: one choice each; `echo`
    GET  /tokenizer_info        the tokenizer's special tokens, chat template, length (lm_eval's remote tokenizer)
    GET  /v1/models             the served model name
    GET  /health                200 when ready, 503 while the model loads (never needs the API key)
    GET  /metrics               Prometheus text
    POST /tokenize, /detokenize

Threads: uvicorn's event loop runs the handlers; the model loads in a thread at startup (so /health can answer
503 meanwhile); the engine thread owns the model afterwards. A handler submits a GenerationRequest with a
channel whose sink hands engine events to the event loop (call_soon_threadsafe), then streams them as SSE or
collects them into one response. A client that disconnects (streaming or not) cancels its request, which frees
its batch row before the next decode step. CPU work that grows with the request (JSON parsing, chat templates,
tokenising) runs in worker threads (`plumbing.offload`), so /health and the streams keep answering meanwhile.

Every request passes guard.py first (request id, Content-Type, body size and timeout, the catch-all 500) and
every error leaves in OpenAI's shape. An engine Failure is a 500 with a generic message and the request id (the
detail is in the log), or a 503 when the server is shutting down.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from zamba2.sampling import SamplingParams
from zamba2.serve import loading
from zamba2.serve.engine import Engine, Failure, GenerationRequest, Output, Progress, QueueFull, ShuttingDown
from zamba2.serve.guard import GENERIC_500, Guard
from zamba2.serve.metrics import ServerMetrics
from zamba2.serve.plumbing import KEEP_ALIVE, Channel, offload, sse, wait_for_disconnect
from zamba2.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    ResponseBuilder,
    SamplingFields,
    TokenizeRequest,
    TokenTexts,
    echo_of,
    parse_body,
    refuse_unsupported,
)
from zamba2.tokenizer import Tokenizer

log = logging.getLogger("zamba2.serve")

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the limit
ENDPOINTS = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/tokenize",
             "/detokenize", "/tokenizer_info"}  # fmt: skip


def _error_response(err: APIError) -> Response:
    # ensure_ascii: a message can quote client text, and no lone surrogate may break the error itself
    return Response(json.dumps(err.body()), status_code=err.status, headers=err.headers,
                    media_type="application/json")  # fmt: skip


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down; retry on another instance", type="service_unavailable",
                    code="server_shutting_down")  # fmt: skip


class Server:
    """Everything one server holds: arguments, the loaded model's engine and tokenizer, metrics."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.model_name = args.served_model_name or args.model
        self.created = int(time.time())
        self.engine: Engine | None = None
        self.tokenizer: Tokenizer | None = None
        self.texts: TokenTexts | None = None
        self.error: str | None = None  # why the load failed (for the log; clients get a generic message)
        self.shutting_down = False
        self.metrics = ServerMetrics(lambda: self.engine)
        self.on_load_failure: Callable[[], None] | None = None

    def load(self) -> None:
        """Load model + tokenizer and start the engine (runs in a thread at startup)."""
        a = self.args
        try:
            engine, tokenizer = loading.engine_for(a)
            engine.start()
            self.tokenizer, self.texts = tokenizer, TokenTexts(tokenizer)
            self.engine = engine  # set last: from here on the server is ready
            log.info("ready: serving %s as %r", a.model, self.model_name)
        except Exception as exc:
            log.exception("could not load %s", a.model)
            self.error = f"{type(exc).__name__}: {exc}"
            if self.on_load_failure is not None:
                self.on_load_failure()

    def require(self, model: str | None) -> tuple[Engine, Tokenizer]:
        if self.engine is None or self.tokenizer is None:
            detail = "the model failed to load (see the server log)" if self.error else "the model is still loading"
            raise APIError(503, detail, type="service_unavailable", code="model_not_ready")
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves `{self.model_name}`.",
                           param="model", code="model_not_found")  # fmt: skip
        return self.engine, self.tokenizer

    # ---- generation ------------------------------------------------------------------------------
    def generation_request(self, body: SamplingFields, ids: list[int], logprobs: int | None,
                           default_max: int) -> GenerationRequest:  # fmt: skip
        if body.n is not None and body.n != 1:
            raise APIError(400, f"n={body.n}: only one choice per request is supported (n must be 1)",
                           param="n", code="unsupported_value")  # fmt: skip
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options",
                           code="invalid_value")  # fmt: skip
        limit = self.args.max_tokens_limit
        field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = getattr(body, field)
        if max_tokens is not None and max_tokens > limit:
            raise APIError(400, f"{field}: {max_tokens} is more than this server allows ({limit})",
                           param=field, code="invalid_value")  # fmt: skip
        context = self.engine.max_model_len if self.engine is not None else limit
        where = "messages" if isinstance(body, ChatRequest) else "prompt"
        if len(ids) + (0 if max_tokens == 0 else 1) > context:  # max_tokens 0: echo scores the prompt only
            raise APIError(400, f"{where}: the prompt is {len(ids)} tokens; this model's context is {context} "
                           "tokens (--max-model-len), with room for at least one generated token",
                           param=where, code="context_length_exceeded")  # fmt: skip
        if max_tokens is None:  # the default shrinks to what the context leaves
            max_tokens = min(default_max, context - len(ids))
        elif len(ids) + max_tokens > context:
            raise APIError(400, f"{field}: the prompt ({len(ids)} tokens) + {field} ({max_tokens}) = "
                           f"{len(ids) + max_tokens} tokens is more than this model's context of {context} tokens "
                           f"(--max-model-len); reduce the prompt or {field}", param=field,
                           code="context_length_exceeded")  # fmt: skip
        temperature = 1.0 if body.temperature is None else body.temperature

        def value(x, default):
            return default if x is None else x

        params = SamplingParams(
            do_sample=temperature > 0, temperature=temperature, top_k=max(value(body.top_k, 0), 0),
            top_p=value(body.top_p, 1.0), min_p=value(body.min_p, 0.0),
            repetition_penalty=value(body.repetition_penalty, 1.0),
            presence_penalty=value(body.presence_penalty, 0.0), frequency_penalty=value(body.frequency_penalty, 0.0),
        )  # fmt: skip
        return GenerationRequest(ids, max_tokens, params, seed=body.seed, stop=body.stop, logprobs=logprobs,
                                 ignore_eos=bool(body.ignore_eos))  # fmt: skip

    async def respond(self, request: Request, kind: str, body: SamplingFields, gens: list[GenerationRequest],
                      builder: ResponseBuilder, received: float) -> Response:  # fmt: skip
        """Submit one request per choice and answer with them all (a stream, or one JSON response)."""
        engine = self.engine
        assert engine is not None and self.texts is not None
        channel = Channel(asyncio.get_running_loop())
        rids: list[int] = []
        try:
            for i, gen in enumerate(gens):
                rids.append(engine.submit(gen, channel.sink(i)))
        except QueueFull:
            self._cancel(rids)
            raise APIError(429, "the server is at capacity (--max-queue); retry shortly", type="rate_limit_exceeded",
                           code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None  # fmt: skip
        except ShuttingDown:
            self._cancel(rids)
            raise _shutting_down() from None
        except ValueError as exc:
            self._cancel(rids)
            raise APIError(400, str(exc), param="messages" if kind == "chat" else "prompt") from None
        if body.stream:
            return StreamingResponse(
                self._stream(channel, rids, builder, received, request.state.request_id),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                background=BackgroundTask(self._cancel, rids),  # also when the stream never started
            )  # fmt: skip
        return await self._collect(request, channel, rids, builder, received)

    def _cancel(self, rids: list[int]) -> None:
        assert self.engine is not None
        for rid in rids:
            self.engine.cancel(rid)

    @staticmethod
    def failure_error(event: Failure, rid: int, request_id: str) -> APIError:
        """The client's view of an engine Failure; its detail goes to the log only."""
        if event.shutdown:
            return _shutting_down()
        log.error("request %s (engine request %d) failed: %s", request_id, rid, event.message)
        return APIError(500, GENERIC_500.format(request_id), type="server_error", code="internal_error")

    def _finished(self, last: Output) -> None:
        self.metrics.prompt_tokens.inc(last.prompt_tokens)
        self.metrics.generation_tokens.inc(last.completion_tokens)

    async def _collect(self, request: Request, channel: Channel, rids: list[int], builder: ResponseBuilder,
                       received: float) -> Response:  # fmt: skip
        gone = asyncio.ensure_future(wait_for_disconnect(request))
        outputs: list[list[Output]] = [[] for _ in rids]
        pending = len(rids)
        try:
            while pending:
                get = asyncio.ensure_future(channel.queue.get())
                await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    self._cancel(rids)
                    return Response(status_code=499)  # nobody reads it: the client closed the connection
                index, event = get.result()
                if isinstance(event, Failure):
                    self._cancel(rids)
                    raise self.failure_error(event, rids[index], request.state.request_id)
                if isinstance(event, Output):
                    if not any(outputs):
                        self.metrics.ttft.observe(time.monotonic() - received)
                    outputs[index].append(event)
                    if event.finish_reason is not None:
                        pending -= 1
        finally:
            gone.cancel()
        for outs in outputs:
            self._finished(outs[-1])
        return JSONResponse(builder.whole(outputs))

    async def _stream(self, channel: Channel, rids: list[int], builder: ResponseBuilder, received: float,
                      request_id: str) -> AsyncIterator[str]:  # fmt: skip
        complete = False
        started = [False] * len(rids)
        lasts: list[Output | None] = [None] * len(rids)
        try:
            if builder.kind == "chat":
                yield sse(builder.chunk("", None, None, role=True))
            while not all(lasts):
                try:
                    index, event = await asyncio.wait_for(channel.queue.get(), self.args.keep_alive)
                except asyncio.TimeoutError:
                    yield KEEP_ALIVE
                    continue
                if isinstance(event, Progress):  # a long prompt is being prefilled
                    yield KEEP_ALIVE
                    continue
                if isinstance(event, Failure):
                    yield f"data: {json.dumps(self.failure_error(event, rids[index], request_id).body())}\n\n"
                    break
                if not any(started):
                    self.metrics.ttft.observe(time.monotonic() - received)
                if not started[index]:
                    started[index] = True
                    if builder.echoes[index] is not None:
                        yield sse(builder.echo_chunk(index, event))
                if event.text or (event.logprobs and builder.top_logprobs is not None):
                    yield sse(builder.chunk(event.text, event.logprobs, None, index=index))
                if event.finish_reason is not None:
                    yield sse(builder.chunk("", None, event.finish_reason, index=index))
                    self._finished(event)
                    lasts[index] = event
            else:
                if builder.include_usage:
                    yield sse(builder.usage_chunk(lasts))  # type: ignore[arg-type]
            yield "data: [DONE]\n\n"
            complete = True
        finally:
            if not complete:  # client gone (the response task was cancelled) or error
                self._cancel(rids)


def create_app(args: argparse.Namespace) -> FastAPI:
    server = Server(args)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=server.load, name="zamba2-load", daemon=True).start()
        yield
        if server.engine is not None:
            server.engine.stop()

    app = FastAPI(title="zamba2", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        err = APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None,
                       headers=getattr(exc, "headers", None))  # fmt: skip
        return _error_response(err)

    @app.exception_handler(RequestValidationError)
    async def request_error(request: Request, exc: RequestValidationError) -> Response:
        return _error_response(APIError(400, str(exc)))

    async def authorize(request: Request) -> None:
        if not args.api_key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), args.api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")  # fmt: skip

    auth = [Depends(authorize)]

    @app.get("/health")
    async def health() -> JSONResponse:
        engine = server.engine
        if engine is not None:
            h = engine.health()
            problem = ("shutting_down" if server.shutting_down else "engine_stopped" if not h["alive"]
                       else "leaked_slots" if h["untracked"] else "stalled" if h["stalled_s"] > args.stall_timeout
                       else None)  # fmt: skip
            return JSONResponse({"status": problem or "ok", **h}, status_code=503 if problem else 200)
        if server.error is not None:
            return JSONResponse({"status": "error", "message": "the model failed to load (see the server log)"},
                                status_code=503)  # fmt: skip
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/metrics", dependencies=auth)
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict[str, Any]:
        return {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "zamba2",
                "root": args.model}  # fmt: skip

    @app.get("/v1/models", dependencies=auth)
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}", dependencies=auth)
    async def get_model(model: str) -> dict[str, Any]:
        if model != server.model_name:
            raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request) -> Response:
        received = time.monotonic()
        raw = await request.body()
        body: ChatRequest = await offload(len(raw), parse_body, raw, ChatRequest)
        _, tokenizer = server.require(body.model)
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        try:
            ids = await offload(len(raw), tokenizer.apply_chat_template,
                                 [m.as_template_input() for m in body.messages], tokenize=True)  # fmt: skip
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages", code="invalid_value") from None
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        gen = server.generation_request(body, ids, logprobs, default_max=args.max_tokens_limit)  # type: ignore[arg-type]
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        builder = ResponseBuilder("chat", body.model, server.texts, logprobs, include_usage)  # type: ignore[arg-type]
        return await server.respond(request, "chat", body, [gen], builder, received)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request) -> Response:
        received = time.monotonic()
        raw = await request.body()
        body: CompletionRequest = await offload(len(raw), parse_body, raw, CompletionRequest)
        engine, tokenizer = server.require(body.model)
        prompts = body.prompts()
        most = args.max_concurrency + args.max_queue
        if len(prompts) > most:
            raise APIError(400, f"{len(prompts)} prompts: this server takes at most {most} per request "
                           "(--max-concurrency + --max-queue)", param="prompt", code="invalid_value")  # fmt: skip
        refuse_unsupported(body)
        vocab = engine.config.vocab_size
        gens, echoes = [], []
        for i, prompt in enumerate(prompts):
            # text gets the tokenizer's bos; token ids are scored and continued exactly as sent
            ids = await offload(len(prompt), tokenizer.encode, prompt) if isinstance(prompt, str) else list(prompt)
            if not ids or any(not 0 <= t < vocab for t in ids):
                where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
                raise APIError(400, f"{where} must be text or a non-empty list of token ids in [0, {vocab})",
                               param=where, code="invalid_value")  # fmt: skip
            gen = server.generation_request(body, ids, body.logprobs, default_max=COMPLETION_DEFAULT_MAX_TOKENS)
            gen.continue_text = True
            if body.echo:
                # with logprobs the prompt is scored too; max_tokens 0 alone scores it (and asks for nothing else)
                gen.prompt_logprobs = body.logprobs if body.logprobs is not None else 0 if gen.max_tokens == 0 else None
            elif gen.max_tokens == 0:
                raise APIError(400, "max_tokens: 0 is only allowed with echo (scoring the prompt)",
                               param="max_tokens", code="invalid_value")  # fmt: skip
            gens.append(gen)
            echoes.append(echo_of(tokenizer, ids, prompt if isinstance(prompt, str) else None) if body.echo else None)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        builder = ResponseBuilder("text", body.model, server.texts, body.logprobs, include_usage, echoes)  # type: ignore[arg-type]
        return await server.respond(request, "text", body, gens, builder, received)

    @app.get("/tokenizer_info", dependencies=auth)
    async def tokenizer_info() -> dict[str, Any]:
        """What a client needs to tokenise as this server does (vLLM's endpoint; lm_eval's remote tokenizer)."""
        engine, tokenizer = server.require(None)
        return {
            "tokenizer_class": "zamba2.Tokenizer", "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
            "unk_token": tokenizer.unk_token, "pad_token": tokenizer.pad_token,
            "add_bos_token": tokenizer.add_bos_token, "add_eos_token": tokenizer.add_eos_token,
            "chat_template": tokenizer.chat_template, "model_max_length": engine.max_model_len,
            "vocab_size": engine.config.vocab_size,
        }  # fmt: skip

    @app.post("/tokenize", dependencies=auth)
    async def tokenize(request: Request) -> dict[str, Any]:
        raw = await request.body()
        body: TokenizeRequest = await offload(len(raw), parse_body, raw, TokenizeRequest)
        engine, tokenizer = server.require(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "pass exactly one of prompt and messages", param="prompt", code="invalid_value")
        if body.messages is not None:
            try:
                ids = await offload(len(raw), tokenizer.apply_chat_template,
                                     [m.as_template_input() for m in body.messages],
                                     add_generation_prompt=body.add_generation_prompt is not False, tokenize=True)
            except ValueError as exc:
                raise APIError(400, str(exc), param="messages", code="invalid_value") from None
        else:
            ids = await offload(len(raw), tokenizer.encode, body.prompt or "",
                                 add_special_tokens=body.add_special_tokens is not False)  # fmt: skip
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len}

    @app.post("/detokenize", dependencies=auth)
    async def detokenize(request: Request) -> dict[str, Any]:
        raw = await request.body()
        body: DetokenizeRequest = await offload(len(raw), parse_body, raw, DetokenizeRequest)
        _, tokenizer = server.require(body.model)
        try:
            return {"prompt": await offload(len(raw), tokenizer.decode, body.tokens)}
        except ValueError as exc:
            raise APIError(400, str(exc), param="tokens", code="invalid_value") from None

    if args.cors_origins:
        origins = [o.strip() for o in args.cors_origins.split(",") if o.strip()]
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(Guard, metrics=server.metrics, endpoints=ENDPOINTS, max_body=args.max_request_bytes,
                       body_timeout=args.body_timeout)  # fmt: skip
    return app


# The command line lives in command.py; these names stay importable from here.
from zamba2.serve.command import build_parser, main  # noqa: E402, F401
