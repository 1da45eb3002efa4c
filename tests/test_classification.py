"""Sequence classification: pooled logits and all three losses agree with transformers 5.23."""

import pytest
import torch
from reference import make_pair, small_kwargs


@pytest.mark.parametrize(
    "num_labels, problem_type, make_labels",
    [
        (1, None, lambda b: torch.randn(b)),  # regression inferred
        (3, None, lambda b: torch.tensor([0, 2])),  # single-label inferred from integer labels
        (3, "multi_label_classification", lambda b: torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])),
        (2, "single_label_classification", lambda b: torch.tensor([1, 0])),
    ],
)
def test_classification_matches_reference(num_labels, problem_type, make_labels):
    kw = small_kwargs(num_labels=num_labels, problem_type=problem_type, use_mem_rope=True)
    ref, ours, config = make_pair("cls", **kw)
    ids = torch.randint(3, config.vocab_size, (2, 7))
    ids[1, -2:] = config.pad_token_id  # row 1 ends in padding: pool its last real token
    labels = make_labels(2)
    with torch.no_grad():
        r = ref(ids, labels=labels)
        o = ours(ids, labels=labels)
    torch.testing.assert_close(o.logits, r.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(o.loss, r.loss, rtol=1e-4, atol=1e-4)
    assert o.logits.shape == (2, num_labels)


def test_no_pad_id_with_batch_is_an_error():
    _, ours, config = make_pair("cls", **small_kwargs(pad_token_id=None))
    with pytest.raises(ValueError, match="pad_token_id"):
        ours(torch.randint(3, config.vocab_size, (2, 4)))
    assert ours(torch.randint(3, config.vocab_size, (1, 4))).logits.shape == (1, 2)
