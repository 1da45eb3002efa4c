"""Generation: cache use, greedy equivalence, padded batches, EOS handling, sampling controls."""

import pytest
import torch
from reference import make_pair, small_kwargs

from zamba2.config import Zamba2Config
from zamba2.model import Zamba2ForCausalLM


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Zamba2ForCausalLM(Zamba2Config(**small_kwargs(use_mem_rope=True, use_shared_attention_adapter=True,
                                                          num_key_value_heads=2))).eval()  # fmt: skip


def naive_greedy(model, ids, n):
    """Re-run the whole sequence every step: the plain path the cached loop must equal."""
    for _ in range(n):
        logits = model(ids, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


def test_greedy_equals_uncached_greedy(model):
    ids = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(1))
    out = model.generate(ids, max_new_tokens=10, eos_token_id=[])
    assert out.shape == (1, 17)
    assert torch.equal(out, naive_greedy(model, ids, 10))


@pytest.fixture(scope="module")
def pair_with_large_dt():
    """Reference and ours with dt_bias = 0, so dt = softplus(~0) ~ 0.69 stays far above time_step_min: the
    reference's single-step path skips the dt limit its prefill applies, and this keeps that known difference
    from masking a real one."""
    ref, ours, config = make_pair(
        "lm", **small_kwargs(use_mem_rope=True, use_shared_attention_adapter=True, num_mem_blocks=2)
    )
    with torch.no_grad():
        for model in (ref, ours):
            for name, p in model.named_parameters():
                if name.endswith("dt_bias"):
                    p.zero_()
    ref.generation_config.eos_token_id = None  # never stop early: compare all 32 tokens
    return ref, ours, config


def test_greedy_32_tokens_match_reference_generate(pair_with_large_dt):
    ref, ours, config = pair_with_large_dt
    ids = torch.randint(3, config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(11))
    expected = ref.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=0)
    got = ours.generate(ids, max_new_tokens=32, eos_token_id=[])
    assert expected.shape == got.shape == (1, 38)
    assert torch.equal(got, expected)


def test_greedy_left_padded_batch_matches_reference_generate(pair_with_large_dt):
    ref, ours, config = pair_with_large_dt
    g = torch.Generator().manual_seed(12)
    lengths, T = [7, 3, 5], 7
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, T - n :] = torch.randint(3, config.vocab_size, (n,), generator=g)
        mask[i, T - n :] = 1
    expected = ref.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False, pad_token_id=0)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=32, eos_token_id=[])
    assert torch.equal(got, expected)


def test_left_padded_batch_gives_each_rows_tokens(model):
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 128, (n,), generator=g) for n in (8, 3, 5)]
    T = 8
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :], mask[i, T - len(p) :] = p, 1
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], max_new_tokens=6, eos_token_id=[])
        assert torch.equal(batch[i, T:], alone[0, len(p) :]), f"row {i}"


def test_rows_stop_at_eos_and_pad(model):
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(3))
    free = model.generate(ids, max_new_tokens=6, eos_token_id=[])
    eos = int(free[0, 5 + 1])  # make row 0's second new token the EOS
    out = model.generate(ids, max_new_tokens=6, eos_token_id=[eos, 99999], pad_token_id=0)
    assert out[0, 6] == eos and (out[0, 7:] == 0).all()
    # row 1 keeps going unless it also produced that token
    if eos not in free[1, 5:].tolist():
        assert torch.equal(out[1], free[1][: out.shape[1]])


def test_max_length_and_zero_new_tokens(model):
    ids = torch.randint(3, 128, (1, 4))
    assert model.generate(ids, max_length=9, eos_token_id=[]).shape == (1, 9)
    assert torch.equal(model.generate(ids, max_new_tokens=0), ids)


