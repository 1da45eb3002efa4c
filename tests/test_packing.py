"""Packed rows: several documents in one row, marked by position_ids restarting at 0, give each document exactly
what it gets alone (scan, conv, attention, logits, loss, gradients), and the ops equal their per-document
references."""

import pytest
import torch
from reference import maxdiff, small_kwargs

from zamba2.config import Zamba2Config
from zamba2.model import Zamba2ForCausalLM
from zamba2.ops.conv import conv_full, conv_reference
from zamba2.ops.ssd import ssd_chunked, ssd_reference
from zamba2.packing import document_spans, packed_documents


def doc_index(T: int, starts: list[int]) -> torch.Tensor:
    """(T,) document index with documents starting at 0 and at each of `starts`."""
    idx = torch.zeros(T, dtype=torch.long)
    for s in starts:
        idx[s:] += 1
    return idx


# Row layouts over T = 37 tokens: documents starting mid-chunk, on a chunk boundary (8, 16), 1-token documents
# (at the start, in the middle and as the last token), and one document spanning several chunks.
SEQ_IDX = torch.stack([doc_index(37, [5, 8, 9, 16, 30]), doc_index(37, [1, 2, 3, 20, 36])])


def scan_inputs(groups: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, T, H, P, N = 2, SEQ_IDX.shape[1], 4, 3, 5
    x, dt = torch.randn(b, T, H, P, generator=g), torch.rand(b, T, H, generator=g) * 0.3
    A, D = -torch.arange(1, H + 1, dtype=torch.float32), torch.randn(H, generator=g)
    B, C = torch.randn(b, T, groups, N, generator=g), torch.randn(b, T, groups, N, generator=g)
    return x, dt, A, B, C, D, torch.randn(b, H, P, N, generator=g)


@pytest.mark.parametrize("chunk", [1, 4, 8, 16, 64])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("path", ["in-place", "fused-backward", "plain-autograd"])
def test_ssd_chunked_with_seq_idx_equals_documents_alone(chunk, groups, with_state, path, monkeypatch):
    from zamba2.ops import ssd

    monkeypatch.setattr(ssd, "FUSED_BACKWARD", path == "fused-backward")
    grad = path != "in-place"
    x, dt, A, B, C, D, s0 = scan_inputs(groups, seed=chunk)
    s0 = s0 if with_state else None
    with torch.set_grad_enabled(grad):
        y, s = ssd_chunked(x.requires_grad_(grad), dt, A, B, C, D, chunk, initial_state=s0, seq_idx=SEQ_IDX)
    yr, sr = ssd_reference(x.detach(), dt, A, B, C, D, initial_state=s0, seq_idx=SEQ_IDX)
    assert maxdiff(y, yr) < 1e-5, f"y max diff {maxdiff(y, yr):.3g}"
    assert maxdiff(s, sr) < 1e-5, f"state max diff {maxdiff(s, sr):.3g}"


def test_ssd_reference_with_seq_idx_runs_documents_alone():
    """The reference itself: a document's output is the plain recurrence over that document from zero."""
    x, dt, A, B, C, D, _ = scan_inputs(1)
    yr, _ = ssd_reference(x, dt, A, B, C, D, seq_idx=SEQ_IDX)
    lo, hi = 9, 16  # row 0's fourth document
    alone, _ = ssd_reference(x[:1, lo:hi], dt[:1, lo:hi], A, B[:1, lo:hi], C[:1, lo:hi], D)
    assert torch.equal(yr[:1, lo:hi], alone)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-backward", "plain-autograd"])
def test_ssd_chunked_with_seq_idx_gradients_equal_documents_alone(fused, monkeypatch):
    from zamba2.ops import ssd

    monkeypatch.setattr(ssd, "FUSED_BACKWARD", fused)
    x, dt, A, B, C, D, _ = scan_inputs(2)
    leaves = [t.clone().requires_grad_() for t in (x, dt, A, B, C, D)]
    y, s = ssd_chunked(*leaves[:5], leaves[5], 8, seq_idx=SEQ_IDX)
    w = torch.randn_like(y)
    ((y * w).sum() + s.sum()).backward()
    sep = [t.clone().requires_grad_() for t in (x, dt, A, B, C, D)]
    xs, dts, As, Bs, Cs, Ds = sep
    total = 0.0
    for row in range(2):
        spans = document_spans(SEQ_IDX[row])
        for n, (lo, hi) in enumerate(spans):
            part = [t[row : row + 1, lo:hi] for t in (xs, dts, Bs, Cs)]
            yd, sd = ssd_chunked(part[0], part[1], As, part[2], part[3], Ds, 8)
            total = total + (yd * w[row : row + 1, lo:hi]).sum() + (sd.sum() if n == len(spans) - 1 else 0.0)
    total.backward()
    for name, a, b in zip("x dt A B C D".split(), leaves, sep, strict=True):
        assert maxdiff(a.grad, b.grad) < 1e-4, f"d{name} max diff {maxdiff(a.grad, b.grad):.3g}"


@pytest.mark.parametrize("with_state", [False, True])
def test_conv_with_seq_idx_equals_documents_alone(with_state):
    g = torch.Generator().manual_seed(1)
    b, T, Ch, K = 2, SEQ_IDX.shape[1], 6, 4
    x, w, bias = torch.randn(b, T, Ch, generator=g), torch.randn(Ch, K, generator=g), torch.randn(Ch, generator=g)
    state = torch.randn(b, Ch, K - 1, generator=g) if with_state else None
    out, new_state = conv_full(x, w, bias, state, seq_idx=SEQ_IDX)
    ref, ref_state = conv_reference(x, w, bias, state, SEQ_IDX)
    assert maxdiff(out, ref) < 1e-5, f"max diff {maxdiff(out, ref):.3g}"
    # row 1 ends with a 1-token document: its state is that token after zeros
    assert torch.equal(new_state, ref_state) and not new_state[1, :, :2].any()
    # one document and no boundaries: the same as the plain conv
    single = torch.zeros(b, T, dtype=torch.long)
    plain, plain_state = conv_full(x, w, bias, state)
    one, one_state = conv_full(x, w, bias, state, seq_idx=single)
    assert maxdiff(one, plain) < 1e-5 and maxdiff(one_state, plain_state) == 0.0


def test_conv_with_seq_idx_gradients_equal_documents_alone():
    g = torch.Generator().manual_seed(2)
    b, T, Ch, K = 2, SEQ_IDX.shape[1], 5, 4
    x, w, bias = torch.randn(b, T, Ch, generator=g), torch.randn(Ch, K, generator=g), torch.randn(Ch, generator=g)
    up = torch.randn(b, T, Ch, generator=g)
    grads = []
    for packed in (True, False):
        leaves = [t.clone().requires_grad_() for t in (x, w, bias)]
        if packed:
            out, _ = conv_full(*leaves, seq_idx=SEQ_IDX)
        else:
            out, _ = conv_reference(*leaves, None, SEQ_IDX)
        (out * up).sum().backward()
        grads.append([t.grad for t in leaves])
    for name, a, r in zip(("x", "weight", "bias"), *grads, strict=True):
        assert maxdiff(a, r) < 1e-5, f"d{name} max diff {maxdiff(a, r):.3g}"


def test_packed_documents_from_position_ids():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 0], [0, 1, 2, 3, 4, 5, 6]])
    assert packed_documents(pos).tolist() == [[0, 0, 0, 1, 1, 2, 3], [0] * 7]
    assert packed_documents(torch.arange(7)[None]) is None
    # left padding, with the pads at 0 (ours) or at 1 (transformers), is not packing
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    assert packed_documents(torch.tensor([[0, 0, 0, 1, 2]]), mask) is None
    assert packed_documents(torch.tensor([[1, 1, 0, 1, 2]]), mask) is None
    # right padding after packed documents: pads at 0 start nothing
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    assert packed_documents(torch.tensor([[0, 1, 0, 1, 0, 0]]), mask).tolist() == [[0, 0, 1, 1, 1, 1]]


