"""`decontaminate`: find training examples that share an n-gram with an evaluation benchmark, and drop them.

What counts as an overlap is curate/decontaminate.py's (`ContaminationCheck`, `BenchmarkIndex`). The
step writes the kept examples to curated/<name> (every example when `drop` is off) and the overlaps
found to decontamination/<name>.json.
"""

from __future__ import annotations

from dataclasses import asdict

from pydantic import Field

from ..curate.decontaminate import BenchmarkIndex, ContaminationCheck, find_overlaps
from ..errors import UserError
from ..records import TrainingExample, atomic_write_json, read_records, write_records
from ..rundir import RunDir
from ..store import training_data, training_data_name, training_data_step
from ..tasks.selection import benchmark_inputs, load_benchmarks
from ..ui import note, progress_bar
from .base import Stage


class DecontaminateConfig(ContaminationCheck):
    name: str = Field(description="output name: curated/<name> and decontamination/<name>.json")
    data: str = Field(
        description="a curated set of this run (curated/<name>), or a .jsonl/.parquet file of training examples"
    )
    drop: bool = Field(True, description="drop the overlapping examples (off: only report them)")


def run_decontaminate(cfg: DecontaminateConfig, run: RunDir, overwrite: bool) -> None:
    data_path, data_fingerprint = training_data(cfg.data, run)
    benchmarks = load_benchmarks(cfg)
    inputs = {"data": data_fingerprint, **benchmark_inputs(benchmarks)}

    def body(_fingerprint: str) -> dict:
        examples = read_records(data_path, TrainingExample)
        if not examples:
            raise UserError(
                f"decontaminate:{cfg.name}: {training_data_name(cfg.data, run, data_path)} holds no examples"
            )
        index = BenchmarkIndex(benchmarks, cfg.ngram, cfg.template_share)
        with progress_bar(f"decontaminate {cfg.name}", total=len(examples), unit="examples") as bar:
            overlaps = find_overlaps(examples, index, cfg.check, progress=bar.advance)
        contaminated = {o.row for o in overlaps}
        kept = [e for row, e in enumerate(examples) if not (cfg.drop and row in contaminated)]
        write_records(run.curated(cfg.name), kept, TrainingExample)
        benchmark_of = {p.id: name for name, ps in benchmarks.items() for p in ps}
        stats = {
            "data": str(data_path),
            "input": len(examples),
            "ngram": cfg.ngram,
            "benchmarks": {name: len(ps) for name, ps in benchmarks.items()},
            "contaminated": len(contaminated),
            "by_benchmark": {
                name: n
                for name in benchmarks
                if (n := len({o.row for o in overlaps if benchmark_of[o.benchmark_problem] == name}))
            },
            "dropped": len(examples) - len(kept),
        }
        atomic_write_json(run.decontamination(cfg.name), {**stats, "overlaps": [asdict(o) for o in overlaps]})
        return stats

    outputs = [run.curated(cfg.name), run.decontamination(cfg.name)]
    stats = run.step(f"curate:{cfg.name}", cfg, inputs, body, outputs=outputs, overwrite=overwrite)["stats"]
    note(
        f"decontaminate:{cfg.name}: {stats['contaminated']} of {stats['input']} examples share a "
        f"{cfg.ngram}-gram with {', '.join(stats['benchmarks'])} {stats['by_benchmark']}; dropped {stats['dropped']}"
    )


STAGE = Stage(
    "decontaminate",
    DecontaminateConfig,
    run_decontaminate,
    "find training examples sharing an n-gram with evaluation benchmarks, and drop them",
    # The cleaned set is a curated set like any other: `train` reads it by name.
    produces=lambda cfg: [f"curate:{cfg.name}"],
    requires=lambda cfg: training_data_step(cfg.data),
)
