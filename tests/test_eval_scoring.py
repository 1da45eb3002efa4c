"""zamba2.eval.scoring: per-token logprobs from one chunked prefill equal a direct fp32 log-softmax of the
full-sequence logits; the piece and row chunking change nothing beyond rounding."""

from __future__ import annotations

import pytest
import torch

from zamba2 import eval as zeval
from zamba2.cache import HybridCache
from zamba2.config import Zamba2Config
from zamba2.model import Zamba2ForCausalLM


@pytest.fixture(scope="module")
def model() -> Zamba2ForCausalLM:
    torch.manual_seed(0)
    return Zamba2ForCausalLM(Zamba2Config.preset("tiny", vocab_size=512)).eval()


def direct(model, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1 from one plain forward: (T - 1,)."""
    with torch.no_grad():
        rows = torch.log_softmax(model(ids[None]).logits[0, :-1].float(), -1)
    return rows.gather(1, ids[1:, None])[:, 0]


@pytest.mark.parametrize("piece", [None, 7, 64])
def test_score_tokens_equals_full_sequence_log_softmax(model, monkeypatch, piece):
    monkeypatch.setattr(zeval.scoring, "LOGIT_ROWS", 5)  # several row chunks per piece
    ids = torch.randint(0, 512, (150,), generator=torch.Generator().manual_seed(1))
    out = zeval.score_tokens(model, ids, top=3, piece=piece)
    want = direct(model, ids)
    diff = (out.logprobs - want).abs().max().item()
    assert out.logprobs.dtype == torch.float32 and out.logprobs.shape == (149,)
    assert diff < 1e-5, f"max |difference| {diff:.3g}"
    with torch.no_grad():
        rows = torch.log_softmax(model(ids[None]).logits[0, :-1].float(), -1)
    best = torch.topk(rows, 3, -1)
    assert torch.equal(out.top_ids, best.indices)
    assert (out.top_logprobs - best.values).abs().max().item() < 1e-5


def test_score_chunk_continues_a_cache_and_gives_the_next_logits(model):
    ids = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(2))
    cache = HybridCache(model.config, 1, 40)
    first = zeval.score_chunk(model, ids[None, :25], cache, ids[1:26])
    last = zeval.score_chunk(model, ids[None, 25:], cache, ids[26:])
    assert first.logprobs.shape == (25,) and last.logprobs.shape == (14,) and first.top_ids is None
    got = torch.cat([first.logprobs, last.logprobs])
    assert (got - direct(model, ids)).abs().max().item() < 1e-5
    with torch.no_grad():
        want = model(ids[None]).logits[:, -1]
    assert (last.last_logits - want).abs().max().item() < 1e-5


def test_bad_input_is_refused(model):
    with pytest.raises(ValueError, match="at least 2 tokens"):
        zeval.score_tokens(model, [5])
    with pytest.raises(ValueError, match=r"\[0, 512\)"):
        zeval.score_tokens(model, [5, 512])
    with pytest.raises(ValueError, match="n or n - 1 targets"):
        zeval.score_chunk(model, torch.tensor([[1, 2, 3]]), HybridCache(model.config, 1, 3), torch.tensor([2]))
