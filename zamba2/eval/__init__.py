"""Scoring text exactly: per-token log-probabilities, perplexity, multiple-choice loglikelihoods.

    scoring.py     score_chunk / score_tokens: the one scoring function (server echo, `zamba2 eval`, tests)
"""

from zamba2.eval.scoring import LOGIT_ROWS, Scores, score_chunk, score_tokens

__all__ = ["LOGIT_ROWS", "Scores", "score_chunk", "score_tokens"]
