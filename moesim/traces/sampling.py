"""Categorical draws for the synthetic generator: alias tables packed one 64-bit word per column, and ``k``
distinct picks per token by successive sampling (sampling without replacement).

A draw costs one 64-bit random word and one table read. Its high 32 bits ``h`` choose the column and the
coin: ``h x width`` is a 64-bit product whose high half is the column (``floor(h x width / 2^32)``) and whose
low half, uniform given the column, is compared with the column's keep threshold (its own label, else its
alias's). Its low 32 bits are left to the caller (the mixture's component). Probabilities are thus
resolved to about ``2^-32 x width`` (columns) and ``2^-(32 - log2 width)`` (keep thresholds): far below
what any trace of this size can show (the old double-precision draws resolved 2^-53).

Successive sampling draws pick ``i`` as the first i.i.d. candidate that differs from picks ``0..i-1``
(rejection): exactly sampling without replacement.
Deliberately simple: no per-token alias tables (mixtures are a coin between rows).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

_LOW32 = np.uint64(0xFFFFFFFF)
_S32 = np.uint64(32)
MAX_REJECTION_ROUNDS = 200
MAX_DRAWS_PER_ROUND = 64


def alias_rows(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker alias tables of every row of ``weights`` [rows, n], vectorised: (prob, alias), both [rows, n].

    Column c keeps a draw with probability ``prob[c]`` and hands it to ``alias[c]`` otherwise. Scaled to
    mean 1, the small columns' deficits (1 - p) and the large ones' surpluses (p - 1) are laid end to end
    in column order: each small is topped up by the large whose surplus interval holds the start of its
    deficit; a large whose surplus runs out inside a small's deficit lends that overshoot from its own
    column and is topped up in turn by the next large. (Vose's sweep with its order fixed, so that one
    cumulative sum and one sorted search per side do every row at once.)
    """
    rows, n = weights.shape
    p = weights / weights.sum(axis=1, keepdims=True) * n
    r = np.arange(rows)
    large = p >= 1.0
    large[r, p.argmax(axis=1)] = True  # every row has a donor, whatever the rounding
    deficit = np.where(large, 0.0, 1.0 - p)
    surplus = np.where(large, np.maximum(p - 1.0, 0.0), 0.0)
    off = r[:, None] * (n + 1.0)  # row offsets: one sorted search serves every row
    d_end = np.cumsum(deficit, axis=1) + off
    d_start = np.concatenate([off, d_end[:, :-1]], axis=1).ravel()
    d_end = d_end.ravel()
    s_end = (np.cumsum(surplus, axis=1) + off).ravel()
    larges = np.flatnonzero(large)
    row_last = larges[np.searchsorted(larges, (r + 1) * n) - 1]  # each row's last large
    donor = np.minimum(np.searchsorted(s_end, d_start, side="right"), np.repeat(row_last, n))
    q = np.minimum(np.searchsorted(d_end, s_end, side="right"), rows * n - 1)
    overshoot = np.where(d_start[q] < s_end, d_end[q] - s_end, 0.0)
    next_large = np.empty(rows * n, dtype=np.int64)
    next_large[larges[:-1]] = larges[1:]
    next_large[row_last] = row_last
    flat_large = large.ravel()
    prob = np.where(flat_large, 1.0 - overshoot, p.ravel())
    alias = np.where(flat_large, next_large, donor) - np.repeat(r * n, n)
    return prob.reshape(rows, n), alias.reshape(rows, n)


