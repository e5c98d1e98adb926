"""All-pairs test cases: every value of every axis, and every pair of values of any two
axes, appears in some case, without the full cartesian product (the interpreter is slow)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any


def pairwise(axes: Sequence[Sequence[Any]]) -> list[tuple[Any, ...]]:
    """Greedy all-pairs covering array over ``axes``; deterministic for a given input."""
    uncovered = {
        (i, a, j, b)
        for i, j in itertools.combinations(range(len(axes)), 2)
        for a in range(len(axes[i]))
        for b in range(len(axes[j]))
    }
    candidates = list(itertools.product(*(range(len(axis)) for axis in axes)))
    cases = []
    while uncovered:

        def gain(case: tuple[int, ...], uncovered: set = uncovered) -> int:
            return sum((i, case[i], j, case[j]) in uncovered for i, j in itertools.combinations(range(len(axes)), 2))

        best = max(candidates, key=gain)
        uncovered -= {(i, best[i], j, best[j]) for i, j in itertools.combinations(range(len(axes)), 2)}
        cases.append(tuple(axis[k] for axis, k in zip(axes, best)))
    return cases
