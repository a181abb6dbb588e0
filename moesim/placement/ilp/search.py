"""Local search over expert-to-rank assignments, shared by the ILP stages and ``ilp_moetuner``.

Pure bookkeeping on numpy arrays: no cost model of its own (the callers pass their objective as a move
chooser or a screen and an exact check). Iteration counts, not the clock, bound the work, so results
repeat. See docs/ilp.md, "How it scales".
"""

from __future__ import annotations

from typing import Callable, Iterator, Protocol

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


Move = tuple[str, int, int]  # ("swap", i, j): experts i and j trade ranks; ("move", i, g): expert i goes to rank g


def descend(load_row: np.ndarray, a: np.ndarray, G: int,
            best_move: Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], Move | None],
            max_iter: int) -> np.ndarray:
    """Best-improvement local search on one layer's expert -> rank row ``a`` (a new row is returned).

    ``best_move(p, a, loads, counts)`` sees the loads ``p`` (floats), the current row, each rank's summed
    load and its number of experts, and returns the move to make, or None when no move improves its
    objective; at most ``max_iter`` moves are made. ``loads`` and ``counts`` are kept up to date.
    """
    p = np.asarray(load_row, dtype=float)
    a = a.copy()
    loads = np.bincount(a, weights=p, minlength=G)
    counts = np.bincount(a, minlength=G)
    for _ in range(max_iter):
        move = best_move(p, a, loads, counts)
        if move is None:
            break
        if move[0] == "swap":
            i, j = move[1], move[2]
            gi, gj = a[i], a[j]
            a[i], a[j] = gj, gi
            loads[gi] += p[j] - p[i]
            loads[gj] += p[i] - p[j]
        else:
            i, g = move[1], move[2]
            loads[a[i]] -= p[i]
            counts[a[i]] -= 1
            a[i] = g
            loads[g] += p[i]
            counts[g] += 1
    return a


class SwapSearch(Protocol):
    """What :func:`screened_swaps` needs: a screen of every swap and an exact check of one."""

    def screen(self) -> np.ndarray:
        """[n, n] estimated change of the objective if items i and j swapped (inf: not a candidate)."""

    def try_swap(self, i: int, j: int) -> bool:
        """Swap i and j if that lowers the exact objective (updating the state); whether it did."""


def screened_swaps(search: SwapSearch, candidates: int, rounds: int) -> bool:
    """Best-first swaps in rounds: the ``candidates`` most promising swaps of the screen, best first, each
    item swapped at most once per round, each swap kept only where the exact objective falls.

    Stops after ``rounds`` rounds or a round that keeps nothing; returns whether any swap was kept.
    """
    kept = False
    for _ in range(rounds):
        touched: set[int] = set()
        improved = False
        for i, j in improving_pairs(search.screen(), candidates):
            if i in touched or j in touched:
                continue
            if search.try_swap(i, j):
                touched.update((i, j))
                improved = True
        if not improved:
            break
        kept = True
    return kept