class PackedAlias:
    """Alias tables of many categorical rows, stacked, one uint64 word per column: its keep threshold in
    the low ``thr_bits``, then its own label and its alias's label, ``label_bits`` each.

    ``blocks`` is a list of (weights [rows, n], labels [rows, n]) (n may differ between blocks); block b's
    row r starts at word ``start(b, r)``. A draw from a row returns one of its labels with probability
    proportional to its weight. Labels are non-negative and below ``2^label_bits``.
    """

    def __init__(self, blocks: list[tuple[np.ndarray, np.ndarray]], label_bits: int) -> None:
        self.label_bits = label_bits
        self.thr_bits = min(32, 64 - 2 * label_bits)
        if self.thr_bits < 16:
            raise ValueError(f"labels of {label_bits} bits leave too few bits for the keep thresholds")
        words, self.offsets = [], []
        offset = 0
        for weights, labels in blocks:
            rows, n = weights.shape
            prob, alias = alias_rows(weights)
            scale = float(1 << self.thr_bits)
            thr = np.minimum(np.rint(prob * scale), scale - 1).astype(np.uint64)
            own = labels.astype(np.uint64)
            other = np.take_along_axis(labels, alias, axis=1).astype(np.uint64)
            other = np.where(prob >= 1.0, own, other)  # always kept: the threshold's cap cannot hand it away
            lb, tb = np.uint64(label_bits), np.uint64(self.thr_bits)
            words.append((thr | (own << tb) | (other << (tb + lb))).ravel())
            self.offsets.append(offset)
            offset += rows * n
        self.words = np.concatenate(words)
        self._shift = np.uint64(32 - self.thr_bits)
        self._thr_mask = np.uint64((1 << self.thr_bits) - 1)
        self._lab_mask = np.uint64((1 << label_bits) - 1)

    def draw(self, start: np.ndarray, width: np.ndarray | int, bits: np.ndarray) -> np.ndarray:
        """One label per random word ``bits`` (uint64) from the row starting at word ``start`` (int64) of
        ``width`` columns (broadcast together): int64."""
        x = (bits >> _S32) * np.asarray(width, dtype=np.uint64)
        col = (x >> _S32).view(np.int64)
        word = self.words[col + start]
        keep = ((x & _LOW32) >> self._shift) < (word & self._thr_mask)
        tb, lb = np.uint64(self.thr_bits), np.uint64(self.label_bits)
        own = (word >> tb) & self._lab_mask
        return np.where(keep, own, word >> (tb + lb)).view(np.int64)

    def draw_high(self, start: np.ndarray, width: int, high: np.ndarray) -> np.ndarray:
        """:meth:`draw` from the high halves ``high`` (uint32) of the random words alone, for tables whose
        keep thresholds fill 32 bits (labels of 16 bits or fewer): the same labels, as uint32, computed on
        contiguous 32-bit arrays (numpy's vector loops; strided or mixed-type operands fall back to
        element-by-element ones). ``start`` is int64."""
        assert self.thr_bits == 32
        if width & (width - 1) == 0:  # a power of two: the product's halves are shifts
            b = width.bit_length() - 1
            col = high >> np.uint32(32 - b) if b else np.zeros(high.shape, np.uint32)
            coin = high << np.uint32(b)
        else:
            x = high.astype(np.uint64) * np.uint64(width)
            col, coin = (x >> _S32).astype(np.uint32), x.astype(np.uint32)
        idx = col.astype(np.int64)
        idx += start
        word = self.words.take(idx)
        handed = (coin >= word.astype(np.uint32)).astype(np.uint32)  # 1: the alias's label, in the upper bits
        handed *= np.uint32(self.label_bits)
        labels = (word >> _S32).astype(np.uint32)
        labels >>= handed
        labels &= np.uint32((1 << self.label_bits) - 1)
        return labels


def take_rows(table: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``table[idx]`` for a 2-D ``table``, each row read as one item (numpy's row-wise fancy indexing copies
    element by element: ten times slower on rows of a few numbers)."""
    table = np.ascontiguousarray(table)
    row = np.dtype((np.void, table.dtype.itemsize * table.shape[1]))
    return table.view(row).ravel().take(idx).view(table.dtype).reshape(idx.shape + table.shape[1:])


def label_bits(num_labels: int) -> int:
    """Bits that hold labels 0..num_labels-1 (at least 1)."""
    return max(int(num_labels - 1).bit_length(), 1)


Draw = Callable[[np.ndarray | None, int], np.ndarray]  # (tokens or None for all, m) -> [m, tokens] candidates


def successive_sampling(draw: Draw, n: int, k: int, dtype: np.dtype | type = np.int64) -> np.ndarray:
    """``k`` distinct picks for each of ``n`` tokens, [k, n] of ``dtype``: pick i is the token's first i.i.d.
    draw that differs from its picks 0..i-1 (rejection), which is exactly successive sampling without
    replacement. The comparisons run on ``dtype`` (the labels' narrowest: uint8 below 256 labels).

    ``draw(tokens, m)`` returns ``m`` i.i.d. candidates for each of ``tokens`` (all n when None): [m, len].
    A token rejected in one round draws twice as many candidates in the next (up to
    ``MAX_DRAWS_PER_ROUND``) and takes the first that is new. (Tokens are selected by index arrays, not
    boolean masks: numpy's masked selection is slow on random masks.)
    """
    picks = draw(None, k).astype(dtype, copy=False)  # every pick's first candidate
    same = np.empty(n, dtype=bool)
    for i in range(1, k):
        repeat = np.zeros(n, dtype=bool)
        for j in range(i):
            repeat |= np.equal(picks[j], picks[i], out=same)
        todo = repeat.nonzero()[0]
        m = 1
        for _ in range(MAX_REJECTION_ROUNDS):
            if todo.size == 0:
                break
            cand = draw(todo, m).astype(dtype, copy=False)  # [m, todo]
            new = np.ones(cand.shape, dtype=bool)
            for j in range(i):
                new &= cand != picks[j][todo]
            if m == 1:
                ok, take = new[0], cand[0]
            else:  # each token's first new candidate
                first, col = new.argmax(axis=0), np.arange(todo.size)
                ok, take = new[first, col], cand[first, col]
            got = ok.nonzero()[0]
            picks[i][todo[got]] = take[got]
            todo = todo[(~ok).nonzero()[0]]
            m = min(2 * m, MAX_DRAWS_PER_ROUND)
        else:
            raise ValueError("could not draw top_k distinct experts: raise affinity_fanout or lower affinity")
    return picks
