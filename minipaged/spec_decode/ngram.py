"""N-gram (prompt lookup) proposer: the continuation of the latest earlier match of the sequence's tail.

For a sequence ``t[0..N)`` the proposer looks for the longest ``n`` in ``[min_n, max_n]`` such that
the last ``n`` tokens ``t[N-n..N)`` occurred before, ending at some ``e <= N - 2``; among the
matches of that length it takes the latest one and proposes ``t[e+1 .. e+1+k)`` (fewer when the
sequence ends sooner). Text that copies from its prompt (edits, summaries, code repeating
identifiers) is where this pays off.

The search is vectorised with numpy: one pass of ``max_n`` comparisons over the sequence, so it
stays cheap for long prompts (no Python loop over positions).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def propose_ngram(token_ids: Sequence[int] | np.ndarray, k: int, min_n: int, max_n: int) -> list[int]:
    """Up to ``k`` draft tokens continuing ``token_ids`` (``[N]`` ints), or ``[]`` without a match.

    ``match_len[e]`` counts how many tokens ending at ``e`` agree with the sequence's tail; the
    answer follows the latest ``e`` with the longest agreement (capped at ``max_n``, at least ``min_n``).
    """
    tokens = np.asarray(token_ids, dtype=np.int64)
    n = tokens.shape[0]
    if k < 1 or n < min_n + 1:
        return []
    candidates = tokens[: n - 1]  # a match must end before the last token, so something follows it
    alive = candidates == tokens[n - 1]
    match_len = alive.astype(np.int32)
    for length in range(2, min(max_n, n - 1) + 1):
        # ends e >= length - 1 can still grow: compare t[e - length + 1] with t[n - length]
        shifted = np.zeros_like(alive)
        shifted[length - 1 :] = candidates[: n - length] == tokens[n - length]
        alive &= shifted
        if not alive.any():
            break
        match_len += alive
    best = int(match_len.max()) if match_len.size else 0
    if best < min_n:
        return []
    end = int(np.flatnonzero(match_len == best)[-1])
    return tokens[end + 1 : end + 1 + k].tolist()


def propose_ngram_brute_force(token_ids: Sequence[int], k: int, min_n: int, max_n: int) -> list[int]:
    """The same rule written as the definition reads (tests compare the two): longest n first, latest match."""
    t = list(token_ids)
    n = len(t)
    for length in range(max_n, min_n - 1, -1):
        if length >= n:
            continue
        tail = t[n - length :]
        for start in range(n - length - 1, -1, -1):
            if t[start : start + length] == tail:
                return t[start + length : start + length + k]
    return []