# ---- the whole model -------------------------------------------------------------------------------------------

CONFIGS = {
    "tiny preset (2 blocks, adapters, rope, chunk 16)": lambda: Zamba2Config.preset("tiny", vocab_size=128),
    "2 blocks, GQA, ngroups 2, chunk 4": lambda: Zamba2Config(**small_kwargs(
        num_mem_blocks=2, num_key_value_heads=2, mamba_ngroups=2, n_mamba_heads=4, use_mem_rope=True,
        use_shared_attention_adapter=True, chunk_size=4)),
    "1 block, no rope, hybrid first": lambda: Zamba2Config(**small_kwargs(
        layers_block_type=["hybrid", "mamba", "hybrid", "mamba"], num_mem_blocks=1, use_mem_rope=False,
        chunk_size=8)),
}  # fmt: skip

# Documents (lengths) of the two packed rows, T = 40: mid-chunk starts, a start on a chunk boundary (16), two
# 1-token documents; row 1 ends with 3 padding positions.
ROWS = [[7, 1, 8, 11, 13], [16, 1, 5, 15]]
T_ROW = 40


def packed_batch(vocab: int, seed: int = 0):
    """input_ids, position_ids, labels, attention_mask (2, 40) and the documents as (row, start, ids) tuples."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(ROWS), T_ROW), generator=g)
    pos = torch.zeros_like(ids)
    labels = ids.clone()
    mask = torch.zeros_like(ids)
    docs = []
    for r, lengths in enumerate(ROWS):
        start = 0
        for n in lengths:
            pos[r, start : start + n] = torch.arange(n)
            labels[r, start] = -100  # no document predicts the next one's first token
            docs.append((r, start, ids[r, start : start + n]))
            start += n
        mask[r, :start] = 1
        labels[r, start:] = -100
    return ids, pos, labels, mask, docs


def summed_loss(model, ids, labels, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of per-token losses, logits): the mean loss times the number of predicted tokens."""
    out = model(ids, labels=labels, use_cache=False, **kw)
    count = (labels[:, 1:] != -100).sum()
    return out.loss * count, out.logits


