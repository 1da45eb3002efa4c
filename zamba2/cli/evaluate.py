"""`zamba2 eval`: perplexity of text files and accuracy on multiple-choice JSONL; see zamba2/eval/."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from zamba2.cli.parser import UsageError, _common, _model_args, _number

EVAL_HELP = """\
Scores text with the model (or, with --server, with a running `zamba2 serve` through its echo) and prints
one line per file. --text FILE: perplexity per token and bits per byte of the file (a .jsonl file holds one
document per line, {"text": ...}); documents longer than --context-length are scored in windows that move
by --stride tokens, each new token seen with at least context-length - stride tokens before it.
--choices FILE.jsonl: items {"context": str, "choices": [str, ...], "answer": int}; each choice is scored
as the continuation of the context (lm-evaluation-harness's convention), accuracy takes the most likely.
Texts start with the tokenizer's bos token unless --no-bos; lm_eval's local-completions scores choices
without it (use --no-bos to compare) and perplexity with it. --output FILE.json keeps every figure."""


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity and multiple-choice accuracy", description=EVAL_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--text", action="append", default=[], metavar="FILE", help="text to score (repeatable)")
    p.add_argument("--choices", action="append", default=[], metavar="FILE.jsonl",
                   help="multiple-choice items (repeatable)")  # fmt: skip
    p.add_argument("--context-length", type=_number(int, 2, what=">= 2"), metavar="N",
                   help="tokens per window (default: 1024, at most the model's max_position_embeddings)")  # fmt: skip
    p.add_argument("--stride", type=_number(int, 1, what=">= 1"), metavar="S",
                   help="tokens a window moves by, < --context-length (default: half of it)")  # fmt: skip
    p.add_argument("--no-bos", action="store_true", help="do not start texts with the bos token")
    p.add_argument("--output", metavar="FILE.json", help="write every document's and item's figures here")
    p.add_argument("--server", metavar="URL", help="score through a running `zamba2 serve` at URL (its echo) "
                   "instead of loading the weights; the tokenizer still comes from --model")  # fmt: skip
    p.add_argument("--api-key", help="the server's API key (with --server)")
    p.add_argument("--batch-size", type=_number(int, 1, what=">= 1"), default=8, metavar="B",
                   help="sequences per server request (with --server; default 8)")  # fmt: skip
    _model_args(p)
    _common(p)


def _files(paths: list[str], flag: str) -> list[Path]:
    out = []
    for name in paths:
        path = Path(name).expanduser()
        if not path.is_file():
            raise UsageError(f"{flag} {name}: no such file")
        out.append(path)
    return out


def cmd_eval(args: argparse.Namespace) -> int:
    from zamba2.checkpoint import read_config
    from zamba2.cli.generate import _load, _load_tokenizer, _resolve, default_model
    from zamba2.eval import choices as mc
    from zamba2.eval import perplexity as ppl
    from zamba2.eval.scorers import LocalScorer, ServerScorer

    texts, items_files = _files(args.text, "--text"), _files(args.choices, "--choices")
    if not texts and not items_files:
        raise UsageError("nothing to evaluate: give --text FILE and/or --choices FILE.jsonl")
    # read every input before loading anything: a bad line is reported at once
    documents = {path: ppl.read_documents(path) for path in texts}
    items = {path: mc.read_items(path) for path in items_files}
    folder = _resolve(default_model(args.model, "eval"), args.revision, args.quiet)
    limit = read_config(folder).max_position_embeddings
    context = args.context_length or min(1024, limit)
    if context > limit:
        raise UsageError(f"--context-length {context} is more than the model's max_position_embeddings ({limit})")
    stride = args.stride or context // 2
    if stride >= context:
        raise UsageError(f"--stride {stride} must be less than --context-length {context}")
    tokenizer = _load_tokenizer(folder, need_chat=False)
    if args.server:
        scorer = ServerScorer(args.server, args.api_key)
        source = f"{args.server} ({scorer.model})"
    else:
        scorer = LocalScorer(_load(folder, tokenizer, args).model)
        source = str(folder)
    add_bos = not args.no_bos
    report: dict = {"model": source, "context_length": context, "stride": stride, "bos": add_bos,
                    "texts": [], "choices": []}  # fmt: skip
    started = time.perf_counter()
    for path, docs in documents.items():
        scores = ppl.perplexity(scorer, tokenizer, docs, context, stride, add_bos, args.batch_size)
        total = ppl.combined(str(path), scores)
        what = f"{len(docs)} document{'s' * (len(docs) != 1)}, {total.tokens} tokens, {total.bytes} bytes"
        print(f"perplexity {path} ({what}): {total.perplexity:.4f} per token, "
              f"{total.bits_per_byte:.4f} bits per byte", flush=True)  # fmt: skip
        report["texts"].append({**total.as_dict(), "documents": [s.as_dict() for s in scores]})
    for path, its in items.items():
        scored = mc.score_items(scorer, tokenizer, its, context, add_bos, args.batch_size)
        rows = [s.as_dict(item) for s, item in zip(scored, its, strict=True)]
        acc = sum(r["correct"] for r in rows) / len(rows)
        acc_norm = sum(r["correct_norm"] for r in rows) / len(rows)
        print(f"choices {path} ({len(rows)} items): accuracy {acc:.4f}, length-normalised {acc_norm:.4f}",
              flush=True)  # fmt: skip
        report["choices"].append({"name": str(path), "items": rows, "accuracy": acc, "accuracy_norm": acc_norm})
    if not args.quiet:
        print(f"scored with {source} in {time.perf_counter() - started:.1f} s "
              f"(context {context}, stride {stride}, bos {'on' if add_bos else 'off'})", file=sys.stderr)  # fmt: skip
    if args.output:
        Path(args.output).expanduser().write_text(json.dumps(report, indent=2) + "\n")
    return 0
