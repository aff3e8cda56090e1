"""What a stage is: its options model, its run function, and what it reads and writes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..config import StageConfig
from ..report.tables import Section, Table
from ..rundir import RunDir

__all__ = ["Section", "Stage", "Table"]


@dataclass(frozen=True)
class Stage:
    name: str
    config: type[StageConfig]
    run: Callable[[StageConfig, RunDir, bool], None]  # (config, run directory, overwrite)
    summary: str
    # The step keys a configuration writes, and the ones it reads ({option: step key}): a recipe is
    # checked with them before anything runs, so a typo fails in a second, not after an hour of work.
    produces: Callable[[StageConfig], list[str]] = lambda cfg: []
    # option -> the step it needs, or a tuple of steps any one of which will do
    requires: Callable[[StageConfig], dict[str, str | tuple[str, ...]]] = lambda cfg: {}
    default_run_dir: str | None = (
        None  # for a stage that is often run alone (eval); else --run-dir is required
    )
    # The report's sections about this stage's results in a run (the report stage renders every
    # stage's, in registry order); None for a stage the report covers in its own tables.
    report_sections: Callable[[RunDir], list[Section]] | None = None
