import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from reasondistill.errors import UserError
from reasondistill.recipe import check_references, load_recipe
from reasondistill.rundir import RunDir

VALID_STEPS = """
steps:
  - problems: {tasks: [arithmetic], train: 4, test: 2}
  - generate: {model: "testbed:teacher", name: teacher, n: 2}
  - verify: {traces: teacher}
  - curate: {name: distill, traces: teacher}
  - decontaminate: {name: distill-clean, data: distill, benchmarks: [gsm8k], data_file: [gsm8k.jsonl]}
  - train: {name: student, init: "testbed:student", data: distill-clean}
  - eval: {models: ["testbed:teacher", student]}
  - eval: {model: [student], benchmarks: [gsm8k, math500], data_file: [gsm8k=a.jsonl, math500=b.jsonl], n: 8}
  - report: {}
"""


def write(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def error_of(tmp_path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(UserError) as err:
        _, steps = load_recipe(path)
        check_references(steps, RunDir(tmp_path / "run"))
    message = str(err.value)
    assert "\n" not in message
    return message.replace(str(path), "recipe.yaml")


def test_a_valid_recipe_loads_and_the_recipe_seed_fills_in_step_seeds(tmp_path):
    recipe, steps = load_recipe(write(tmp_path, "run_dir: r\nseed: 3\n" + VALID_STEPS))
    assert [s.stage.name for s in steps] == [
        "problems",
        "generate",
        "verify",
        "curate",
        "decontaminate",
        "train",
        "eval",
        "eval",
        "report",
    ]
    assert steps[1].config.seed == 3 and steps[5].config.seed == 3
    assert steps[7].config.data_files() == {"gsm8k": "a.jsonl", "math500": "b.jsonl"}
    check_references(steps, RunDir(tmp_path / "run"))


def test_a_benchmark_only_eval_needs_no_problems_step(tmp_path):
    recipe = 'run_dir: r\nsteps:\n  - eval: {models: ["testbed:student"], benchmarks: [aime24]}\n'
    _, steps = load_recipe(write(tmp_path, recipe))
    check_references(steps, RunDir(tmp_path / "run"))
    with_tasks = recipe.replace("benchmarks: [aime24]", "benchmarks: [aime24], tasks: [logic]")
    assert "eval.problems: needs a `problems` step" in error_of(tmp_path, with_tasks)


@pytest.mark.parametrize(
    "recipe, expected",
    [
        ("run_dir: r\nsteps: []\n", "recipe.yaml: steps: List should have at least 1 item"),
        ("rundir: r\n" + VALID_STEPS, "recipe.yaml: rundir: unknown key"),
        (
            "run_dir: r\nsteps:\n  - generate: {model: m, temprature: 0.8}\n",
            "recipe.yaml: steps[0].generate: temprature: unknown key",
        ),
        (
            "run_dir: r\nsteps:\n  - generate: {model: m, n: four}\n",
            "recipe.yaml: steps[0].generate: n: Input should be a valid integer",
        ),
        (
            "run_dir: r\nsteps:\n  - generate: {n: 2}\n",
            "recipe.yaml: steps[0].generate: model: missing required key",
        ),
        ("run_dir: r\nsteps:\n  - distill: {}\n", "recipe.yaml: steps[0]: unknown stage 'distill'"),
        (
            "run_dir: r\nsteps:\n  - verify: {traces: t}\n    curate: {}\n",
            "recipe.yaml: steps[0]: expected one stage name",
        ),
        ("run_dir: r\nsteps: [\n", "recipe.yaml: invalid YAML at line"),
        (
            "run_dir: r\nsteps:\n  - train: {name: s, init: 'testbed:student', data: missing.jsonl}\n",
            "recipe.yaml: steps[0].train.data: needs a `curate` step named 'missing.jsonl'",
        ),
        (
            "run_dir: r\nsteps:\n  - eval: {models: [student]}\n",
            "recipe.yaml: steps[0].eval.problems: needs a `problems` step",
        ),
        (
            "run_dir: r\nsteps:\n  - problems: {}\n  - eval: {models: ['testbed:teacher', student]}\n",
            "recipe.yaml: steps[1].eval.models[1]: needs a `train` step named 'student'",
        ),
        (
            "run_dir: r\nsteps:\n  - train: {name: s, init: i, data: d.jsonl, objective: kl}\n",
            "recipe.yaml: steps[0].train: Value error, unknown objective 'kl'; known objectives: ",
        ),
        (
            "run_dir: r\nsteps:\n  - train: {name: s, init: i, data: d.jsonl, objective: jsd, "
            "objective_args: {beta: 2}, teacher: t}\n",
            "recipe.yaml: steps[0].train: Value error, objective jsd: objective_args.beta: "
            "Input should be less than or equal to 1",
        ),
        (
            "run_dir: r\nsteps:\n  - train: {name: s, init: i, data: d.jsonl, objective: reverse_kl}\n",
            "recipe.yaml: steps[0].train: Value error, objective 'reverse_kl' needs a teacher",
        ),
        (
            "run_dir: r\nsteps:\n  - train: {name: s, init: i, data: d.jsonl, teacher: t}\n",
            "recipe.yaml: steps[0].train: Value error, objective 'sft' does not use a teacher",
        ),
        (
            "run_dir: r\nsteps:\n  - train: {name: s, init: i, data: d.jsonl, objective: adaspec, teacher: t}\n",
            "recipe.yaml: steps[0].train: Value error, objective 'adaspec' needs a reference model",
        ),
        (
            "run_dir: r\ndefaults: {training: {}}\nsteps:\n  - problems: {}\n",
            "recipe.yaml: defaults.training: unknown stage",
        ),
    ],
)
def test_malformed_recipes_fail_before_anything_runs_with_one_line(tmp_path, recipe, expected):
    assert error_of(tmp_path, recipe).startswith(expected)


def test_a_missing_recipe_file(tmp_path):
    with pytest.raises(UserError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_the_cli_prints_one_line_and_no_traceback_unless_debug(tmp_path):
    path = write(tmp_path, "run_dir: r\nsteps:\n  - generate: {model: m, temprature: 0.8}\n")
    command = [sys.executable, "-m", "reasondistill.cli", "run", str(path)]
    quiet = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert quiet.returncode == 2
    assert quiet.stderr.strip() == f"error: {path}: steps[0].generate: temprature: unknown key"
    assert "Traceback" not in quiet.stderr
    loud = subprocess.run(
        [sys.executable, "-m", "reasondistill.cli", "--debug", *command[3:]],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert loud.returncode != 0 and "Traceback" in loud.stderr and "UserError" in loud.stderr


def test_the_packaged_demo_recipe_is_valid_and_trains_both_students_alike(tmp_path):
    from importlib import resources

    with resources.as_file(resources.files("reasondistill") / "recipes" / "demo.yaml") as path:
        recipe, steps = load_recipe(path)
    check_references(steps, RunDir(tmp_path / "run"))
    distilled, answer_only = (s.config for s in steps if s.stage.name == "train")
    assert distilled.data == "distill" and answer_only.data == "answer-only"
    differing = {k for k, v in distilled.model_dump().items() if answer_only.model_dump()[k] != v}
    assert differing == {"name", "data"}  # the baseline differs only in what it learns from


def test_recipe_defaults_fill_in_what_a_step_does_not_set(tmp_path):
    recipe = (
        "run_dir: r\ndefaults: {train: {init: 'testbed:student', learning_rate: 0.003}}\nsteps:\n"
        "  - train: {name: a, data: a.jsonl}\n  - train: {name: b, data: b.jsonl, learning_rate: 0.1}\n"
    )
    _, steps = load_recipe(write(tmp_path, recipe))
    assert [(s.config.init, s.config.learning_rate) for s in steps] == [
        ("testbed:student", 0.003),
        ("testbed:student", 0.1),
    ]


def packaged_recipes():
    from importlib import resources

    folder = resources.files("reasondistill") / "recipes"
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".yaml"))


@pytest.mark.parametrize("name", packaged_recipes())
def test_every_packaged_recipe_is_valid(tmp_path, name):
    from importlib import resources

    with resources.as_file(resources.files("reasondistill") / "recipes" / name) as path:
        _, steps = load_recipe(path)
    check_references(steps, RunDir(tmp_path / "run"))


def test_every_objective_has_a_packaged_recipe():
    from importlib import resources

    from reasondistill.objectives import OBJECTIVES

    used = set()
    for name in packaged_recipes():
        with resources.as_file(resources.files("reasondistill") / "recipes" / name) as path:
            used |= {s.config.objective for s in load_recipe(path)[1] if s.stage.name == "train"}
    assert used == set(OBJECTIVES)


def test_a_packaged_recipe_runs_by_name(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import reasondistill.recipe
    from reasondistill.cli import cli

    ran = []
    monkeypatch.setattr(
        reasondistill.recipe, "run_recipe", lambda path, *_: ran.append(Path(path).read_text())
    )
    monkeypatch.chdir(tmp_path)
    assert CliRunner().invoke(cli, ["run", "token-kd"]).exit_code == 0
    assert "run_dir: runs/token-kd" in ran[0]


def test_every_curation_operator_has_a_packaged_recipe():
    from importlib import resources

    from reasondistill.curate.operators import OPERATORS

    used = set()
    for name in packaged_recipes():
        with resources.as_file(resources.files("reasondistill") / "recipes" / name) as path:
            used |= {op.op for s in load_recipe(path)[1] if s.stage.name == "curate" for op in s.config.ops}
    assert used == set(OPERATORS)


def test_defaults_are_sized_for_reasoning_and_the_testbed_recipes_keep_small_lengths(tmp_path):
    """Real reasoning traces run to thousands of tokens; the testbed's models have 1,024 positions."""
    from importlib import resources

    from reasondistill.evaluate.harness import EvalOptions
    from reasondistill.stages.generate import GenerateConfig
    from reasondistill.train.hyperparameters import Hyperparameters
    from reasondistill.train.on_policy_options import OnPolicyOptions

    assert GenerateConfig(model="m").max_new_tokens == EvalOptions().max_new_tokens == 4096
    assert Hyperparameters().max_length == 4096 and OnPolicyOptions().max_new_tokens == 1024
    for name in ("demo.yaml", "token-kd.yaml", "teacher-selection.yaml"):
        with resources.as_file(resources.files("reasondistill") / "recipes" / name) as path:
            _, steps = load_recipe(path)
        for step in steps:
            for option in ("max_new_tokens", "max_length"):
                if option in type(step.config).model_fields:
                    assert getattr(step.config, option) <= 512, (name, step.where, option)
