"""Scoring text exactly: per-token log-probabilities, perplexity, multiple-choice loglikelihoods.

    scoring.py     score_chunk / score_tokens: the one scoring function (server echo, `zamba2 eval`, tests)
    perplexity.py  documents, strided windows, perplexity per token and bits per byte
    choices.py     multiple-choice JSONL items: each choice's log-likelihood after the context, accuracy
    scorers.py     LocalScorer (the model) and ServerScorer (a `zamba2 serve` echo): token ids -> logprobs
"""

from zamba2.eval.scoring import LOGIT_ROWS, Scores, score_chunk, score_tokens

__all__ = ["LOGIT_ROWS", "Scores", "score_chunk", "score_tokens"]
