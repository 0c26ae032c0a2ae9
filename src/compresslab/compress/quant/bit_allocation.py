"""Mixed precision under a bit budget (``quant=lsq`` / ``pact`` with ``bits_per_layer=sensitivity``):
given each layer's measured loss increase at each candidate bit width, choose the bits per layer
so the quantized layers' weights average at most the budget, the most sensitive layers keeping
the most bits.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence


def allocate_bits(delta: Mapping[str, Mapping[int, float]], sizes: Mapping[str, int], candidates: Sequence[int],
                  budget_bits: float) -> dict[str, int]:
    """Greedy allocation: start every layer at the largest candidate; while the size-weighted
    mean bits exceed ``budget_bits``, lower by one candidate the layer whose step costs the least
    measured loss increase per weight bit saved."""
    cands = sorted(candidates)
    level = {n: len(cands) - 1 for n in delta}
    total = sum(sizes.values())

    def mean_bits() -> float:
        return sum(cands[level[n]] * sizes[n] for n in delta) / max(1, total)

    while mean_bits() > budget_bits + 1e-9:
        best, best_cost = None, math.inf
        for n in delta:
            if level[n] == 0:
                continue
            hi, lo = cands[level[n]], cands[level[n] - 1]
            cost = (delta[n][lo] - delta[n][hi]) / ((hi - lo) * sizes[n])
            if cost < best_cost:
                best, best_cost = n, cost
        if best is None:
            break
        level[best] -= 1
    return {n: cands[level[n]] for n in delta}
