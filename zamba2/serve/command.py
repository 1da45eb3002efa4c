"""The `zamba2 serve` command line: flags, uvicorn settings, and the graceful shutdown.

Limits (flag: default), each refused with a 4xx in OpenAI's error shape that names it:

    --max-model-len: the model's max_position_embeddings   prompt + max_tokens of one request (400)
    --max-tokens-limit: 4096                                largest max_tokens (400)
    --max-request-bytes: 4 MiB                              request body (413, before it is read)
    --header-timeout: 10 s, --body-timeout: 30 s            slow request headers (connection closed) / body (408)
    --max-connections: 256                                  open connections (more are closed at once)
    --max-concurrency: 8, --max-queue: 64                   sequences decoded together / waiting (429 past both)

Shutdown (SIGTERM or Ctrl-C): the server stops accepting connections and requests (503), lets the requests in
flight finish for --shutdown-grace seconds, then ends the rest: a stream gets an error event and `[DONE]`, a
waiting request a 503.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from zamba2 import allocator
from zamba2.cli.parser import adapter_folder
from zamba2.serve.engine import PREFILL_CHUNK

MAX_REQUEST_BYTES = 4 << 20


def _positive(kind: type):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def _dtype(text: str) -> str:
    from zamba2.checkpoint import resolve_dtype

    try:
        resolve_dtype(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zamba2 serve", description="OpenAI-compatible server for Zamba2 models")
    p.add_argument("--model", help="model folder or hub id (org/name); default: the shipped zamba2.DEFAULT_MODEL")
    p.add_argument("--served-model-name", help="the name clients pass as `model` (default: --model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (not on /health)")
    p.add_argument("--cors-origins", help="comma-separated origins allowed by CORS (e.g. http://localhost:3000)")
    p.add_argument("--max-concurrency", type=_positive(int), default=8, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond that; more get 429")
    p.add_argument("--max-tokens-limit", type=_positive(int), default=4096, help="largest max_tokens accepted")
    p.add_argument("--max-model-len", type=_positive(int),
                   help="largest prompt + max_tokens (default and upper bound: the model's max_position_embeddings)")
    p.add_argument("--max-request-bytes", type=_positive(int), default=MAX_REQUEST_BYTES,
                   help="largest request body in bytes (413 past it)")  # fmt: skip
    p.add_argument("--header-timeout", type=_positive(float), default=10.0,
                   help="seconds for a request's headers to arrive (the connection is closed after)")
    p.add_argument("--body-timeout", type=_positive(float), default=30.0,
                   help="seconds for each part of a request body to arrive (408 after)")  # fmt: skip
    p.add_argument("--max-connections", type=_positive(int), default=256, help="open connections (more are closed)")
    p.add_argument("--timeout-keep-alive", type=_positive(int), default=5,
                   help="seconds an idle keep-alive connection stays open")  # fmt: skip
    p.add_argument("--shutdown-grace", type=float, default=30.0,
                   help="seconds in-flight requests may finish after SIGTERM before they are ended")  # fmt: skip
    p.add_argument("--stall-timeout", type=_positive(float), default=120.0,
                   help="/health is 503 when the engine makes no progress this long with work outstanding")
    p.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantisation at load")
    p.add_argument("--adapter", type=adapter_folder, metavar="FOLDER", help="apply a LoRA adapter (PEFT's format)")
    p.add_argument("--dtype", type=_dtype, default="auto", help="auto (config.json), fp32, bf16, fp16")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--threads", type=_positive(int), help="torch CPU threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true", help="torch.compile the mixer decode step (faster batched decode)")
    p.add_argument("--prompt-cache-mb", type=float, default=1024.0, help="prompt-state snapshots (0 = off)")
    p.add_argument("--prefill-chunk", type=_positive(int), default=PREFILL_CHUNK,
                   help="prompt tokens prefilled per engine iteration")  # fmt: skip
    p.add_argument("--keep-alive", type=_positive(float), default=10.0,
                   help="seconds between SSE keep-alive comments while a stream waits")  # fmt: skip
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--access-log", action="store_true", help="log every request")
    spec = p.add_argument_group("speculative decoding", "while one request decodes alone, propose a few tokens "
                                "cheaply and check them in one forward (the same output, faster when right)")
    how = spec.add_mutually_exclusive_group()
    how.add_argument("--prompt-lookup", type=_positive(int), metavar="K",
                     help="propose up to K tokens by n-gram lookup in the prompt and the text so far")  # fmt: skip
    how.add_argument("--draft-model", metavar="PATH_OR_ID", help="a smaller Zamba2 with the same tokenizer proposes")
    spec.add_argument("--draft-tokens", type=_positive(int), metavar="K",
                      help="tokens the draft model proposes per check, at most (default 4)")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from zamba2.serve.app import Server, create_app
    from zamba2.serve.connections import guarded_h11

    parser = build_parser()
    args = parser.parse_args(argv)
    from zamba2.cli.generate import default_model

    args.model = default_model(args.model, "serve")
    if args.max_queue < 0:
        parser.error("--max-queue must be >= 0")
    if args.shutdown_grace < 0:
        parser.error("--shutdown-grace must be >= 0")
    if args.draft_tokens is not None and args.draft_model is None:
        parser.error("--draft-tokens needs --draft-model (the model that proposes the tokens)")
    try:
        allocator.tune()  # keep activation memory between prompt chunks (see zamba2/allocator.py)
    except ValueError as err:
        parser.error(str(err))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(args)
    state: Server = app.state.server

    class GracefulServer(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            # Runs on the event loop once a signal has set should_exit: uvicorn closes the listening sockets and
            # waits for the connections; the engine takes no new request and, after the grace period, ends the
            # ones still running, so that each handler answers (an error event + [DONE], or a 503) and returns.
            engine = state.engine
            timer = None
            if engine is not None:
                state.shutting_down = True
                engine.close()
                timer = asyncio.get_running_loop().call_later(args.shutdown_grace, engine.abort)
            try:
                await super().shutdown(sockets)
            finally:
                if timer is not None:
                    timer.cancel()

    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level, access_log=args.access_log,
        http=guarded_h11(args.header_timeout, args.max_connections), timeout_keep_alive=args.timeout_keep_alive,
        timeout_graceful_shutdown=int(args.shutdown_grace) + 10,  # a backstop: the engine ends requests first
    )  # fmt: skip
    server = GracefulServer(config)

    def stop() -> None:
        server.should_exit = True

    state.on_load_failure = stop
    server.run()
    return 1 if state.error is not None else 0
