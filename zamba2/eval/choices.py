"""Multiple-choice items: the log-likelihood of each choice after a context, and accuracy.

An item is one JSONL line: {"context": str, "choices": [str, ...], "answer": int}. A choice is scored as the
continuation of the context, in lm-evaluation-harness's convention (so its per-item figures compare):
trailing spaces of the context move to the start of the choice, the context and context + choice are
tokenised whole, and the choice's tokens are what the second has beyond the first. The prediction is the
choice with the highest log-likelihood; the length-normalised prediction divides by the choice's length in
characters (lm_eval's acc_norm).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from zamba2.eval.perplexity import Scorer
from zamba2.jsonl import objects


@dataclass
class Item:
    where: str  # file:line
    context: str
    choices: list[str]
    answer: int


@dataclass
class ItemScore:
    where: str
    loglikelihoods: list[float]  # one per choice, nats
    answer: int

    @property
    def pred(self) -> int:
        return max(range(len(self.loglikelihoods)), key=self.loglikelihoods.__getitem__)

    def as_dict(self, item: Item) -> dict:
        norm = [ll / max(len(c), 1) for ll, c in zip(self.loglikelihoods, item.choices, strict=True)]
        pred_norm = max(range(len(norm)), key=norm.__getitem__)
        return {"where": self.where, "loglikelihoods": self.loglikelihoods, "answer": self.answer,
                "pred": self.pred, "correct": self.pred == self.answer,
                "correct_norm": pred_norm == self.answer}  # fmt: skip


def read_items(path: str | Path) -> list[Item]:
    """Items from a JSONL file; an error names the file, the line and the field."""
    path = Path(path)
    items = []
    for where, entry in objects(path):
        context, choices, answer = entry.get("context"), entry.get("choices"), entry.get("answer")
        if not isinstance(context, str):
            raise ValueError(f'{where}: "context" must be a string, got {type(context).__name__}')
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise ValueError(f'{where}: "choices" must be a list of at least 2 non-empty strings')
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise ValueError(f'{where}: "answer" must be the index of the right choice, 0 to {len(choices) - 1}; '
                             f"got {answer!r}")  # fmt: skip
        items.append(Item(where, context, choices, answer))
    if not items:
        raise ValueError(f"{path}: no items (expected one JSON object per line)")
    return items


def encode_pair(tokenizer, context: str, continuation: str, add_bos: bool) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm_eval splits them; an empty context is the bos token alone."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        if tokenizer.bos_token_id is None:
            raise ValueError("an empty context needs a bos token to condition on; this tokenizer has none")
        return [tokenizer.bos_token_id], tokenizer.encode(continuation, add_special_tokens=False)
    ctx = tokenizer.encode(context, add_special_tokens=add_bos)
    whole = tokenizer.encode(context + continuation, add_special_tokens=add_bos)
    return ctx, whole[len(ctx) :]


def score_items(scorer: Scorer, tokenizer, items: Sequence[Item], context_length: int, add_bos: bool = True,
                batch: int = 8) -> list[ItemScore]:  # fmt: skip
    """Each choice's log-likelihood; a sequence past `context_length` loses context tokens on the left."""
    jobs: list[tuple[int, list[int], int]] = []  # (item, ids, number of context ids)
    for k, item in enumerate(items):
        for choice in item.choices:
            ctx, cont = encode_pair(tokenizer, item.context, choice, add_bos)
            if not cont:
                raise ValueError(f"{item.where}: the choice {choice!r} adds no tokens to the context")
            if len(cont) >= context_length:
                raise ValueError(f"{item.where}: the choice {choice!r} is {len(cont)} tokens, no shorter than "
                                 f"the context length {context_length}")  # fmt: skip
            ids = (ctx + cont)[-context_length:]
            jobs.append((k, ids, len(ids) - len(cont)))
    lls: list[list[float]] = [[] for _ in items]
    for s in range(0, len(jobs), batch):
        group = jobs[s : s + batch]
        for (k, _, n_ctx), lps in zip(group, scorer([ids for _, ids, _ in group]), strict=True):
            lls[k].append(math.fsum(lps[n_ctx - 1 :]))  # lps[j] scores token j + 1
    return [ItemScore(item.where, ll, item.answer) for item, ll in zip(items, lls, strict=True)]
