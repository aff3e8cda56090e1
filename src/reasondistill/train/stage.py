"""`train`: train a student on a curated set (or a file of training examples) with an objective."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from ..curate.stage import training_data, training_data_step
from ..modelref import required_steps, resolve_model
from ..records import TrainingExample, read_records
from ..rundir import RunDir
from ..stages import Stage, StageConfig
from ..ui import note
from .trainer import Hyperparameters, train_model


class TrainConfig(StageConfig, Hyperparameters):
    name: str = Field(description="output model name: checkpoints/<name>")
    init: str = Field(
        description="starting weights: testbed:student, a model trained in this run, a model folder or a Hub id"
    )
    data: str = Field(
        description="a curated set of this run (curated/<name>), or a .jsonl/.parquet file of training examples"
    )


def run_train(cfg: TrainConfig, run: RunDir, overwrite: bool) -> None:
    init = resolve_model(cfg.init, run)
    data_path, data_fingerprint = training_data(cfg.data, run)
    inputs = {"init": init.fingerprint, "data": data_fingerprint}

    def body(step_fingerprint: str) -> dict:
        examples = read_records(data_path, TrainingExample)
        hyperparameters = Hyperparameters(**cfg.model_dump(include=set(Hyperparameters.model_fields)))
        note(
            f"train:{cfg.name}: {len(examples)} examples from {data_path}, objective {cfg.objective}, init {cfg.init}"
        )
        return train_model(
            Path(init.path), examples, run.checkpoint(cfg.name), hyperparameters,
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
        **training_data_step(cfg.data),
    },
)