@pytest.mark.parametrize("name", list(CONFIGS))
def test_packed_rows_equal_documents_alone(name):
    torch.manual_seed(0)
    model = Zamba2ForCausalLM(CONFIGS[name]()).eval()
    ids, pos, labels, mask, docs = packed_batch(model.config.vocab_size)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=pos)  # use_cache left to its default
        assert out.past_key_values is None  # packed rows make no cache
        packed_sum, _ = summed_loss(model, ids, labels, attention_mask=mask, position_ids=pos)
        worst, alone_sum = 0.0, 0.0
        for r, start, doc in docs:
            alone = model(doc[None], use_cache=False).logits
            worst = max(worst, maxdiff(out.logits[r : r + 1, start : start + len(doc)], alone))
            if len(doc) > 1:
                alone_sum += summed_loss(model, doc[None], doc[None])[0]
    assert worst < 1e-5, f"{name}: logits max diff {worst:.3g}"
    assert abs(packed_sum - alone_sum) < 1e-4 * abs(alone_sum), f"{name}: loss sum {packed_sum} vs {alone_sum}"


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
@pytest.mark.parametrize("name", list(CONFIGS)[:2])
def test_packed_gradients_equal_documents_alone(name, checkpointing):
    torch.manual_seed(0)
    model = Zamba2ForCausalLM(CONFIGS[name]()).train()
    model.model.gradient_checkpointing = checkpointing
    ids, pos, labels, mask, docs = packed_batch(model.config.vocab_size, seed=1)
    summed_loss(model, ids, labels, attention_mask=mask, position_ids=pos)[0].backward()
    packed = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    for _, _, doc in docs:
        if len(doc) > 1:
            summed_loss(model, doc[None], doc[None])[0].backward()
    for k, p in model.named_parameters():
        scale = p.grad.abs().max().item() + 1e-6
        assert maxdiff(packed[k], p.grad) < 1e-4 * scale, f"{k}: max diff {maxdiff(packed[k], p.grad):.3g}"


def test_packed_attention_weights_stay_inside_documents():
    torch.manual_seed(0)
    model = Zamba2ForCausalLM(CONFIGS["tiny preset (2 blocks, adapters, rope, chunk 16)"]()).eval()
    ids, pos, _, mask, _ = packed_batch(model.config.vocab_size)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=pos, output_attentions=True, use_cache=False)
    seq_idx = packed_documents(pos, mask)
    across = seq_idx[:, :, None] != seq_idx[:, None, :]  # (B, T, T)
    for weights in out.attentions:  # (B, heads, T, T)
        assert weights.masked_select(across[:, None]).abs().max().item() == 0.0


def test_packed_rows_refuse_a_cache():
    model = Zamba2ForCausalLM(Zamba2Config.preset("tiny", vocab_size=128)).eval()
    ids, pos, _, _, _ = packed_batch(128)
    with pytest.raises(ValueError, match="packed documents.*use_cache=False"):
        model(ids, position_ids=pos, use_cache=True)
    with pytest.raises(ValueError, match="packed documents"):
        model(ids, position_ids=pos, past_key_values=model.model.new_cache(2, T_ROW))
    with pytest.raises(ValueError, match="position_ids must be"):
        model(ids, position_ids=pos[:, :5])


def test_left_padded_position_ids_are_not_packing():
    """Positions as transformers writes them for a left-padded batch (pads at 1): same logits as without
    position_ids, and the cache is still made."""
    torch.manual_seed(0)
    model = Zamba2ForCausalLM(Zamba2Config.preset("tiny", vocab_size=128)).eval()
    ids = torch.randint(3, 128, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        a = model(ids, attention_mask=mask, position_ids=pos)
        b = model(ids, attention_mask=mask)
    assert a.past_key_values is not None
    assert maxdiff(a.logits, b.logits) == 0.0
