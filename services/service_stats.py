"""Small running statistics the live services put in their STATUS reports."""
from __future__ import annotations

from collections import deque

import numpy as np


class RecentSamples:
    """The last `keep` samples of a quantity (e.g. a latency in ms): memory stays bounded on long
    runs, while the count and the maximum cover every sample ever added."""

    def __init__(self, keep: int = 100_000):
        self._recent: deque[float] = deque(maxlen=keep)
        self.count = 0
        self.max = float("-inf")

    def add(self, value: float) -> None:
        value = float(value)
        self._recent.append(value)
        self.count += 1
        if value > self.max:
            self.max = value

    def summary(self, digits: int = 3) -> dict:
        """{"n", "p50", "p95", "p99", "max", "mean"} (p* over the recent window); {"n": 0} when empty."""
        if not self.count:
            return {"n": 0}
        a = np.fromiter(self._recent, dtype=np.float64, count=len(self._recent))
        p50, p95, p99 = np.percentile(a, [50, 95, 99])
        return {"n": self.count, "p50": round(float(p50), digits), "p95": round(float(p95), digits),
                "p99": round(float(p99), digits), "max": round(self.max, digits),
                "mean": round(float(a.mean()), digits)}
