"""`train`: train a student on a curated set (or a file of training examples) with an objective."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from ..curate.stage import training_data, training_data_step
from ..errors import UserError
from ..generate.logprobs import read_logprobs
from ..generate.stage import logprob_shards
from ..modelref import required_steps, resolve_model
from ..objectives import make_objective
from ..records import PairExample, TrainingExample, read_records
from ..rundir import RunDir
from ..stages import Stage, StageConfig
from ..ui import note
from .trainer import Hyperparameters, Teachers, missing_inputs, train_model


class TrainConfig(StageConfig, Hyperparameters):
    name: str = Field(description="output model name: checkpoints/<name>")
    init: str = Field(
        description="starting weights: testbed:student, a model trained in this run, a model folder or a Hub id"
    )
    data: str = Field(
        description="a curated set of this run (curated/<name>), or a .jsonl/.parquet file of training examples"
    )
    teacher: str | None = Field(
        None, description="online teacher for token-level objectives: a model reference like init"
    )
    teacher_logprobs: str | None = Field(
        None,
        description="stored teacher top-k distributions instead of an online teacher: logprobs/<name> "
        "(score) or the traces of a generate step run with --top-logprobs",
    )
    reference: str | None = Field(
        None,
        description="frozen reference model: DPO's reference policy (default: the init weights), AdaSPEC's draft",
    )

    @model_validator(mode="after")
    def _objective_gets_what_it_needs(self) -> TrainConfig:
        """Checked when a recipe is loaded, not after the steps before this one have run."""
        if self.teacher and self.teacher_logprobs:
            raise ValueError("set teacher (online) or teacher_logprobs (stored), not both")
        try:
            objective = make_objective(self.objective, self.objective_args)
        except UserError as err:
            raise ValueError(str(err)) from None
        problem = missing_inputs(objective, bool(self.teacher or self.teacher_logprobs), bool(self.reference))
        if problem:
            raise ValueError(problem)
        return self


def stored_logprobs_dir(name: str, run: RunDir) -> tuple[Path, str]:
    """The folder of a stored teacher distribution set and the step that wrote it."""
    if run.logprobs(name).is_dir():
        return run.logprobs(name), f"score:{name}"
    if run.traces(name).is_dir() and any(run.traces(name).glob("logprobs-*.parquet")):
        return run.traces(name), f"generate:{name}"
    raise UserError(
        f"teacher_logprobs {name!r}: neither logprobs/{name} (score) nor traces/{name} with stored "
        f"top-k log-probabilities (generate --top-logprobs) in {run.root}"
    )


def run_train(cfg: TrainConfig, run: RunDir, overwrite: bool) -> None:
    init = resolve_model(cfg.init, run)
    data_path, data_fingerprint = training_data(cfg.data, run)
    inputs = {"init": init.fingerprint, "data": data_fingerprint}
    teacher = resolve_model(cfg.teacher, run) if cfg.teacher else None
    reference = resolve_model(cfg.reference, run) if cfg.reference else None
    stored_dir = None
    if teacher:
        inputs["teacher"] = teacher.fingerprint
    if reference:
        inputs["reference"] = reference.fingerprint
    if cfg.teacher_logprobs:
        stored_dir, writer = stored_logprobs_dir(cfg.teacher_logprobs, run)
        inputs["teacher_logprobs"] = run.finished_step(writer)["fingerprint"]

    def body(step_fingerprint: str) -> dict:
        objective = make_objective(cfg.objective, cfg.objective_args)
        examples = read_records(data_path, PairExample if objective.data == "pairs" else TrainingExample)
        teachers = Teachers(
            model=teacher.path if teacher else None,
            reference=reference.path if reference else None,
        )
        if stored_dir is not None:
            teachers.stored = {
                (problem_id, sample_idx): row
                for path in logprob_shards(stored_dir)
                for problem_id, sample_idx, row in read_logprobs(path)
            }
            teachers.stored_source = str(stored_dir)
        hyperparameters = Hyperparameters(**cfg.model_dump(include=set(Hyperparameters.model_fields)))
        note(
            f"train:{cfg.name}: {len(examples)} examples from {data_path}, objective {cfg.objective}, init {cfg.init}"
        )
        return train_model(
            Path(init.path), examples, run.checkpoint(cfg.name), hyperparameters, teachers=teachers,
            description=f"train:{cfg.name}", resume_key=step_fingerprint,
        )  # fmt: skip

    outputs = [run.checkpoint(cfg.name)]
    stats = run.step(f"train:{cfg.name}", cfg, inputs, body, outputs=outputs, overwrite=overwrite)["stats"]
    note(
        f"train:{cfg.name}: {stats['steps']} steps, final loss {stats['loss_curve'][-1][1] if stats['loss_curve'] else stats['train_loss']:.4f}"
    )


STAGE = Stage(
    "train",
    TrainConfig,
    run_train,
    "train a student with a registered objective (default: SFT)",
    produces=lambda cfg: [f"train:{cfg.name}"],
    requires=lambda cfg: {
        **required_steps("init", [cfg.init]),
        **required_steps("teacher", [cfg.teacher] if cfg.teacher else []),
        **required_steps("reference", [cfg.reference] if cfg.reference else []),
        **training_data_step(cfg.data),
        **(
            {"teacher_logprobs": (f"score:{cfg.teacher_logprobs}", f"generate:{cfg.teacher_logprobs}")}
            if cfg.teacher_logprobs
            else {}
        ),
    },
)
