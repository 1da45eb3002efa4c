"""Tensor-parallel inference with DTensor: every rank holds a slice of each large weight and the same logits.

    ctx = init_distributed()                       # torchrun, WORLD_SIZE = N (zamba2/train/distributed.py)
    model = Zamba2ForCausalLM.from_pretrained(folder)
    plan = parallelize(model, ctx.mesh)            # in place; plan says what was sharded
    ids = model.generate(input_ids, max_new_tokens=32)    # the same call on every rank, the same tokens

What is sharded over the N ranks (`parallelize_module` with Colwise / Rowwise plans, one all-reduce after each
row-wise product), with the input of every block replicated:

* shared attention: q/k/v column-wise by heads (na/N query heads, nkv/N K/V heads per rank), o_proj row-wise;
  the q/k/v adapters' second factor column-wise like the projection it adds to, the first factor replicated;
* shared MLP: gate_up column-wise with gate and up rows of the same columns on the same rank (the rows are
  reordered first: the checkpoint stores all gate rows, then all up rows), its adapter likewise; down_proj
  row-wise;
* Mamba mixers, when N divides n_mamba_heads and N divides mamba_ngroups or the other way round: heads (their
  z, x and dt rows of in_proj, conv channels, A_log, D, dt_bias, norm channels) split N ways, each rank keeping
  the B/C groups its heads read; out_proj row-wise. When a norm group spans several ranks (N > mamba_ngroups)
  its sum of squares is all-reduced over those ranks. Otherwise the mixers are replicated;
* embedding row-wise over the vocabulary and lm_head column-wise with the logits gathered, when N divides
  vocab_size (replicated otherwise); a tied lm_head stays tied;
* replicated: norms, the hybrid layers' `linear`, and everything smaller.

N must divide num_attention_heads, num_key_value_heads and intermediate_size; the error names the field.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from zamba2.cache import CacheShapes
from zamba2.layers.attention import SharedAttention
from zamba2.layers.blocks import HybridLayer
from zamba2.layers.mamba2 import Mamba2Mixer, dt_activation
from zamba2.layers.mlp import SharedMLP
from zamba2.ops.conv import conv_step
from zamba2.ops.ssd import ssd_step


@dataclass(frozen=True)
class TensorParallelPlan:
    """What `parallelize` did on this rank."""

    size: int
    rank: int
    mamba_sharded: bool  # False: every rank runs the whole mixers
    vocab_sharded: bool
    cache_shapes: CacheShapes


def _check_divides(size: int, **fields: int) -> None:
    for name, value in fields.items():
        if value % size:
            raise ValueError(f"tensor parallel size {size} must divide {name} ({value})")


def mamba_shardable(config, size: int) -> bool:
    """Whether the Mamba heads can be split `size` ways (else the mixers are replicated)."""
    H, G = config.n_mamba_heads, config.mamba_ngroups
    return H % size == 0 and (G % size == 0 or size % G == 0)


def parallelize(model: nn.Module, mesh) -> TensorParallelPlan:
    """Shard a Zamba2ForCausalLM in place over the 1-D DeviceMesh `mesh` (see the module docstring).

    Every rank must call it with the same model weights; afterwards every rank runs the same forward /
    generate calls and gets the same outputs as the unsharded model."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from zamba2.quant import QuantizedLinear

    config = model.config
    size, rank = mesh.size(), mesh.get_local_rank()
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise ValueError("tensor parallelism works on float weights; quantised models are not supported")
    _check_divides(
        size, num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
        intermediate_size=config.intermediate_size,
    )  # fmt: skip
    backbone = model.model
    col, row = ColwiseParallel(), RowwiseParallel()

    blocks = {id(la.shared_transformer): la.shared_transformer for la in backbone.layers if isinstance(la, HybridLayer)}
    for block in blocks.values():
        attn: SharedAttention = block.self_attn
        plan = {"q_proj": col, "k_proj": col, "v_proj": col, "o_proj": row}
        if attn.use_adapters:
            for kind in ("q", "k", "v"):
                for j in getattr(attn, f"linear_{kind}_adapter_list"):
                    plan[f"linear_{kind}_adapter_list.{j}.1"] = col
        parallelize_module(attn, mesh, plan)
        attn.n_heads //= size
        attn.n_kv //= size
        attn.split_projections = False  # the half-width products read DTensor weights as plain tensors

        mlp: SharedMLP = block.feed_forward
        _interleave_gate_up(mlp.gate_up_proj, size)
        plan = {"gate_up_proj": col, "down_proj": row}
        for j, adapter in mlp.gate_up_proj_adapter_list.items():
            _interleave_gate_up(adapter[1], size)
            plan[f"gate_up_proj_adapter_list.{j}.1"] = col
        parallelize_module(mlp, mesh, plan)

    mixers: list[Mamba2Mixer] = [
        (layer.mamba_decoder if isinstance(layer, HybridLayer) else layer).mamba for layer in backbone.layers
    ]
    mamba = mamba_shardable(config, size)
    if mamba:
        norm_group = _norm_group(config, mesh)
        for mixer in mixers:
            _shard_mixer(mixer, size, rank, norm_group)
            parallelize_module(mixer, mesh, {"in_proj": col, "out_proj": row})

    vocab = config.vocab_size % size == 0
    if vocab:
        parallelize_module(backbone, mesh, {"embed_tokens": RowwiseParallel(input_layouts=Replicate())})
        parallelize_module(model, mesh, {"lm_head": ColwiseParallel(output_layouts=Replicate())})
        if config.tie_word_embeddings:
            model.lm_head.weight = backbone.embed_tokens.weight  # both Shard(0) over the vocabulary
    shapes = CacheShapes(mixers[0].conv_dim, mixers[0].H, config.num_key_value_heads // size)
    backbone.cache_shapes = shapes
    return TensorParallelPlan(size, rank, mamba, vocab, shapes)


# ---- shared MLP ----------------------------------------------------------------------------------


@torch.no_grad()
def _interleave_gate_up(linear: nn.Linear, size: int) -> None:
    """Rows [gate; up] -> [gate_0; up_0; gate_1; up_1; ...] so a column-wise split gives each rank the gate
    and up rows of the same F/N columns (its local output then chunks into gate, up as the forward expects)."""

    def reorder(t: torch.Tensor) -> torch.Tensor:
        gate, up = t.chunk(2, dim=0)
        pieces = [p for g, u in zip(gate.chunk(size), up.chunk(size), strict=True) for p in (g, u)]
        return torch.cat(pieces, dim=0)

    linear.weight = nn.Parameter(reorder(linear.weight), requires_grad=False)
    if linear.bias is not None:
        linear.bias = nn.Parameter(reorder(linear.bias), requires_grad=False)


# ---- Mamba ---------------------------------------------------------------------------------------


def _norm_group(config, mesh):
    """The process group over which one gated-norm group is spread (None when each rank holds whole groups).
    Collective: every rank creates every subgroup."""
    G, size, rank = config.mamba_ngroups, mesh.size(), mesh.get_local_rank()
    if G % size == 0:
        return None
    if G == 1:
        return mesh.get_group()
    span = size // G  # ranks per norm group
    ranks = mesh.mesh.flatten().tolist()
    mine = None
    for g in range(G):
        group = dist.new_group(ranks[g * span : (g + 1) * span])
        if g == rank // span:
            mine = group
    return mine


@torch.no_grad()
def _shard_mixer(m: Mamba2Mixer, size: int, rank: int, norm_group) -> None:
    """Keep this rank's heads in every per-head tensor; rebuild in_proj as the concatenation over ranks of
    [z_r, x_r, B_r, C_r, dt_r] so that its column-wise split (applied next) hands rank r exactly its rows."""
    I, H, G, N = m.I, m.H, m.G, m.N
    Il, Hl = I // size, H // size
    Gl = G // size if G % size == 0 else 1

    def groups_of(r: int) -> slice:  # the B/C groups rank r's heads read
        first = r * Gl if G % size == 0 else r // (size // G)
        return slice(first * N, (first + Gl) * N)

    def rows(t: torch.Tensor, r: int) -> torch.Tensor:  # t: in_proj weight or bias, rows [z, x, B, C, dt]
        z, x, Bm, Cm, dt = t.split([I, I, G * N, G * N, H], dim=0)
        heads, ch = slice(r * Hl, (r + 1) * Hl), slice(r * Il, (r + 1) * Il)
        return torch.cat([z[ch], x[ch], Bm[groups_of(r)], Cm[groups_of(r)], dt[heads]], dim=0)

    def conv(t: torch.Tensor) -> torch.Tensor:  # conv channels [x, B, C] of this rank
        x, Bm, Cm = t.split([I, G * N, G * N], dim=0)
        return torch.cat([x[rank * Il : (rank + 1) * Il], Bm[groups_of(rank)], Cm[groups_of(rank)]], dim=0)

    def param(t: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(t.contiguous(), requires_grad=False)

    m.in_proj.weight = param(torch.cat([rows(m.in_proj.weight, r) for r in range(size)]))
    if m.in_proj.bias is not None:
        m.in_proj.bias = param(torch.cat([rows(m.in_proj.bias, r) for r in range(size)]))
    m.conv1d.weight = param(conv(m.conv1d.weight))
    if m.conv1d.bias is not None:
        m.conv1d.bias = param(conv(m.conv1d.bias))
    heads = slice(rank * Hl, (rank + 1) * Hl)
    m.A_log, m.D, m.dt_bias = (param(getattr(m, n)[heads]) for n in ("A_log", "D", "dt_bias"))
    m.norm = ShardedGatedRMSNorm(m.norm.weight[rank * Il : (rank + 1) * Il], I // G, m.norm.eps, norm_group)
    m.I, m.H, m.G = Il, Hl, Gl
    m.conv_dim = Il + 2 * Gl * N
    m.conv1d.groups = m.conv1d.in_channels = m.conv1d.out_channels = m.conv_dim
    m.__class__ = ShardedMamba2Mixer


class ShardedGatedRMSNorm(nn.Module):
    """GatedRMSNorm over this rank's channels. With `group` set, a norm group of `group_size` channels spans
    the ranks of `group`: each sums its squares, the sums are all-reduced, then each normalises its own part."""

    def __init__(self, weight: torch.Tensor, group_size: int, eps: float, group) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.group_size = group_size
        self.eps = eps
        self.group = group

    def forward(self, y: torch.Tensor, gate: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        h = y.float() * F.silu(gate.float())  # (..., I / N)
        if self.group is None:  # whole groups on this rank
            hg = h.view(*h.shape[:-1], -1, self.group_size)
            out = hg * torch.rsqrt(hg.square().mean(-1, keepdim=True) + self.eps)
        else:  # one part of a single group
            sumsq = h.square().sum(-1, keepdim=True)
            dist.all_reduce(sumsq, group=self.group)
            out = h * torch.rsqrt(sumsq / self.group_size + self.eps)
        return self.weight * out.view(h.shape).to(out_dtype)


class ShardedMamba2Mixer(Mamba2Mixer):
    """A Mamba2 mixer holding one rank's heads (its sizes I, H, G, conv_dim are the local ones). Prefill is
    the parent's; the decode step is written out here so that the norm goes through ShardedGatedRMSNorm."""

    def step(self, x: torch.Tensor, cache) -> torch.Tensor:
        b, i = x.shape[0], self.layer_idx
        z, xBC, dt = self.in_proj(x[:, 0]).split([self.I, self.conv_dim, self.H], dim=-1)
        xBC = F.silu(conv_step(xBC, self.conv1d.weight[:, 0], self.conv1d.bias, cache.conv_states[i]))
        xs, Bm, Cm = xBC.split([self.I, self.G * self.N, self.G * self.N], dim=-1)
        y = ssd_step(
            cache.ssm_states[i], xs.view(b, self.H, self.P), dt_activation(dt, self.dt_bias, self.dt_min, self.dt_max),
            -torch.exp(self.A_log.float()), Bm.view(b, self.G, self.N), Cm.view(b, self.G, self.N), self.D,
        )  # fmt: skip
        return self.out_proj(self.norm(y.view(b, 1, self.I), z[:, None], out_dtype=x.dtype))


# ---- command line --------------------------------------------------------------------------------


def join_tensor_parallel(size: int, device: str | torch.device):
    """The DistContext of a `torchrun --nproc-per-node N ... --tp N` process: checks that WORLD_SIZE is N.
    `device` cuda means cuda:LOCAL_RANK on each rank; cpu uses gloo."""
    from zamba2.train.distributed import init_distributed, world_size_from_env

    world = world_size_from_env()
    if world != size:
        how = f"launch with: torchrun --nproc-per-node {size} -m zamba2 generate --tp {size} ..."
        raise ValueError(f"--tp {size} needs {size} processes but WORLD_SIZE is {world}; {how}")
    return init_distributed(device)


def common_seed(seed: int | None) -> int:
    """A sampling seed every rank agrees on (rank 0's random pick when None): the ranks see the same logits
    and must draw the same tokens."""
    if seed is not None:
        return seed
    value = torch.randint(0, 2**62, (1,), dtype=torch.long)
    if dist.get_backend() == "nccl":
        value = value.cuda()
    dist.broadcast(value, src=0)
    return int(value)
