"""torch.distributed for training, in one place: the process group, FSDP2 sharding, sharded checkpoints.

    ctx = init_distributed("cuda")              # from torchrun's env (WORLD_SIZE > 1), else None
    shard_model(model, ctx, param_dtype=torch.bfloat16)   # FSDP2: a unit per layer + shared blocks + root
    save_sharded(folder, model, optimizer)                # torch.distributed.checkpoint: one file per rank
    load_sharded(folder, model, optimizer)                # same or another number of ranks, or one process
    save_consolidated(model, folder, ctx)                 # a plain save_pretrained folder, written by rank 0
    plain_copy(model, build, ctx)                         # rank 0: an unsharded copy (the loop's export)

The training loop (loop.py) also uses check_batch / local_rows (each rank's share of a global batch) and
all_sum (target counts and loss sums over ranks).

The backend is nccl when CUDA is there, gloo otherwise; every collective gives up after `timeout` so a rank that
dies or hangs ends the job with a message instead of a hang. Tensor-parallel inference is zamba2/tensor_parallel.py.

FSDP2 and Zamba2's shared weights: a shared block is called by several hybrid layers, and torch refuses a
parameter split across two FSDP groups. Each shared block is therefore its own unit, wrapped before the layers:
its hooks gather it at every use, whoever the caller, and its gradients are reduced once all uses are done. The
tied embedding / lm_head go to the root unit with the final norm, which stays gathered for the whole step.
"""

from __future__ import annotations

import datetime
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

DEFAULT_TIMEOUT_S = 600.0


class DistributedError(RuntimeError):
    """A distributed set-up or run failed; the message says which rank and why."""


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job. `mesh` is the 1-D device mesh over all ranks."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    mesh: object  # torch.distributed.device_mesh.DeviceMesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int | None = None) -> int:
    text = os.environ.get(name)
    if text is None:
        if default is None:
            raise DistributedError(f"{name} is not set: launch with torchrun (it sets RANK, WORLD_SIZE, ...)")
        return default
    try:
        return int(text)
    except ValueError:
        raise DistributedError(f"{name}={text!r} is not an integer") from None


def world_size_from_env() -> int:
    """WORLD_SIZE as torchrun sets it; 1 outside a distributed launch."""
    return _env_int("WORLD_SIZE", 1)


def rank_from_env() -> int:
    """RANK as torchrun sets it; 0 outside a distributed launch."""
    return _env_int("RANK", 0)


def pick_backend(device_type: str) -> str:
    """nccl for CUDA, gloo for CPU; an error naming what is missing otherwise."""
    if device_type == "cuda":
        if not dist.is_nccl_available():
            raise DistributedError(f"CUDA needs the nccl backend, which this torch ({torch.__version__}) lacks")
        return "nccl"
    if device_type == "cpu":
        if not dist.is_gloo_available():
            raise DistributedError(f"CPU needs the gloo backend, which this torch ({torch.__version__}) lacks")
        return "gloo"
    raise DistributedError(f"no torch.distributed backend for device type {device_type!r} (cuda: nccl, cpu: gloo)")


def init_distributed(
    device: str | torch.device | None = None, timeout: float = DEFAULT_TIMEOUT_S
) -> DistContext | None:
    """Join the job torchrun started (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the environment).

    Returns None when WORLD_SIZE is 1 or unset: a single process needs no process group. A CUDA `device` means
    cuda:LOCAL_RANK (one GPU per process), None means that when CUDA is available, else cpu. `timeout`
    (seconds) bounds every collective."""
    from torch.distributed.device_mesh import init_device_mesh

    world = world_size_from_env()
    if world <= 1:
        return None
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world:
        raise DistributedError(f"RANK={rank} is outside 0..WORLD_SIZE-1 = 0..{world - 1}")
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = pick_backend(device.type)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout), device_id=(
            device if device.type == "cuda" else None))  # fmt: skip
    elif dist.get_world_size() != world:
        raise DistributedError(f"a process group of {dist.get_world_size()} ranks exists but WORLD_SIZE is {world}")
    mesh = init_device_mesh(device.type, (world,))
    return DistContext(rank, world, local_rank, device, backend, mesh)


def shutdown() -> None:
    """Leave the process group (no-op when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def describe_failure(err: BaseException) -> str:
    """One line for a collective that failed: usually another rank died or stopped answering."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else _env_int("RANK", 0)
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"rank {rank}: a collective failed ({first[:300]}); another rank probably failed or timed out"


def is_distributed_failure(err: BaseException) -> bool:
    """Whether an exception came out of torch.distributed (a lost peer, a timeout)."""
    text = str(err).lower()
    return isinstance(err, dist.DistError) or (
        isinstance(err, RuntimeError) and any(w in text for w in ("gloo", "nccl", "connection closed", "timed out"))
    )


# ---- FSDP2 ---------------------------------------------------------------------------------------


def _backbone(model: nn.Module) -> nn.Module:
    return model.model if hasattr(model, "model") else model


def shared_blocks(model: nn.Module) -> list[nn.Module]:
    """The shared transformer blocks, each once, in the order of first use."""
    from zamba2.layers.blocks import HybridLayer

    seen: dict[int, nn.Module] = {}
    for layer in _backbone(model).layers:
        if isinstance(layer, HybridLayer):
            seen.setdefault(id(layer.shared_transformer), layer.shared_transformer)
    return list(seen.values())


