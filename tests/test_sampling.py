"""Sampling functions against hand-computed expectations (transformers warper semantics)."""
import math

import pytest
import torch

from bianque.sampling import (
    SamplingParams, apply_temperature, banned_ngram_tokens, block_repeated_ngrams, guard_invalid,
    next_token, process_logits, top_k_filter, top_p_filter,
)

NEG = float("-inf")


def test_top_k_keeps_k_best():
    x = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    assert top_k_filter(x, 2).tolist() == [NEG, 5.0, NEG, 4.0, NEG]
    assert torch.equal(top_k_filter(x, 0), x) and torch.equal(top_k_filter(x, 9), x)


def test_top_p_drops_low_tail():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    x = probs.log()
    # ascending cumulative: .05, .20, .50, 1.0; with p=0.7 drop cum <= 0.3 -> tokens 3 and 2
    out = top_p_filter(x, 0.7)
    assert torch.isinf(out[2]) and torch.isinf(out[3])
    assert torch.allclose(out[:2], x[:2])
    # the most likely token survives even a tiny p
    assert torch.isfinite(top_p_filter(x, 1e-6)).tolist() == [True, False, False, False]


def test_top_p_batched_rows_independent():
    x = torch.tensor([[0.0, 0.0, 10.0], [10.0, 0.0, 0.0]])
    out = top_p_filter(x, 0.5)
    assert torch.isfinite(out).tolist() == [[False, False, True], [True, False, False]]


def test_temperature_and_guard():
    x = torch.tensor([1.0, 2.0])
    assert apply_temperature(x, 0.5).tolist() == [2.0, 4.0]
    bad = torch.tensor([[1.0, math.nan, 3.0, 0.0, 0.0, 2.0, 1.0]])
    fixed = guard_invalid(bad, 5)
    assert fixed.tolist() == [[0, 0, 0, 0, 0, 5e4, 0]]
    assert guard_invalid(x, 0) is x


def test_banned_ngrams():
    assert banned_ngram_tokens([1, 2, 3, 1, 2], 3) == {3}
    assert banned_ngram_tokens([1, 2], 3) == set()
    assert banned_ngram_tokens([4, 4, 4], 1) == {4}
    logits = torch.zeros(1, 6)
    out = block_repeated_ngrams(logits, torch.tensor([[1, 2, 3, 1, 2]]), 3)
    assert torch.isinf(out[0, 3]) and torch.isfinite(out[0, [0, 1, 2, 4, 5]]).all()


def test_next_token_greedy_and_seeded_sampling():
    x = torch.tensor([[0.1, 3.0, 0.2], [5.0, 0.0, 0.0]])
    assert next_token(x, SamplingParams(do_sample=False)).tolist() == [1, 0]
    params = SamplingParams(do_sample=True, temperature=0.7, top_p=1.0, top_k=2)
    draws = [next_token(x, params, torch.Generator().manual_seed(s)).tolist() for s in range(40)]
    assert all(d[0] in (1, 2) and d[1] in (0, 1, 2) for d in draws)  # token 0 of row 0 is outside top-2
    again = [next_token(x, params, torch.Generator().manual_seed(s)).tolist() for s in range(40)]
    assert draws == again


def test_process_logits_greedy_is_identity():
    x = torch.randn(10)
    assert torch.equal(process_logits(x, SamplingParams(do_sample=False, top_k=1)), x)


@pytest.mark.parametrize("kw", [dict(temperature=0), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1)])
def test_params_validation(kw):
    with pytest.raises(ValueError):
        SamplingParams(**kw)


@pytest.mark.parametrize("vocab,k,p", [(130528, 50, 0.7), (32128, 50, 0.6), (1000, 5, 0.9), (64, 63, 0.3), (20, 3, 1e-6)])
def test_top_k_top_p_on_the_survivors_keeps_the_same_tokens_as_the_two_filters(vocab, k, p):
    """Distinct scores (float32): exactly the tokens the two whole-vocabulary filters keep, with
    the same scores, for one row and for a batch of rows."""
    from bianque.sampling import top_k_top_p_filter

    g = torch.Generator().manual_seed(vocab + k)
    logits = torch.randn(3, vocab, generator=g) * 3
    expected = top_p_filter(top_k_filter(logits, k), p)
    assert torch.equal(top_k_top_p_filter(logits, k, p), expected)
    assert torch.equal(top_k_top_p_filter(logits[1], k, p), expected[1])
    assert torch.equal(top_k_top_p_filter(logits[:1], k, p), expected[:1])


def test_top_k_top_p_ties_drop_the_lower_id_first_and_delegates_without_either_filter():
    from bianque.sampling import top_k_top_p_filter

    x = torch.tensor([1.0, 3.0, 1.0, 3.0, 0.0, -1.0])  # two tied pairs; top-2 keeps both 3.0s
    # probabilities among the survivors {1, 3}: 0.5 each; p=0.5 drops the first in stable order (id 1)
    assert torch.isfinite(top_k_top_p_filter(x, 2, 0.5)).tolist() == [False, False, False, True, False, False]
    # top-3: ties with the 3rd are kept (ids 0 and 2 as well), as top_k_filter does
    assert torch.isfinite(top_k_top_p_filter(x, 3, 0.99)).tolist() == [True, True, True, True, False, False]
    for k, p in ((0, 0.5), (2, 1.0), (6, 0.5)):
        assert torch.equal(top_k_top_p_filter(x, k, p), top_p_filter(top_k_filter(x, k), p))
