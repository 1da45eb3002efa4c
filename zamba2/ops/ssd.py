"""The Mamba2 SSD scan as pure functions.

Per head h, with state S of shape (P, N) (P = head dim, N = d_state), the recurrence is

    S_t = exp(dt_t * A) * S_{t-1} + dt_t * x_t B_t^T          (x_t: (P,), B_t: (N,))
    y_t = S_t C_t + D * x_t

Three forms of it live here:
- `ssd_chunked`: prompts. Within a chunk of Q steps the output is a masked (Q, Q) "attention" whose weights are
  C_i . B_j times the decay exp(sum_{j<k<=i} dt_k A); across chunks one state per head is carried. Chunks are
  processed one at a time, so memory is O(T + Q^2) and work is linear in T.
- `ssd_step`: decode. One step of the recurrence, updating the state in place; `ssd_step_fused` is the same
  step written for torch.compile (one read and one write of the state), used under `--compile`.
- `ssd_reference`: a plain loop over time using the recurrence, for tests only.

Packed rows: with `seq_idx` (B, T), a document index per position (constant within a document, each document
one contiguous run), `ssd_chunked` treats each document as its own sequence: the state is zero at every document
start, so no information flows from one document into the next. An initial state belongs to the row's first
document. `ssd_reference` with `seq_idx` runs the documents one by one.

All math runs in fp32 whatever the inputs' dtype; the state is fp32.
Shapes: x (B, T, H, P); dt (B, T, H) already softplus'ed and clamped; A (H,) negative; B, C (B, T, G, N) with
head h reading group h // (H / G); D (H,); state (B, H, P, N).
"""

from __future__ import annotations

import torch

from zamba2.ops.ssd_grad import ssd_chunked_autograd
from zamba2.packing import document_spans

# With autograd, `ssd_chunked` runs as one autograd function (ops/ssd_grad.py: keeps the inputs and a few states,
# recomputes the rest in backward). Tests turn this off to compare with autograd through the plain loop.
FUSED_BACKWARD = True


