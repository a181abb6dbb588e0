"""The synthetic generator's per-chunk sampling compiled with numba (the optional extra ``fast``): the same picks,
byte for byte, as the numpy path of :mod:`moesim.traces.sampling` and :func:`moesim.traces.synthetic._layer_picks`.

Identity rests on three things, each tested against the numpy path (tests/test_sampler_jit.py):
- the random words: numpy's PCG64 (the generator of ``np.random.default_rng``) stepped here from the state its
  ``bit_generator`` reports, 128-bit LCG on two 64-bit halves and the XSL-RR output, so word i here is word i of
  ``random_raw``; the state is handed back at the end, as if ``random_raw`` had drawn them;
- the order: words are consumed exactly as the numpy path asks for them - one per token for its set of groups,
  then ``k x n`` (pick i's first candidate of every token, pick by pick), then per pick i its rejection rounds
  over the tokens that repeat an earlier pick, in token order, ``m x todo`` words per round (m = 1, 2, 4, ... up to
  :data:`MAX_DRAWS_PER_ROUND`), each token taking its first new candidate (the words of tokens done earlier in
  the round are drawn and dropped, as numpy computes and drops them). The first candidates are drawn token by
  token from ``k`` copies of the stream jumped ahead to rows ``0, n, 2n, ...`` (PCG's jump-ahead, numpy's
  ``advance``): the same words, each token's segments read once. A round draws its words, then every
  candidate, then picks each token's first new one: the same choice;
- the arithmetic: integer operations of :meth:`PackedAlias.draw` on the same table words, and the group path's
  segment cuts from the same float64 products, sums (in ``np.cumsum``'s order, from the groups' masses rather
  than the numpy path's per-set tables of them) and truncations.

A token's draw is one segment out of ``S`` by its word's low 32 bits against the token's ``S - 1`` cuts (the
count of cuts at or below them), then :meth:`PackedAlias.draw` from the segment's row (first word per token,
width per segment) by its high 32 bits: a single row (no affinity, S = 1), the mixture's coin (S = 2: successors
below the cut, then popularity) and group-limited routing (S = 2 x topk_groups) are all of this form.

A token's segments are kept in one row of uint32: its ``S - 1`` cuts, a pad, then each segment's first word (64
bytes for DeepSeek-V3's 8 segments; the alias tables hence hold at most 2^32 words, else the numpy path runs).

Why compiled: the numpy path spends ~750 ns per token and layer in numpy temporaries and per-call costs (a few
tens of calls per round over a chunk's tokens); the work itself is ~11 random words and table reads per token
(DeepSeek-V3's shape), ~160-240 ns compiled (256-1024 GPUs; benchmarks/bench_prepare_output.txt), much of it
waiting on reads of tables that outgrow the L2 cache.
Compiled without the GIL (``nogil``), chunks still sample in parallel threads. The first call in a fresh
install compiles (seconds; cached on disk for later processes).

Without numba, or with ``MOESIM_SAMPLER_JIT=0`` in the environment, :func:`enabled` is False and nothing here is
compiled or called; bit generators other than PCG64 also take the numpy path.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np

from moesim.traces.sampling import MAX_DRAWS_PER_ROUND, MAX_REJECTION_ROUNDS, PackedAlias

ENV = "MOESIM_SAMPLER_JIT"  # "0": the numpy path even where numba is installed
_MULT_HI = 2549297995355413924  # PCG64's 128-bit multiplier (numpy's PCG_DEFAULT_MULTIPLIER_128), high half
_MULT_LO = 4865540595714422341
_M64 = (1 << 64) - 1


def _numba_njit() -> Any:
    """numba's ``njit``, or None when the optional extra is not installed (the numpy path runs)."""
    try:
        from numba import njit
    except ImportError:
        return None
    return njit


_njit = _numba_njit()
AVAILABLE = _njit is not None


def enabled(compiled: bool | None = None) -> bool:
    """Whether to sample compiled: ``compiled`` when given (True needs numba), else where numba is installed
    and ``MOESIM_SAMPLER_JIT`` is not ``0``."""
    if compiled and not AVAILABLE:
        raise ValueError("compiled=True needs numba: pip install moesim[fast]")
    if compiled is not None:
        return compiled
    return AVAILABLE and os.environ.get(ENV, "1") != "0"


