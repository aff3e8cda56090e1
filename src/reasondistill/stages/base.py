"""What a stage is: its options model, its run function, and what it reads and writes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..config import StageConfig
from ..processes import alone, on_main, world_size
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
    # Runs in every process of a job started by `accelerate launch` / torchrun (training); any other
    # stage runs on process 0 while the others wait (see processes.py).
    distributed: bool = False

    def run_in_job(self, config: StageConfig, run: RunDir, overwrite: bool) -> None:
        """Run a step of this stage in a job of one process or several."""
        if self.distributed:
            self.run(config, run, overwrite)
        else:
            on_main(lambda: self._run_alone(config, run, overwrite), f"{self.name} step")

    def _run_alone(self, config: StageConfig, run: RunDir, overwrite: bool) -> None:
        if world_size() == 1:
            self.run(config, run, overwrite)
        else:
            with alone():
                self.run(config, run, overwrite)
