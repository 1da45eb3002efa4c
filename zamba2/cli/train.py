"""`zamba2 train`: fine-tune a checkpoint (full or LoRA) or train from scratch; see zamba2/train/."""

from __future__ import annotations

import argparse
import sys

from zamba2.cli.parser import EXIT_INTERRUPTED, CommandError, UsageError, _common, _model_name, _number

TRAIN_HELP = """\
LoRA when --lora-rank is given (only the adapters train; --out gets adapter_config.json and
adapter_model.safetensors in PEFT's format), full fine-tuning otherwise (--out gets a save_pretrained
checkpoint). --config tiny|1.2b|FILE.json trains from a fresh initialisation (with --tokenizer).
Data: a .txt file, a folder of .txt files, JSONL with "text" or chat "messages" (loss on assistant turns),
or for --task sequence-classification a JSONL/CSV with "text" and "label"."""


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune or train a model", description=TRAIN_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", "-m", type=_model_name, metavar="PATH_OR_ID", help="checkpoint to fine-tune")
    src.add_argument("--config", metavar="PRESET_OR_JSON", help="train from scratch: tiny, 1.2b, ... or config.json")
    p.add_argument("--tokenizer", metavar="FOLDER", help="tokenizer folder (default: the model's)")
    p.add_argument("--data", required=True, metavar="PATH", help="training data (file or folder)")
    p.add_argument("--eval-data", metavar="PATH", help="held-out data: loss and perplexity every --eval-every")
    p.add_argument("--out", required=True, metavar="DIR", help="where checkpoints, metrics and the result go")
    p.add_argument("--task", choices=["causal-lm", "sequence-classification"], default="causal-lm")
    p.add_argument("--num-labels", type=_number(int, 1, what=">= 1"), metavar="K")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-rank", type=_number(int, 1, what=">= 1"), metavar="R", help="adapter rank (LoRA on)")
    g.add_argument("--lora-alpha", type=_number(float, 0, lo_open=True, what="> 0"), metavar="A",
                   help="scaling alpha (alpha / r multiplies the update; default 2 * rank)")  # fmt: skip
    g.add_argument("--lora-targets", nargs="+", metavar="NAME",
                   help="module names to adapt, as PEFT's target_modules (default: Zamba2's linears)")  # fmt: skip
    g.add_argument("--lora-dropout", type=_number(float, 0, 1, hi_open=True, what="in [0, 1)"), default=0.0,
                   metavar="P")  # fmt: skip
    h = p.add_argument_group("schedule")
    h.add_argument("--seq-len", type=_number(int, 2, what=">= 2"), default=512, metavar="T")
    h.add_argument("--batch-size", type=_number(int, 1, what=">= 1"), default=8, metavar="B")
    h.add_argument("--grad-accum", type=_number(int, 1, what=">= 1"), default=1, metavar="N")
    h.add_argument("--lr", type=_number(float, 0, lo_open=True, what="> 0"), default=3e-4)
    h.add_argument("--min-lr-ratio", type=_number(float, 0, 1, what="in [0, 1]"), default=0.1, metavar="R",
                   help="the cosine ends at lr * R (default 0.1)")  # fmt: skip
    h.add_argument("--warmup", type=_number(int, 0, what=">= 0"), default=0, metavar="STEPS")
    h.add_argument("--weight-decay", type=_number(float, 0, what=">= 0"), default=0.0)
    h.add_argument("--max-grad-norm", type=_number(float, 0, what=">= 0 (0 = off)"), default=1.0)
    length = h.add_mutually_exclusive_group()
    length.add_argument("--steps", type=_number(int, 1, what=">= 1"), metavar="N", help="optimizer steps")
    length.add_argument("--epochs", type=_number(float, 0, lo_open=True, what="> 0"), metavar="E",
                        help="passes over the data (default 1)")  # fmt: skip
    h.add_argument("--eval-every", type=_number(int, 0, what=">= 0"), default=0, metavar="STEPS")
    h.add_argument("--eval-batches", type=_number(int, 1, what=">= 1"), metavar="N", help="cap the held-out set")
    h.add_argument("--save-every", type=_number(int, 0, what=">= 0"), default=0, metavar="STEPS")
    h.add_argument("--keep-checkpoints", type=_number(int, 1, what=">= 1"), default=2, metavar="N")
    h.add_argument("--resume", action="store_true", help="continue from --out's newest checkpoint (if any)")
    r = p.add_argument_group("runtime")
    r.add_argument("--grad-checkpointing", action="store_true", help="recompute layers in backward (less memory)")
    r.add_argument("--dtype", choices=["fp32", "bf16", "bf16-autocast"], default="fp32",
                   help="bf16: bf16 weights, fp32 master copies in the optimizer step; bf16-autocast: fp32 weights "
                        "under bf16 autocast (default fp32)")  # fmt: skip
    r.add_argument("--optimizer-in-backward", action="store_true",
                   help="step each parameter as soon as its gradient is complete and free that gradient (one "
                        "gradient copy of the weights less); needs --grad-accum 1 and --max-grad-norm 0")  # fmt: skip
    r.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--threads", type=_number(int, 1, what=">= 1"), metavar="N", help="torch CPU threads")
    r.add_argument("--dist-timeout", type=_number(float, 0, lo_open=True, what="> 0"), default=600.0, metavar="S",
                   help="torchrun: seconds a rank waits for the others before the job fails (default 600)")  # fmt: skip
    r.add_argument("--plot", action="store_true", help="draw the loss curves to OUT/loss.png (needs matplotlib)")
    _common(p)


def cmd_train(args: argparse.Namespace) -> int:
    from zamba2.train import TrainConfig, TrainingStopped, train

    if args.task == "sequence-classification" and args.config and not args.num_labels:
        raise UsageError("--task sequence-classification from --config needs --num-labels K")
    cfg = TrainConfig(
        out=args.out, data=args.data, model=args.model, config=args.config, tokenizer=args.tokenizer,
        eval_data=args.eval_data, task=args.task, num_labels=args.num_labels, lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha, lora_targets=args.lora_targets, lora_dropout=args.lora_dropout,
        seq_len=args.seq_len, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        min_lr_ratio=args.min_lr_ratio, warmup=args.warmup, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm, steps=args.steps, epochs=args.epochs, eval_every=args.eval_every,
        eval_batches=args.eval_batches, save_every=args.save_every, keep_checkpoints=args.keep_checkpoints,
        resume=args.resume, grad_checkpointing=args.grad_checkpointing, dtype=args.dtype, device=args.device,
        seed=args.seed, threads=args.threads, plot=args.plot, progress=not args.quiet,
        dist_timeout=args.dist_timeout, optimizer_in_backward=args.optimizer_in_backward,
    )  # fmt: skip
    from zamba2.train import distributed

    try:
        last = train(cfg)
    except TrainingStopped as stop:
        print(f"zamba2: {stop}", file=sys.stderr)
        return EXIT_INTERRUPTED if "interrupted" in str(stop) else 1
    except RuntimeError as err:  # under torchrun: another rank died or stopped answering
        if distributed.is_distributed_failure(err):
            raise CommandError(distributed.describe_failure(err)) from err
        raise
    finally:
        distributed.shutdown()
    if distributed.rank_from_env() != 0:  # one summary line per job
        return 0
    if not args.quiet:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if isinstance(v, float))
        print(f"trained {last.get('step', 0)} steps -> {args.out} ({shown})", file=sys.stderr)
    return 0
