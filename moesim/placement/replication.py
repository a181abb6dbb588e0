"""Replicated placements: how many copies each expert gets, and which GPUs hold them - shared by policies.

:func:`replicate_and_pack` is the one entry point for a policy that takes ``redundant_experts: N``
(``greedy``; the ILP can call it for its replica counts and its seed):

1. counts (:func:`replica_counts`): each of the ``N`` extra copies goes to the expert with the heaviest load
   per copy (EPLB's rule, which minimises the heaviest copy's load when copies split their expert's load
   evenly), never more copies than GPUs;
2. packing (:func:`pack_replicas`): copies, heaviest first (load / count each), onto the least-loaded GPU
   that has a free slot and does not hold that expert yet (longest-processing-time first with slot limits),
   ``ceil((E + N) / G)`` slots per GPU. Every layer advances together (numpy over layers).

For the ``ilp`` policy's joint search (:mod:`moesim.placement.ilp`) this module also gives, per layer,
the even-split GPU loads of a copy mask (:func:`copy_loads`), a proven lower bound on the heaviest GPU
over every choice of counts and packing (:func:`replica_lower_bound`), a local search that moves, swaps
and re-counts copies (:func:`improve_replicas`), and the repair of a packing whose end-game merged twins
(:func:`place_missing`).

Ignored: communication (where a copy sits relative to the tokens that use it) and the memory the copies
take (the caller checks ``PlacementProblem.max_slots_per_gpu``).
"""

from __future__ import annotations

import numpy as np

from moesim.placement.format import Placement


def replica_counts(load: np.ndarray, num_copies: int, max_copies: int) -> np.ndarray:
    """[layers, experts] copies per expert, ``num_copies`` in all per layer, at most ``max_copies`` each."""
    load = np.asarray(load, dtype=float)
    L, E = load.shape
    if not E <= num_copies <= E * max_copies:
        raise ValueError(f"{num_copies} copies of {E} experts need between {E} and {E * max_copies} "
                         f"(at most {max_copies} per expert: one per GPU)")
    counts = np.ones((L, E), dtype=np.int64)
    r = np.arange(L)
    for _ in range(num_copies - E):
        per_copy = np.where(counts < max_copies, load / counts, -np.inf)
        pick = per_copy.argmax(axis=1)  # first maximum: lowest expert id among ties
        counts[r, pick] += 1
    return counts


def pack_replicas(load: np.ndarray, counts: np.ndarray, num_ranks: int, slots_per_gpu: int) -> np.ndarray:
    """``held [layers, experts, gpus]``: copies (``counts``) packed heaviest first onto the least-loaded GPU
    with a free slot that does not hold the expert yet (ties: lowest GPU)."""
    load = np.asarray(load, dtype=float)
    L, E = load.shape
    total = int(counts[0].sum())
    if (counts.sum(axis=1) != total).any() or total > num_ranks * slots_per_gpu:
        raise ValueError(f"{total} copies do not fit {num_ranks} EP ranks x {slots_per_gpu} slots")
    # every layer's copies as items: expert id and per-copy load, heaviest first (stable: lower id first)
    item_expert = np.stack([np.repeat(np.arange(E), counts[l]) for l in range(L)])
    item_load = np.take_along_axis(load / counts, item_expert, axis=1)
    order = np.argsort(-item_load, axis=1, kind="stable")
    item_expert = np.take_along_axis(item_expert, order, axis=1)
    item_load = np.take_along_axis(item_load, order, axis=1)
    r = np.arange(L)
    held = np.zeros((L, E, num_ranks), dtype=bool)
    gpu_load = np.zeros((L, num_ranks))
    gpu_n = np.zeros((L, num_ranks), dtype=np.int64)
    for j in range(total):
        e = item_expert[:, j]
        room = gpu_n < slots_per_gpu
        ok = room & ~held[r, e]
        # a copy that could only land beside its twin (a rare end-game) takes any free slot and merges
        ok = np.where(np.any(ok, axis=1, keepdims=True), ok, room)
        g = np.where(ok, gpu_load, np.inf).argmin(axis=1)
        held[r, e, g] = True
        gpu_load[r, g] += item_load[:, j]
        gpu_n[r, g] += 1
    return held


