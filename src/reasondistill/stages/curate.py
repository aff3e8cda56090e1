"""`curate`: turn graded traces into a training set, recording what was kept and dropped.

The graded sets named by `traces` go through the curation of curate/pipeline.py (rejection sampling,
the operators, the cap, single examples or pairs); the step writes the records to curated/<name> and
one row per input trace to curation/<name>.parquet saying whether it was kept and, if not, which
operator dropped it and why.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from ..curate.operators import Candidate
from ..curate.pipeline import CurationDecision, CurationOptions, curate_candidates
from ..errors import UserError
from ..records import GradedTrace, PairExample, TrainingExample, read_records, write_records
from ..rundir import RunDir
from ..store import graded_fingerprint, graded_requirement, problems_by_id
from ..ui import note
from .base import Stage


class CurateConfig(CurationOptions):
    name: str = Field(description="output name: curated/<name>")
    traces: list[str] = Field(
        min_length=1,
        description="graded traces to select from (graded/<name>), or several such sets (e.g. two teachers to mix)",
    )

    @field_validator("traces", mode="before")
    @classmethod
    def _one_set(cls, traces):
        return [traces] if isinstance(traces, str) else traces


def load_candidates(cfg: CurateConfig, run: RunDir) -> list[Candidate]:
    """Every trace of the graded sets `cfg.traces`, with its problem; a trace of a problem that is not
    one of the run's is a UserError naming its file and row."""
    problems = problems_by_id(run)
    candidates = []
    for origin in cfg.traces:
        path = run.graded(origin)
        for row, trace in enumerate(read_records(path, GradedTrace)):
            if trace.problem_id not in problems:
                raise UserError(
                    f"{path} row {row}: problem_id {trace.problem_id!r} is not a problem of this run"
                )
            candidates.append(Candidate(trace, origin, problems[trace.problem_id]))
    return candidates


def curate(
    cfg: CurateConfig, run: RunDir
) -> tuple[list[TrainingExample] | list[PairExample], list[CurationDecision], dict]:
    """What the step writes, without running a step: the curated records, the decision on every input
    trace, and the statistics for the manifest."""
    return curate_candidates(cfg, load_candidates(cfg, run), run, one_source=len(cfg.traces) == 1)


def run_curate(cfg: CurateConfig, run: RunDir, overwrite: bool) -> None:
    inputs = {f"graded:{name}": graded_fingerprint(run, name) for name in cfg.traces}
    for op in cfg.ops:
        inputs.update(op.inputs(run))
        inputs.update(
            {f"{option}:{name}": graded_fingerprint(run, name) for option, name in op.graded_sets().items()}
        )

    def body(_fingerprint: str) -> dict:
        records, decisions, stats = curate(cfg, run)
        write_records(run.curated(cfg.name), records, PairExample if cfg.pairs else TrainingExample)
        write_records(run.curation(cfg.name), decisions, CurationDecision)
        return stats

    outputs = [run.curated(cfg.name), run.curation(cfg.name)]
    stats = run.step(f"curate:{cfg.name}", cfg, inputs, body, outputs=outputs, overwrite=overwrite)["stats"]
    steps = ", ".join(f"{s['op']} {s['input']}→{s['kept']}" for s in stats["operators"])
    what = "pairs" if cfg.pairs else "examples"
    note(
        f"curate:{cfg.name}: kept {sum(stats['kept'].values())} {what} from "
        f"{stats['input']} traces ({steps}); dropped {stats['dropped']}"
    )
    if not stats["kept"]:
        note(
            f"[yellow]warning:[/] curate:{cfg.name}: curated/{cfg.name} holds no {what}: {_emptied_by(cfg, stats)}"
        )


def _emptied_by(cfg: CurateConfig, stats: dict) -> str:
    """What left a curated set empty: its input, or the first step of curation that kept nothing."""
    if not stats["input"]:
        sets = ", ".join(f"graded/{name}" for name in cfg.traces)
        return f"{sets} {'holds' if len(cfg.traces) == 1 else 'hold'} no traces"
    step = next(s for s in stats["operators"] if s["input"] and not s["kept"])
    reasons = ", ".join(f"{reason} {count}" for reason, count in step["dropped"].items())
    return f"{step['op']} dropped the last {step['input']} traces ({reasons})"


def _requirements(cfg: CurateConfig) -> dict[str, str | tuple[str, ...]]:
    needs = {
        f"traces[{i}]" if len(cfg.traces) > 1 else "traces": graded_requirement(name)
        for i, name in enumerate(cfg.traces)
    }
    for op in cfg.ops:
        needs.update(op.requires())
        needs.update(
            {f"ops.{op.op}.{option}": graded_requirement(name) for option, name in op.graded_sets().items()}
        )
    return needs


STAGE = Stage(
    "curate",
    CurateConfig,
    run_curate,
    "select graded traces into a training set",
    produces=lambda cfg: [f"curate:{cfg.name}"],
    requires=_requirements,
)
