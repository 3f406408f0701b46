#!/usr/bin/env python3
"""Writes agent/src/verify/mannwhitney_fixtures.in: Mann-Whitney U results computed by scipy,
used as fixtures by the unit tests of agent/src/verify/stats.rs. Run once when the cases
change (needs scipy: pip install scipy); the output is committed.

    python3 tools/mannwhitney_fixtures.py
"""
import random
from pathlib import Path

from scipy.stats import mannwhitneyu

random.seed(20261127)
cases = [
    ([0.1, 0.2, 0.3, 0.4, 0.5], [0.6, 0.7, 0.8, 0.9, 1.0]),          # fully separated
    ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]),                              # identical
    ([0.0] * 10, [0.05] * 10),                                       # error rate 0 vs 5%
    ([0.0] * 8 + [0.01, 0.02], [0.0] * 9 + [0.01]),                  # mostly ties
    ([20.1, 20.5, 19.8, 21.0, 20.2, 20.7], [21.9, 22.4, 21.5, 22.8, 22.0, 21.7, 22.3]),
    ([random.gauss(100, 10) for _ in range(300)], [random.gauss(100, 10) for _ in range(300)]),
    ([random.gauss(100, 10) for _ in range(300)], [random.gauss(103, 10) for _ in range(300)]),
    ([random.expovariate(1.0) for _ in range(50)], [random.expovariate(0.7) for _ in range(40)]),
    ([round(random.uniform(0, 5)) for _ in range(30)], [round(random.uniform(0, 6)) for _ in range(30)]),
    ([1.5], [2.5, 3.5]),
]
out = ["&["]
for x, y in cases:
    r = mannwhitneyu(x, y, alternative="two-sided", method="asymptotic")
    fx = ", ".join(repr(float(v)) for v in x)
    fy = ", ".join(repr(float(v)) for v in y)
    out.append(f"    (&[{fx}], &[{fy}], {float(r.statistic)!r}, {float(r.pvalue)!r}),")
out.append("]")
path = Path(__file__).resolve().parent.parent / "agent/src/verify/mannwhitney_fixtures.in"
path.write_text("\n".join(out) + "\n")
print(f"wrote {len(cases)} cases to {path}")
