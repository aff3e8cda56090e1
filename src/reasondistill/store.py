"""Run-directory storage the stages share: the run's problems, finished traces and teacher log-prob
shards, the graded and curated sets, with the step each comes from, and the analyses' texts and
results (analysis/<name>.json).

Library packages take records, not run directories; the stage adapters read and write through this module.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .analyze.selection import Text, TextSelection, only_tasks, selection_source
from .errors import UserError
from .generate.logprobs import logprobs_file
from .records import GradedTrace, Problem, Trace, TrainingExample, atomic_write_json, read_records
from .rundir import RunDir
from .tasks import TASKS
from .tasks.problem_sets import SetInfo
from .tasks.selection import ProblemSelection

# ---- problems ----------------------------------------------------------------------------------


def run_tasks(run: RunDir) -> list[str]:
    """The tasks the `problems` step of the run wrote."""
    return sorted(p.name for p in (run.root / "problems").glob("*") if p.is_dir())


def load_problems(run: RunDir, selection: ProblemSelection, split: str, *, step: str) -> list[Problem]:
    """Problems of `split` for the selected tasks, in a stable order. An error naming `step` when a task
    named in the selection has none, or when there are none at all (a task left to the default may have
    none: `train_per_task: {logic: 0}` keeps logic for testing)."""
    tasks = selection.tasks or run_tasks(run)
    if not tasks:
        raise UserError(f"{run.root}: no problems; run the `problems` stage first")
    problems = []
    known = run_tasks(run)
    for task in tasks:
        if task not in known and task not in TASKS:
            raise UserError(
                f"{step}: unknown task {task!r}; this run has: {', '.join(known) or 'no problems'}"
            )
        path = run.problems(task, split)
        if not path.exists():
            raise UserError(f"{path}: no {split} problems for task {task!r}; add it to the `problems` stage")
        found = read_records(path, Problem)[: selection.limit]
        if not found and selection.tasks is not None:
            raise _none_in(step, run, [task], split)
        problems.extend(found)
    if not problems:
        raise _none_in(step, run, tasks, split)
    return problems


def _none_in(step: str, run: RunDir, tasks: list[str], split: str) -> UserError:
    files = ", ".join(str(run.problems(task, split).relative_to(run.root)) for task in tasks)
    return UserError(
        f"{step}: {files} {'holds' if len(tasks) == 1 else 'hold'} no {split} problems; "
        f"give the `problems` stage some (its `{split}` option)"
    )


def problem_sets(run: RunDir) -> dict[str, SetInfo]:
    """The problem sets the run's `problems` step wrote (none before it has run), by name."""
    record = run.manifest()["steps"].get("problems")
    sets = (record or {}).get("stats", {}).get("sets", {})
    return {name: SetInfo(info["grader"], info.get("difficulty_label")) for name, info in sets.items()}


def problems_by_id(run: RunDir) -> dict[str, Problem]:
    """Every problem of the run (all tasks and splits), by id: what graded traces are joined with."""
    paths = sorted((run.root / "problems").glob("*/*.parquet"))
    if not paths:
        raise UserError(f"{run.root}: no problems; run the `problems` stage first")
    return {p.id: p for path in paths for p in read_records(path, Problem)}


# ---- traces and teacher log-probs --------------------------------------------------------------


def trace_shards(directory: Path) -> list[Path]:
    """The shard files of a finished `generate` output, in order."""
    index = json.loads((directory / "index.json").read_text())
    return [directory / f"shard-{i:05d}.parquet" for i in sorted(index["finished"])]


def read_traces(directory: Path, problems: dict[str, Problem]) -> list[Trace]:
    """Every trace of a finished `generate` output; a trace of a problem not in `problems` (the run's
    problems by id) is a UserError naming its shard and row."""
    traces = []
    for shard in trace_shards(directory):
        for row, trace in enumerate(read_records(shard, Trace)):
            if trace.problem_id not in problems:
                raise UserError(
                    f"{shard} row {row}: problem_id {trace.problem_id!r} is not a problem of this run"
                )
            traces.append(trace)
    return traces


def logprob_shards(directory: Path) -> list[Path]:
    """The teacher-distribution files beside the traces (generate with logprobs) or of `score`."""
    index = json.loads((directory / "index.json").read_text())
    return [logprobs_file(directory, i) for i in sorted(index["finished"])]


# ---- graded and curated sets --------------------------------------------------------------------

# The steps that write graded/<name>: `verify` (graded teacher traces) and `rewrite` (re-verified
# rewrites of them). Whatever reads a graded set accepts either.
GRADED_BY = ("verify", "rewrite")


def graded_requirement(name: str) -> tuple[str, ...]:
    """The step keys any one of which provides graded/<name> (for a Stage's `requires`)."""
    return tuple(f"{stage}:{name}" for stage in GRADED_BY)


def graded_fingerprint(run: RunDir, name: str) -> str:
    """The fingerprint of the finished step that wrote graded/<name>."""
    steps = run.manifest()["steps"]
    for key in graded_requirement(name):
        if key in steps:
            return steps[key]["fingerprint"]
    raise UserError(f"{run.root}: no graded set {name!r}; run `verify` (or `rewrite`) for it first")