def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` compiled (cached on disk, without the GIL, IEEE arithmetic without reordering)."""
    if _njit is None:
        return fn
    compiled: Callable[..., Any] = _njit(cache=True, nogil=True, error_model="numpy")(fn)
    return compiled


def pcg64_state(bit_generator: np.random.BitGenerator) -> np.ndarray | None:
    """The state of a PCG64 ``bit_generator`` as uint64 [state high, state low, increment high, increment low],
    or None for another kind of bit generator."""
    if type(bit_generator) is not np.random.PCG64:
        return None
    s = bit_generator.state["state"]
    return np.array([s["state"] >> 64, s["state"] & _M64, s["inc"] >> 64, s["inc"] & _M64], dtype=np.uint64)


def store_pcg64_state(bit_generator: np.random.BitGenerator, st: np.ndarray) -> None:
    """Sets ``bit_generator`` to the state ``st`` (:func:`pcg64_state`'s layout) the kernels advanced."""
    hi, lo, inc_hi, inc_lo = (int(x) for x in st)
    bit_generator.state = {**bit_generator.state, "state": {"state": (hi << 64) | lo, "inc": (inc_hi << 64) | inc_lo}}


def _mulhi_llvm() -> Any:
    """``mulhi(a, b)``: the high 64 bits of the 128-bit product of two uint64, one 128-bit multiply in LLVM (the
    machine's 64 x 64 -> 128 instruction, as numpy's C code multiplies); None without numba."""
    if _njit is None:
        return None
    from llvmlite import ir
    from numba.core import types
    from numba.extending import intrinsic

    @intrinsic
    def mulhi(typingctx: Any, a: Any, b: Any) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            wide = ir.IntType(128)
            prod = builder.mul(builder.zext(args[0], wide), builder.zext(args[1], wide))
            return builder.trunc(builder.lshr(prod, ir.Constant(wide, 64)), ir.IntType(64))

        return types.uint64(types.uint64, types.uint64), codegen

    return mulhi


_mulhi = _mulhi_llvm()


@_compiled
def _mul128(ah: np.uint64, al: np.uint64, bh: np.uint64, bl: np.uint64) -> tuple[np.uint64, np.uint64]:
    """(high, low) halves of ``a x b`` mod 2^128."""
    return _mulhi(al, bl) + al * bh + ah * bl, al * bl


@_compiled
def _add128(ah: np.uint64, al: np.uint64, bh: np.uint64, bl: np.uint64) -> tuple[np.uint64, np.uint64]:
    """(high, low) halves of ``a + b`` mod 2^128."""
    lo = al + bl
    return ah + bh + (np.uint64(1) if lo < al else np.uint64(0)), lo


@_compiled
def _pcg64(hi: np.uint64, lo: np.uint64, inc_hi: np.uint64, inc_lo: np.uint64
           ) -> tuple[np.uint64, np.uint64, np.uint64]:
    """One step of PCG64: (new state high, low, the word), as numpy's ``pcg64_random_r`` (step, then XSL-RR of
    the new state)."""
    p_hi, p_lo = _mul128(hi, lo, np.uint64(_MULT_HI), np.uint64(_MULT_LO))
    n_hi, n_lo = _add128(p_hi, p_lo, inc_hi, inc_lo)
    v = n_hi ^ n_lo
    r = n_hi >> np.uint64(58)
    return n_hi, n_lo, (v >> r) | (v << ((np.uint64(64) - r) & np.uint64(63)))


@_compiled
def _advance(hi: np.uint64, lo: np.uint64, inc_hi: np.uint64, inc_lo: np.uint64, delta: int
             ) -> tuple[np.uint64, np.uint64]:
    """The state ``delta`` steps on (numpy's ``pcg_advance_lcg_128``: the LCG's powers by squaring)."""
    acc_mh, acc_ml, acc_ph, acc_pl = np.uint64(0), np.uint64(1), np.uint64(0), np.uint64(0)
    cur_mh, cur_ml, cur_ph, cur_pl = np.uint64(_MULT_HI), np.uint64(_MULT_LO), inc_hi, inc_lo
    while delta > 0:
        if delta & 1:
            acc_mh, acc_ml = _mul128(acc_mh, acc_ml, cur_mh, cur_ml)
            acc_ph, acc_pl = _mul128(acc_ph, acc_pl, cur_mh, cur_ml)
            acc_ph, acc_pl = _add128(acc_ph, acc_pl, cur_ph, cur_pl)
        sum_h, sum_l = _add128(cur_mh, cur_ml, np.uint64(0), np.uint64(1))
        cur_ph, cur_pl = _mul128(sum_h, sum_l, cur_ph, cur_pl)
        cur_mh, cur_ml = _mul128(cur_mh, cur_ml, cur_mh, cur_ml)
        delta >>= 1
    hi, lo = _mul128(acc_mh, acc_ml, hi, lo)
    return _add128(hi, lo, acc_ph, acc_pl)


@_compiled
def _label(table: np.ndarray, start: np.int64, width: np.uint64, bits: np.uint64, thr_bits: np.uint64,
           label_bits: np.uint64) -> np.int64:
    """:meth:`PackedAlias.draw` of one word ``bits`` from the row of ``width`` columns starting at word ``start``."""
    s32 = np.uint64(32)
    x = (bits >> s32) * width
    word = table[np.int64(x >> s32) + start]
    thr = word & ((np.uint64(1) << thr_bits) - np.uint64(1))
    if ((x & np.uint64(0xFFFFFFFF)) >> (s32 - thr_bits)) < thr:
        return np.int64((word >> thr_bits) & ((np.uint64(1) << label_bits) - np.uint64(1)))
    return np.int64(word >> (thr_bits + label_bits))


@_compiled
def _candidate(table: np.ndarray, tb: np.uint64, lb: np.uint64, segs: np.ndarray, widths: np.ndarray, t: int,
               bits: np.uint64) -> np.int64:
    """Token ``t``'s candidate from the word ``bits``: its segment, the count of its cuts (``segs[t, :S - 1]``)
    at or below the low 32 bits, then that segment's row (from word ``segs[t, S + segment]``) by the high ones."""
    u = np.uint32(bits & np.uint64(0xFFFFFFFF))
    num = widths.size
    seg = 0
    for j in range(num - 1):
        seg += u >= segs[t, j]
    return _label(table, np.int64(segs[t, num + seg]), widths[seg], bits, tb, lb)


@_compiled
def _streams(st: np.ndarray, first: int, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(high, low) state halves of ``k`` streams, stream i at word ``first + i x n`` from ``st``."""
    sh, sl = np.empty(k, dtype=np.uint64), np.empty(k, dtype=np.uint64)
    for i in range(k):
        sh[i], sl[i] = _advance(st[0], st[1], st[2], st[3], first + i * n)
    return sh, sl


@_compiled
def _first_candidates(st: np.ndarray, table: np.ndarray, tb: np.uint64, lb: np.uint64, segs: np.ndarray,
                      widths: np.ndarray, picks: np.ndarray) -> None:
    """Every pick's first candidate, ``picks[t, i]`` from word ``i x n + t`` (``k`` streams jumped ahead to their
    rows: a token's segments are read once); ``st`` is left past the ``k x n`` words."""
    n, k = picks.shape
    sh, sl = _streams(st, 0, n, k)
    for t in range(n):
        for i in range(k):
            h, l, w = _pcg64(sh[i], sl[i], st[2], st[3])
            sh[i], sl[i] = h, l
            picks[t, i] = _candidate(table, tb, lb, segs, widths, t, w)
    st[0], st[1] = _advance(st[0], st[1], st[2], st[3], k * n)


@_compiled
def _is_new(picks: np.ndarray, t: int, i: int, c: np.int64) -> bool:
    """Whether ``c`` differs from token t's picks 0..i-1."""
    rep = False
    for j in range(i):
        rep |= picks[t, j] == c
    return not rep


@_compiled
def _repeats(picks: np.ndarray, i: int, todo: np.ndarray) -> int:
    """Puts in ``todo`` the tokens whose pick i repeats one of their picks 0..i-1, in order; returns how many."""
    size = 0
    for t in range(picks.shape[0]):
        todo[size] = t
        size += not _is_new(picks, t, i, picks[t, i])
    return size


@_compiled
def _round(hi: np.uint64, lo: np.uint64, inc_hi: np.uint64, inc_lo: np.uint64, table: np.ndarray, tb: np.uint64,
           lb: np.uint64, segs: np.ndarray, widths: np.ndarray, picks: np.ndarray, i: int, todo: np.ndarray,
           size: int, m: int, bits: np.ndarray, cand: np.ndarray) -> tuple[np.uint64, np.uint64, int]:
    """One rejection round of ``m`` rows over the ``size`` tokens of ``todo`` (row r: one word per token, in
    order; each token takes its first new candidate); ``todo`` keeps those left. Returns the state and how many.
    The round's words are drawn first (into ``bits``), then every candidate (into ``cand``: independent table
    reads, which overlap), then each token's first new one."""
    for x in range(m * size):
        hi, lo, bits[x] = _pcg64(hi, lo, inc_hi, inc_lo)
    for r in range(m):
        for q in range(size):
            cand[r * size + q] = _candidate(table, tb, lb, segs, widths, todo[q], bits[r * size + q])
    left = 0
    for q in range(size):
        t, taken = todo[q], False
        for r in range(m):
            c = cand[r * size + q]
            if _is_new(picks, t, i, c):
                picks[t, i], taken = c, True
                break
        todo[left] = t
        left += not taken
    return hi, lo, left


@_compiled
def _rejections(st: np.ndarray, table: np.ndarray, tb: np.uint64, lb: np.uint64, segs: np.ndarray,
                widths: np.ndarray, picks: np.ndarray) -> bool:
    """Picks 1..k-1 of ``picks`` [n, k] made distinct by rejection rounds (their first candidates drawn), the
    words from ``st`` (advanced). False when a token found no new candidate in :data:`MAX_REJECTION_ROUNDS`."""
    n, k = picks.shape
    hi, lo, inc_hi, inc_lo = st[0], st[1], st[2], st[3]
    todo = np.empty(n, dtype=np.int64)
    bits, cand = np.empty(2 * n, dtype=np.uint64), np.empty(2 * n, dtype=np.int64)
    for i in range(1, k):
        size = _repeats(picks, i, todo)
        rounds, m = 0, 1
        while size > 0 and rounds < MAX_REJECTION_ROUNDS:
            if m * size > cand.size:
                bits, cand = np.empty(m * size, dtype=np.uint64), np.empty(m * size, dtype=np.int64)
            hi, lo, size = _round(hi, lo, inc_hi, inc_lo, table, tb, lb, segs, widths, picks, i, todo, size, m, bits,
                                  cand)
            rounds, m = rounds + 1, min(2 * m, MAX_DRAWS_PER_ROUND)
        if rounds == MAX_REJECTION_ROUNDS:  # numpy's loop ran out (even if its last round left none)
            return False
    st[0], st[1] = hi, lo
    return True


@_compiled
def successive(st: np.ndarray, table: np.ndarray, thr_bits: int, label_bits: int, segs: np.ndarray,
               widths: np.ndarray, picks: np.ndarray) -> bool:
    """:func:`moesim.traces.sampling.successive_sampling` into ``picks`` [n, k] (token-major, filled here): token
    t's candidates drawn from its S segments, ``segs`` [n, 2 S] (uint32: S - 1 cuts, a pad, then each segment's
    first word) of ``widths`` [S] (uint64) columns on the alias table words ``table``, the random words from PCG64
    state ``st`` (advanced). False when a token found no new candidate in :data:`MAX_REJECTION_ROUNDS` rounds."""
    tb, lb = np.uint64(thr_bits), np.uint64(label_bits)
    _first_candidates(st, table, tb, lb, segs, widths, picks)
    return _rejections(st, table, tb, lb, segs, widths, picks)


@_compiled
def _group_ends(members: np.ndarray, s: int, pop_mass: np.ndarray, succ_mass: np.ndarray, shares: tuple[float, float],
                ends: np.ndarray) -> None:
    """The ends of a token's 2 k_g segments in set ``s`` of groups, into ``ends``, as the numpy path adds them
    (:func:`moesim.traces.synthetic._segments`'s per-set tables, one row of each): the popularity's cumulative
    mass ``P_j`` (``shares[0] x pop_mass[g]`` over the set's groups g, summed in order as ``np.cumsum``) and the
    successors' ``S_j`` (``shares[1] x succ_mass[g]``); end 2j is ``P_j + S_(j-1)`` (0 for j = 0), end 2j + 1 is
    ``P_j + S_j``."""
    pc, sc = 0.0, 0.0
    for j in range(members.shape[1]):
        g = members[s, j]
        y, x = shares[0] * pop_mass[g], shares[1] * succ_mass[g]
        before = sc
        pc, sc = (y, x) if j == 0 else (pc + y, sc + x)
        ends[2 * j] = pc + before
        ends[2 * j + 1] = pc + sc


@_compiled
def grouped(st: np.ndarray, sets: np.ndarray, set_bits: tuple[int, int], members: np.ndarray, home: np.ndarray,
            prev_top1: np.ndarray, group_mass: np.ndarray, succ_mass: np.ndarray, shares: tuple[float, float],
            shape: tuple[int, int, int], table: np.ndarray, thr_bits: int, label_bits: int, picks: np.ndarray) -> int:
    """Group-limited routing with precomputed sets of groups, as :func:`moesim.traces.synthetic._grouped_draw`
    then :func:`successive`: each token's set (one word from its home's row of the alias words ``sets``, of
    (thresholds, labels) ``set_bits``; the set's groups ``members`` [sets, k_g]), its 2 k_g segments - cuts from
    the groups' popularity mass at its home ``group_mass`` [G, groups] and successor mass of its previous top-1
    ``succ_mass`` [E, groups], weighed by ``shares`` (1 - affinity, affinity); group g's popularity row from word
    ``(home x groups + g) x size``, its successors' from ``G x E + (expert x groups + g) x size`` for ``shape``
    (G x E, groups, size) - then the picks into ``picks`` [n, k] from ``table`` (:func:`successive`, after the
    n set words; a pass of its own: its short chains of dependent steps overlap from token to token). 0 when done,
    1 when a token's segments have no mass, 2 when a token found no new candidate."""
    n = picks.shape[0]
    num_sets, num = members.shape[0], 2 * members.shape[1]
    gtb, glb, width = np.uint64(set_bits[0]), np.uint64(set_bits[1]), np.uint64(num_sets)
    widths = np.full(num, np.uint64(shape[2]))
    segs, ends = np.empty((n, 2 * num), dtype=np.uint32), np.empty(num)
    hi, lo = st[0], st[1]
    for t in range(n):
        hi, lo, w = _pcg64(hi, lo, st[2], st[3])
        s = _label(sets, home[t] * num_sets, width, w, gtb, glb)
        _group_ends(members, s, group_mass[home[t]], succ_mass[prev_top1[t]], shares, ends)
        if not ends[num - 1] > 0.0:
            return 1
        scale = 2.0**32 / ends[num - 1]
        for j in range(num - 1):
            segs[t, j] = np.uint32(min(ends[j] * scale, 2.0**32 - 1))
        segs[t, num - 1] = 0
        for j in range(num // 2):
            g = members[s, j]
            segs[t, num + 2 * j] = (home[t] * shape[1] + g) * shape[2]
            segs[t, num + 2 * j + 1] = shape[0] + (prev_top1[t] * shape[1] + g) * shape[2]
    st[0], st[1] = hi, lo
    return 0 if successive(st, table, thr_bits, label_bits, segs, widths, picks) else 2


def draw_picks(st: np.ndarray, experts: PackedAlias, segs: np.ndarray, widths: np.ndarray, k: int,
               dtype: np.dtype) -> np.ndarray | None:
    """[k, n] picks of ``dtype`` (a view of [n, k]) by :func:`successive` on ``experts``, or None when a token found
    no new one."""
    picks = np.empty((segs.shape[0], k), dtype=dtype)
    ok = successive(st, experts.words, experts.thr_bits, experts.label_bits, segs, widths, picks)
    return picks.T if ok else None
