"""The Mamba2 SSD scan as pure functions.

Per head h, with state S of shape (P, N) (P = head dim, N = d_state), the recurrence is

    S_t = exp(dt_t * A) * S_{t-1} + dt_t * x_t B_t^T          (x_t: (P,), B_t: (N,))
    y_t = S_t C_t + D * x_t

Three forms of it live here:
- `ssd_chunked`: prompts. Within a chunk of Q steps the output is a masked (Q, Q) "attention" whose weights are
  C_i . B_j times the decay exp(sum_{j<k<=i} dt_k A); across chunks one state per head is carried. Chunks are
  processed one at a time, so memory is O(T + Q^2) and work is linear in T.
- `ssd_step`: decode. One step of the recurrence, updating the state in place.
- `ssd_reference`: a plain loop over time using the recurrence, for tests only.

All math runs in fp32 whatever the inputs' dtype; the state is fp32.
Shapes: x (B, T, H, P); dt (B, T, H) already softplus'ed and clamped; A (H,) negative; B, C (B, T, G, N) with
head h reading group h // (H / G); D (H,); state (B, H, P, N).
"""

from __future__ import annotations

import torch


def _segment_sum(dA: torch.Tensor) -> torch.Tensor:
    """(..., Q) -> (..., Q, Q) with out[i, j] = sum_{j < k <= i} dA[k] for i >= j and -inf above the diagonal.

    Summing inside the window (instead of differencing two long cumulative sums) keeps the small exponents
    exact even when the chunk's total decay is large.
    """
    Q = dA.shape[-1]
    strict = torch.ones(Q, Q, dtype=torch.bool, device=dA.device).tril(-1)
    # x[k, j] = dA[k] for k > j; a cumulative sum down the rows then gives sum_{j < k <= i} dA[k] at [i, j]
    x = dA[..., :, None].expand(*dA.shape, Q).masked_fill(~strict, 0.0)
    out = x.cumsum(dim=-2)
    lower = torch.ones(Q, Q, dtype=torch.bool, device=dA.device).tril(0)
    return out.masked_fill(~lower, -torch.inf)


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked scan over a prompt. Returns y (B, T, H, P) fp32 and the final state (B, H, P, N) fp32."""
    b, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    R = H // G  # heads per group
    x = x.float()
    dt = dt.float()
    A = A.float()
    B = B.float()
    C = C.float()
    state = (
        torch.zeros(b, H, P, N, dtype=torch.float32, device=x.device)
        if initial_state is None
        else initial_state.float()
    )
    y = torch.empty(b, T, H, P, dtype=torch.float32, device=x.device)
    for start in range(0, T, chunk_size):
        end = min(start + chunk_size, T)
        xc = x[:, start:end]  # (b, Q, H, P)
        dtc = dt[:, start:end]  # (b, Q, H)
        Bc = B[:, start:end]  # (b, Q, G, N)
        Cc = C[:, start:end]
        dA = (dtc * A).transpose(1, 2)  # (b, H, Q)
        cum = dA.cumsum(dim=-1)  # (b, H, Q): log decay from chunk start through step i
        xdt = xc * dtc[..., None]  # (b, Q, H, P)

        # intra-chunk: y_i += sum_{j<=i} (C_i . B_j) exp(segsum[i, j]) dt_j x_j
        decay = torch.exp(_segment_sum(dA))  # (b, H, Q, Q)
        scores = torch.einsum("bign,bjgn->bgij", Cc, Bc)  # (b, G, Q, Q)
        weights = decay.view(b, G, R, *decay.shape[-2:]) * scores[:, :, None]  # (b, G, R, Q, Q)
        y_diag = torch.einsum("bgrij,bjgrp->bigrp", weights, xdt.view(b, -1, G, R, P))

        # contribution of the carried state: y_i += exp(cum_i) C_i . S
        Sg = state.view(b, G, R, P, N)
        y_off = torch.einsum("bign,bgrpn->bigrp", Cc, Sg) * cum.view(b, G, R, -1).permute(0, 3, 1, 2)[
            ..., None
        ].exp()
        y[:, start:end] = (y_diag + y_off).reshape(b, -1, H, P)

        # carry: S <- exp(cum_last) S + sum_j exp(cum_last - cum_j) dt_j x_j B_j^T
        to_end = torch.exp(cum[..., -1:] - cum)  # (b, H, Q); differences within one chunk only
        xw = xdt * to_end.transpose(1, 2)[..., None]  # (b, Q, H, P)
        new = torch.einsum("bjgrp,bjgn->bgrpn", xw.view(b, -1, G, R, P), Bc).reshape(b, H, P, N)
        state = state * torch.exp(cum[..., -1])[..., None, None] + new
    y = y + x * D.float()[:, None]
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

    Returns y (B, H, P) in fp32.
    """
    b, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    R = H // G
    x = x.float()
    dt = dt.float()
    dA = torch.exp(dt * A.float())  # (b, H)
    Bh = B.float()[:, :, None, :].expand(b, G, R, N).reshape(b, H, 1, N)
    Ch = C.float()[:, :, None, :].expand(b, G, R, N).reshape(b, H, N, 1)
    state.mul_(dA[..., None, None]).add_((x * dt[..., None])[..., None] * Bh)
    y = torch.matmul(state, Ch).squeeze(-1)  # (b, H, P)
    return y + x * D.float()[:, None]


def ssd_reference(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequential recurrence, one step at a time (tests only). Same contract as `ssd_chunked`."""
    b, T, H, P = x.shape
    N = B.shape[-1]
    state = (
        torch.zeros(b, H, P, N, dtype=torch.float32, device=x.device)
        if initial_state is None
        else initial_state.float().clone()
    )
    ys = [ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D) for t in range(T)]
    return torch.stack(ys, dim=1), state
