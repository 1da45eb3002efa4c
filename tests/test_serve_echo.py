"""/v1/completions for evaluation clients: `echo` with prompt logprobs, several prompts per request,
max_tokens 0, /tokenizer_info, and completion text equal to its tokens (a real server, the openai client)."""

from __future__ import annotations

import json

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import test_serve  # noqa: E402
from test_serve import AUTH, NAME, NO_EOS, post  # noqa: E402

# The same real server (tiny random checkpoint, --prefill-chunk 64): its module-scoped fixtures, used here.
checkpoint, server, client, local = test_serve.checkpoint, test_serve.server, test_serve.client, test_serve.local


def direct(local, ids: list[int]) -> list[float]:
    """log p(ids[t] | ids[:t]) for t >= 1 from a direct fp32 log-softmax of the full-sequence logits."""
    model = local[0]
    with torch.no_grad():
        rows = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
    return rows.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def assert_close(got: list[float], want: list[float], what: str, tol: float = 1e-5) -> None:
    assert len(got) == len(want), f"{what}: {len(got)} logprobs, expected {len(want)}"
    diff = max(abs(a - b) for a, b in zip(got, want, strict=True))
    assert diff < tol, f"{what}: max |difference| {diff:.3g}"


def completion(server: str, **body) -> dict:
    r = post(server, "/v1/completions", {"model": NAME, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_echo_scores_a_text_prompt(server, local):
    prompt = "The quick brown fox jumps over the lazy dog"
    ids = local[1].encode(prompt)
    r = completion(server, prompt=prompt, max_tokens=1, logprobs=2, echo=True)
    (choice,) = r["choices"]
    lp = choice["logprobs"]
    n = len(ids)
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n + 1
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert_close(lp["token_logprobs"][1:n], direct(local, ids), "prompt logprobs")
    assert choice["text"].startswith(prompt)
    assert lp["tokens"][:3] == ["<s>", " The", " quick"]
    text = choice["text"]
    for token, offset in zip(lp["tokens"][2:], lp["text_offset"][2:], strict=True):
        assert text[offset : offset + len(token)] == token  # offsets index the echoed text
    for value, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:], strict=True):
        assert len(top) == 2 and max(top.values()) >= value
    assert r["usage"]["prompt_tokens"] == n and r["usage"]["completion_tokens"] == 1


