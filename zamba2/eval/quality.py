"""Quantisation quality on real text: held-out perplexity of one checkpoint in fp32, bf16, int8 and int4
(groups of 32, 64, 128), with the same windows and the same scoring as `zamba2 eval`.

    zamba2 eval --model FOLDER --text held-out.txt --quality       (or quality_table() from Python)

A kernel or packing defect shows here first: on a trained model int8 stays within ~1% of bf16 and int4 within a
few percent, while a broken layout multiplies the perplexity.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from zamba2.eval.perplexity import Document, combined, perplexity
from zamba2.eval.scorers import LocalScorer

# (name, dtype, quantize, group size)
VARIANTS: tuple[tuple[str, str, str | None, int], ...] = (
    ("fp32", "float32", None, 64),
    ("bf16", "bfloat16", None, 64),
    ("int8", "bfloat16", "int8", 64),
    ("int4-g32", "bfloat16", "int4", 32),
    ("int4-g64", "bfloat16", "int4", 64),
    ("int4-g128", "bfloat16", "int4", 128),
)


def quality_table(
    folder: str | Path,
    documents: Sequence[Document],
    context_length: int,
    stride: int,
    variants: Sequence[str] | None = None,
) -> dict[str, dict[str, float]]:
    """{variant: {document name: perplexity per token, ..., "all": over every document}}."""
    from zamba2.model import Zamba2ForCausalLM
    from zamba2.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(folder)
    table: dict[str, dict[str, float]] = {}
    for name, dtype, quantize, group in VARIANTS:
        if variants is not None and name not in variants:
            continue
        model = Zamba2ForCausalLM.from_pretrained(folder, dtype=dtype, quantize=quantize,
                                                  quantize_group_size=group, progress=False).eval()  # fmt: skip
        scores = perplexity(LocalScorer(model), tok, documents, context_length, stride)
        row = {s.name: s.perplexity for s in scores}
        row["all"] = combined("all", scores).perplexity
        table[name] = row
    return table


def format_table(table: dict[str, dict[str, float]]) -> str:
    """A plain-text table: one row per variant, one column per document, and the change against bf16."""
    names = list(next(iter(table.values())))
    width = max(len(Path(n).name) for n in names) + 2
    head = f"{'variant':<10}" + "".join(f"{Path(n).name:>{width}}" for n in names) + f"{'vs bf16':>10}"
    lines = [head]
    base = table.get("bf16", {}).get("all")
    for variant, row in table.items():
        rel = f"{(row['all'] / base - 1) * 100:+.2f}%" if base else ""
        lines.append(f"{variant:<10}" + "".join(f"{row[n]:>{width}.2f}" for n in names) + f"{rel:>10}")
    return "\n".join(lines)
