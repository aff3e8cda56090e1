"""`train`: train a student on a curated set (or a file of training examples) with an objective."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from ..errors import UserError
from ..generate.backends import BackendOptions, open_generator
from ..modelref import backend_model, backend_requirements, required_steps, resolve_model
from ..records import PairExample, TrainingExample, read_records
from ..rundir import RunDir
from ..store import (
    load_problems,
    logprob_shards,
    problem_sets,
    problems_by_id,
    run_tasks,
    training_data,
    training_data_name,
    training_data_step,
)
from ..tasks.selection import GraderChoice, ProblemSelection
from ..train.hyperparameters import Hyperparameters, missing_inputs
from ..train.lora import LoraOptions
from ..train.on_policy_options import TEACHER_SELF, OnPolicyOptions, on_policy_problem
from ..ui import note
from .base import Stage

PROBLEMS_DATA = "problems"  # `data: problems`: the run's train problems as on-policy prompts


class ServedTeacher(BackendOptions):
    """`train.teacher_server`: a teacher behind a generation backend, asked for its top-k over each sample."""

    model: str = Field(
        description="the teacher, as for generate (for openai: the name the server knows it by)"
    )
    top_k: int = Field(20, ge=1, le=1024, description="teacher tokens returned per sampled position")
    batch_size: int = Field(16, ge=1, description="sequences scored together (hf)")


class TrainConfig(GraderChoice, Hyperparameters):
    operational = frozenset({"report_to"})  # where the logs go, not what is trained

    name: str = Field(description="output model name: checkpoints/<name>")
    lora: LoraOptions | None = Field(
        None,
        description="train LoRA adapters on the student instead of all its weights: r, alpha, dropout, "
        "target_modules, merge (save merged full weights instead of an adapter folder)",
    )
    packing: bool = Field(
        False,
        description="pack each micro-batch's examples into one row without padding, attention kept within "
        "each example (token-level objectives on given completions; flash-attention varlen with "
        "attn_implementation flash_attention_2)",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="recompute the student's activations in the backward pass: less memory, one more forward pass of time",
    )
    torch_compile: bool = Field(False, description="compile the student with torch.compile")
    report_to: list[str] = Field(
        default_factory=list,
        description="experiment trackers, as transformers names them (tensorboard, wandb, mlflow, trackio, …): "
        "the step is the run name; tensorboard writes to the run's tensorboard/<name>, the others where "
        "their own settings say",
    )
    init: str = Field(
        description="starting weights: testbed:student, a model trained in this run, a model folder or a Hub id"
    )
    data: str = Field(
        description="a curated set of this run (curated/<name>), a .jsonl/.parquet file of training examples, "
        "or `problems`: the run's train problems as prompts (on-policy, their gold solutions for off-policy steps)"
    )
    teacher: str | None = Field(
        None,
        description="online teacher for token-level objectives: a model reference like init, or `self` "
        "(on-policy: the student's current weights, as in OPSD)",
    )
    teacher_server: ServedTeacher | None = Field(
        None, description="on-policy: a teacher served by a generation backend instead of an online one"
    )
    on_policy: OnPolicyOptions | None = Field(
        None, description="train on the student's own samples (GKD, OPSD, GRPO/KDRL, quality-gated)"
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
        if sum(map(bool, (self.teacher, self.teacher_logprobs, self.teacher_server))) > 1:
            raise ValueError("set one of teacher (online), teacher_logprobs (stored) or teacher_server")
        if self.teacher_server and not self.on_policy:
            raise ValueError("teacher_server scores the student's samples: it needs on_policy")
        if self.data == PROBLEMS_DATA and (not self.on_policy or self.on_policy.fraction < 1):
            raise ValueError("data `problems` gives prompts only: set on_policy with fraction 1")
        objective = self.objective_spec
        has_teacher = bool(self.teacher or self.teacher_logprobs or self.teacher_server)
        problem = missing_inputs(objective, has_teacher, bool(self.reference)) or on_policy_problem(
            objective, self.on_policy, self.teacher == TEACHER_SELF
        )
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


def read_examples(cfg: TrainConfig, run: RunDir, data_path: Path | None) -> list:
    """The training examples: a curated set or file, or the run's train problems with their gold solutions."""
    if data_path is not None:
        pairs = cfg.objective_spec.data == "pairs"
        return read_records(data_path, PairExample if pairs else TrainingExample)
    return [
        TrainingExample(
            problem_id=p.id, task=p.task, messages=p.messages, completion=p.solution or "", sample_idx=0
        )
        for p in load_problems(run, ProblemSelection(), "train", step=f"train:{cfg.name}")
    ]


