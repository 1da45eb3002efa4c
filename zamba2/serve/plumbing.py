"""Event-loop plumbing of the HTTP server: the engine-to-loop channel, SSE framing, waiting for a client to go
away, and moving long CPU work (parsing, templates, tokenising) off the event loop."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import Request

OFFLOAD_BYTES = 16 << 10  # bodies and texts from this size on are parsed / tokenised in a worker thread
KEEP_ALIVE = ": keep-alive\n\n"


class Channel:
    """Engine thread -> event loop: each event is put on an asyncio.Queue from the loop's own thread, as
    (choice index, event); `sink(i)` is the engine sink of choice i."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def sink(self, index: int) -> Callable[[Any], None]:
        return lambda event: self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


T = TypeVar("T")


async def offload(size: int, fn: Callable[..., T], *args, **kwargs) -> T:
    """fn(*args, **kwargs), in a worker thread when `size` (bytes or characters of input) makes it long."""
    if size < OFFLOAD_BYTES:
        return fn(*args, **kwargs)
    return await asyncio.to_thread(fn, *args, **kwargs)
