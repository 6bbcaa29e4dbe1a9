"""torch's CPU topk order, for rows where it is not simply "largest first, lower index first on ties".

torch's CPU kernel (aten/src/ATen/native/TopKImpl.h) pairs each value with its index and runs libstdc++'s
`std::partial_sort` over the row when k * 64 <= n, else `std::nth_element` at k - 1 followed (sorted=True)
by `std::sort` of the first k - 1 pairs. Neither is stable: among equal values the chosen and returned
indices follow the algorithms' swaps (a zero-initialised MoE router, whose scores all tie, picks experts 2
and 3 of 4, not 0 and 1), and with sorted=False the k pairs come back in nth_element's order. This module
runs the same algorithms on one row (keys, indices), step for step, as JAX loops; `topk_rows` maps them over
rows. Comparisons use dense integer ranks of the values (NaN largest, equal values equal ranks), which
decide every comparison as torch's NaN-aware comparators do.

Example:
    >>> idx = topk_rows(scores_RN, k=2, largest=True, sorted=True)     # (R, 2) int32, torch CPU's indices
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

SORT_THRESHOLD = 16        # libstdc++'s _S_threshold: std::sort finishes ranges this short by insertion sort


def dense_ranks(x_RN):
    """Per row, 0-based dense ranks of the values (equal values share one, NaNs rank above everything)."""
    nan = jnp.isnan(x_RN) if jnp.issubdtype(x_RN.dtype, jnp.inexact) else jnp.zeros(x_RN.shape, bool)
    pos = lax.broadcasted_iota(jnp.int32, x_RN.shape, 1)
    nan_s, x_s, pos_s = lax.sort((nan, x_RN, pos), dimension=1, num_keys=2)
    new = jnp.concatenate([jnp.zeros_like(nan_s[:, :1]),
                           (nan_s[:, 1:] != nan_s[:, :-1]) | (~nan_s[:, 1:] & (x_s[:, 1:] != x_s[:, :-1]))], 1)
    rank_s = jnp.cumsum(new, axis=1, dtype=jnp.int32)
    rows = lax.broadcasted_iota(jnp.int32, x_RN.shape, 0)
    return jnp.zeros(x_RN.shape, jnp.int32).at[rows, pos_s].set(rank_s)


def has_ties(ranks_RN):
    """Whether any row holds two equal values."""
    return jnp.any(jnp.max(ranks_RN, axis=1) < ranks_RN.shape[1] - 1)


# ------------------------------------------------------------------ one row: s = (keys, indices)
def _swap(s, a, b):
    k, i = s
    return k.at[a].set(k[b]).at[b].set(k[a]), i.at[a].set(i[b]).at[b].set(i[a])


def _put(s, at, value):
    return s[0].at[at].set(value[0]), s[1].at[at].set(value[1])


def _get(s, at):
    return s[0][at], s[1][at]


def _insertion_sort(s, first, last, comp):
    """std::__insertion_sort on [first, last): each element moves left past the elements it precedes."""
    pos = jnp.arange(s[0].shape[0], dtype=jnp.int32)

    def insert(i, s):
        k, ix = s
        val, vix = k[i], ix[i]
        keep = (pos >= first) & (pos < i) & ~comp(val, k)
        p = jnp.where(comp(val, k[first]), first, jnp.max(jnp.where(keep, pos, first - 1)) + 1)
        moved = (pos > p) & (pos <= i)
        k, ix = jnp.where(moved, jnp.roll(k, 1), k), jnp.where(moved, jnp.roll(ix, 1), ix)
        return k.at[p].set(val), ix.at[p].set(vix)
    return lax.fori_loop(first + 1, jnp.maximum(last, first + 1), insert, s)


def _partition_pivot(s, first, last, comp):
    """std::__unguarded_partition_pivot: median of three moved to first, then Hoare's partition around it."""
    k = s[0]
    a, b, c = first + 1, first + (last - first) // 2, last - 1
    ab, bc, ac = comp(k[a], k[b]), comp(k[b], k[c]), comp(k[a], k[c])
    s = _swap(s, first, jnp.where(ab, jnp.where(bc, b, jnp.where(ac, c, a)), jnp.where(ac, a, jnp.where(bc, c, b))))
    pivot = s[0][first]

    def step(carry):
        s, lo, hi, _ = carry
        lo = lax.while_loop(lambda j: comp(s[0][j], pivot), lambda j: j + 1, lo)
        hi = lax.while_loop(lambda j: comp(pivot, s[0][j]), lambda j: j - 1, hi - 1)
        done = lo >= hi
        swapped = _swap(s, lo, hi)
        s = jax.tree.map(lambda old, new: jnp.where(done, old, new), s, swapped)
        return s, jnp.where(done, lo, lo + 1), hi, done
    s, cut, _, _ = lax.while_loop(lambda c: ~c[3], step, (s, first + 1, last, jnp.bool_(False)))
    return s, cut


