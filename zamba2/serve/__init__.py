"""OpenAI-compatible serving: `zamba2 serve` / `python -m zamba2.serve`.

    engine.py        continuous batching in a thread that owns the model
    requests.py      one request in the engine: its events, state, token choice
    batch.py         HybridCache row operations: join, leave, compact, snapshot, resume
    prompt_cache.py  LRU of prompt-state snapshots (multi-turn chat reuse)
    protocol.py      OpenAI request/response/error shapes
    metrics.py       Prometheus metrics
    app.py           FastAPI app: endpoints, streaming, health
    guard.py         ASGI middleware: request ids, body limits, Content-Type, the catch-all error
    connections.py   uvicorn protocol with a request-header deadline and a connection cap
    command.py       the command line, uvicorn settings, graceful shutdown
    bench.py         throughput and time-to-first-token benchmark

The HTTP stack (fastapi, uvicorn, prometheus_client) is the `serve` extra, imported only when serving.
"""

from __future__ import annotations

_EXTRA = {"fastapi", "starlette", "uvicorn", "prometheus_client", "pydantic"}


def main(argv: list[str] | None = None) -> int:
    """Run the server; `argv` as on the command line (without the program name)."""
    try:
        from zamba2.serve.app import main as run
    except ModuleNotFoundError as err:
        if err.name not in _EXTRA:
            raise
        raise SystemExit(
            f"zamba2 serve needs {err.name!r}, which is not installed: pip install 'zamba2[serve]'"
        ) from err
    return run(argv)


__all__ = ["main"]
