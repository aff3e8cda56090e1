"""Every public benchmark by name, single datasets and suites' members alike, and the suites."""

from __future__ import annotations

from .benchmarks import SINGLE_BENCHMARKS, Benchmark
from .logiglue import LOGIGLUE, SUITES

BENCHMARKS: dict[str, Benchmark] = {**SINGLE_BENCHMARKS, **LOGIGLUE}


def expand_suites(names: list[str]) -> list[str]:
    """Benchmark names with each suite (`logiglue`, `logiglue-in-domain`, …) replaced by its
    benchmarks, in order, each once."""
    expanded = [member for name in names for member in SUITES.get(name, (name,))]
    return list(dict.fromkeys(expanded))
