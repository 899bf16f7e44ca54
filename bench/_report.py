"""The table the whole-run benchmarks print: each implementation's median over rounds and its ratio to a baseline."""

from __future__ import annotations

import os
import statistics


def print_medians(title: str, samples: dict[str, list[float]], base: str, unit: str, higher_is_better: bool,
                  digits: int = 3) -> None:  # fmt: skip
    """``samples``: implementation -> one value per round (``unit``); the ratio reads "x faster than ``base``"."""
    reference = statistics.median(samples[base])
    width = max(len(name) for name in samples) + 2
    print(f"\n{title}; load {os.getloadavg()[0]:.2f}")
    print(f"{'implementation':<{width}} {unit:>10} {'vs ' + base:>12}")
    for name, values in samples.items():
        median = statistics.median(values)
        ratio = median / reference if higher_is_better else reference / median
        print(f"{name:<{width}} {median:>10.{digits}f} {ratio:>11.2f}x")
