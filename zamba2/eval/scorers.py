"""Scorers: the local model, or a running `zamba2 serve` through its /v1/completions echo.

Both give, for each token sequence, the log-probabilities of its tokens after the first. The server scores
token-id prompts exactly as sent with `echo: true, max_tokens: 0, logprobs: 0` (several prompts per request),
so `zamba2 eval --server URL` checks the server's figures against the local ones with the same windows.
Only the standard library talks HTTP here: the runtime package needs no client library.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from zamba2.eval.scoring import score_tokens


class LocalScorer:
    def __init__(self, model) -> None:
        self.model = model

    def __call__(self, seqs: list[list[int]]) -> list[list[float]]:
        return [score_tokens(self.model, ids).logprobs.tolist() for ids in seqs]


class ServerScorer:
    """Scores through a server's echo; `url` is the server's root (http://host:port)."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600.0) -> None:
        self.url = url.rstrip("/").removesuffix("/v1")
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout = timeout
        models = self._call("GET", "/v1/models", None)["data"]
        if not models:
            raise ValueError(f"{self.url}/v1/models lists no model")
        self.model = models[0]["id"]

    def _call(self, method: str, path: str, body: dict | None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers=self.headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            detail = err.read().decode("utf-8", "replace")
            try:
                detail = json.loads(detail)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                pass
            raise ConnectionError(f"{self.url}{path}: HTTP {err.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as err:
            raise ConnectionError(f"{self.url}{path}: {getattr(err, 'reason', err)}") from None

    def __call__(self, seqs: list[list[int]]) -> list[list[float]]:
        body = {"model": self.model, "prompt": seqs, "max_tokens": 0, "echo": True, "logprobs": 0, "temperature": 0}
        choices = sorted(self._call("POST", "/v1/completions", body)["choices"], key=lambda c: c["index"])
        if len(choices) != len(seqs):
            raise ConnectionError(f"{self.url}: {len(choices)} choices for {len(seqs)} prompts")
        return [c["logprobs"]["token_logprobs"][1:] for c in choices]