def shard_model(
    model: nn.Module,
    ctx: DistContext,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = torch.float32,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """FSDP2 in place: each shared block, then each layer, then the root (embedding, tied lm_head, final norm).

    `param_dtype` is the compute dtype of the gathered parameters (None: the stored dtype; bf16 for mixed
    precision, with fp32 master weights and optimizer state); gradients are reduced in `reduce_dtype`. Apply
    LoRA (and freeze the base) before this: only parameters with requires_grad get gradients and reductions."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if param_dtype is not None and param_dtype != torch.float32 and not _supports(ctx.device, param_dtype):
        raise DistributedError(f"{ctx.device} does not support {param_dtype} compute for mixed precision")
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    kw = dict(mesh=ctx.mesh, mp_policy=policy)
    for block in shared_blocks(model):  # before the layers that own or call them (see the module docstring)
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kw)
    for layer in _backbone(model).layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kw)
    fully_shard(model, reshard_after_forward=False, **kw)  # the root is used first and last; keep it gathered
    return model


def _supports(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type == "cuda":
        return dtype != torch.bfloat16 or torch.cuda.is_bf16_supported()
    return True  # CPU kernels exist for bf16 and fp16


def unwrapped_class(model: nn.Module) -> type:
    """The model's own class (fully_shard swaps in a subclass named FSDP<Class>)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def sharded_parameters(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, local shard) of every parameter; plain tensors pass through."""
    from torch.distributed.tensor import DTensor

    for name, p in model.named_parameters():
        yield name, (p.to_local() if isinstance(p, DTensor) else p)


# ---- the training loop's collectives -------------------------------------------------------------


def check_batch(batch_size: int, ctx: DistContext) -> None:
    if batch_size % ctx.world_size:
        raise ValueError(
            f"--batch-size {batch_size} (the global batch) must be divisible by WORLD_SIZE {ctx.world_size}: "
            "each rank takes an equal share of every batch"
        )


def local_rows(rows: list[int], ctx: DistContext) -> list[int]:
    """This rank's share of a global batch's row indices (a contiguous slice)."""
    per = len(rows) // ctx.world_size
    return rows[ctx.rank * per : (ctx.rank + 1) * per]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_sum(value: float, ctx: DistContext) -> float:
    """The sum over ranks of a number (fp64, on the backend's device)."""
    t = torch.tensor([float(value)], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return float(t)


# ---- checkpoints ---------------------------------------------------------------------------------


def save_sharded(folder: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """model (+ optimizer) state with torch.distributed.checkpoint: each rank writes its own shards, keyed by
    the unsharded parameter names, so any number of ranks (or one process) can load it. Collective."""
    import torch.distributed.checkpoint as dcp

    state = _dcp_state(model, optimizer)
    dcp.save(state, checkpoint_id=str(folder))


def load_sharded(folder: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load what save_sharded wrote into `model` (FSDP-sharded or plain) and `optimizer`, resharding to this
    job's ranks. Collective when a process group exists. Missing or unexpected keys are an error naming them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    folder = Path(folder)
    if not (folder / ".metadata").is_file():
        raise FileNotFoundError(f"{folder}: not a torch.distributed.checkpoint folder (no .metadata file)")
    state = _dcp_state(model, optimizer)
    try:
        with warnings.catch_warnings():  # without a process group DCP loads in this process, as intended
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(folder))
    except (RuntimeError, ValueError, KeyError) as err:
        raise DistributedError(f"{folder}: the sharded checkpoint does not fit this model/optimizer ({err})") from err
    set_state_dict(
        model, optimizer if optimizer is not None else [], model_state_dict=state["model"],
        optim_state_dict=state.get("optimizer", {}), options=_trainable(strict=False),
    )  # fmt: skip


def _trainable(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # strict=False on load: the frozen parameters are absent on purpose; every trainable one was asked for
    return StateDictOptions(ignore_frozen_params=True, strict=strict)


def _dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """{"model": trainable parameters, "optimizer": its state}, keyed by unsharded names (frozen base weights
    under LoRA are not written: they come from the base checkpoint)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer if optimizer is not None else [], options=_trainable())
    # a tied lm_head is the frozen embedding under a second name, which ignore_frozen_params lets through
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    state = {"model": {k: v for k, v in model_state.items() if k not in frozen}}
    if optimizer is not None:
        state["optimizer"] = optim_state
    return state


def full_state_dict(model: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The unsharded model state on CPU, on rank 0 only (other ranks get {}). Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(model, options=options)


def plain_copy(
    model: nn.Module, build: Callable[[], nn.Module], ctx: DistContext, trainable_only: bool = False
) -> nn.Module | None:
    """Rank 0: an unsharded copy of `model` on CPU, made by `build()` (called on the meta device; the same
    structure, LoRA included) and filled with the gathered weights; other ranks: None. With `trainable_only`
    only the trained parameters are gathered (a LoRA export), the rest stay on the meta device. Collective."""
    state = full_state_dict(model, trainable_only)
    plain = None
    if ctx.is_main:
        with torch.device("meta"):
            plain = build()
        plain.load_state_dict(state, strict=not trainable_only, assign=True)
        plain.tie_weights()
    dist.barrier()
    return plain


def save_consolidated(
    model: nn.Module, folder: str | os.PathLike, ctx: DistContext | None, max_shard_size: int | str = "5GB"
) -> None:
    """A plain save_pretrained folder (config.json + safetensors) from a sharded model, written by rank 0.
    Collective: every rank must call it. Gathers one full copy on rank 0's CPU."""
    if ctx is None:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        return
    plain = plain_copy(model, lambda: unwrapped_class(model)(model.config), ctx)
    if plain is not None:
        plain.save_pretrained(folder, max_shard_size=max_shard_size)
    dist.barrier()