def placement_from_mask(held: np.ndarray, policy: str, info: dict | None = None) -> Placement:
    """A placement from ``held [layers, experts, gpus]`` (True where a GPU holds a copy), GPUs ascending."""
    L, E, G = held.shape
    width = max(int(held.sum(axis=2).max(initial=1)), 1)
    # stable sort puts held GPUs first, in ascending order
    order = np.argsort(~held, axis=2, kind="stable")[:, :, :width]
    ok = np.take_along_axis(held, order, axis=2)
    gpus = np.where(ok, order, -1).astype(np.int32)
    return Placement(num_ranks=G, gpus=gpus, policy=policy, info=dict(info or {}))


def replicate_and_pack(load: np.ndarray, num_ranks: int, redundant_experts: int, policy: str,
                       info: dict | None = None) -> Placement:
    """Choose replica counts and pack them (see the module docstring) into a :class:`Placement`."""
    L, E = np.asarray(load).shape
    if redundant_experts < 0:
        raise ValueError(f"redundant_experts must be >= 0, got {redundant_experts}")
    total = E + redundant_experts
    counts = replica_counts(load, total, num_ranks)
    held = pack_replicas(load, counts, num_ranks, -(-total // num_ranks))
    merged = int(counts.sum() - held.sum())
    return placement_from_mask(held, policy, {**(info or {}), "redundant_experts": redundant_experts,
                                              "merged_twins": merged})


# ----------------------------------------------------------------------------------------------------
# one layer, copies as a mask ``held [experts, gpus]``: loads, a proven bound, local search, repair


def copy_loads(load_row: np.ndarray, held: np.ndarray) -> np.ndarray:
    """[gpus] load of each GPU when every copy takes an even share of its expert's load (token_index)."""
    counts = held.sum(axis=1)
    share = np.asarray(load_row, dtype=float) / np.maximum(counts, 1)
    return share @ held


def replica_lower_bound(load_row: np.ndarray, num_ranks: int, num_copies: int) -> float:
    """A proven lower bound on the heaviest GPU of one layer over every count vector (at most ``num_copies``
    copies, at most one per GPU) and every packing, copies splitting their expert evenly.

    ``max(total / GPUs, m*)``: the heaviest GPU carries at least the mean, and at least its heaviest copy,
    whose least possible value ``m*`` EPLB's count rule (:func:`replica_counts`) attains exactly - each extra
    copy goes to the expert with the heaviest copy, the only move that can lower it. (Subset arguments -
    the k hottest experts' load over the GPUs their copies can reach - add nothing: they follow from these
    two. What is left is integrality, which only the whole-layer MILP proves.)
    """
    p = np.asarray(load_row, dtype=float)
    if p.size == 0 or p.max() <= 0:
        return 0.0
    counts = replica_counts(p[None, :], min(num_copies, p.size * num_ranks), num_ranks)[0]
    return float(max(p.sum() / num_ranks, (p / counts).max()))


# A candidate of :func:`improve_replicas`: (kind, e, f, g) - see :func:`_apply_move`.
_Move = tuple[str, int, int, int]


def _best_move_off(held: np.ndarray, q: np.ndarray, bl: np.ndarray, n: np.ndarray, m: int, mine: np.ndarray,
                   slots: int, best: float) -> tuple[float, _Move | None]:
    """1. The best move of a copy off ``m`` onto a GPU with a free slot that lacks the expert, when it beats
    ``best``: ``(its value, move)``, else ``(best, None)``."""
    G = held.shape[1]
    ok = ~held[mine] & (n < slots)[None, :]
    if ok.any():
        top = bl[m]
        val = np.where(ok, np.maximum(top - q[mine][:, None], bl[None, :] + q[mine][:, None]), np.inf)
        k = int(np.argmin(val))
        if val.flat[k] < best:
            return float(val.flat[k]), ("move", int(mine[k // G]), -1, k % G)
    return best, None


def _best_swap(held: np.ndarray, q: np.ndarray, bl: np.ndarray, m: int, mine: np.ndarray,
               best: float) -> tuple[float, _Move | None]:
    """2. The best swap of a copy on ``m`` with a lighter copy of another expert on another GPU, when it beats
    ``best``."""
    f_all, g_all = np.nonzero(held & ~held[:, [m]])  # copies of experts m lacks, hence on GPUs != m
    if f_all.size:
        d = q[mine][:, None] - q[f_all][None, :]
        ok = (d > 0) & ~held[mine][:, g_all]
        val = np.where(ok, np.maximum(bl[m] - d, bl[g_all][None, :] + d), np.inf)
        k = int(np.argmin(val))
        if val.flat[k] < best:
            j = k % f_all.size
            return float(val.flat[k]), ("swap", int(mine[k // f_all.size]), int(f_all[j]), int(g_all[j]))
    return best, None


def _recount_candidates(held: np.ndarray, c: np.ndarray, m: int, mine: np.ndarray,
                        max_copies: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The re-counts to try, as arrays ``(e, f, g)``: expert ``e`` gains a copy on GPU ``g`` in the place of
    a copy of ``f`` (``c_f >= 2``)."""
    cand = []
    grow = mine[c[mine] < max_copies]
    if grow.size:  # 3. e on m grows onto a GPU g that lacks it, where f (c_f >= 2) had a copy
        f3, g3 = np.nonzero(held & (c >= 2)[:, None])
        ee, jj = np.meshgrid(grow, np.arange(f3.size), indexing="ij")
        ee, ff, gg = ee.ravel(), f3[jj.ravel()], g3[jj.ravel()]
        keep = (ee != ff) & ~held[ee, gg]
        cand.append((ee[keep], ff[keep], gg[keep]))
    shrink = mine[c[mine] >= 2]
    if shrink.size:  # 4. f on m (replicated) gives its copy on m to an expert e that m lacks
        e4 = np.flatnonzero(~held[:, m] & (c < max_copies))
        ff, ee = np.meshgrid(shrink, e4, indexing="ij")
        cand.append((ee.ravel(), ff.ravel(), np.full(ee.size, m)))
    if not cand:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    return (np.concatenate([x[0] for x in cand]), np.concatenate([x[1] for x in cand]),
            np.concatenate([x[2] for x in cand]))


def _best_recount(p: np.ndarray, held: np.ndarray, c: np.ndarray, q: np.ndarray, bl: np.ndarray, m: int,
                  mine: np.ndarray, max_copies: int, best: float) -> tuple[float, _Move | None]:
    """3./4. The best re-count (:func:`_recount_candidates`), when it beats ``best``."""
    ee, ff, gg = _recount_candidates(held, c, m, mine, max_copies)
    if ee.size:
        de = q[ee] - p[ee] / (c[ee] + 1)  # every copy of e gets lighter
        df = p[ff] / np.maximum(c[ff] - 1, 1) - q[ff]  # every other copy of f heavier
        new = bl[None, :] - de[:, None] * held[ee] + df[:, None] * held[ff]
        r = np.arange(ee.size)
        new[r, gg] += -df - q[ff] + p[ee] / (c[ee] + 1)
        changed = held[ee] | held[ff]
        changed[r, gg] = True
        val = np.where(changed, new, -np.inf).max(axis=1)
        k = int(np.argmin(val))
        if val[k] < best:
            return float(val[k]), ("recount", int(ee[k]), int(ff[k]), int(gg[k]))
    return best, None


def _apply_move(held: np.ndarray, m: int, move: _Move) -> None:
    """Apply ``move`` in place: ``move`` takes ``e``'s copy from ``m`` to ``g``; ``swap`` also takes ``f``'s
    from ``g`` to ``m``; ``recount`` gives ``f``'s copy on ``g`` to ``e``."""
    kind, e, f, g = move
    if kind == "move":
        held[e, m], held[e, g] = False, True
    elif kind == "swap":
        held[e, m], held[e, g] = False, True
        held[f, g], held[f, m] = False, True
    else:
        held[f, g], held[e, g] = False, True


def improve_replicas(load_row: np.ndarray, held: np.ndarray, slots: int, max_copies: int,
                     max_iter: int = 5_000) -> np.ndarray:
    """Best-improvement search on the heaviest GPU ``m`` of one layer, copies counted as they stand.

    Moves (each keeps the number of copies, at most ``slots`` per GPU, one copy of an expert per GPU):
    a copy leaves ``m`` for a GPU with a free slot; a copy on ``m`` trades places with a lighter one;
    an expert on ``m`` gains a copy in the place of a copy of a replicated expert elsewhere (``m``'s share
    shrinks); a replicated expert on ``m`` gives its copy there to another expert. A move is taken when
    every GPU it changes ends below ``m``'s load, the best (lowest such maximum) first; ties: the first found.
    """
    p = np.asarray(load_row, dtype=float)
    held = held.copy()
    if held.shape[1] < 2:
        return held
    for _ in range(max_iter):
        c = held.sum(axis=1)
        q = p / np.maximum(c, 1)
        bl = q @ held
        n = held.sum(axis=0)
        m = int(np.argmax(bl))
        top = float(bl[m])
        mine = np.flatnonzero(held[:, m])
        best = top - 1e-9 * max(top, 1e-300)
        best, move = _best_move_off(held, q, bl, n, m, mine, slots, best)
        best, swap = _best_swap(held, q, bl, m, mine, best)
        best, recount = _best_recount(p, held, c, q, bl, m, mine, max_copies, best)
        move = recount or swap or move
        if move is None:
            break
        _apply_move(held, m, move)
    return held


def place_missing(load_row: np.ndarray, held: np.ndarray, counts: np.ndarray, slots: int) -> np.ndarray:
    """Give every expert its ``counts`` copies on distinct GPUs (after :func:`pack_replicas` merged twins).

    A missing copy goes to the lightest GPU with a free slot that lacks the expert; where every GPU with a
    free slot already holds it, a copy ``f`` moves from a full GPU ``h`` lacking the expert to the free
    slot, and the expert takes ``f``'s place on ``h`` (``h`` is full and the other not, so such an ``f``
    exists). Needs ``counts <= GPUs`` and ``counts.sum() <= GPUs x slots``.
    """
    p = np.asarray(load_row, dtype=float)
    held = held.copy()
    for e in np.flatnonzero(held.sum(axis=1) < counts):
        while held[e].sum() < counts[e]:
            bl = copy_loads(p, held)
            q = p / np.maximum(held.sum(axis=1), 1)
            n = held.sum(axis=0)
            free = n < slots
            direct = np.flatnonzero(free & ~held[e])
            if direct.size:
                held[e, direct[np.argmin(bl[direct])]] = True
                continue
            g = int(np.flatnonzero(free)[np.argmin(bl[free])])  # holds e
            best = None
            for h in np.flatnonzero(~held[e]):  # full GPUs lacking e
                for f in np.flatnonzero(held[:, h] & ~held[:, g]):
                    val = max(bl[g] + q[f], bl[h] - q[f])
                    if best is None or val < best[0]:
                        best = (val, int(h), int(f))
            assert best is not None
            _, full, moved = best  # moved leaves the full GPU for g; e takes its place
            held[moved, full], held[moved, g], held[e, full] = False, True, True
    return held
