"""The server's speculative decoding for a lone stream (zamba2/serve/speculate.py): the same tokens and logprobs
as plain decoding, batched steps when several streams run, counters in /metrics, errors contained."""

from __future__ import annotations

import pytest
import torch
from test_serve_engine import VOCAB, Collect, alone, run

from zamba2.config import Zamba2Config
from zamba2.model import Zamba2ForCausalLM
from zamba2.sampling import SamplingParams
from zamba2.serve.engine import Engine, Failure, GenerationRequest
from zamba2.serve.speculate import SpeculationSettings


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = Zamba2Config.preset("tiny", vocab_size=VOCAB, num_key_value_heads=2, chunk_size=8)
    return Zamba2ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def draft(model):
    """The model with perturbed weights: its proposals are often, not always, right."""
    out = Zamba2ForCausalLM(model.config).eval()
    out.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in out.parameters():
            p.add_(0.05 * p.std().nan_to_num() * torch.randn_like(p))
    return out


def repetitive(n: int, seed: int) -> list[int]:
    """A random phrase repeated: prompt lookup finds matches, and the model is drawn into repeating it."""
    phrase = torch.randint(3, VOCAB, (7,), generator=torch.Generator().manual_seed(seed)).tolist()
    return (phrase * (n // 7 + 1))[:n]


def submit(engine: Engine, ids: list[int], n: int, **kw) -> Collect:
    sink = Collect()
    engine.submit(GenerationRequest(ids, max_tokens=n, ignore_eos=True, **kw), sink)
    return sink


@pytest.mark.parametrize("how", ["lookup", "draft"])
def test_lone_stream_speculates_and_gives_plain_tokens(model, draft, how):
    settings = SpeculationSettings(prompt_lookup=4) if how == "lookup" else SpeculationSettings(
        draft_model=draft, draft_tokens=3)  # fmt: skip
    engine = Engine(model, speculation=settings)
    prompts = [repetitive(30, 1), repetitive(19, 2), repetitive(44, 3)]
    budgets = [6, 40, 25]  # the first ends early: then two streams, then one alone (after left padding)
    sinks = [submit(engine, ids, n) for ids, n in zip(prompts, budgets, strict=True)]
    run(engine, sinks)
    for ids, n, sink in zip(prompts, budgets, sinks, strict=True):
        assert sink.tokens == alone(model, ids, n)
        assert sink.outputs[-1].finish_reason == "length"
    stats = engine.speculation_stats
    assert stats.verifications > 0 and stats.accepted > 0, stats
    assert engine.stats.generated_tokens == sum(budgets)


def test_logprobs_and_stop_with_speculation(model):
    ids, n = repetitive(28, 4), 30
    plain, spec = Engine(model), Engine(model, speculation=SpeculationSettings(prompt_lookup=5))
    a, b = (submit(e, ids, n, logprobs=2) for e in (plain, spec))
    run(plain, [a])
    run(spec, [b])
    assert a.tokens == b.tokens
    for x, y in zip((lp for o in a.outputs for lp in o.logprobs), (lp for o in b.outputs for lp in o.logprobs),
                    strict=True):  # fmt: skip
        assert x.token_id == y.token_id and abs(x.logprob - y.logprob) < 1e-5
        assert [t for t, _ in x.top] == [t for t, _ in y.top]
    assert spec.speculation_stats.verifications > 0
    # max_tokens cuts inside an accepted run of drafts
    for limit in (1, 2, 3, 7):
        s = submit(spec, ids, limit)
        run(spec, [s])
        assert s.tokens == a.tokens[:limit]


def test_sampled_streams_finish_with_their_budget(model, draft):
    engine = Engine(model, speculation=SpeculationSettings(draft_model=draft))
    params = SamplingParams(do_sample=True, temperature=0.8, top_k=20)
    sinks = [submit(engine, repetitive(20, s), 12, params=params, seed=s) for s in range(2)]
    run(engine, sinks)
    assert [len(s.tokens) for s in sinks] == [12, 12]
    again = submit(engine, repetitive(20, 0), 12, params=params, seed=0)
    run(engine, [again])  # alone from the start: a different path, the same seed
    assert len(again.tokens) == 12


def test_a_failing_speculation_ends_that_request_alone(model):
    class Broken:
        def propose(self, *args, **kwargs):
            raise RuntimeError("proposer broke")

        def accepted(self, n: int) -> None:
            pass

    settings = SpeculationSettings(prompt_lookup=3)
    engine = Engine(model, speculation=settings)
    from zamba2.speculative import Speculator

    settings.speculator = lambda m, stats: Speculator(m, Broken(), 3, stats)  # type: ignore[method-assign]
    bad = submit(engine, repetitive(20, 5), 10)
    run(engine, [bad])
    (failure,) = [e for e in bad.events if isinstance(e, Failure)]
    assert "proposer broke" in failure.message
    engine.speculation = None  # the engine goes on serving
    good = submit(engine, repetitive(20, 6), 5)
    run(engine, [good])
    assert good.tokens == alone(model, repetitive(20, 6), 5)


def test_metrics_show_the_counters(model):
    pytest.importorskip("prometheus_client")
    from zamba2.serve.metrics import ServerMetrics

    engine = Engine(model, speculation=SpeculationSettings(prompt_lookup=4))
    run(engine, [submit(engine, repetitive(30, 7), 20)])
    text = ServerMetrics(lambda: engine).render().decode()
    stats = engine.speculation_stats
    assert f"zamba2_speculative_accepted_tokens_total {float(stats.accepted)}" in text
    assert f"zamba2_speculative_verifications_total {float(stats.verifications)}" in text
    assert "zamba2_speculative_acceptance_rate" in text


def test_settings_refuse_bad_values():
    with pytest.raises(ValueError, match="exactly one"):
        SpeculationSettings()
    with pytest.raises(ValueError, match="prompt_lookup must be an int >= 1"):
        SpeculationSettings(prompt_lookup=0)


def test_serve_with_the_shipped_draft_model_end_to_end(tmp_path):
    """`zamba2 serve --draft-model`: the real server answers as plain greedy does, and /metrics counts the checks."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    import subprocess
    import sys

    from test_serve import ROOT, free_port, wait_healthy

    import zamba2
    from zamba2.tokenizer import Tokenizer

    draft = zamba2.DEFAULT_MODEL.parent / "shakespeare-draft"
    if not (draft / "model.safetensors").is_file():
        pytest.skip("no draft model shipped")
    port = free_port()
    argv = [sys.executable, "-m", "zamba2.serve", "--model", str(zamba2.DEFAULT_MODEL), "--port", str(port),
            "--dtype", "fp32", "--draft-model", str(draft), "--draft-tokens", "3", "--threads", "1",
            "--log-level", "warning", "--served-model-name", "shakespeare"]  # fmt: skip
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, tmp_path / "server.log")
        prompt = "KING HENRY.\nNow, lords, "
        body = {"model": "shakespeare", "prompt": prompt, "max_tokens": 24, "temperature": 0, "logprobs": 1}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        model = Zamba2ForCausalLM.from_pretrained(zamba2.DEFAULT_MODEL, dtype="float32", progress=False).eval()
        ids = Tokenizer.from_pretrained(zamba2.DEFAULT_MODEL).encode(prompt)
        want = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=[])
        got = r.json()["choices"][0]["logprobs"]["tokens"]
        assert len(got) == 24
        text = Tokenizer.from_pretrained(zamba2.DEFAULT_MODEL).decode(want[0, len(ids):].tolist())
        assert r.json()["choices"][0]["text"] == text
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        checks = [line for line in metrics.splitlines() if line.startswith("zamba2_speculative_verifications_total")]
        assert checks and float(checks[0].split()[-1]) > 0, metrics
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        log.close()
