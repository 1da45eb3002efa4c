"""Cached decode equals the full forward; padding does not leak; cache bookkeeping."""

import pytest
import torch
from reference import make_pair, maxdiff, small_kwargs

from zamba2.cache import HybridCache

CONFIGS = {
    "rope+adapters, 1 block": dict(
        use_mem_rope=True, use_shared_attention_adapter=True, num_mem_blocks=1, chunk_size=4
    ),
    "GQA, 2 blocks, ngroups 2": dict(num_key_value_heads=2, num_mem_blocks=2, mamba_ngroups=2, chunk_size=3,
                                     use_mem_rope=True),
    "time_step_limit set": dict(time_step_limit=(0.01, 0.05), chunk_size=4),
}  # fmt: skip


@pytest.fixture(params=list(CONFIGS))
def model(request):
    _, ours, config = make_pair("lm", **small_kwargs(**CONFIGS[request.param]))
    return ours


def test_prefill_then_steps_equals_full_forward(model):
    ids = torch.randint(3, model.config.vocab_size, (2, 14), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = model.model.new_cache(2, 14)
        out = [model(ids[:, :6], past_key_values=cache).logits]
        for t in range(6, 14):
            out.append(model(ids[:, t : t + 1], past_key_values=cache).logits)
    stepped = torch.cat(out, dim=1)
    print("max diff", maxdiff(stepped, full))
    torch.testing.assert_close(stepped, full, rtol=1e-4, atol=1e-4)
    assert cache.get_seq_length() == 14


def test_prefill_then_second_chunk_equals_full_forward(model):
    ids = torch.randint(3, model.config.vocab_size, (2, 15), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        first = model(ids[:, :7], use_cache=True)
        second = model(ids[:, 7:], past_key_values=first.past_key_values)  # cache grows as needed
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), full, rtol=1e-4, atol=1e-4)


def test_decode_matches_reference_decode_when_dt_limit_inactive():
    """The reference's single-step path skips the dt clamp; with a limit that never binds both agree."""
    ref, ours, config = make_pair("lm", **small_kwargs(use_mem_rope=True, time_step_min=1e-9, time_step_floor=1e-9))
    ids = torch.randint(3, config.vocab_size, (1, 8))
    with torch.no_grad():
        r = ref(ids[:, :5], use_cache=True)
        rcache = r.past_key_values
        o = ours(ids[:, :5], use_cache=True)
        ocache = o.past_key_values
        for t in range(5, 8):
            r = ref(ids[:, t : t + 1], past_key_values=rcache, use_cache=True)
            o = ours(ids[:, t : t + 1], past_key_values=ocache)
            torch.testing.assert_close(o.logits, r.logits, rtol=1e-4, atol=1e-4)


def test_left_padded_batch_equals_rows_alone(model):
    g = torch.Generator().manual_seed(5)
    lengths = [9, 5, 2]
    T = max(lengths)
    rows = [torch.randint(3, model.config.vocab_size, (n,), generator=g) for n in lengths]
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r) :] = r
        mask[i, T - len(r) :] = 1
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, use_cache=True)
        cache = batch.past_key_values
        nxt = torch.randint(3, model.config.vocab_size, (len(rows), 1), generator=g)
        step = model(nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1), past_key_values=cache)
        for i, r in enumerate(rows):
            alone = model(r[None], use_cache=True)
            torch.testing.assert_close(batch.logits[i, T - len(r) :], alone.logits[0], rtol=1e-4, atol=1e-4)
            alone_step = model(nxt[i : i + 1], past_key_values=alone.past_key_values)
            torch.testing.assert_close(step.logits[i], alone_step.logits[0], rtol=1e-4, atol=1e-4)
    assert torch.isfinite(batch.logits).all()


def test_padding_matches_reference_on_real_positions():
    ref, ours, config = make_pair("lm", **small_kwargs(use_mem_rope=True, use_shared_attention_adapter=True))
    ids = torch.randint(3, config.vocab_size, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        r = ref(ids, attention_mask=mask).logits
        o = ours(ids, attention_mask=mask).logits
    torch.testing.assert_close(o[mask.bool()], r[mask.bool()], rtol=1e-4, atol=1e-4)


def test_cache_reorder_select_reset(model):
    ids = torch.randint(3, model.config.vocab_size, (3, 6))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        sub = cache.select([2, 0])
        nxt = torch.randint(3, model.config.vocab_size, (3, 1))
        full_step = model(nxt, past_key_values=cache).logits
        sub_step = model(nxt[[2, 0]], past_key_values=sub).logits
    torch.testing.assert_close(sub_step, full_step[[2, 0]])
    cache.reorder(torch.tensor([1, 0, 2]))
    assert cache.batch_size == 3 and cache.get_seq_length() == 7
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.ssm_states.abs().sum() == 0
    assert cache.ssm_states.dtype == torch.float32


def test_cache_keeps_fp32_state_in_bf16():
    _, ours, config = make_pair("lm", **small_kwargs())
    ours = ours.to(torch.bfloat16)
    cache = HybridCache(config, 1, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        ours(torch.randint(3, config.vocab_size, (1, 4)), past_key_values=cache)
        out = ours(torch.randint(3, config.vocab_size, (1, 1)), past_key_values=cache)
    assert cache.ssm_states.dtype == torch.float32 and cache.keys.dtype == torch.bfloat16
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()


def test_batch_mismatch_is_an_error(model):
    cache = model.model.new_cache(2, 4)
    with pytest.raises(ValueError, match="holds 2 sequences"):
        model(torch.ones(3, 1, dtype=torch.long), past_key_values=cache)


def test_compiled_decode_equals_eager_decode():
    """--compile's fused mixer step (conv, dt, scan, gated norm in one graph) and fused one-query attention equal
    the eager steps, at two batch sizes (the second compiles once with a symbolic batch, and is left-padded, so the
    attention mask is used) and with a time-step limit that binds."""
    from zamba2.ops import compiled

    _, model, config = make_pair("lm", **small_kwargs(**CONFIGS["time_step_limit set"], mamba_ngroups=2))
    for b in (1, 3):
        ids = torch.randint(3, config.vocab_size, (b, 10), generator=torch.Generator().manual_seed(b))
        mask = torch.ones(b, 10, dtype=torch.long)
        mask[0, :2] = 0 if b > 1 else 1
        runs = []
        for fast in (False, True):
            compiled.enable(fast)
            try:
                with torch.no_grad():
                    cache = model.model.new_cache(b, 10)
                    out = [model(ids[:, :4], attention_mask=mask[:, :4], past_key_values=cache).logits]
                    out += [
                        model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache).logits
                        for t in range(4, 10)
                    ]
            finally:
                compiled.enable(False)
            runs.append((torch.cat(out, 1), cache.ssm_states.clone(), cache.conv_states.clone()))
        from zamba2.layers.attention import one_query_fused
        from zamba2.layers.mamba2 import decode_step_fused

        # the compiled graphs ran (no silent eager fallback)
        assert decode_step_fused in compiled._compiled and one_query_fused in compiled._compiled
        (eager, s_eager, c_eager), (fast, s_fast, c_fast) = runs
        print("batch", b, "max diff", maxdiff(fast, eager))
        torch.testing.assert_close(fast, eager, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s_fast, s_eager, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c_fast, c_eager)
