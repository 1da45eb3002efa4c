"""The chunked SSD scan as one autograd function, for training.

Autograd through `ssd_chunked`'s loop records some thirty ops per chunk, and each slice a chunk reads gets a
backward that fills a full-size zero gradient and copies one chunk into it: the copies and fills outweigh the
math. Here the forward runs the same loop without autograd and keeps only its inputs and the state at the start
of every `SEGMENT`-th chunk. The backward walks the segments in reverse: it recomputes the states at the starts of
a segment's chunks from the saved one, then goes back through those chunks, recomputing each chunk's decays and
weights and writing its gradients into preallocated full-size buffers.

Per head, for a chunk of Q steps with state S0 (P, N) at its start (c = cumsum(dt A) from the chunk start):

    y_i   = sum_{j<=i} W_ij u_j + e_i S0 C_i + D x_i      u_j = dt_j x_j,  W_ij = L_ij (C_i . B_j),
    S_end = d S0 + sum_j t_j u_j B_j^T                     L_ij = exp(c_i - c_j), e_i = exp(c_i),
                                                           t_j = exp(c_last - c_j), d = exp(c_last)

With G the upstream gradient of y and dS that of S_end, the backward of one chunk is

    du_j  = sum_i W_ij G_i + t_j dS B_j          dW_ij = G_i . u_j        ds_ij = sum_heads dW_ij L_ij
    dC_i  = sum_j ds_ij B_j + e_i S0^T G_i       dB_j  = sum_i ds_ij C_i + sum_heads t_j dS^T u_j
    dS0   = d dS + sum_i e_i G_i C_i^T           dc    from W (rows minus columns of dW * W), from e, t and d

and dc flows to dt and A through the cumulative sum (a reversed cumsum), du to x and dt through u = dt x.
Packed rows (`seq_idx`, see ssd.py) only zero some L, e, t and d, and every term above carries one of them as
a factor, so the same backward holds with the masked values.

Shapes as in ssd.py: x (b, T, H, P) in its dtype, dt (b, T, H) fp32, A (H,), B/C (b, T, G, N), D (H,),
state (b, H, P, N) fp32; R = H // G heads share one group's B and C.
"""

from __future__ import annotations

import torch

# States kept by the forward: one per SEGMENT chunks (at 1.2B, 2 MB each per row and layer); the backward
# recomputes the others, each once whatever SEGMENT is, into a buffer of SEGMENT states that only one layer's
# backward holds at a time. 16 keeps a 512-token forward at 1 state per layer for chunks of 32 steps (4 kept
# 4: 240 MB more over the 38 layers of 1.2B).
SEGMENT = 16


class _Chunk:
    """One chunk's recomputed terms (fp32): Bc/Cc (b, G, Q, N), dtc/cum/e/t (b, H, Q), d (b, H), u (b, G, R, Q, P),
    L (b, H, Q, Q) (only when `weights`), xc (b, Q, H, P)."""

    def __init__(self, x, dt, A, B, C, seq_idx, start: int, end: int, weights: bool) -> None:
        b, _, H, P = x.shape
        G = B.shape[2]
        R, Q = H // G, end - start
        self.Bc = B[:, start:end].float().transpose(1, 2)
        self.Cc = C[:, start:end].float().transpose(1, 2)
        self.dtc = dt[:, start:end].transpose(1, 2)
        cum = (self.dtc * A[:, None]).cumsum(dim=-1)
        self.xc = x[:, start:end].float()
        self.u = (self.xc * dt[:, start:end, :, None]).permute(0, 2, 1, 3).reshape(b, G, R, Q, P)
        self.e = cum.exp()
        self.t = torch.exp(cum[..., -1:] - cum)
        self.d = self.e[..., -1].clone()
        allowed = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
        if seq_idx is not None:
            doc = seq_idx[:, start:end]  # (b, Q)
            allowed = allowed & (doc[:, :, None] == doc[:, None, :])[:, None]  # (b, 1, Q, Q)
            running = (doc == seq_idx[:, max(start - 1, 0), None]).float()  # in the carried state's document
            self.e = self.e * running[:, None]
            self.t = self.t * (doc == doc[:, -1:]).float()[:, None]  # only the last document is carried out
            self.d = self.d * running[:, -1:]
        if weights:
            self.L = (cum[..., :, None] - cum[..., None, :]).masked_fill_(~allowed, -torch.inf).exp_()

    def carry_(self, state: torch.Tensor) -> None:
        """state (b, H, P, N) <- d state + sum_j t_j u_j B_j^T, in place: one GEMM per group."""
        b, G, R, Q, P = self.u.shape
        N = self.Bc.shape[-1]
        upd = (self.u * self.t.view(b, G, R, Q, 1)).transpose(-1, -2).reshape(b * G, R * P, Q)
        state.mul_(self.d[..., None, None]).view(b * G, R * P, N).baddbmm_(upd, self.Bc.reshape(b * G, Q, N))


class ChunkedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, initial_state, seq_idx, chunk_size: int):
        b, T, H, P = x.shape
        G, N = B.shape[2], B.shape[3]
        R = H // G
        dt, A, D = dt.float(), A.float(), D.float()
        state = torch.zeros(b, H, P, N, dtype=torch.float32, device=x.device)
        if initial_state is not None:
            state.copy_(initial_state)
        starts = list(range(0, T, chunk_size))
        saved = torch.empty(len(range(0, len(starts), SEGMENT)), b, H, P, N, dtype=torch.float32, device=x.device)
        y = torch.empty(b, T, H, P, dtype=torch.float32, device=x.device)
        for n, start in enumerate(starts):
            if n % SEGMENT == 0:
                saved[n // SEGMENT].copy_(state)
            end = min(start + chunk_size, T)
            Q = end - start
            k = _Chunk(x, dt, A, B, C, seq_idx, start, end, weights=True)
            scores = torch.matmul(k.Cc, k.Bc.transpose(-1, -2))[:, :, None]  # (b, G, 1, Q, Q)
            yc = torch.matmul(k.L.view(b, G, R, Q, Q).mul_(scores), k.u)  # (b, G, R, Q, P)
            y_off = torch.matmul(state.view(b, G, R * P, N), k.Cc.transpose(-1, -2))  # (b, G, R*P, Q)
            yc.addcmul_(y_off.view(b, G, R, P, Q).transpose(-1, -2), k.e.view(b, G, R, Q, 1))
            y[:, start:end] = yc.view(b, H, Q, P).transpose(1, 2).addcmul(k.xc, D[:, None])
            k.carry_(state)
        ctx.save_for_backward(x, dt, A, B, C, D, saved, seq_idx)
        ctx.chunk_size = chunk_size
        ctx.has_initial = initial_state is not None
        ctx.mark_non_differentiable(saved)
        return y, state

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, D, saved, seq_idx = ctx.saved_tensors
        Q0 = ctx.chunk_size
        b, T, H, P = x.shape
        G, N = B.shape[2], B.shape[3]
        R = H // G
        dx = torch.empty_like(x)
        ddt = torch.empty_like(dt)
        dB, dC = torch.empty_like(B), torch.empty_like(C)
        dA = torch.zeros_like(A)
        dD = torch.zeros_like(D)
        dS = dfinal.float().clone() if dfinal is not None else x.new_zeros(b, H, P, N, dtype=torch.float32)
        starts = list(range(0, T, Q0))
        states = torch.empty(min(SEGMENT, len(starts)), b, H, P, N, dtype=torch.float32, device=x.device)
        for seg in reversed(range(len(saved))):
            chunks = starts[seg * SEGMENT : (seg + 1) * SEGMENT]
            states[0].copy_(saved[seg])
            for i, start in enumerate(chunks[:-1]):  # the states at the starts of this segment's chunks
                states[i + 1].copy_(states[i])
                _Chunk(x, dt, A, B, C, seq_idx, start, min(start + Q0, T), weights=False).carry_(states[i + 1])
            for i in reversed(range(len(chunks))):
                start = chunks[i]
                end = min(start + Q0, T)
                Q = end - start
                k = _Chunk(x, dt, A, B, C, seq_idx, start, end, weights=True)
                S0 = states[i]
                S0g = S0.view(b, G, R * P, N)
                dyh = dy[:, start:end].permute(0, 2, 1, 3).reshape(b, G, R, Q, P)  # (b, G, R, Q, P)
                Lg = k.L.view(b, G, R, Q, Q)
                W = Lg * torch.matmul(k.Cc, k.Bc.transpose(-1, -2))[:, :, None]  # (b, G, R, Q, Q)

                # within the chunk
                dW = torch.matmul(dyh, k.u.transpose(-1, -2))  # (b, G, R, Q, Q)
                du = torch.matmul(W.transpose(-1, -2), dyh)  # (b, G, R, Q, P)
                ds = (dW * Lg).sum(2)  # (b, G, Q, Q)
                M = dW.mul_(W).view(b, H, Q, Q)
                dcum = M.sum(-1) - M.sum(-2)  # (b, H, Q)
                dCc = torch.matmul(ds, k.Bc)  # (b, G, Q, N)
                dBc = torch.matmul(ds.transpose(-1, -2), k.Cc)

                # the read of the carried state: y_i += e_i S0 C_i
                eg = k.e.view(b, G, R, Q, 1)
                dye = dyh * eg  # (b, G, R, Q, P)
                dCc += torch.matmul(dye.permute(0, 1, 3, 2, 4).reshape(b, G, Q, R * P), S0g)
                y_off = torch.matmul(S0g, k.Cc.transpose(-1, -2)).view(b, G, R, P, Q)
                dcum += (dyh * y_off.transpose(-1, -2)).sum(-1).view(b, H, Q) * k.e
                dS_prev = torch.matmul(dye.transpose(-1, -2).reshape(b, G, R * P, Q), k.Cc).view(b, H, P, N)

                # the carry: S_end = d S0 + sum_j t_j u_j B_j^T
                dSg = dS.view(b, G, R * P, N)
                dcum[..., -1] += (dS * S0).sum((-1, -2)) * k.d
                v = torch.matmul(dSg, k.Bc.transpose(-1, -2)).view(b, G, R, P, Q).transpose(-1, -2)  # dS B_j
                tg = k.t.view(b, G, R, Q, 1)
                du.addcmul_(v, tg)
                w = (k.u * v).sum(-1).view(b, H, Q) * k.t
                dcum[..., -1] += w.sum(-1)
                dcum -= w
                dBc += torch.matmul((k.u * tg).permute(0, 1, 3, 2, 4).reshape(b, G, Q, R * P), dSg)
                dS = dS_prev.addcmul_(dS, k.d[..., None, None])

                # c = cumsum(dt A), u = dt x
                g = dcum.flip(-1).cumsum(-1).flip(-1)  # (b, H, Q)
                dA += (g * k.dtc).sum((0, 2))
                duh = du.view(b, H, Q, P)
                xch = k.xc.transpose(1, 2)  # (b, H, Q, P)
                ddt[:, start:end] = (g * A[:, None] + (duh * xch).sum(-1)).transpose(1, 2)
                dyv = dyh.view(b, H, Q, P)
                dD += (dyv * xch).sum((0, 2, 3))
                dx[:, start:end] = (duh * k.dtc[..., None]).addcmul_(dyv, D[:, None, None]).transpose(1, 2)
                dB[:, start:end] = dBc.transpose(1, 2)
                dC[:, start:end] = dCc.transpose(1, 2)
        d_initial = dS if ctx.has_initial else None
        return dx, ddt, dA, dB, dC, dD, d_initial, None, None


def ssd_chunked_autograd(
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
    """`ssd_chunked` with the backward above: same contract, same numbers up to rounding."""
    return ChunkedScan.apply(x, dt, A, B, C, D, initial_state, seq_idx, chunk_size)