def training_data(data: str, run: RunDir) -> tuple[Path, str]:
    """The file of a set of training examples and its fingerprint: a curated set of the run (with
    its step's fingerprint) or a .jsonl/.parquet file (with its content hash)."""
    if run.curated(data).exists():
        return run.curated(data), run.finished_step(f"curate:{data}")["fingerprint"]
    path = Path(data).expanduser()
    if path.suffix in (".jsonl", ".parquet") and path.exists():
        return path, hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    raise UserError(
        f"training data {data!r}: not a curated set of {run.root} nor an existing .jsonl/.parquet file"
    )


def training_data_name(data: str, run: RunDir, path: Path) -> str:
    """How messages name a set of training examples: curated/<name>, or the file's path."""
    return f"curated/{data}" if path == run.curated(data) else str(path)


def training_data_step(data: str) -> dict[str, str]:
    """What a stage reading `data` requires: the step that curates it, unless it is a file."""
    return {} if Path(data).expanduser().is_file() else {"data": f"curate:{data}"}


@dataclass(frozen=True)
class TraceSet:
    """A set of finished traces a stage reads: a graded set (graded/<name>: GradedTrace rows, with
    labels) or a set of training examples (curated/<name> of the run, or a .jsonl/.parquet file:
    TrainingExample rows, without labels)."""

    kind: Literal["graded", "curated"]
    path: Path
    description: str  # how messages name it: graded/<name>, curated/<name>, or the file's path
    fingerprint: str  # of the step that wrote it, or the file's content hash

    def read(self) -> list[GradedTrace] | list[TrainingExample]:
        return read_records(self.path, GradedTrace if self.kind == "graded" else TrainingExample)


def trace_set(run: RunDir, *, traces: str | None = None, data: str | None = None) -> TraceSet:
    """The graded set `traces` or the set of training examples `data` (give exactly one); a UserError
    when the run has no such set. Its rows are read by `.read()`, so that a step can take the
    fingerprint for its inputs first and read the rows only when it runs."""
    if (traces is None) == (data is None):
        raise UserError("give either traces (a graded set) or data (a curated set or file)")
    if traces is not None:
        return TraceSet("graded", run.graded(traces), f"graded/{traces}", graded_fingerprint(run, traces))
    path, fingerprint = training_data(data, run)
    return TraceSet("curated", path, training_data_name(data, run, path), fingerprint)


# ---- analyses: the texts they read, the results they write ------------------------------------


def selection_requirements(
    sel: TextSelection, default_eval_model: str | None = None
) -> dict[str, str | tuple[str, ...]]:
    """The step that writes the selected texts, for a Stage's `requires`."""
    if sel.traces is None and sel.data is None and sel.eval_model is None and default_eval_model is None:
        return {}
    kind, name = selection_source(sel, default_eval_model)
    if kind == "graded":
        return {"traces": graded_requirement(name)}
    if kind == "curated":
        return training_data_step(name)
    return {"eval_model": f"eval:{name}"}


def load_texts(
    sel: TextSelection, run: RunDir, step: str, default_eval_model: str | None = None
) -> tuple[list[Text], str, str]:
    """The selected texts, a description of where they come from, and that input's fingerprint; an
    error naming `step` and the set when none are selected."""
    kind, name = selection_source(sel, default_eval_model)
    if kind == "eval":
        fingerprint = run.finished_step(f"eval:{name}")["fingerprint"]
        files = sorted(run.eval_dir(name).glob(f"*.{sel.decoding}.parquet"))
        if not files:
            raise UserError(f"{run.eval_dir(name)}: no {sel.decoding} evaluation completions")
        texts = [Text.from_graded(t) for path in files for t in read_records(path, GradedTrace)]
        description = f"eval/{name} ({sel.decoding})"
    else:
        found = trace_set(run, traces=name) if kind == "graded" else trace_set(run, data=name)
        to_text = Text.from_graded if found.kind == "graded" else Text.from_example
        texts = [to_text(row) for row in found.read()]
        description, fingerprint = found.description, found.fingerprint
    texts = only_tasks(texts, sel.tasks, sel.limit, f"{step}: {description}")
    return texts, description, fingerprint


def write_analysis(run: RunDir, name: str, kind: str, result: dict) -> None:
    """analysis/<name>.json, refusing to replace another kind of analysis of the same name."""
    path = run.analysis(name)
    if path.exists():
        try:
            previous = json.loads(path.read_text()).get("kind")
        except (json.JSONDecodeError, AttributeError):
            previous = None
        if previous not in (None, kind):
            raise UserError(f"{path}: holds a {previous} analysis; give this {kind} analysis another name")
    atomic_write_json(path, {"kind": kind, "name": name, **result})


def analyses(run: RunDir, kind: str) -> list[dict]:
    """Every analysis/<name>.json of this kind in the run, by name."""
    found = []
    for path in sorted((run.root / "analysis").glob("*.json")):
        try:
            result = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        if isinstance(result, dict) and result.get("kind") == kind:
            found.append(result)
    return found
