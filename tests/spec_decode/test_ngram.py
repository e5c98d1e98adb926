"""The vectorised n-gram proposer against the brute-force reading of its rule."""

from __future__ import annotations

import random

import pytest

from minipaged.spec_decode.ngram import propose_ngram, propose_ngram_brute_force


@pytest.mark.parametrize("seed", range(4))
def test_matches_brute_force(seed):
    rng = random.Random(seed)
    for _ in range(600):
        n = rng.randint(0, 60)
        vocab = rng.randint(1, 6)  # small vocabularies make many (and long) matches
        tokens = [rng.randrange(vocab) for _ in range(n)]
        k = rng.randint(1, 6)
        lo = rng.randint(1, 4)
        hi = rng.randint(lo, 7)
        assert propose_ngram(tokens, k, lo, hi) == propose_ngram_brute_force(tokens, k, lo, hi), (tokens, k, lo, hi)


def test_examples_by_hand():
    # tail [7, 8] occurred at 1..2 and at 5..6: the latest match wins, its next tokens are proposed
    assert propose_ngram([1, 7, 8, 3, 4, 7, 8, 9, 5, 7, 8], 2, 2, 4) == [9, 5]
    # a longer match beats a later shorter one
    assert propose_ngram([5, 6, 7, 1, 9, 7, 2, 5, 6, 7], 3, 1, 3) == [1, 9, 7]
    # fewer than k tokens after the match; no match at all; shorter than min_n
    assert propose_ngram([4, 2, 4], 5, 1, 2) == [2, 4]
    assert propose_ngram([1, 2, 3, 4], 3, 1, 4) == []
    assert propose_ngram([1, 2, 1, 2], 3, 3, 4) == []


def test_long_prompt_stays_exact():
    rng = random.Random(0)
    text = [rng.randrange(50) for _ in range(5000)]
    tokens = text + text[1234:1240]
    assert propose_ngram(tokens, 4, 2, 5) == text[1240:1244]
