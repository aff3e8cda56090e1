"""Recipes: a YAML list of stage steps run in order against one run directory.

    description: what this recipe shows
    run_dir: runs/demo          # relative to the current directory
    seed: 0                     # default `seed` of every step that has one and does not set it
    defaults:                   # options of every step of a stage, unless the step sets them
      train: {init: "testbed:student", epochs: 2.5}
    steps:
      - problems: {tasks: [arithmetic], train: 200, test: 100}
      - generate: {model: "testbed:teacher", n: 4, temperature: 0.8}
      - ...

Everything is validated before the first step runs: unknown keys, wrong types, unknown stages, and
inputs that no earlier step makes and the run directory does not hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .config import StageConfig
from .errors import UserError, describe_validation_error
from .models import remote_code_allowed_if
from .processes import on_main
from .records import read_text_utf8
from .rundir import RunDir
from .stages import Stage, all_stages
from .ui import note


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str = ""
    run_dir: str = Field(description="run directory, relative to the current directory")
    seed: int | None = Field(None, description="default seed for steps that do not set one")
    trust_remote_code: bool = Field(
        False, description="run Python code shipped with models (auto_map); as --trust-remote-code"
    )
    defaults: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per stage name, options its steps start from"
    )
    steps: list[Any] = Field(min_length=1)


@dataclass(frozen=True)
class Step:
    stage: Stage
    config: StageConfig
    where: str  # "recipe.yaml: steps[3].train", for error messages


def load_recipe(path: Path) -> tuple[Recipe, list[Step]]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(read_text_utf8(path))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}: invalid YAML{line}: {getattr(err, 'problem', err)}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping with run_dir and steps, got {type(raw).__name__}")
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        raise UserError(describe_validation_error(err, str(path))) from None

    stages = all_stages()
    unknown = sorted(recipe.defaults.keys() - stages.keys())
    if unknown:
        raise UserError(f"{path}: defaults.{unknown[0]}: unknown stage; stages: {', '.join(stages)}")
    steps = []
    for i, entry in enumerate(recipe.steps):
        where = f"{path}: steps[{i}]"
        if not isinstance(entry, dict) or len(entry) != 1:
            raise UserError(
                f"{where}: expected one stage name with its options, e.g. `- generate: {{model: ...}}`"
            )
        ((name, options),) = entry.items()
        if name not in stages:
            raise UserError(f"{where}: unknown stage {name!r}; stages: {', '.join(stages)}")
        if not isinstance(options or {}, dict):
            raise UserError(f"{where}.{name}: expected a mapping of options, got {options!r}")
        options = {**recipe.defaults.get(name, {}), **(options or {})}
        stage = stages[name]
        if recipe.seed is not None and "seed" in stage.config.model_fields:
            options.setdefault("seed", recipe.seed)
        try:
            config = stage.config.model_validate(options)
        except ValidationError as err:
            raise UserError(describe_validation_error(err, f"{where}.{name}")) from None
        steps.append(Step(stage, config, f"{where}.{name}"))
    return recipe, steps


def check_references(steps: list[Step], run: RunDir) -> None:
    """Every input of every step is made by an earlier step or already finished in the run directory."""
    available = set(run.manifest()["steps"])
    for step in steps:
        try:
            requires = step.stage.requires(step.config)  # also checks the models it names (required_steps)
        except UserError as err:
            raise UserError(f"{step.where}.{err}") from None
        for option, keys in requires.items():
            alternatives = keys if isinstance(keys, tuple) else (keys,)  # any one of them will do
            if not available.intersection(alternatives):
                made_by = " or ".join(
                    f"{'an' if kind[0] in 'aeiou' else 'a'} `{kind}` step"
                    + (f" named {name!r}" if name else "")
                    for kind, _, name in (key.partition(":") for key in alternatives)
                )
                raise UserError(
                    f"{step.where}.{option}: needs {made_by}, which no earlier step makes and {run.root} does not hold"
                )
        available.update(step.stage.produces(step.config))


def run_recipe(path: Path, run_dir: Path | None = None, overwrite: bool = False) -> RunDir:
    """Run a recipe's steps in order; an error in a step names the recipe file and the step."""
    recipe, steps = load_recipe(path)
    run = RunDir(run_dir or recipe.run_dir)
    with remote_code_allowed_if(recipe.trust_remote_code):
        check_references(steps, run)
        with run.working():
            content = Path(path).read_text()
            on_main(lambda: run.update_manifest(recipe={"path": str(path), "content": content}), "recipe")
            for i, step in enumerate(steps, start=1):
                note(f"[bold]step {i}/{len(steps)}: {step.stage.name}[/bold]")
                try:
                    step.stage.run_in_job(step.config, run, overwrite)
                except UserError as err:
                    raise UserError(f"{step.where}: {err}") from None
    return run
