"""Inter-rater agreement on preference items: percent agreement and Krippendorff's alpha (nominal).

An *item* is one comparison several raters judged (the same prompt and the same two response texts); each
rater's value is a category (which of the two texts they preferred). Items with fewer than two values carry
no agreement information and are skipped, as Krippendorff prescribes.

- Percent agreement: for each item, the share of ordered rater pairs that agree,
  ``sum_c n_c (n_c - 1) / (m (m - 1))``, averaged over items.
- Alpha: ``1 - D_o / D_e`` with the coincidence matrix ``o_ck = sum_u sum_{i != j} [v_i = c][v_j = k] / (m_u - 1)``,
  ``D_o = sum_{c != k} o_ck / n`` and ``D_e = sum_{c != k} n_c n_k / (n (n - 1))``. It is 1 for perfect
  agreement, 0 for agreement at chance level, and undefined (NaN) when every value is the same category.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Agreement:
    items: int  # items with at least two ratings
    ratings: int
    percent: float
    alpha: float

    def as_dict(self) -> dict[str, float | int | None]:
        return {"items": self.items, "ratings": self.ratings,
                "percent_agreement": None if math.isnan(self.percent) else round(self.percent, 6),
                "krippendorff_alpha": None if math.isnan(self.alpha) else round(self.alpha, 6)}


def agreement(items: Iterable[Sequence[object]]) -> Agreement:
    pairable = [list(v) for v in items if len(v) >= 2]
    if not pairable:
        return Agreement(0, 0, math.nan, math.nan)
    percent = 0.0
    coincidence: dict[tuple[object, object], float] = defaultdict(float)
    for values in pairable:
        m = len(values)
        counts = Counter(values)
        percent += sum(n * (n - 1) for n in counts.values()) / (m * (m - 1))
        for c, nc in counts.items():
            for k, nk in counts.items():
                pairs = nc * (nc - 1) if c == k else nc * nk
                coincidence[(c, k)] += pairs / (m - 1)
    n_c: dict[object, float] = defaultdict(float)
    for (c, _k), o in coincidence.items():
        n_c[c] += o
    n = sum(n_c.values())
    d_o = sum(o for (c, k), o in coincidence.items() if c != k) / n
    d_e = sum(n_c[c] * n_c[k] for c in n_c for k in n_c if c != k) / (n * (n - 1))
    alpha = math.nan if d_e == 0 else 1 - d_o / d_e
    return Agreement(len(pairable), sum(len(v) for v in pairable), percent / len(pairable), alpha)
