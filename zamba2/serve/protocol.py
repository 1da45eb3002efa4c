"""The OpenAI wire format: request bodies (pydantic, strict types, unknown fields ignored), errors, and the
response / stream-chunk objects built from engine Outputs.

Every optional parameter accepts null, meaning "the default". Errors have the OpenAI shape
{"error": {"message", "type", "param", "code"}} and name the offending field in `param`.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from zamba2.serve.engine import MAX_TOP_LOGPROBS, Output, TokenLogprob
from zamba2.tokenizer import Tokenizer

MAX_STOP = 16


class APIError(Exception):
    """An error answered with an OpenAI-shaped body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- requests ------------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: bool | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_input(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        out: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.name is not None:
            out["name"] = self.name
        return out


class SamplingFields(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: off
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    n: int | None = Field(None, ge=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool | None = None  # extension (as in vLLM): generate max_tokens whatever the model says

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are supported")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = None


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|dict|list)$|\[")


def _param(loc: tuple) -> str | None:
    """('messages', 0, 'content', 'list[TextPart]', 0, 'text') -> 'messages[0].content[0].text'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _TYPE_TAG.search(part):
            out += f".{part}" if out else part
    return out or None


def validation_error(err: ValidationError) -> APIError:
    """The first invalid field of a pydantic error as a 400; union alternatives are merged into one message."""
    errors = err.errors(include_url=False)
    first = errors[0]
    param = _param(first["loc"])
    messages = list(dict.fromkeys(e["msg"] for e in errors if _param(e["loc"]) == param))
    kind = first["type"]
    code = "missing_required_parameter" if kind == "missing" else "invalid_type" if kind.endswith("_type") \
        else "invalid_value"  # fmt: skip
    return APIError(400, f"{param or 'body'}: {' or '.join(messages)}", param=param, code=code)


def parse_body(raw: bytes, cls: type[BaseModel]) -> Any:
    import json

    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


# ---- responses -----------------------------------------------------------------------------------

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class TokenTexts:
    """The text and UTF-8 bytes of single tokens (for logprobs), memoised per id.

    SentencePiece pieces: "▁" is a space and "<0xNN>" a raw byte (its text is the byte as a character when
    it is ASCII, else U+FFFD; `bytes` always carries the exact value).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._memo: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._memo.get(token_id)
        if hit is None:
            piece = self.tokenizer.backend.id_to_token(token_id) or ""
            byte = _BYTE_PIECE.match(piece)
            if byte:
                value = int(byte[1], 16)
                hit = (chr(value) if value < 128 else "\ufffd", [value])
            else:
                text = piece if token_id in self.tokenizer.special_ids else piece.replace("\u2581", " ")
                hit = (text, list(text.encode("utf-8")))
            self._memo[token_id] = hit
        return hit


def chat_logprobs(entries: list[TokenLogprob], texts: TokenTexts) -> dict[str, Any]:
    def item(token_id: int, lp: float) -> dict[str, Any]:
        text, raw = texts(token_id)
        return {"token": text, "logprob": lp, "bytes": raw}

    return {
        "content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(i, lp) for i, lp in e.top]} for e in entries]
    }


def completion_logprobs(entries: list[TokenLogprob], texts: TokenTexts, with_top: bool) -> dict[str, Any]:
    return {
        "tokens": [texts(e.token_id)[0] for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{texts(i)[0]: lp for i, lp in e.top} for e in entries] if with_top else None,
        "text_offset": [e.text_offset for e in entries],
    }


def usage(last: Output) -> dict[str, Any]:
    return {
        "prompt_tokens": last.prompt_tokens,
        "completion_tokens": last.completion_tokens,
        "total_tokens": last.prompt_tokens + last.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": last.cached_tokens},
    }


class ResponseBuilder:
    """Builds the JSON objects of one chat or text completion (whole, or as stream chunks)."""

    def __init__(self, kind: Literal["chat", "text"], model: str, texts: TokenTexts, top_logprobs: int | None,
                 include_usage: bool = False) -> None:  # fmt: skip
        self.kind = kind
        self.model = model
        self.texts = texts
        self.top_logprobs = top_logprobs  # None: no logprobs
        self.include_usage = include_usage
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _logprobs(self, entries: list[TokenLogprob]) -> dict[str, Any] | None:
        if self.top_logprobs is None:
            return None
        if self.kind == "chat":
            return chat_logprobs(entries, self.texts)
        return completion_logprobs(entries, self.texts, with_top=self.top_logprobs > 0)

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                "system_fingerprint": None}  # fmt: skip

    def whole(self, outputs: list[Output]) -> dict[str, Any]:
        text = "".join(o.text for o in outputs)
        entries = [e for o in outputs for e in (o.logprobs or [])]
        last = outputs[-1]
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        choice.update(logprobs=self._logprobs(entries), finish_reason=last.finish_reason)
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return {**self._envelope(obj, [choice]), "usage": usage(last)}

    def chunk(self, text: str, entries: list[TokenLogprob] | None, finish_reason: str | None,
              role: bool = False) -> dict[str, Any]:  # fmt: skip
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": text} if role else {}
            if text and not role:
                delta["content"] = text
            choice = {"index": 0, "delta": delta}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text}
            obj = "text_completion"
        choice.update(logprobs=self._logprobs(entries) if entries else None, finish_reason=finish_reason)
        out = self._envelope(obj, [choice])
        if self.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, last: Output) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._envelope(obj, []), "usage": usage(last)}
