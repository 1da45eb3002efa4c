"""The hybrid cache: everything a Zamba2 model carries from one forward call to the next.

Per layer (every layer has a Mamba2 mixer, hybrid layers included):
    conv_states  (L, B, I + 2GN, K-1)   the last K-1 inputs of the depthwise conv, in the model dtype
    ssm_states   (L, B, H, P, N)        the SSM state, always fp32
Per hybrid layer j (its own K/V even when the weights are shared):
    keys, values (J, B, nkv, T_max, d)  model dtype, preallocated, written in place
Per sequence:
    key_mask     (B, T_max) bool        which cached positions are real tokens (False under left padding)
    positions    (B,) long              the RoPE position the next token of each row gets
and `seq_len`, the number of filled K/V slots, shared by all rows (a left-padded batch is aligned on the right).

Everything is allocated once; forward calls write into it. `ensure_capacity` grows K/V by reallocation when a
caller goes past `max_length` (generation sizes the cache up front, so this never happens on its hot path).

Speculation (zamba2/speculative.py): between `begin_speculation()` and `commit(n)` the committed conv/SSM states
are never written. Each Mamba2 mixer runs its `speculate` path instead: it continues from its layer's running
state and hands its tokens' weight-free scan inputs to `record_speculation`. `commit(n)` then keeps the first n
speculated tokens: with dA_t = dt_t A, the state after them is, from the untouched state S_0 (fp32),

    S_n = exp(sum_{t<n} dA_t) S_0 + sum_{t<n} exp(sum_{t<s<n} dA_s) (dt_t x_t) B_t^T

the conv state is the last K-1 columns of [conv_0, xBC_0 .. xBC_{n-1}] (the pre-conv inputs), and K/V, positions
and seq_len truncate to n tokens. That is exactly the state of feeding only those n tokens, up to fp32 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from zamba2.config import Zamba2Config


@dataclass(frozen=True)
class CacheShapes:
    """Widths of the cached tensors: the config's, or one tensor-parallel rank's share of them (its Mamba
    heads and conv channels, its K/V heads; see zamba2/tensor_parallel.py)."""

    conv_dim: int  # I + 2GN
    mamba_heads: int  # H
    kv_heads: int  # nkv

    @classmethod
    def of(cls, config: Zamba2Config) -> CacheShapes:
        return cls(config.mamba_conv_dim, config.n_mamba_heads, config.num_key_value_heads)


@dataclass
class Speculation:
    """What a speculation keeps until `commit`: the committed length, how many tokens each layer has recorded,
    and each layer's running conv/SSM state after them. The scan inputs themselves are in the cache's
    `scan_inputs` buffers, reused from one speculation to the next."""

    seq_len: int  # committed K/V length
    positions: torch.Tensor  # (B,) committed positions
    recorded: list[int]  # per layer: tokens recorded so far
    tokens: int = 0  # tokens fed since begin_speculation
    running: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # conv, SSM after tokens


class HybridCache:
    def __init__(
        self,
        config: Zamba2Config,
        batch_size: int,
        max_length: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        shapes: CacheShapes | None = None,
    ) -> None:
        if batch_size <= 0 or max_length <= 0:
            raise ValueError(f"batch_size and max_length must be positive, got {batch_size}, {max_length}")
        self.config = config
        shapes = shapes or CacheShapes.of(config)
        L = config.num_hidden_layers
        J = len(config.hybrid_layer_ids)
        d = config.attention_head_dim
        self.conv_states = torch.zeros(
            L, batch_size, shapes.conv_dim, config.mamba_d_conv - 1, dtype=dtype, device=device
        )
        self.ssm_states = torch.zeros(
            L, batch_size, shapes.mamba_heads, config.mamba_headdim, config.mamba_d_state,
            dtype=torch.float32, device=device,
        )  # fmt: skip
        self.keys = torch.zeros(J, batch_size, shapes.kv_heads, max_length, d, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.key_mask = torch.ones(batch_size, max_length, dtype=torch.bool, device=device)
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.seq_len = 0
        # True once some cached key is padding; lets unpadded decode skip building a mask.
        self.has_padding = False
        self.speculation: Speculation | None = None  # set between begin_speculation and commit
        # Speculated tokens' scan inputs, (L, B, capacity, ...) each, allocated at the first speculation:
        # xBC (.., C) pre-conv in the model dtype; dA = dt A (.., H), dtx = dt x (.., H, P), B (.., G, N) fp32.
        self.scan_inputs: dict[str, torch.Tensor] = {}

    # ---- sizes -----------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.ssm_states.shape[1]

    @property
    def max_length(self) -> int:
        return self.keys.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys.dtype

    @property
    def device(self) -> torch.device:
        return self.keys.device

    def get_seq_length(self) -> int:
        """Number of tokens already processed (transformers' Cache API name)."""
        return self.seq_len

    def __len__(self) -> int:
        return self.seq_len

    # ---- writes (called by the model) ------------------------------------------------------------
    def ensure_capacity(self, length: int) -> None:
        if length <= self.max_length:
            return
        new_len = max(length, 2 * self.max_length)
        grow = new_len - self.max_length

        def pad(t: torch.Tensor) -> torch.Tensor:
            extra = t.new_zeros(*t.shape[:3], grow, t.shape[4])
            return torch.cat([t, extra], dim=3)

        self.keys, self.values = pad(self.keys), pad(self.values)
        self.key_mask = torch.cat([self.key_mask, self.key_mask.new_ones(self.batch_size, grow)], dim=1)

    def update_kv(self, j: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nkv, T, d) of hybrid layer j after the cached ones; return all keys/values so far.

        Does not advance `seq_len`: the model calls `advance` once every layer has written.
        """
        T = k.shape[2]
        end = self.seq_len + T
        self.keys[j, :, :, self.seq_len : end] = k.detach()
        self.values[j, :, :, self.seq_len : end] = v.detach()
        return self.keys[j, :, :, :end], self.values[j, :, :, :end]

    def begin(self, mask: torch.Tensor | None, T: int) -> None:
        """Reserve room for T new tokens and record which of them are real (mask (B, T), 1 = token)."""
        self.ensure_capacity(self.seq_len + T)
        if mask is not None:
            real = mask.to(torch.bool)
            self.key_mask[:, self.seq_len : self.seq_len + T] = real
            if not bool(real.all()):
                self.has_padding = True
        else:
            self.key_mask[:, self.seq_len : self.seq_len + T] = True

    def advance(self, T: int, mask: torch.Tensor | None) -> None:
        self.seq_len += T
        self.positions += T if mask is None else mask.to(torch.long).sum(-1)
        if self.speculation is not None:
            self.speculation.tokens += T

    # ---- speculation (see the module docstring) --------------------------------------------------
    @property
    def speculating(self) -> bool:
        return self.speculation is not None

    def begin_speculation(self) -> None:
        """From here on, forward calls leave the committed conv/SSM states as they are until `commit(n)`."""
        if self.speculation is not None:
            raise RuntimeError("begin_speculation: a speculation is already open; commit(n) it first")
        self.speculation = Speculation(self.seq_len, self.positions.clone(), [0] * self.conv_states.shape[0])

    def speculative_state(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s conv state (B, C, K-1) and SSM state (B, H, P, N) after the tokens speculated so far:
        the committed ones before its first speculated token. Read only: the mixer returns new ones."""
        running = self.speculation.running.get(layer)
        return running if running is not None else (self.conv_states[layer], self.ssm_states[layer])

    def record_speculation(
        self,
        layer: int,
        xBC: torch.Tensor,
        dA: torch.Tensor,
        dtx: torch.Tensor,
        B: torch.Tensor,
        conv_state: torch.Tensor,
        ssm_state: torch.Tensor,
    ) -> None:
        """Called by layer `layer`'s mixer for the T tokens of one forward call: pre-conv inputs xBC (B, T, C),
        dA = dt * A (B, T, H), dtx = dt * x (B, T, H, P), B (B, T, G, N), and its state after them."""
        spec = self.speculation
        start, T = spec.tokens, xBC.shape[1]
        if spec.recorded[layer] != start:
            raise RuntimeError(f"record_speculation: layer {layer} has {spec.recorded[layer]} tokens, not {start}")
        values = {"xBC": xBC, "dA": dA.float(), "dtx": dtx.float(), "B": B.float()}
        buffers = self.scan_inputs
        if not buffers or buffers["dA"].shape[2] < start + T or buffers["dA"].shape[1] != xBC.shape[0]:
            capacity = max(16, 2 * (start + T))
            old, L = buffers, self.conv_states.shape[0]
            buffers = {k: v.new_zeros(L, v.shape[0], capacity, *v.shape[2:]) for k, v in values.items()}
            if old and old["dA"].shape[1] == xBC.shape[0]:
                for k in buffers:
                    buffers[k][:, :, : old[k].shape[2]] = old[k][:, :, : buffers[k].shape[2]]
            self.scan_inputs = buffers
        for k, v in values.items():
            buffers[k][layer, :, start : start + T] = v.detach()
        spec.recorded[layer] = start + T
        spec.running[layer] = (conv_state.detach(), ssm_state.detach())

    def commit(self, n: int) -> None:
        """End the speculation keeping its first n tokens (0 = none): every layer's conv and SSM state, K/V,
        positions and seq_len become those of feeding only them. One state-sized update per layer."""
        spec = self.speculation
        if spec is None:
            raise RuntimeError("commit: no speculation is open (call begin_speculation first)")
        if not 0 <= n <= spec.tokens:
            raise ValueError(f"commit: n must be in 0..{spec.tokens} (the tokens speculated), got {n}")
        if n and min(spec.recorded) < n:
            missing = [i for i, t in enumerate(spec.recorded) if t < n]
            raise RuntimeError(f"commit: layers {missing} recorded fewer than {n} tokens")
        self.speculation = None
        self.seq_len = spec.seq_len + n
        self.positions.copy_(spec.positions + n)
        if n == 0:
            return
        # All layers at once: (L, B, n, ...) the first n recorded tokens.
        dA, dtx, Bm = (self.scan_inputs[k][:, :, :n] for k in ("dA", "dtx", "B"))
        L, b, _, H, P = dtx.shape
        G, N = Bm.shape[-2:]
        cum = dA.cumsum(dim=2)  # (L, B, n, H): log decay from the start through token t
        total = cum[:, :, -1]  # (L, B, H)
        to_end = torch.exp(total[:, :, None] - cum)  # decay from after token t to after token n-1
        # The heads of a group read the same B_t: one (R*P, n) x (n, N) product per group (R = H / G heads)
        u = (dtx * to_end[..., None]).reshape(L, b, n, G, H // G * P).permute(0, 1, 3, 4, 2)  # (L, B, G, R*P, n)
        update = torch.matmul(u, Bm.permute(0, 1, 3, 2, 4)).view(L, b, H, P, N)
        self.ssm_states.mul_(total.exp()[..., None, None]).add_(update)
        xBC = self.scan_inputs["xBC"][:, :, :n].transpose(2, 3).to(self.conv_states.dtype)  # (L, B, C, n)
        window = torch.cat([self.conv_states, xBC], dim=-1)  # (L, B, C, K-1+n)
        self.conv_states.copy_(window[..., window.shape[-1] - self.conv_states.shape[-1] :])

    # ---- whole-cache operations ------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every sequence; keeps the allocation."""
        self.conv_states.zero_()
        self.ssm_states.zero_()
        self.key_mask.fill_(True)
        self.positions.zero_()
        self.seq_len = 0
        self.has_padding = False
        self.speculation = None

    def reorder(self, indices: torch.Tensor | list[int]) -> None:
        """Reorder or select batch rows in place (beam search, dropping finished rows)."""
        self.__dict__.update(self.select(indices).__dict__)

    def select(self, indices: torch.Tensor | list[int]) -> HybridCache:
        """A new cache holding copies of the given rows."""
        if self.speculation is not None:
            raise RuntimeError("select/reorder: a speculation is open; commit(n) it first")
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.device)
        out = object.__new__(HybridCache)
        out.__dict__.update(self.__dict__)  # config, seq_len, has_padding
        for name in ("conv_states", "ssm_states", "keys", "values"):  # batch is dim 1 of these
            setattr(out, name, getattr(self, name).index_select(1, idx))
        out.key_mask = self.key_mask.index_select(0, idx)
        out.positions = self.positions.index_select(0, idx)
        return out

    def memory_bytes(self) -> int:
        tensors = (self.conv_states, self.ssm_states, self.keys, self.values, self.key_mask, self.positions,
                   *self.scan_inputs.values())  # fmt: skip
        return sum(t.numel() * t.element_size() for t in tensors)
