"""The OpenAI wire format: request bodies (pydantic, strict types, unknown fields ignored), errors, and the
response / stream-chunk objects built from engine Outputs.

Every optional parameter accepts null, meaning "the default". Errors have the OpenAI shape
{"error": {"message", "type", "param", "code"}} and name the offending field in `param`. Before validation a
body is checked as a whole (`parse_body`): JSON nested deeper than MAX_DEPTH and strings that are not valid
Unicode (a lone surrogate such as "\\udfff" is valid JSON but no text) are 400s naming the field.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from zamba2.serve.engine import MAX_TOP_LOGPROBS, Output, TokenLogprob
from zamba2.tokenizer import StreamDecoder, Tokenizer

MAX_STOP = 16
MAX_DEPTH = 64  # JSON nesting; a chat body needs about 6


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

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: Any) -> Any:
        if isinstance(value, list):
            for i, part in enumerate(value):
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(kind, str) and kind != "text":
                    raise ValueError(f"content[{i}] is a {kind!r} part; only 'text' parts are supported")
        return value

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
    echo: bool | None = None  # the prompt comes first in text and logprobs
    max_tokens: int | None = Field(None, ge=0)  # 0: with echo, score the prompt only
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: one string or token-id list per choice."""
        p = self.prompt
        if isinstance(p, str) or not p or isinstance(p[0], int):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


def refuse_unsupported(body: CompletionRequest) -> None:
    """Fields that would change what the response means are refused rather than ignored."""
    if body.best_of is not None and body.best_of > 1:
        raise APIError(400, f"best_of={body.best_of}: only one candidate per request is supported",
                       param="best_of", code="unsupported_value")  # fmt: skip
    if body.suffix:
        raise APIError(400, "suffix (insertion) is not supported", param="suffix", code="unsupported_value")


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