def test_seeded_sampling_is_reproducible_and_tiny_temperature_is_greedy(model):
    ids = torch.randint(3, 128, (2, 4), generator=torch.Generator().manual_seed(4))
    a = model.generate(ids, max_new_tokens=8, do_sample=True, top_k=20, top_p=0.9, seed=7, eos_token_id=[])
    b = model.generate(ids, max_new_tokens=8, do_sample=True, top_k=20, top_p=0.9, seed=7, eos_token_id=[])
    assert torch.equal(a, b)
    cold = model.generate(ids, max_new_tokens=8, do_sample=True, temperature=1e-6, seed=1, eos_token_id=[])
    assert torch.equal(cold, model.generate(ids, max_new_tokens=8, eos_token_id=[]))


def test_iterator_and_streamer_see_the_same_tokens(model):
    ids = torch.randint(3, 128, (1, 4))
    steps = list(model.generate_iter(ids, max_new_tokens=5, eos_token_id=[]))

    class Collect:
        def __init__(self):
            self.got, self.ended = [], False

        def put(self, t):
            self.got.append(t)

        def end(self):
            self.ended = True

    s = Collect()
    out = model.generate(ids, max_new_tokens=5, eos_token_id=[], streamer=s)
    assert s.ended and torch.equal(torch.stack(s.got, 1), torch.stack(steps, 1))
    assert torch.equal(out[:, 4:], torch.stack(steps, 1))


def test_prefill_in_chunks_equals_one_prefill(model, monkeypatch):
    import zamba2.generation as gen

    ids = torch.randint(3, 128, (1, 11))
    whole = model.generate(ids, max_new_tokens=5, eos_token_id=[])
    monkeypatch.setattr(gen, "PREFILL_CHUNK", 4)
    assert torch.equal(model.generate(ids, max_new_tokens=5, eos_token_id=[]), whole)
    # Long prompts switch to their own (fixed) chunk size.
    monkeypatch.setattr(gen, "LONG_PROMPT", 8)
    monkeypatch.setattr(gen, "LONG_PROMPT_CHUNK", 3)
    assert torch.equal(model.generate(ids, max_new_tokens=5, eos_token_id=[]), whole)


def test_out_of_vocab_ids_and_too_long_prompts_are_clear_errors(model):
    with pytest.raises(ValueError, match=r"input_ids hold id 128 .*vocab_size = 128"):
        model.generate(torch.tensor([[5, 128]]))
    with pytest.raises(ValueError, match="input_ids hold id -1"):
        model(torch.tensor([[5, -1]]))
    short = Zamba2ForCausalLM(Zamba2Config(**small_kwargs(use_mem_rope=True, max_position_embeddings=8))).eval()
    with pytest.raises(ValueError, match="max_position_embeddings"):
        short.generate(torch.ones(1, 9, dtype=torch.long), max_new_tokens=1)
    no_rope = Zamba2ForCausalLM(Zamba2Config(**small_kwargs(use_mem_rope=False, max_position_embeddings=8))).eval()
    with pytest.warns(UserWarning, match="max_position_embeddings"):
        no_rope.generate(torch.ones(1, 9, dtype=torch.long), max_new_tokens=1)


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="top_p"):
        model.generate(torch.ones(1, 3, dtype=torch.long), do_sample=True, top_p=1.5)
    with pytest.raises(ValueError, match="stop_strings need a tokenizer"):
        model.generate(torch.ones(1, 3, dtype=torch.long), stop_strings=["x"])


def test_non_finite_logits_are_an_error_not_token_zero():
    """A model whose weights overflowed gives NaN logits: generate says so instead of answering with id 0."""
    torch.manual_seed(0)
    model = Zamba2ForCausalLM(Zamba2Config.preset("tiny", vocab_size=64)).eval()
    with torch.no_grad():
        model.model.final_layernorm.weight.fill_(float("nan"))
    ids = torch.tensor([[1, 5, 9, 5, 9]])
    for kw in ({}, {"do_sample": True}, {"prompt_lookup_num_tokens": 2}):
        with pytest.raises(FloatingPointError, match="not finite .* at new token 0"):
            model.generate(ids, max_new_tokens=3, **kw)
