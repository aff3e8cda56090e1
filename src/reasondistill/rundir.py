"""The run directory: where every stage reads its inputs and writes its outputs.

    <run>/manifest.json                 provenance: environment, recipe, every finished step
    <run>/problems/<task>/<split>.parquet
    <run>/traces/<name>/shard-*.parquet  + index.json of finished shards (resumable), failures, usage
                         logprobs-*.parquet  the teacher's top-k per token, when asked for
    <run>/logprobs/<name>/logprobs-*.parquet  a teacher's top-k over existing traces (`score`)
    <run>/graded/<name>.parquet
    <run>/curated/<name>.parquet
    <run>/curation/<name>.parquet       what each curation operator kept and dropped, one row per trace
    <run>/decontamination/<name>.json   overlaps with evaluation benchmarks found by `decontaminate`
    <run>/chunks/<name>.parquet         reasoning cut into chunks labelled reasoning / non-reasoning
    <run>/teacher-selection/<name>.json teachers compared by what a student learns from them
    <run>/analysis/<name>.json          provenance, memorization and trace statistics
    <run>/checkpoints/<name>/            a Hub-style model folder
    <run>/eval/<model>/<task>.json       + <task>.<greedy|sampled>.parquet (graded completions)
    <run>/report.md  report.html  figures/

A *step* is one stage producing one named output (`generate:teacher`). Its fingerprint hashes its
configuration and the fingerprints of everything it read, so a rerun with the same settings skips a
finished step (unless one of its output files has gone missing: then it is recomputed), and a rerun
with different settings stops instead of mixing stale and new outputs (`overwrite=True` recomputes it).
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from .config import StageConfig
from .errors import UserError
from .models import trust_remote_code
from .processes import barrier, is_main
from .records import atomic_write_json
from .ui import note

TRACKED_PACKAGES = (
    "reasondistill", "torch", "transformers", "tokenizers", "datasets", "accelerate", "peft", "math-verify", "pyarrow",
)  # fmt: skip


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def environment() -> dict:
    versions = {}
    for package in TRACKED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {"python": sys.version.split()[0], "platform": platform.platform(), "packages": versions}


class RunDir:
    def __init__(self, root: Path | str):
        self.root = Path(root)

    # ---- layout ---------------------------------------------------------------------------------
    def problems(self, task: str, split: str) -> Path:
        return self.root / "problems" / task / f"{split}.parquet"

    def traces(self, name: str) -> Path:
        return self.root / "traces" / name

    def logprobs(self, name: str) -> Path:
        return self.root / "logprobs" / name

    def graded(self, name: str) -> Path:
        return self.root / "graded" / f"{name}.parquet"

    def curated(self, name: str) -> Path:
        return self.root / "curated" / f"{name}.parquet"

    def curation(self, name: str) -> Path:
        return self.root / "curation" / f"{name}.parquet"

    def decontamination(self, name: str) -> Path:
        return self.root / "decontamination" / f"{name}.json"

    def chunks(self, name: str) -> Path:
        return self.root / "chunks" / f"{name}.parquet"

    def teacher_selection(self, name: str) -> Path:
        return self.root / "teacher-selection" / f"{name}.json"

    def analysis(self, name: str) -> Path:
        return self.root / "analysis" / f"{name}.json"

    def checkpoint(self, name: str) -> Path:
        return self.root / "checkpoints" / name

    def eval_dir(self, model: str) -> Path:
        return self.root / "eval" / model

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @contextmanager
    def working(self) -> Iterator[None]:
        """Create the run directory for a command; if the command created it and then fails, leave
        nothing unused behind (`remove_if_unused`)."""
        created = is_main() and not self.root.exists()  # of a job of several processes, process 0 writes
        if is_main():
            self.root.mkdir(parents=True, exist_ok=True)
        try:
            yield
        except BaseException:
            if created:
                self.remove_if_unused()
            raise

    def remove_if_unused(self) -> None:
        """Remove what a failed first command left in a run directory it created: empty folders, a
        manifest without finished steps, and the directory itself if nothing else is in it. Files a
        rerun resumes from (finished shards, checkpoints) are kept, and so is the directory above them."""
        if not self.root.is_dir():
            return
        if self.manifest_path.exists() and not self.manifest().get("steps"):
            self.manifest_path.unlink()
        for folder in sorted((p for p in self.root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            if not any(folder.iterdir()):
                folder.rmdir()
        if not any(self.root.iterdir()):
            self.root.rmdir()

    # ---- manifest -------------------------------------------------------------------------------
    def manifest(self) -> dict:
        if not self.manifest_path.exists():
            return {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "steps": {}}
        try:
            return json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(
                f"{self.manifest_path}: not valid JSON ({err.msg}); the run directory is damaged"
            ) from None

    def update_manifest(self, **fields) -> None:
        manifest = self.manifest()
        manifest.update(fields)
        atomic_write_json(self.manifest_path, manifest)

    def finished_step(self, key: str) -> dict:
        """The manifest record of a finished step that this step reads from."""
        record = self.manifest()["steps"].get(key)
        if record is None:
            stage = key.split(":")[0]
            raise UserError(f"{self.root}: step {key!r} has not run; run the `{stage}` stage first")
        return record

    @staticmethod
    def step_fingerprint(key: str, config: StageConfig, inputs: dict[str, str]) -> str:
        """What `step` compares to decide whether a step must run again (see `step`)."""
        return fingerprint({"key": key, "config": config.identity(), "inputs": inputs})

    def step(
        self,
        key: str,
        config: StageConfig,
        inputs: dict[str, str],
        body: Callable[[str], dict],
        *,
        outputs: Sequence[Path],
        overwrite: bool = False,
        every_process: bool = False,
    ) -> dict:
        """Run `body(fingerprint)` unless this step already finished with the same fingerprint.

        `inputs` maps what the step reads to those inputs' fingerprints. `body` does the work,
        writing `outputs` (files or folders) atomically, and returns statistics for the manifest.

        `every_process`: the step runs in every process of a job (training): each decides from the
        same manifest whether to run it, all run `body`, and process 0 alone records it.
        """
        step_fingerprint = self.step_fingerprint(key, config, inputs)
        previous = self.manifest()["steps"].get(key)
        if previous and previous["fingerprint"] == step_fingerprint:
            missing = [path for path in outputs if not path.exists()]
            if not missing:
                note(f"{key}: finished earlier with the same settings, skipped")
                return {"skipped": True, **previous}
            note(f"{key}: finished earlier, but {missing[0]} is missing; recomputing")
        elif previous and not overwrite:
            changed = _changed_settings(previous, config, inputs)
            raise UserError(
                f"{self.root}: step {key!r} already ran with other settings ({changed}); "
                "pass --overwrite to recompute it, or use another run directory"
            )
        if every_process:
            barrier()  # every process has read the manifest before process 0 can change it
        started = time.time()
        stats = body(step_fingerprint)
        if every_process and not is_main():
            barrier()  # until process 0 has recorded the step, which the next step may read
            return {"skipped": False, "fingerprint": step_fingerprint, "stats": stats}
        record = {
            "fingerprint": step_fingerprint,
            "config": config.model_dump(mode="json"),
            "inputs": inputs,
            "outputs": [str(path.relative_to(self.root)) for path in outputs],
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "seconds": round(time.time() - started, 2),
            "environment": environment(),
            "trust_remote_code": trust_remote_code(),
            "stats": stats,
        }
        manifest = self.manifest()
        manifest["steps"][key] = record
        atomic_write_json(self.manifest_path, manifest)
        if every_process:
            barrier()
        return {"skipped": False, **record}


def _changed_settings(previous: dict, config: StageConfig, inputs: dict) -> str:
    now, before, identity = config.model_dump(mode="json"), previous["config"], config.identity()
    changed = [
        k
        for k in sorted(set(now) | set(before))
        if k not in config.operational
        and now.get(k) != before.get(k)
        and (k in before or k in identity)  # an option added since, at its default, changes nothing
    ]
    changed += [
        f"input {k}"
        for k in sorted(set(inputs) | set(previous["inputs"]))
        if inputs.get(k) != previous["inputs"].get(k)
    ]
    return ", ".join(changed) or "none of its options: it was fingerprinted by an older reasondistill"
