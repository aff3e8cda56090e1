"""`memorization`: does a model reproduce its training traces verbatim?

For each training example the model reads the prompt and the first `prefix_tokens` completion
tokens and decodes `suffix_tokens` tokens greedily; the example is memorised when they equal the
true next tokens exactly (the protocol, and why `heldout` matters: `analyze.memorization`).

Output analysis/<name>.json: the exact extraction rate and the per-token match rate, overall and
per task, for the training examples and the held-out ones, their difference
(`excess_exact_rate`), and every example with its zlib entropy.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from ..analyze.memorization import extract, summarise_by_task
from ..analyze.selection import only_tasks
from ..modelref import required_steps, resolve_model
from ..models import ModelLoading
from ..records import TrainingExample, read_records
from ..report.tables import number, percent
from ..rundir import RunDir
from ..store import analyses, training_data, training_data_name, training_data_step, write_analysis
from ..ui import note
from .base import Section, Stage

KIND = "memorization"


class MemorizationConfig(ModelLoading):
    name: str = Field("memorization", description="output name: analysis/<name>.json")
    model: str = Field(
        description="the model to test (testbed:…, a model trained in the run, a folder, a Hub id)"
    )
    data: str = Field(
        description="its training examples: a curated set of the run or a .jsonl/.parquet file of them"
    )
    prefix_tokens: int = Field(
        32,
        ge=0,
        description="P: completion tokens given after the prompt (inferred default; the card has 32–50)",
    )
    suffix_tokens: int = Field(
        32, ge=1, description="S: tokens decoded greedily and compared with the true next S tokens"
    )
    heldout: str | None = Field(
        None,
        description="examples the model was not trained on (a curated set or file), tested alike: the "
        "extraction rate that skill alone gives, to compare with",
    )
    tasks: list[str] | None = Field(None, description="only these tasks (default: all)")
    limit: int | None = Field(None, ge=1, description="at most this many examples per task (in file order)")
    batch_size: int = Field(64, ge=1, description="sequences decoded together")

    operational = frozenset({"batch_size"})


def _select(data: str, path: Path, cfg: MemorizationConfig, run: RunDir) -> list[TrainingExample]:
    where = f"{KIND}:{cfg.name}: {training_data_name(data, run, path)}"
    return only_tasks(read_records(path, TrainingExample), cfg.tasks, cfg.limit, where)


def run_memorization(cfg: MemorizationConfig, run: RunDir, overwrite: bool) -> None:
    model = resolve_model(cfg.model, run)
    path, data_fingerprint = training_data(cfg.data, run)
    inputs = {"model": model.fingerprint, "data": data_fingerprint}
    heldout_path = None
    if cfg.heldout is not None:
        heldout_path, inputs["heldout"] = training_data(cfg.heldout, run)

    def body(_fingerprint: str) -> dict:
        from ..generate.hf import HFGenerator

        examples = _select(cfg.data, path, cfg, run)
        heldout_examples = _select(cfg.heldout, heldout_path, cfg, run) if heldout_path is not None else None
        generator = HFGenerator(model.path, batch_size=cfg.batch_size, **cfg.loading())
        records = extract(generator, examples, cfg.prefix_tokens, cfg.suffix_tokens)
        heldout = None
        if heldout_examples is not None:
            heldout = {
                "data": str(heldout_path),
                **summarise_by_task(
                    extract(generator, heldout_examples, cfg.prefix_tokens, cfg.suffix_tokens)
                ),
            }
        generator.close()
        result = {
            "model": {"name": model.name, "path": model.path},
            "data": str(path),
            "prefix_tokens": cfg.prefix_tokens,
            "suffix_tokens": cfg.suffix_tokens,
            **summarise_by_task(records),
            "heldout": heldout,
        }
        trained, skill = result["exact_rate"], heldout["exact_rate"] if heldout else None
        result["excess_exact_rate"] = trained - skill if trained is not None and skill is not None else None
        result["per_example"] = records
        write_analysis(run, cfg.name, KIND, result)
        keys = ("examples", "tested", "too_short", "memorised", "exact_rate", "token_match_rate")
        return {
            **{k: result[k] for k in keys},
            "heldout_exact_rate": skill,
            "excess_exact_rate": result["excess_exact_rate"],
        }

    stats = run.step(
        f"{KIND}:{cfg.name}", cfg, inputs, body, outputs=[run.analysis(cfg.name)], overwrite=overwrite
    )["stats"]
    heldout_note = (
        f"; held-out examples {percent(stats['heldout_exact_rate'])}" if cfg.heldout is not None else ""
    )
    note(
        f"memorization:{cfg.name}: {stats['memorised']} of {stats['tested']} examples extracted "
        f"({percent(stats['exact_rate'])}), per-token match {percent(stats['token_match_rate'])}; "
        f"{stats['too_short']} too short for {cfg.prefix_tokens}+{cfg.suffix_tokens} tokens{heldout_note}"
    )


def report_sections(run: RunDir) -> list[Section]:
    """One table per memorization analysis of the run: extraction by task, with the held-out rate."""
    sections: list[Section] = []
    headers = [
        "task", "examples", "tested", "too short", "memorised (exact)", "per-token match",
        "zlib bytes: memorised / not",
    ]  # fmt: skip
    for result in analyses(run, KIND):
        heldout = result.get("heldout")
        rows = []
        for task, s in [*result["by_task"].items(), ("all", result)]:
            zlib_means = s["mean_zlib_entropy"]
            rows.append(
                [
                    task, str(s["examples"]), str(s["tested"]), str(s["too_short"]), percent(s["exact_rate"]),
                    percent(s["token_match_rate"]),
                    f"{number(zlib_means['memorised'], 0)} / {number(zlib_means['not_memorised'], 0)}",
                ]
            )  # fmt: skip
            if heldout is not None:
                held = heldout if task == "all" else heldout["by_task"].get(task)
                rows[-1].append(f"{percent(held['exact_rate'])} of {held['tested']}" if held else "–")
        heading = (
            f"Memorization of {result['data']} by {result['model']['name']} ({result['name']}): "
            f"prefix {result['prefix_tokens']} tokens, suffix {result['suffix_tokens']}"
        )
        extra = [f"held-out exact ({heldout['data']})"] if heldout is not None else []
        sections.append((heading, ([*headers, *extra], rows)))
    return sections


def _requirements(cfg: MemorizationConfig) -> dict[str, str | tuple[str, ...]]:
    required: dict[str, str | tuple[str, ...]] = {**training_data_step(cfg.data)}
    if cfg.heldout is not None:
        heldout_step = training_data_step(cfg.heldout).get("data")  # none for a file
        if heldout_step is not None:
            required["heldout"] = heldout_step
    return {**required, **required_steps("model", [cfg.model])}


STAGE = Stage(
    KIND,
    MemorizationConfig,
    run_memorization,
    "measure how many training traces a model reproduces verbatim from a prefix",
    produces=lambda cfg: [f"{KIND}:{cfg.name}"],
    requires=_requirements,
    report_sections=report_sections,
)
