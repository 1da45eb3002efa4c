"""Worker processes of tests/test_distributed.py, started by torchrun: `python -m tests.dist_workers CASE OUT`.

Each case runs on every rank; rank 0 writes what the test checks under OUT (JSON, safetensors, folders).
Tiny configs with a 256-token vocabulary keep a 2-rank gloo job on a 2-core machine to seconds.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from zamba2.config import Zamba2Config
from zamba2.model import Zamba2ForCausalLM
from zamba2.train import distributed as D

VOCAB = 256
GLOBAL_BATCH = 4
STEPS = 5
SAVE_AT = 3  # the sharded checkpoint is written after this many steps
LR = 1e-3


def tiny(**overrides) -> Zamba2Config:
    return Zamba2Config.preset("tiny", **{"vocab_size": VOCAB, **overrides})


def batches(steps: int = STEPS) -> list[torch.Tensor]:
    """The global batches (GLOBAL_BATCH, 12) of every step, the same in every process."""
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (GLOBAL_BATCH, 12), generator=g) for _ in range(steps)]


def probe() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(7))


def fresh_model(seed: int = 0) -> Zamba2ForCausalLM:
    torch.manual_seed(seed)
    return Zamba2ForCausalLM(tiny())


def train_steps(model, optimizer, steps: range, rank: int = 0, world: int = 1) -> list[float]:
    """The test loop: each rank takes its rows of the global batch; the mean loss over equal-sized slices,
    averaged by FSDP's gradient reduction, is the global batch's mean."""
    per = GLOBAL_BATCH // world
    losses = []
    data = batches()
    for step in steps:
        ids = data[step][rank * per : (rank + 1) * per]
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach().item())
    return losses


# ---- cases ---------------------------------------------------------------------------------------


def case_fsdp(ctx: D.DistContext, out: Path, resume: Path | None) -> None:
    """5 FSDP2 steps (or steps SAVE_AT..5 from `resume`), a sharded checkpoint after SAVE_AT, a consolidated
    folder at the end, and the sharded model's logits on a probe batch."""
    model = fresh_model()
    D.shard_model(model, ctx)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    if resume is None:
        train_steps(model, opt, range(SAVE_AT), ctx.rank, ctx.world_size)
        D.save_sharded(out / f"step{SAVE_AT}", model, opt)
    else:
        D.load_sharded(resume, model, opt)
    train_steps(model, opt, range(SAVE_AT, STEPS), ctx.rank, ctx.world_size)
    with torch.no_grad():
        logits = model(probe()).logits
    D.save_consolidated(model, out / "final", ctx)
    if ctx.is_main:
        save_file({"logits": logits.contiguous()}, str(out / "logits.safetensors"))
    if resume is None:  # mixed precision: bf16 compute, fp32 master weights and reductions
        mp = fresh_model()
        D.shard_model(mp, ctx, param_dtype=torch.bfloat16)
        mp_opt = torch.optim.AdamW(mp.parameters(), lr=LR)
        loss = train_steps(mp, mp_opt, range(1), ctx.rank, ctx.world_size)[0]
        dtypes = sorted({str(p.dtype) for p in mp.parameters()})
        if ctx.is_main:
            (out / "mixed.json").write_text(json.dumps({"loss": loss, "param_dtypes": dtypes}))


def case_tp(ctx: D.DistContext, out: Path) -> None:
    """Tensor-parallel logits (full forward, prefill + one cached step) and greedy tokens against the same
    model unsharded, for several configs."""
    from zamba2.tensor_parallel import parallelize

    configs = {
        "one_shared_block": dict(num_mem_blocks=1),
        "two_shared_blocks": dict(num_mem_blocks=2),
        "gqa_two_groups": dict(num_key_value_heads=2, mamba_ngroups=2),
        "mamba_replicated": dict(n_mamba_heads=1),
        "vocab_replicated_untied": dict(vocab_size=VOCAB - 1, tie_word_embeddings=False),
    }
    if ctx.world_size == 4:  # norm groups over 2 of 4 ranks (2 groups), over all (1), within each rank (4)
        configs = {f"groups_{g}": dict(mamba_ngroups=g, n_mamba_heads=4) for g in (1, 2, 4)}
    results = {}
    for name, overrides in configs.items():
        config = tiny(**overrides)
        torch.manual_seed(0)
        model = Zamba2ForCausalLM(config).eval()
        ref = copy.deepcopy(model)
        ids = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
        mask = torch.ones_like(ids)
        mask[1, :3] = 0  # a left-padded row
        step_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
        plan = parallelize(model, ctx.mesh)
        diffs = {}
        with torch.no_grad():
            for key, m in (("ref", ref), ("tp", model)):
                cache = m.model.new_cache(2, 16)
                full = m(ids, attention_mask=mask).logits
                m(ids, attention_mask=mask, past_key_values=cache)
                step = m(ids[:, -1:], attention_mask=step_mask, past_key_values=cache).logits
                tokens = m.generate(ids, attention_mask=mask, max_new_tokens=6)
                diffs[key] = (full, step, tokens)
        (rf, rs, rt), (tf, ts, tt) = diffs["ref"], diffs["tp"]
        q = model.model.layers[1].shared_transformer.self_attn.q_proj.weight
        results[name] = {
            "forward": (tf - rf).abs().max().item(),
            "step": (ts - rs).abs().max().item(),
            "tokens_equal": torch.equal(tt, rt),
            "mamba_sharded": plan.mamba_sharded,
            "vocab_sharded": plan.vocab_sharded,
            "q_proj_local_rows": q.to_local().shape[0] * ctx.world_size,
            "q_proj_rows": ref.model.layers[1].shared_transformer.self_attn.q_proj.weight.shape[0],
        }
    try:  # 2 (or 4) ranks cannot split 1 K/V head
        parallelize(Zamba2ForCausalLM(tiny(num_key_value_heads=1)), ctx.mesh)
        results["refused"] = ""
    except ValueError as err:
        results["refused"] = str(err)
    if ctx.is_main:
        (out / "tp.json").write_text(json.dumps(results, indent=1))


def case_hang(ctx: D.DistContext, out: Path) -> None:
    """Rank 1 stops answering (as a stuck rank does); rank 0's next collective must give up at the timeout."""
    if ctx.rank == 1:
        time.sleep(600)
    dist.all_reduce(torch.ones(1))


def main(argv: list[str]) -> int:
    case, out = argv[0], Path(argv[1])
    timeout = float(argv[2]) if case == "hang" else 120.0
    ctx = D.init_distributed(timeout=timeout)
    assert ctx is not None, "run under torchrun with WORLD_SIZE > 1"
    try:
        if case == "fsdp":
            case_fsdp(ctx, out, Path(argv[2]) if len(argv) > 2 else None)
        elif case == "tp":
            case_tp(ctx, out)
        elif case == "hang":
            case_hang(ctx, out)
        else:
            raise SystemExit(f"unknown case {case!r}")
    except Exception as err:
        if not D.is_distributed_failure(err):
            raise
        print(D.describe_failure(err), file=sys.stderr, flush=True)
        return 1
    D.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