def _causal(Q: int, device: torch.device) -> torch.Tensor:
    return torch.ones(Q, Q, dtype=torch.bool, device=device).tril()


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked scan over a prompt. Returns y (B, T, H, P) fp32 and the final state (B, H, P, N) fp32.

    Decays inside a chunk are exp(cum_i - cum_j) with cum the running sum of dt * A from the chunk start, as
    in the Mamba2 kernels; keeping chunks short keeps those sums small.

    `seq_idx` (B, T) int, optional: document index of each position (packed rows, see the module docstring).
    Inside a chunk, weights between positions of different documents are zero, the carried state reaches only
    positions of the document running at the chunk start, and the state carried out holds only the chunk's last
    document (the old state is decayed to zero when a document starts in the chunk). The returned state is then
    the last document's.
    """
    tensors = (x, dt, A, B, C, D, initial_state)
    if FUSED_BACKWARD and torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return ssd_chunked_autograd(x, dt, A, B, C, D, chunk_size, initial_state, seq_idx)
    b, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    R = H // G  # heads per group
    # x stays in its dtype and is converted a chunk at a time: no (B, T, H, P) fp32 copy of it
    dt, B, C = dt.float(), B.float(), C.float()
    A, D = A.float(), D.float()
    # Without autograd the carried state is one buffer updated in place (decay, then the chunk's rank-Q update
    # accumulated by the matmul itself): two fresh 2 MB tensors per chunk cost more than the matmuls at 1.2B.
    in_place = not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, dt, A, B, C, D)))
    if initial_state is None:
        state = torch.zeros(b, H, P, N, dtype=torch.float32, device=x.device)
    else:
        state = initial_state.float().contiguous()  # (b, H, P, N), viewed below as (b, G, R*P, N)
        if in_place and state is initial_state:
            state = state.clone()  # the caller's tensor is not ours to change
    y = torch.empty(b, T, H, P, dtype=torch.float32, device=x.device)
    mask = _causal(min(chunk_size, T), x.device)
    for start in range(0, T, chunk_size):
        end = min(start + chunk_size, T)
        Q = end - start
        Bc = B[:, start:end].permute(0, 2, 1, 3)  # (b, G, Q, N)
        Cc = C[:, start:end].permute(0, 2, 1, 3)  # (b, G, Q, N)
        dtc = dt[:, start:end].transpose(1, 2)  # (b, H, Q)
        cum = (dtc * A[:, None]).cumsum(dim=-1)  # (b, H, Q): log decay from the chunk start through step i
        xc = x[:, start:end].float()  # (b, Q, H, P)
        xdt = (xc * dt[:, start:end, :, None]).permute(0, 2, 1, 3)  # (b, H, Q, P)
        xdt = xdt.reshape(b, G, R, Q, P)
        allowed = mask[:Q, :Q]  # (Q, Q), or (b, 1, Q, Q) with documents
        if seq_idx is not None:
            doc = seq_idx[:, start:end]  # (b, Q)
            allowed = allowed & (doc[:, :, None] == doc[:, None, :])[:, None]
            # 1 where the position (or the chunk's end) is in the document the carried state belongs to
            running = (doc == seq_idx[:, max(start - 1, 0), None]).float()  # (b, Q)
            last_doc = (doc == doc[:, -1:]).float()[:, None, None, :, None]  # (b, 1, 1, Q, 1): the end's document

        # within the chunk: y_i = sum_{j<=i} (C_i . B_j) exp(cum_i - cum_j) dt_j x_j
        seg = (cum[..., :, None] - cum[..., None, :]).masked_fill_(~allowed, -torch.inf)  # (b, H, Q, Q)
        scores = torch.matmul(Cc, Bc.transpose(-1, -2))[:, :, None]  # C_i . B_j: (b, G, 1, Q, Q)
        weights = seg.exp_().view(b, G, R, Q, Q) * scores  # not in place: autograd needs exp's output
        yc = torch.matmul(weights, xdt)  # (b, G, R, Q, P)

        # from the carried state: y_i += exp(cum_i) C_i . S. The R heads of a group share C_i, so their states
        # stack into one (R*P, N) matrix: one GEMM per group instead of R small ones over a transposed copy.
        y_off = torch.matmul(state.view(b, G, R * P, N), Cc.transpose(-1, -2))  # (b, G, R*P, Q)
        from_state = cum.exp()  # (b, H, Q)
        if seq_idx is not None:
            from_state = from_state * running[:, None]  # a new document does not see the carried state
        yc.addcmul_(y_off.view(b, G, R, P, Q).transpose(-1, -2), from_state.view(b, G, R, Q, 1))
        y[:, start:end] = yc.view(b, H, Q, P).transpose(1, 2).addcmul(xc, D[:, None])  # + D x

        # carry: S <- exp(cum_last) S + sum_j exp(cum_last - cum_j) dt_j x_j B_j^T, again one GEMM per group
        to_end = torch.exp(cum[..., -1:] - cum).view(b, G, R, Q, 1)
        decay = cum[..., -1].exp()[..., None, None]  # (b, H, 1, 1)
        if seq_idx is not None:
            to_end = to_end * last_doc  # only the last document's steps enter the carried state
            decay = decay * running[:, -1, None, None, None]  # 0 when a document started in this chunk
        upd = (xdt * to_end).transpose(-1, -2).reshape(b * G, R * P, Q)  # rows: (head, p)
        if in_place:
            state.mul_(decay).view(b * G, R * P, N).baddbmm_(upd, Bc.reshape(b * G, Q, N))
        else:
            state = state * decay + torch.bmm(upd, Bc.reshape(b * G, Q, N)).view(b, H, P, N)
    return y, state


def ssd_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
) -> torch.Tensor:
    """One decode step. x (B, H, P), dt (B, H), B/C (B, G, N); `state` (B, H, P, N) fp32 is updated in place.

    Returns y (B, H, P) in fp32. Three passes over the state: decay, rank-1 update, read-out.
    """
    b, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    R = H // G
    x, dt = x.float(), dt.float()
    Bh = B.float()[:, :, None].expand(b, G, R, N).reshape(b * H, 1, N)
    Ch = C.float()[:, :, None].expand(b, G, R, N).reshape(b * H, N, 1)
    S = state.view(b * H, P, N)
    S.mul_(torch.exp(dt * A.float()).view(b * H, 1, 1))
    S.baddbmm_((x * dt[..., None]).view(b * H, P, 1), Bh)
    y = torch.bmm(S, Ch).view(b, H, P)
    return y.add_(x * D.float()[:, None])


def ssd_step_fused(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
) -> torch.Tensor:
    """`ssd_step` written for torch.compile, which fuses it into one read and one write of the state."""
    b, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    R = H // G
    x, dt = x.float(), dt.float()
    decay = torch.exp(dt * A.float())[:, :, None, None]  # (b, H, 1, 1)
    Bh = B.float()[:, :, None].expand(b, G, R, N).reshape(b, H, 1, N)
    Ch = C.float()[:, :, None].expand(b, G, R, N).reshape(b, H, 1, N)
    new = state * decay + (x * dt[..., None])[..., None] * Bh  # (b, H, P, N)
    state.copy_(new)
    return (new * Ch).sum(-1) + x * D.float()[:, None]


def ssd_reference(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequential recurrence, one step at a time (tests only). Same contract as `ssd_chunked`.

    With `seq_idx` each row is cut into its documents and each document runs alone from a zero state (the first
    one from `initial_state`); the returned state is the last document's."""
    b, T, H, P = x.shape
    N = B.shape[-1]
    state = (
        torch.zeros(b, H, P, N, dtype=torch.float32, device=x.device)
        if initial_state is None
        else initial_state.float().clone()
    )
    if seq_idx is None:
        ys = [ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D) for t in range(T)]
        return torch.stack(ys, dim=1), state
    y = torch.empty(b, T, H, P, dtype=torch.float32, device=x.device)
    for row in range(b):
        for n, (lo, hi) in enumerate(document_spans(seq_idx[row])):
            s0 = state[row : row + 1] if n == 0 else None
            xd, dtd, Bd, Cd = (t[row : row + 1, lo:hi] for t in (x, dt, B, C))
            y[row : row + 1, lo:hi], last = ssd_reference(xd, dtd, A, Bd, Cd, D, initial_state=s0)
        state[row] = last[0]
    return y, state