def _adjust_heap(s, first, hole, length, value, comp):
    """std::__adjust_heap: sift the hole down to a leaf by the preceding child, then push `value` up."""
    top = hole

    def down(c):
        s, hole, child = c
        child = 2 * (child + 1)
        child = jnp.where(comp(s[0][first + child], s[0][first + child - 1]), child - 1, child)
        return _put(s, first + hole, _get(s, first + child)), child, child
    s, hole, child = lax.while_loop(lambda c: c[2] < (length - 1) // 2, down, (s, hole, hole))
    odd_end = (length % 2 == 0) & (child == (length - 2) // 2)
    last_child = 2 * (child + 1) - 1
    s = jax.tree.map(lambda a, b: jnp.where(odd_end, b, a), s, _put(s, first + hole, _get(s, first + last_child)))
    hole = jnp.where(odd_end, last_child, hole)

    def up(c):
        s, hole = c
        parent = (hole - 1) // 2
        return _put(s, first + hole, _get(s, first + parent)), parent
    s, hole = lax.while_loop(lambda c: (c[1] > top) & comp(c[0][0][first + (c[1] - 1) // 2], value[0]), up, (s, hole))
    return _put(s, first + hole, value)


def _pop_heap(s, first, last, result, comp):
    value = _get(s, result)
    s = _put(s, result, _get(s, first))
    return _adjust_heap(s, first, jnp.zeros_like(first), last - first, value, comp)


def _heap_select(s, first, middle, last, comp):
    """std::__heap_select: heapify [first, middle), then swap in every later element preceding its top."""
    length = middle - first

    def heapify(j, s):
        parent = (length - 2) // 2 - j
        return _adjust_heap(s, first, parent, length, _get(s, first + parent), comp)
    s = lax.fori_loop(0, jnp.where(length >= 2, (length - 2) // 2 + 1, 0), heapify, s)

    def consider(i, s):
        popped = _pop_heap(s, first, middle, i, comp)
        return jax.tree.map(lambda a, b: jnp.where(comp(s[0][i], s[0][first]), b, a), s, popped)
    return lax.fori_loop(middle, last, consider, s)


def _partial_sort(s, middle, comp):
    """std::partial_sort(begin, begin + middle, end): heap select, then sort_heap."""
    zero = jnp.int32(0)
    s = _heap_select(s, zero, middle, jnp.int32(s[0].shape[0]), comp)
    return lax.fori_loop(0, middle - 1, lambda j, s: _pop_heap(s, zero, middle - 1 - j, middle - 1 - j, comp), s)


def _nth_element(s, nth, comp):
    """std::nth_element (introselect): partition while the range is long and depth remains; a range the depth
    limit stops falls back to heap select (as libstdc++ does), a short one to insertion sort."""
    n = s[0].shape[0]
    depth = 2 * (n.bit_length() - 1)

    def step(c):
        s, first, last, depth = c
        s, cut = _partition_pivot(s, first, last, comp)
        return s, jnp.where(cut <= nth, cut, first), jnp.where(cut <= nth, last, cut), depth - 1
    s, first, last, depth = lax.while_loop(lambda c: (c[2] - c[1] > 3) & (c[3] > 0), step,
                                           (s, jnp.int32(0), jnp.int32(n), jnp.int32(depth)))
    long = last - first > 3
    zero = jnp.int32(0)
    heap = _heap_select(s, jnp.where(long, first, zero), jnp.where(long, nth + 1, zero),
                        jnp.where(long, last, zero), comp)
    heap = jax.tree.map(lambda a, b: jnp.where(long, b, a), heap, _swap(heap, first, nth))
    return _insertion_sort(heap, jnp.where(long, zero, first), jnp.where(long, zero, last), comp)


def topk_order_supported(n: int, k: int, sorted: bool) -> bool:
    """Rows this module reproduces: partial_sort's path, or nth_element's with at most 16 pairs to sort."""
    return k * 64 <= n or not sorted or k - 1 <= SORT_THRESHOLD


def topk_row(ranks_N, k: int, largest: bool, sorted: bool):
    """Indices (k,) torch's CPU topk returns for one row of dense ranks."""
    n = ranks_N.shape[0]
    comp = (lambda a, b: a > b) if largest else (lambda a, b: a < b)
    s = (ranks_N, jnp.arange(n, dtype=jnp.int32))
    if k * 64 <= n:
        s = _partial_sort(s, jnp.int32(k), comp)
    else:
        s = _nth_element(s, jnp.int32(k - 1), comp)
        if sorted:
            s = _insertion_sort(s, jnp.int32(0), jnp.int32(k - 1), comp)
    return s[1][:k]


def topk_rows(x_RN, k: int, largest: bool, sorted: bool):
    """torch CPU's topk indices (R, k) of each row of x_RN."""
    ranks = dense_ranks(lax.stop_gradient(x_RN))
    return jax.vmap(lambda r: topk_row(r, k, largest, sorted))(ranks)
