"""The linear sum assignment (Hungarian) in numpy, so that the collector and track mode need no
scipy (the core install leaves it out: docs/install.md).

The same algorithm as ``scipy.optimize.linear_sum_assignment`` (the shortest augmenting path
of Crouse, "On implementing 2D rectangular assignment algorithms", 2016, as scipy's
rectangular_lsap.cpp has it), with the same choice among equal costs, so it picks the same
assignment; tests/test_install.py compares the two. Matrices here are captions × boxes: small.
"""

from __future__ import annotations

import numpy as np


def linear_sum_assignment(cost: np.ndarray, maximize: bool = False) -> tuple[np.ndarray,
                                                                               np.ndarray]:
    """(rows, cols) of a minimum (or maximum) total cost one-to-one assignment of the rows and
    columns of ``cost`` (rectangular allowed: min(rows, cols) pairs, rows ascending)."""
    cost = np.array(cost, dtype=np.float64)
    if cost.ndim != 2:
        raise ValueError(f"expected a matrix, got {cost.ndim} dimensions")
    if not np.isfinite(cost).all():
        raise ValueError("the cost matrix holds nan or infinite entries")
    empty = np.zeros(0, dtype=np.intp)
    if cost.size == 0:
        return empty, empty.copy()
    transpose = cost.shape[1] < cost.shape[0]
    if transpose:
        cost = cost.T
    if maximize:
        cost = -cost
    col4row = _solve(cost)
    if transpose:
        order = np.argsort(col4row, kind="stable")
        return col4row[order], order.astype(np.intp)
    return np.arange(cost.shape[0], dtype=np.intp), col4row


def _solve(cost: np.ndarray) -> np.ndarray:
    """The column of every row (rows <= columns), by one shortest augmenting path per row."""
    nr, nc = cost.shape
    u, v = np.zeros(nr), np.zeros(nc)
    col4row = np.full(nr, -1, dtype=np.intp)
    row4col = np.full(nc, -1, dtype=np.intp)
    for row in range(nr):
        sink, path, shortest, seen_rows, seen_cols, low = _augmenting_path(
            cost, u, v, row4col, row)
        u[row] += low
        others = seen_rows.copy()
        others[row] = False
        u[others] += low - shortest[col4row[others]]
        v[seen_cols] -= low - shortest[seen_cols]
        j = sink
        while True:  # augment along the path back to ``row``
            i = path[j]
            row4col[j] = i
            col4row[i], j = j, col4row[i]
            if i == row:
                break
    return col4row


def _augmenting_path(cost: np.ndarray, u: np.ndarray, v: np.ndarray, row4col: np.ndarray,
                     row: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                        float]:
    nr, nc = cost.shape
    path = np.full(nc, -1, dtype=np.intp)
    shortest = np.full(nc, np.inf)
    seen_rows = np.zeros(nr, dtype=bool)
    seen_cols = np.zeros(nc, dtype=bool)
    remaining = list(range(nc - 1, -1, -1))  # scipy's order: last column first
    low, i, sink = 0.0, row, -1
    while sink == -1:
        seen_rows[i] = True
        rem = np.asarray(remaining, dtype=np.intp)
        reduced = low + cost[i, rem] - u[i] - v[rem]
        better = reduced < shortest[rem]
        path[rem[better]] = i
        shortest[rem[better]] = reduced[better]
        values = shortest[rem]
        lowest = float(values.min())
        if not np.isfinite(lowest):
            raise ValueError("the cost matrix is infeasible")
        # the first column at the minimum, unless a later one at it is free: then the last
        free = np.flatnonzero((values == lowest) & (row4col[rem] == -1))
        index = int(free[-1]) if free.size else int(np.flatnonzero(values == lowest)[0])
        low = lowest
        j = remaining[index]
        if row4col[j] == -1:
            sink = j
        else:
            i = int(row4col[j])
        seen_cols[j] = True
        remaining[index] = remaining[-1]
        remaining.pop()
    return sink, path, shortest, seen_rows, seen_cols, low


__all__ = ["linear_sum_assignment"]