def test_echo_of_token_ids_is_scored_as_sent(server, local):
    ids = local[1].encode("Once upon a time there was", add_special_tokens=False)  # no bos
    r = completion(server, prompt=ids, max_tokens=0, logprobs=0, echo=True)
    (choice,) = r["choices"]
    assert choice["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 0
    lp = choice["logprobs"]
    assert lp["top_logprobs"] is None and len(lp["tokens"]) == len(ids)
    assert_close(lp["token_logprobs"][1:], direct(local, ids), "token-id prompt logprobs")
    assert choice["text"] == local[1].decode(ids)


def test_several_prompts_through_the_openai_client(client, local):
    prompts = ["A short one", "A somewhat longer prompt, with a comma", "Third"]
    r = client.completions.create(model=NAME, prompt=prompts, max_tokens=0, logprobs=1, echo=True, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for choice, prompt in zip(r.choices, prompts, strict=True):
        ids = local[1].encode(prompt)
        assert choice.text == prompt
        assert_close(choice.logprobs.token_logprobs[1:], direct(local, ids), prompt)
    assert r.usage.prompt_tokens == sum(len(local[1].encode(p)) for p in prompts)
    # lists of token-id lists, with generation: each choice is what that prompt gives alone
    id_prompts = [local[1].encode(p) for p in prompts]
    batch = client.completions.create(model=NAME, prompt=id_prompts, max_tokens=5, temperature=0, extra_body=NO_EOS)
    for choice, ids in zip(batch.choices, id_prompts, strict=True):
        alone = client.completions.create(model=NAME, prompt=ids, max_tokens=5, temperature=0, extra_body=NO_EOS)
        assert choice.text == alone.choices[0].text and choice.finish_reason == "length"


def test_streamed_echo_and_several_prompts(server, local):
    prompts = ["First prompt", "Second"]
    body = {"model": NAME, "prompt": prompts, "max_tokens": 4, "temperature": 0, "logprobs": 0, "echo": True,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}  # fmt: skip
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    whole = completion(server, **{k: v for k, v in body.items() if k not in ("stream", "stream_options")})
    for i, prompt in enumerate(prompts):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == i]
        assert mine[0]["text"] == prompt  # the echo comes first
        assert "".join(c["text"] for c in mine) == whole["choices"][i]["text"]
        lps = [x for c in mine if c["logprobs"] for x in c["logprobs"]["token_logprobs"]]
        assert lps == whole["choices"][i]["logprobs"]["token_logprobs"]
        assert mine[-1]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 8


@pytest.mark.parametrize("prompt", ["The capital of France is", "The capital of France is "])
def test_completion_text_equals_its_tokens(server, prompt):
    body = dict(prompt=prompt, max_tokens=6, logprobs=0, ignore_eos=True)
    whole = completion(server, **body)["choices"][0]
    assert whole["text"] == "".join(whole["logprobs"]["tokens"]), whole
    assert whole["logprobs"]["text_offset"][0] == 0
    stream = {"model": NAME, "temperature": 0, "stream": True, **body}
    with httpx.stream("POST", f"{server}/v1/completions", json=stream, headers=AUTH, timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]


def test_tokenizer_info_and_refusals(server, local):
    r = httpx.get(f"{server}/tokenizer_info", headers=AUTH, timeout=10)
    info = r.json()
    assert r.status_code == 200
    assert (info["bos_token"], info["eos_token"], info["pad_token"]) == ("<s>", "</s>", None)
    assert info["chat_template"] == local[1].chat_template and info["model_max_length"] == 4096
    assert httpx.get(f"{server}/tokenizer_info", timeout=10).status_code == 401
    r = post(server, "/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = post(server, "/v1/completions", {"model": NAME, "prompt": [[5, 6], [7, 10**6]], "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt[1]"
    r = post(server, "/v1/completions", {"model": NAME, "prompt": ["x"] * 100, "max_tokens": 1})
    assert r.status_code == 400 and "at most" in r.json()["error"]["message"]


def test_zamba2_eval_through_the_server_equals_local(server, checkpoint, tmp_path):
    """`zamba2 eval --server` (the server's echo, several windows per request) gives the local figures."""
    from zamba2.cli import main

    text = tmp_path / "held.txt"
    text.write_text("A fox ran through the quiet wood at night, and the owls watched it go. " * 10)
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps(x) + "\n" for x in [
        {"context": "The sky is", "choices": [" blue", " green", " loud"], "answer": 0},
        {"context": "One, two, ", "choices": ["three", "four"], "answer": 0},
    ]))  # fmt: skip
    reports = []
    for extra in ([], ["--server", server, "--api-key", test_serve.KEY, "--batch-size", "3"]):
        out = tmp_path / f"report{len(reports)}.json"
        argv = ["eval", "--model", str(checkpoint), "--text", str(text), "--choices", str(items),
                "--context-length", "48", "--stride", "16", "--output", str(out), "--quiet", *extra]  # fmt: skip
        assert main(argv) == 0
        reports.append(json.loads(out.read_text()))
    local_, served = reports
    assert served["texts"][0]["tokens"] == local_["texts"][0]["tokens"]
    assert abs(served["texts"][0]["logprob"] - local_["texts"][0]["logprob"]) < 1e-4
    for a, b in zip(local_["choices"][0]["items"], served["choices"][0]["items"], strict=True):
        assert max(abs(x - y) for x, y in zip(a["loglikelihoods"], b["loglikelihoods"], strict=True)) < 1e-5
