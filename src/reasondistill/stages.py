"""Pipeline stages: each has a pydantic config (also its CLI options) and a run function."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from pydantic import BaseModel, ConfigDict

from .rundir import RunDir


class StageConfig(BaseModel):
    """Options of one stage; unknown keys are errors, so a typo in a recipe cannot pass silently."""

    model_config = ConfigDict(extra="forbid")

    # Options that change how a step runs but not what it produces (connections, retries, prices):
    # left out of the step's fingerprint, so changing one resumes an interrupted job instead of
    # discarding its finished shards.
    operational: ClassVar[frozenset[str]] = frozenset()

    def identity(self) -> dict:
        """The settings that determine a step's outputs: the options set to other than their defaults
        (so an option added later, at its default, leaves finished steps finished), without the
        operational ones, at any depth (`teacher_server.base_url` too)."""
        return _without_operational(self, self.model_dump(mode="json", exclude_defaults=True))


def _without_operational(model: BaseModel, dumped: dict) -> dict:
    """`dumped` (a dump of `model`) without the operational options of `model` and of the options
    models it holds (nested StageConfigs and lists of them)."""
    kept = {}
    for name, value in dumped.items():
        if name in getattr(model, "operational", ()):
            continue
        attribute = getattr(model, name)
        if isinstance(attribute, BaseModel) and isinstance(value, dict):
            value = _without_operational(attribute, value)
        elif isinstance(attribute, list) and isinstance(value, list) and len(attribute) == len(value):
            value = [
                _without_operational(a, v) if isinstance(a, BaseModel) and isinstance(v, dict) else v
                for a, v in zip(attribute, value, strict=True)
            ]
        kept[name] = value
    return kept


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


def all_stages() -> dict[str, Stage]:
    # Imported here so that `import reasondistill.stages` stays light for the stage modules themselves.
    from .analyze.memorization import STAGE as memorization
    from .analyze.provenance import STAGE as provenance
    from .analyze.trace_stats import STAGE as trace_stats
    from .curate.chunks import STAGE as chunk
    from .curate.decontaminate import STAGE as decontaminate
    from .curate.rewrite import STAGE as rewrite
    from .curate.stage import STAGE as curate
    from .curate.teacher_selection import STAGE as select_teacher
    from .evaluate.stage import STAGE as evaluate
    from .generate.score import STAGE as score
    from .generate.stage import STAGE as generate
    from .report.stage import STAGE as report
    from .tasks.stage import STAGE as problems
    from .train.stage import STAGE as train
    from .verify.stage import STAGE as verify

    stages = (
        problems, generate, score, verify, rewrite, curate, chunk, decontaminate, select_teacher, train, evaluate, report,
        trace_stats, provenance, memorization,
    )  # fmt: skip
    return {s.name: s for s in stages}
