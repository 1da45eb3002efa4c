"""Weight-only int8 / int4 quantization: fused CPU kernels == dequantise-then-matmul reference,
quantisation error bounds, whole-model replacement, and the persisted state-dict format."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from zamba2 import quant
from zamba2.quant import (
    QuantizedLinear,
    apply_quantization_config,
    dequantize_int4,
    dequantize_int8,
    pack_int4,
    quantization_config,
    quantize_int4,
    quantize_int8,
    quantize_model,
    reference_kernels,
    unpack_int4,
)

# Allowed |kernel - reference| relative to the largest output: a few units of the dtype's rounding.
TOL = {torch.float32: 1e-5, torch.bfloat16: 4 * 2**-7, torch.float16: 4 * 2**-10}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    diff = (actual.float() - expected.float()).abs().max().item()
    scale = max(1.0, expected.float().abs().max().item())
    assert diff <= tol * scale, f"{what}: max |diff| = {diff:.3e} > {tol * scale:.3e}"


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 256), (1, 1, 256), (8, 16, 256), (128, 256)])
@pytest.mark.parametrize("out_features", [64, 72])  # 72: int4 pads rows to a multiple of 16
def test_kernel_matches_reference(mode, dtype, shape, out_features, monkeypatch):
    # Fused kernels at any rows.
    monkeypatch.setattr(quant.linear, "DEQUANTIZE_ROWS", dict.fromkeys(quant.MODES, 1 << 30))
    torch.manual_seed(0)
    layer = QuantizedLinear.from_linear(nn.Linear(256, out_features, dtype=dtype), mode, group_size=64)
    x = torch.randn(shape, dtype=dtype)
    with torch.inference_mode():
        y = layer(x)
        assert layer._kernel_cache, "CPU forward did not take the fused kernel path"
        with reference_kernels():
            y_ref = layer(x)
    expected = F.linear(x.float(), layer.dequantized_weight(), layer.bias.float())
    assert y.shape == (*shape[:-1], out_features) and y.dtype == dtype
    assert_close(y, y_ref, TOL[dtype], "kernel vs dequantise-then-matmul")
    assert_close(y, expected, TOL[dtype], "kernel vs fp32 reference")


def test_int8_round_trip_within_half_step():
    torch.manual_seed(0)
    w = torch.randn(48, 96) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different magnitude
    w[5] = 0.0  # an all-zero row must not divide by zero
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and s.shape == (48,)
    assert q.min() >= -127 and q.max() <= 127
    assert torch.equal(q[5], torch.zeros_like(q[5]))
    err = (w - dequantize_int8(q, s)).abs()
    bound = s[:, None] / 2 * (1 + 1e-5) + 1e-12
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3e}"
    # The largest |w| of each row is represented exactly up to fp32 rounding.
    assert torch.allclose(q.abs().amax(1)[s > 0].float(), torch.full((47,), 127.0))


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_round_trip_within_half_step(group_size):
    torch.manual_seed(0)
    w = torch.randn(32, 256) + 0.5  # offset groups exercise the zero point
    w[3, :group_size] = 0.25  # a constant group is represented exactly
    q, s, z = quantize_int4(w, group_size)
    assert q.dtype == torch.uint8 and q.shape == (32, 128)
    assert s.shape == z.shape == (32, 256 // group_size)
    codes = unpack_int4(q)
    assert codes.max() <= 15
    assert torch.equal(pack_int4(codes), q)
    deq = dequantize_int4(q, s, z, group_size)
    err = (w - deq).abs().reshape(32, -1, group_size)
    bound = s[..., None] / 2 * (1 + 1e-5) + 1e-6
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3e}"
    assert deq[3, :group_size].eq(0.25).all()


def test_pack_int4_nibble_order():
    codes = torch.tensor([[1, 2, 15, 0]])
    assert pack_int4(codes).tolist() == [[0x21, 0x0F]]  # even column in the low nibble


class ToyLM(nn.Module):
    """Embedding -> a few Linear layers (big, small, adapter, shared) -> lm_head tied to the embedding."""

    def __init__(self, vocab: int = 320, d: int = 256, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d, dtype=dtype)
        self.up = nn.Linear(d, 2 * d, bias=True, dtype=dtype)
        self.down = nn.Linear(2 * d, d, bias=False, dtype=dtype)
        self.gate = nn.Linear(d, 16, dtype=dtype)  # too small to quantise
        self.adapter_list = nn.ModuleList([nn.Linear(d, d, bias=False, dtype=dtype)])
        shared = nn.Linear(d, d, bias=False, dtype=dtype)  # one module reached under two names
        self.blocks = nn.ModuleList([nn.ModuleDict({"proj": shared}), nn.ModuleDict({"proj": shared})])
        self.lm_head = nn.Linear(d, vocab, bias=False, dtype=dtype)
        self.lm_head.weight = self.embed_tokens.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(ids)  # (B, T, d)
        h = h + self.down(F.gelu(self.up(h))) + self.adapter_list[0](h)
        for block in self.blocks:
            h = h + block["proj"](h)
        h = h * torch.sigmoid(self.gate(h)).mean(-1, keepdim=True)
        return self.lm_head(h)  # (B, T, vocab)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantize_model_replaces_selected_and_keeps_tied_embedding(mode):
    torch.manual_seed(0)
    model = ToyLM()
    embed_weight = model.embed_tokens.weight
    embed_before = embed_weight.detach().clone()
    ids = torch.randint(0, 320, (2, 5))
    with torch.inference_mode():
        logits_float = model(ids)
    seen = []
    stats = quantize_model(model, mode, group_size=64, progress=lambda name, done, total: seen.append(name))

    assert sorted(stats["modules"]) == ["blocks.0.proj", "blocks.1.proj", "down", "lm_head", "up"]
    assert stats["quantized"] == 4 and stats["skipped"] == 2  # gate (small) and the adapter
    assert stats["tied"] == ["lm_head"]
    assert stats["bytes_after"] < stats["bytes_before"] / (3 if mode == "int8" else 5)
    assert seen == stats["modules"]
    for name in ("up", "down", "lm_head", "blocks.0.proj", "blocks.1.proj"):
        assert isinstance(model.get_submodule(name), QuantizedLinear), name
    assert model.blocks[0]["proj"] is model.blocks[1]["proj"]
    assert type(model.gate) is nn.Linear and type(model.adapter_list[0]) is nn.Linear
    # The embedding table is the very same float Parameter, unchanged.
    assert model.embed_tokens.weight is embed_weight and embed_weight.dtype == torch.float32
    assert torch.equal(embed_weight, embed_before)
    assert model.up.bias.dtype == torch.float32
    with torch.inference_mode():
        logits = model(ids)
    rel = (logits - logits_float).norm() / logits_float.norm()
    assert rel < (0.02 if mode == "int8" else 0.2), f"quantised logits drift {rel.item():.3e}"


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_state_dict_round_trip_through_safetensors(mode, tmp_path):
    torch.manual_seed(0)
    model = ToyLM(dtype=torch.bfloat16)
    stats = quantize_model(model, mode, group_size=32)
    config = quantization_config(mode, 32, stats["modules"])
    assert config == {
        "quant_method": "zamba2",
        "mode": mode,
        "group_size": 32 if mode == "int4" else None,
        "modules": ["blocks.0.proj", "blocks.1.proj", "down", "lm_head", "up"],
    }
    state = model.state_dict()
    assert "lm_head.qweight" in state and "lm_head.scales" in state and "lm_head.weight" not in state
    assert ("lm_head.zeros" in state) == (mode == "int4")
    assert state["lm_head.qweight"].dtype == (torch.int8 if mode == "int8" else torch.uint8)
    assert state["up.bias"].dtype == torch.bfloat16
    # Shared modules appear under every name; safetensors wants each tensor once.
    state = {k: v for k, v in state.items() if not k.startswith("blocks.1.")}
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))

    torch.manual_seed(1)  # different random float weights: everything must come from the file
    fresh = ToyLM(dtype=torch.bfloat16)
    apply_quantization_config(fresh, config)
    assert isinstance(fresh.lm_head, QuantizedLinear) and fresh.blocks[0]["proj"] is fresh.blocks[1]["proj"]
    missing, unexpected = fresh.load_state_dict(load_file(str(path)), strict=False)
    assert not unexpected and all(k.startswith("blocks.1.") for k in missing), (missing, unexpected)

    ids = torch.randint(0, 320, (2, 7))
    with torch.inference_mode():
        assert torch.equal(model(ids), fresh(ids))
        with reference_kernels():
            assert torch.equal(model(ids), fresh(ids))


def test_load_state_dict_invalidates_kernel_cache():
    torch.manual_seed(0)
    a = QuantizedLinear.from_weight(torch.randn(64, 128), None, "int4", 64)
    b = QuantizedLinear.from_weight(torch.randn(64, 128), None, "int4", 64)
    x = torch.randn(3, 128)
    with torch.inference_mode():
        a(x)  # builds a's packed weight
        a.load_state_dict(b.state_dict())
        assert torch.equal(a(x), b(x))


def test_reference_path_off_cpu_and_with_grad():
    torch.manual_seed(0)
    layer = QuantizedLinear.from_weight(torch.randn(32, 64), torch.randn(32), "int8")
    meta = QuantizedLinear(64, 32, "int4", 32, bias=True, device="meta")
    assert meta(torch.empty(5, 64, device="meta")).shape == (5, 32)
    x = torch.randn(4, 64, requires_grad=True)
    layer(x).sum().backward()  # the fused kernels have no autograd; this goes through F.linear
    assert torch.allclose(x.grad, layer.dequantized_weight().sum(0).expand(4, -1))
    assert not layer._kernel_cache
    assert quant.linear.FORCE_REFERENCE is False


def test_errors_name_the_field():
    w = torch.randn(64, 256)
    with pytest.raises(ValueError, match="group_size"):
        quantize_int4(w, 16)
    with pytest.raises(ValueError, match="group_size"):
        QuantizedLinear(256, 64, "int4", group_size=100)
    with pytest.raises(ValueError, match="in_features=200.*group_size=64"):
        quantize_int4(torch.randn(64, 200), 64)
    with pytest.raises(ValueError, match="in_features=200.*group_size=64"):
        QuantizedLinear.from_weight(torch.randn(64, 200), None, "int4", 64)
    with pytest.raises(ValueError, match="mode"):
        QuantizedLinear(256, 64, "int3")
    with pytest.raises(ValueError, match="group_size"):
        quantize_model(nn.Sequential(nn.Linear(256, 256)), "int4", group_size=48)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        quantize_int8(torch.randn(4, 4, 4))
    with pytest.raises(ValueError, match="in_features=256"):
        QuantizedLinear.from_weight(w, None, "int8")(torch.randn(2, 128))
    with pytest.raises(ValueError, match="modules names 'nope'"):
        apply_quantization_config(nn.Sequential(), quantization_config("int8", modules=["nope"]))


def test_load_into_meta_built_model_with_assign():
    torch.manual_seed(0)
    model = ToyLM(dtype=torch.bfloat16)
    config = quantization_config("int4", 32, quantize_model(model, "int4", group_size=32)["modules"])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.device("meta"):
        fresh = ToyLM(dtype=torch.bfloat16)
    apply_quantization_config(fresh, config)
    fresh.load_state_dict(state, assign=True)
    ids = torch.randint(0, 320, (1, 4))
    with torch.inference_mode():
        assert torch.equal(model(ids), fresh(ids))


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_many_row_path_equals_reference(mode, dtype):
    """Prefill-sized inputs dequantise in the activation dtype and use the GEMM: equal to the fp32 reference
    within that dtype's rounding."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96, bias=True)
    q = QuantizedLinear.from_linear(linear, mode, group_size=64)
    x = torch.randn(2, 50, 256).to(dtype)
    assert x.reshape(-1, 256).shape[0] >= quant.DEQUANTIZE_ROWS[mode]
    ref = torch.nn.functional.linear(x.float(), q.dequantized_weight(), q.bias.float())
    got = q(x).float()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert ((got - ref).norm() / ref.norm()).item() < tol


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 3, 100])  # fused kernels below DEQUANTIZE_ROWS, dequantised GEMM at 100
def test_forward_columns_equal_the_whole_product(mode, rows):
    """Products with the two halves of the input features add up to the whole product (no bias)."""
    torch.manual_seed(0)
    layer = QuantizedLinear.from_linear(nn.Linear(256, 72, bias=False), mode, group_size=64)
    x = torch.randn(rows, 256, dtype=torch.bfloat16)
    with torch.inference_mode():
        whole = layer(x)
        halves = layer.forward_columns(x[:, :128], 0, 128).float() + layer.forward_columns(x[:, 128:], 128, 256).float()
        expected = F.linear(x[:, 128:].float(), layer.dequantized_weight()[:, 128:])
        assert_close(layer.forward_columns(x[:, 128:], 128, 256), expected, TOL[torch.bfloat16], "columns vs fp32")
    assert_close(halves, whole, 2 * TOL[torch.bfloat16], "halves vs whole")


