"""Where curated and graded sets live, and how a step that reads one names and fingerprints it."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import UserError
from ..rundir import RunDir

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
