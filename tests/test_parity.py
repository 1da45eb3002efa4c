"""Logits, hidden states, loss and gradients agree with transformers 5.23 on random weights (fp32)."""

import pytest
import torch
from reference import make_pair, maxdiff, small_kwargs

CASES = {
    # name: (config overrides, sequence length)
    "1.2b-like: 1 block, adapters, rope, chunk not dividing T": (
        dict(num_mem_blocks=1, use_shared_attention_adapter=True, use_mem_rope=True, chunk_size=4), 11),
    "2.7b-like: 2 blocks, no adapters, no rope, chunk == T": (
        dict(num_mem_blocks=2, use_shared_attention_adapter=False, use_mem_rope=False, chunk_size=8), 8),
    "3 blocks over 4 hybrids, adapters, rope": (
        dict(layers_block_type=["mamba", "hybrid", "hybrid", "mamba", "hybrid", "hybrid"], num_mem_blocks=3,
             use_shared_attention_adapter=True, use_mem_rope=True, chunk_size=5), 13),
    "GQA, rope, 2 blocks": (
        dict(num_key_value_heads=2, num_mem_blocks=2, use_mem_rope=True, chunk_size=4), 9),
    "ngroups 2, chunk larger than T": (
        dict(mamba_ngroups=2, n_mamba_heads=4, use_shared_attention_adapter=True, chunk_size=16), 11),
    "hybrid first, last and adjacent": (
        dict(layers_block_type=["hybrid", "hybrid", "mamba", "hybrid"], num_mem_blocks=2,
             use_shared_attention_adapter=True, use_mem_rope=True, chunk_size=3), 10),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_forward_parity(name):
    overrides, T = CASES[name]
    ref, ours, config = make_pair("lm", **small_kwargs(**overrides))
    ids = torch.randint(3, config.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        r = ref(ids, labels=ids, output_hidden_states=True, use_cache=False)
        o = ours(ids, labels=ids, output_hidden_states=True, use_cache=False)
    assert len(o.hidden_states) == len(r.hidden_states) == config.num_hidden_layers + 1
    for i, (a, b) in enumerate(zip(o.hidden_states, r.hidden_states, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m, i=i: f"hidden state {i}: {m}")
    torch.testing.assert_close(o.logits, r.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(o.loss, r.loss, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", [n for n in CASES if "GQA" not in n][:3] + ["GQA, rope, 2 blocks"])
def test_gradient_parity(name):
    overrides, T = CASES[name]
    ref, ours, config = make_pair("lm", **small_kwargs(**overrides))
    ref.train()
    ours.train()
    ids = torch.randint(3, config.vocab_size, (2, T), generator=torch.Generator().manual_seed(2))
    ref(ids, labels=ids, use_cache=False).loss.backward()
    ours(ids, labels=ids, use_cache=False).loss.backward()
    ref_params = dict(ref.named_parameters())
    worst = 0.0
    for key, p in ours.named_parameters():
        g_ref = ref_params[key].grad
        assert p.grad is not None, key
        torch.testing.assert_close(p.grad, g_ref, rtol=1e-3, atol=1e-3, msg=lambda m, key=key: f"{key}: {m}")
        worst = max(worst, maxdiff(p.grad, g_ref))
    print(f"max grad diff {worst:.2e}")


def test_logits_to_keep_and_tuple_output():
    ref, ours, config = make_pair("lm", **small_kwargs(use_mem_rope=True))
    ids = torch.randint(3, config.vocab_size, (1, 7))
    with torch.no_grad():
        full = ours(ids).logits
        torch.testing.assert_close(ours(ids, logits_to_keep=1).logits, full[:, -1:])
        torch.testing.assert_close(ours(ids, logits_to_keep=torch.tensor([0, 3])).logits, full[:, [0, 3]])
        torch.testing.assert_close(ours(ids, logits_to_keep=99).logits, full)
        r = ref(ids, labels=ids, return_dict=False, output_hidden_states=True)
        o = ours(ids, labels=ids, return_dict=False, output_hidden_states=True)
    assert len(o) == len(r) == 4  # loss, logits, past_key_values, hidden_states
    torch.testing.assert_close(o[0], r[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(o[1], r[1], rtol=1e-4, atol=1e-4)


def test_kept_positions_have_plain_strides():
    """A (1, 1, H) slice of a long sequence keeps its batch stride; the lm_head must get fresh strides, or
    the matmul copies the whole (H, V) weight transposed on every call."""
    from zamba2.model import _keep_positions

    h = torch.randn(1, 50, 8)
    kept = _keep_positions(h, 1)
    assert kept.stride() == (8, 8, 1)
    torch.testing.assert_close(kept, h[:, -1:])


def test_output_attentions_matches_eager_reference():
    ref, ours, config = make_pair("lm", **small_kwargs(use_mem_rope=True))
    ref.config._attn_implementation = "eager"
    ids = torch.randint(3, config.vocab_size, (2, 6))
    with torch.no_grad():
        r = ref(ids, output_attentions=True)
        o = ours(ids, output_attentions=True)
    assert len(o.attentions) == len(config.hybrid_layer_ids)
    torch.testing.assert_close(o.logits, r.logits, rtol=1e-4, atol=1e-4)
    for a, b in zip(o.attentions, r.attentions, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_inputs_embeds_equals_input_ids():
    _, ours, config = make_pair("lm", **small_kwargs())
    ids = torch.randint(3, config.vocab_size, (2, 5))
    with torch.no_grad():
        a = ours(ids).logits
        b = ours(inputs_embeds=ours.model.embed_tokens(ids)).logits
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        ours()