def run_train(cfg: TrainConfig, run: RunDir, overwrite: bool) -> None:
    cfg.bind_sets(problem_sets(run))  # the graders of the run's problem sets
    init = resolve_model(cfg.init, run)
    if cfg.data == PROBLEMS_DATA:
        data_path, data_fingerprint = None, run.finished_step("problems")["fingerprint"]
    else:
        data_path, data_fingerprint = training_data(cfg.data, run)
    inputs = {"init": init.fingerprint, "data": data_fingerprint}
    if cfg.on_policy:
        # samples are graded against the problems, and the graders' versions shape the rewards
        inputs["problems"] = run.finished_step("problems")["fingerprint"]
        inputs["graders"] = {task: cfg.grader_for(task).id for task in run_tasks(run)}
    served = backend_model(cfg.teacher_server, cfg.teacher_server.model, run) if cfg.teacher_server else None
    if served:
        inputs["teacher_server"] = served.fingerprint
    teacher = resolve_model(cfg.teacher, run) if cfg.teacher and cfg.teacher != TEACHER_SELF else None
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
        from ..train.stored_teacher import StoredTeacher  # imports torch
        from ..train.trainer import Efficiency, Teachers, train_model  # imports torch and transformers

        examples = read_examples(cfg, run, data_path)
        if not examples:  # (the train problems are checked by load_problems)
            raise UserError(
                f"train:{cfg.name}: {training_data_name(cfg.data, run, data_path)} holds no examples"
            )
        teachers = Teachers(
            model=teacher.path if teacher else cfg.teacher,
            reference=reference.path if reference else None,
        )
        if stored_dir is not None:
            teachers.stored = StoredTeacher.from_files(logprob_shards(stored_dir), str(stored_dir))
        hyperparameters = Hyperparameters(**cfg.model_dump(include=set(Hyperparameters.model_fields)))
        note(
            f"train:{cfg.name}: {len(examples)} examples from {data_path or 'the train problems'}, "
            f"objective {cfg.objective}{' on-policy' if cfg.on_policy else ''}, init {cfg.init}"
        )
        if served:
            teachers.scorer = open_generator(
                cfg.teacher_server, served.path, cfg.teacher_server.batch_size, cfg.teacher_server.top_k
            )
            teachers.scorer_top_k = cfg.teacher_server.top_k
        try:
            return train_model(
                Path(init.path), examples, run.checkpoint(cfg.name), hyperparameters, teachers=teachers,
                on_policy=cfg.on_policy, problems=problems_by_id(run) if cfg.on_policy else None,
                grader_for=cfg.grader_for, description=f"train:{cfg.name}", resume_key=step_fingerprint,
                report_to=cfg.report_to, logging_dir=run.root / "tensorboard" / cfg.name, lora=cfg.lora,
                efficiency=Efficiency(
                    packing=cfg.packing, gradient_checkpointing=cfg.gradient_checkpointing,
                    torch_compile=cfg.torch_compile,
                ),
            )  # fmt: skip
        finally:
            if teachers.scorer is not None:
                teachers.scorer.close()

    outputs = [run.checkpoint(cfg.name)]
    stats = run.step(
        f"train:{cfg.name}", cfg, inputs, body, outputs=outputs, overwrite=overwrite, every_process=True
    )["stats"]
    note(
        f"train:{cfg.name}: {stats['steps']} steps, final loss {stats['loss_curve'][-1][1] if stats['loss_curve'] else stats['train_loss']:.4f}"
    )


STAGE = Stage(
    "train",
    TrainConfig,
    run_train,
    "train a student with a registered objective (default: SFT); under `accelerate launch` or torchrun, "
    "in every process",
    distributed=True,
    produces=lambda cfg: [f"train:{cfg.name}"],
    requires=lambda cfg: {
        **required_steps("init", [cfg.init]),
        **required_steps("teacher", [cfg.teacher] if cfg.teacher and cfg.teacher != TEACHER_SELF else []),
        **(backend_requirements(cfg.teacher_server, cfg.teacher_server.model) if cfg.teacher_server else {}),
        **({"problems": "problems"} if cfg.on_policy else {}),
        **required_steps("reference", [cfg.reference] if cfg.reference else []),
        **(training_data_step(cfg.data) if cfg.data != PROBLEMS_DATA else {}),
        **(
            {"teacher_logprobs": (f"score:{cfg.teacher_logprobs}", f"generate:{cfg.teacher_logprobs}")}
            if cfg.teacher_logprobs
            else {}
        ),
    },
)
