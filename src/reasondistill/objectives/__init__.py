"""Training objectives by name; a recipe's `train.objective` picks one, `train.objective_args` sets it.

Two halves, so that a recipe is checked without torch:

* options.py: one pydantic options model per objective (validated, with help text), `ObjectiveSpec`
  (their union, discriminated by `name`), `parse_objective` (recipe form → spec) and
  `describe_objectives` (help text). Pydantic only.
* the losses: small pure functions (`divergences`, and one module per family: `kd`, `selective`,
  `sequence`, `preference`, `self_distill`, `policy`) and, for each objective, a subclass of its
  options model (`base.Objective`) whose `__call__` maps those functions over the completion
  positions of a batch and reduces them. `build_objective(spec)` imports them (and torch).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import IMPLEMENTATIONS, Objective  # Objective: what build_objective returns
from .options import OBJECTIVES, ObjectiveOptions, ObjectiveSpec, describe_objectives, parse_objective

__all__ = [
    "OBJECTIVES",
    "Objective",
    "ObjectiveOptions",
    "ObjectiveSpec",
    "build_objective",
    "describe_objectives",
    "make_objective",
    "parse_objective",
]


def build_objective(spec: ObjectiveOptions) -> Objective:
    """The objective `spec` describes, ready to compute losses (this imports torch)."""
    from . import kd, policy, preference, selective, self_distill, sequence  # noqa: F401  (@register them)

    return IMPLEMENTATIONS[spec.name](**dict(spec))


def make_objective(name: str, options: Mapping[str, Any] | None = None) -> Objective:
    """The objective `name` with `options` (a recipe's objective_args), or a one-line UserError naming
    the unknown name or the bad option."""
    return build_objective(parse_objective(name, options))