def test_forward_columns_refuse_a_split_group():
    layer = QuantizedLinear.from_linear(nn.Linear(256, 64, bias=False), "int4", group_size=128)
    assert layer.can_take_columns(0, 128) and not layer.can_take_columns(0, 64)
    with pytest.raises(ValueError, match=r"columns \[0, 64\).*group_size=128"):
        layer.forward_columns(torch.randn(1, 64), 0, 64)
    assert QuantizedLinear.from_linear(nn.Linear(256, 64, bias=False), "int8").can_take_columns(0, 64)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_splits_qkv_like_the_whole_projection(mode):
    """Quantised q/k/v take the split fast path (embedding half once per shared block) and give what the whole
    quantised projections give, in prefill and in cached decode."""
    from reference import small_kwargs

    from zamba2 import Zamba2Config, Zamba2ForCausalLM

    torch.manual_seed(0)
    config = Zamba2Config(**small_kwargs(layers_block_type=["hybrid", "mamba", "hybrid"], num_mem_blocks=1,
                                         use_shared_attention_adapter=True, hidden_size=128))  # fmt: skip
    model = Zamba2ForCausalLM(config).eval()
    model.quantize(mode, group_size=64)  # q/k/v read 2 * 128 = 256 features: large enough to be quantised
    attn = model.model.layers[0].shared_transformer.self_attn
    assert isinstance(attn.q_proj, QuantizedLinear) and attn.can_split
    ids = torch.randint(3, 128, (1, 6))
    with torch.inference_mode():
        fast = model(ids).logits
        step_fast = model.generate(ids, max_new_tokens=4)
        attn.split_projections = False
        plain = model(ids).logits
        step_plain = model.generate(ids, max_new_tokens=4)
    assert_close(fast, plain, 4 * TOL[torch.float32], "split vs whole q/k/v")
    assert torch.equal(step_fast, step_plain)
