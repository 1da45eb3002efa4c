"""Model structure: shared blocks built once, checkpoint key names, init, dtypes, gradient checkpointing."""

import math

import pytest
import torch
from reference import small_kwargs

from zamba2.config import Zamba2Config
from zamba2.model import Zamba2ForCausalLM


def test_shared_blocks_are_built_once_and_stored_once():
    config = Zamba2Config(**small_kwargs(layers_block_type=["hybrid", "mamba", "hybrid", "hybrid"], num_mem_blocks=2,
                                         use_shared_attention_adapter=True))  # fmt: skip
    model = Zamba2ForCausalLM(config)
    layers = model.model.layers
    assert layers[0].shared_transformer is layers[3].shared_transformer
    assert layers[0].shared_transformer is not layers[2].shared_transformer
    keys = set(model.state_dict())
    assert "model.layers.0.shared_transformer.self_attn.q_proj.weight" in keys
    assert "model.layers.2.shared_transformer.self_attn.q_proj.weight" in keys
    assert not any(k.startswith("model.layers.3.shared_transformer") for k in keys)
    # adapter slot j lives in block j % 2: slots 0 and 2 under layer 0, slot 1 under layer 2
    assert "model.layers.0.shared_transformer.self_attn.linear_q_adapter_list.2.1.weight" in keys
    assert "model.layers.2.shared_transformer.feed_forward.gate_up_proj_adapter_list.1.0.weight" in keys
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_init_as_documented():
    config = Zamba2Config(**small_kwargs())
    mixer = Zamba2ForCausalLM(config).model.layers[0].mamba
    torch.testing.assert_close(mixer.A_log.data, torch.log(torch.arange(1, config.n_mamba_heads + 1).float()))
    assert torch.equal(mixer.D.data, torch.ones(config.n_mamba_heads))
    dt = torch.nn.functional.softplus(mixer.dt_bias.data)
    assert (dt >= config.time_step_min * 0.999).all() and (dt <= config.time_step_max * 1.001).all()
    std = Zamba2ForCausalLM(Zamba2Config(**small_kwargs(hidden_size=64))).model.layers[0].mamba.in_proj.weight.std()
    assert math.isclose(std.item(), config.initializer_range, rel_tol=0.1)


def test_meta_construction_allocates_nothing():
    with torch.device("meta"):
        model = Zamba2ForCausalLM(Zamba2Config.preset("1.2b"))
    assert all(p.device.type == "meta" for p in model.parameters())
    assert 1.1e9 < model.num_parameters() < 1.4e9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_to_dtype(dtype):
    model = Zamba2ForCausalLM(Zamba2Config(**small_kwargs(use_mem_rope=True))).to(dtype).eval()
    out = model(torch.randint(3, 128, (1, 6)), use_cache=True)
    assert out.logits.dtype == dtype and torch.isfinite(out.logits).all()
    assert out.past_key_values.ssm_states.dtype == torch.float32


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = Zamba2ForCausalLM(Zamba2Config(**small_kwargs(use_mem_rope=True))).train()
    ids = torch.randint(3, 128, (2, 9))
    model(ids, labels=ids).loss.backward()
    plain = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model(ids, labels=ids).loss.backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[k], msg=lambda m, k=k: f"{k}: {m}")


def test_split_qkv_equals_whole_projection():
    """The fast path (embedding half of q/k/v computed once per shared block) equals projecting the whole input."""
    torch.manual_seed(0)
    config = Zamba2Config(**small_kwargs(layers_block_type=["hybrid", "mamba", "hybrid", "hybrid"], num_mem_blocks=2,
                                         use_shared_attention_adapter=True, use_mem_rope=True, num_key_value_heads=2))
    model = Zamba2ForCausalLM(config).eval()
    ids = torch.randint(3, 128, (2, 7))
    with torch.no_grad():
        fast = model(ids).logits
        blocks = {layer.shared_transformer for layer in model.model.layers if hasattr(layer, "shared_transformer")}
        for block in blocks:
            assert block.self_attn.can_split
            block.self_attn.split_projections = False
        plain = model(ids).logits
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_one_query_attention_per_head_loop_equals_batched(masked, monkeypatch):
    """Long-context eager decode attention (a loop over rows and heads) equals the batched matmuls."""
    from zamba2.layers import attention

    torch.manual_seed(0)
    keys, values = torch.randn(2, 2, 3, 40, 8), torch.randn(2, 2, 3, 40, 8)  # (J, B, nkv, capacity, d)
    k, v = keys[1, :, :, :30], values[1, :, :, :30]  # cache slices: not contiguous
    q = torch.randn(2, 3, 2, 8)  # (B, nkv, rep, d)
    allowed = None
    if masked:
        allowed = torch.ones(2, 1, 1, 30, dtype=torch.bool)
        allowed[0, ..., :7] = False
    batched = attention.one_query(q, k, v, allowed, 0.3)
    monkeypatch.setattr(attention, "LOOP_KEYS", 16)
    looped = attention.one_query(q, k, v, allowed, 0.3)
    torch.testing.assert_close(looped, batched)