def check_json(data: Any) -> None:
    """400 for nesting deeper than MAX_DEPTH or a string (key or value) that is not valid Unicode, naming where.
    Iterative, so a deep body cannot exhaust the stack here."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise APIError(400, f"{path or 'body'}: JSON nested deeper than {MAX_DEPTH} levels", param=path or None,
                           code="invalid_json")  # fmt: skip
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                bad = ord(value[exc.start])
                raise APIError(400, f"{path or 'body'}: not valid Unicode text (a lone surrogate \\u{bad:04x} at "
                               f"character {exc.start})", param=path or None, code="invalid_value") from None
        elif isinstance(value, dict):
            for key, item in value.items():
                stack.append((key, path or "body", depth + 1))
                stack.append((item, f"{path}.{key}" if path else str(key), depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))


def parse_body(raw: bytes, cls: type[BaseModel]) -> Any:
    import json

    try:
        data = json.loads(raw)
    except RecursionError:
        raise APIError(400, f"the request body is JSON nested too deeply (more than {MAX_DEPTH} levels)",
                       code="invalid_json") from None  # fmt: skip
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    check_json(data)
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


@dataclass
class Echo:
    """What `echo` puts before a completion: the prompt's text and ids, and each id's offset in that text."""

    text: str
    ids: list[int]
    offsets: list[int]


def echo_of(tokenizer: Tokenizer, ids: list[int], text: str | None) -> Echo:
    """The echo of a prompt given as `text` (kept as sent) or as ids only (decoded, special tokens skipped).

    Offsets come from decoding the ids one by one, so they index the decoded text: for a text prompt that the
    tokenizer round-trips (the usual case) the same string."""
    decoder = StreamDecoder(tokenizer, skip_special_tokens=True)
    offsets, pieces, n = [], [], 0
    for token in ids:
        offsets.append(n)
        pieces.append(decoder.push(token))
        n += len(pieces[-1])
    pieces.append(decoder.flush())
    return Echo("".join(pieces) if text is None else text, list(ids), offsets)


Row = tuple[int, float | None, list[tuple[int, float]] | None, int]  # id, logprob, top (id, logprob), offset


def completion_logprobs(rows: list[Row], texts: TokenTexts, with_top: bool) -> dict[str, Any]:
    return {
        "tokens": [texts(token)[0] for token, *_ in rows],
        "token_logprobs": [lp for _, lp, _, _ in rows],
        "top_logprobs": [None if top is None else {texts(i)[0]: v for i, v in top} for _, _, top, _ in rows]
        if with_top else None,
        "text_offset": [offset for *_, offset in rows],
    }  # fmt: skip


def usage(lasts: list[Output]) -> dict[str, Any]:
    """Token counts of a response, summed over its choices (one per prompt)."""
    prompt = sum(o.prompt_tokens for o in lasts)
    completion = sum(o.completion_tokens for o in lasts)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(o.cached_tokens for o in lasts)},
    }


class ResponseBuilder:
    """Builds the JSON objects of one chat or text completion (whole, or as stream chunks); a text
    completion has one choice per prompt, and with `echoes` each choice starts with its prompt."""

    def __init__(self, kind: Literal["chat", "text"], model: str, texts: TokenTexts, top_logprobs: int | None,
                 include_usage: bool = False, echoes: list[Echo | None] | None = None) -> None:  # fmt: skip
        self.kind = kind
        self.model = model
        self.texts = texts
        self.top_logprobs = top_logprobs  # None: no logprobs
        self.include_usage = include_usage
        self.echoes: list[Echo | None] = echoes or [None]
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    @property
    def choices(self) -> int:
        return len(self.echoes)

    def _rows(self, index: int, entries: list[TokenLogprob]) -> list[Row]:
        shift = len(echo.text) if (echo := self.echoes[index]) is not None else 0
        return [(e.token_id, e.logprob, e.top, shift + e.text_offset) for e in entries]

    def _logprobs(self, entries: list[TokenLogprob], index: int = 0) -> dict[str, Any] | None:
        if self.top_logprobs is None:
            return None
        if self.kind == "chat":
            return chat_logprobs(entries, self.texts)
        return completion_logprobs(self._rows(index, entries), self.texts, with_top=self.top_logprobs > 0)

    def _echo_rows(self, index: int, first: Output) -> list[Row]:
        """The prompt's rows: the first token has no logprob (nothing before it), the others were scored."""
        echo = self.echoes[index]
        assert echo is not None
        scored = first.prompt_logprobs or []
        rows: list[Row] = [(echo.ids[0], None, None, 0)]
        for e, offset in zip(scored, echo.offsets[1:], strict=True):
            rows.append((e.token_id, e.logprob, e.top, offset))
        return rows

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                "system_fingerprint": None}  # fmt: skip

    def _choice(self, index: int, outputs: list[Output]) -> dict[str, Any]:
        text = "".join(o.text for o in outputs)
        entries = [e for o in outputs for e in (o.logprobs or [])]
        if self.kind == "chat":
            return {"index": 0, "message": {"role": "assistant", "content": text},
                    "logprobs": self._logprobs(entries), "finish_reason": outputs[-1].finish_reason}  # fmt: skip
        echo = self.echoes[index]
        logprobs = self._logprobs(entries, index)
        if echo is not None:
            text = echo.text + text
            if logprobs is not None:
                rows = self._echo_rows(index, outputs[0]) + self._rows(index, entries)
                logprobs = completion_logprobs(rows, self.texts, with_top=bool(self.top_logprobs))
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": outputs[-1].finish_reason}

    def whole(self, per_choice: list[list[Output]]) -> dict[str, Any]:
        """The response from every Output of each choice."""
        choices = [self._choice(i, outs) for i, outs in enumerate(per_choice)]
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return {**self._envelope(obj, choices), "usage": usage([outs[-1] for outs in per_choice])}

    def echo_chunk(self, index: int, first: Output) -> dict[str, Any]:
        """The stream chunk that echoes choice `index`'s prompt, sent before its first generated text."""
        echo = self.echoes[index]
        assert echo is not None and self.kind == "text"
        logprobs = None
        if self.top_logprobs is not None:
            logprobs = completion_logprobs(self._echo_rows(index, first), self.texts, self.top_logprobs > 0)
        choice = {"index": index, "text": echo.text, "logprobs": logprobs, "finish_reason": None}
        out = self._envelope("text_completion", [choice])
        if self.include_usage:
            out["usage"] = None
        return out

    def chunk(self, text: str, entries: list[TokenLogprob] | None, finish_reason: str | None,
              role: bool = False, index: int = 0) -> dict[str, Any]:  # fmt: skip
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": text} if role else {}
            if text and not role:
                delta["content"] = text
            choice = {"index": 0, "delta": delta}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": index, "text": text}
            obj = "text_completion"
        choice.update(logprobs=self._logprobs(entries, index) if entries else None, finish_reason=finish_reason)
        out = self._envelope(obj, [choice])
        if self.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, lasts: list[Output]) -> dict[str, Any]:
        """The last stream chunk with stream_options.include_usage: no choices, the usage of them all."""
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._envelope(obj, []), "usage": usage(lasts)}
