"""Local search over expert-to-rank assignments, shared by the ILP policies.

Pure bookkeeping on numpy arrays: no cost model of its own (the callers pass their objective as a move
chooser or a screen and an exact check). Iteration counts, not the clock, bound the work, so results
repeat. See docs/ilp.md, "How it scales".
"""

from __future__ import annotations

from typing import Iterator

import numpy as np


def improving_pairs(delta: np.ndarray, candidates: int) -> Iterator[tuple[int, int]]:
    """``(i, j)`` of the ``candidates`` most negative entries of the square ``delta``, best first (stable),
    while they are negative: the swaps worth trying, in the order to try them."""
    k = min(candidates, delta.size - 1)
    flat = np.argpartition(delta, k, axis=None)[:k]
    for f in flat[np.argsort(delta.flat[flat], kind="stable")]:
        if not delta.flat[f] < 0:
            return
        yield divmod(int(f), delta.shape[1])
