"""`reasondistill` command line: one command per stage, `run RECIPE`, `demo`, `testbed build`.

Stage commands are generated from the stage's pydantic config, so a CLI option and a recipe key are
the same thing with the same help text (`--max-new-tokens` ↔ `max_new_tokens`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Literal

import click
from pydantic import AliasChoices, BaseModel, ValidationError
from pydantic.fields import FieldInfo

from . import processes
from .errors import UserError, describe_validation_error
from .stages import Stage, all_stages
from .ui import console

DEMO_RECIPE = "demo.yaml"


def _setup_logging(debug: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=console, show_path=False)]
    )
    for noisy in ("transformers", "datasets", "accelerate", "httpx", "torch", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _quiet_transformers() -> None:
    """Before a command does work (not for --help: importing transformers takes seconds)."""
    from transformers.utils import logging as hf_logging

    debug = click.get_current_context().find_root().params.get("debug", False)
    hf_logging.set_verbosity_warning() if debug else hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # weight-loading bars; the Trainer's own progress bar stays


def _unwrap_optional(annotation):
    """`X | None` → X; anything else unchanged."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return inner
    return annotation


def _flag(location: tuple) -> str:
    """A config key as the CLI option the user typed: ('max_new_tokens',) → --max-new-tokens."""
    return "--" + ".".join(str(part) for part in location).replace("_", "-")


def _structured_list(annotation) -> bool:
    """A list of mappings (curate's `ops`), typed on the command line as JSON rather than A,B,…"""
    if typing.get_origin(annotation) is not list:
        return False
    (item,) = typing.get_args(annotation)
    return item not in (str, int, float) and typing.get_origin(item) is not Literal


def _json_object(annotation) -> bool:
    """A mapping or a nested options model (train's `on_policy`): a JSON object on the command line."""
    return typing.get_origin(annotation) is dict or (
        isinstance(annotation, type) and issubclass(annotation, BaseModel)
    )


def _option(name: str, field: FieldInfo) -> click.Option:
    annotation = _unwrap_optional(field.annotation)
    origin = typing.get_origin(annotation)
    flag = _flag((name,))
    # A key's aliases (`model` for `models`) are options too; the parameter keeps the key's name.
    aliases = field.validation_alias.choices if isinstance(field.validation_alias, AliasChoices) else []
    flags = [name, flag, *[_flag((alias,)) for alias in aliases if alias != name]]
    default = None if field.is_required() else field.get_default(call_default_factory=True)
    help_text = (field.description or "") + ("" if default in (None, [], {}) else f"  [default: {default}]")
    if annotation is bool:
        return click.Option([name, f"{flag}/--no-{flag[2:]}"], default=None, help=help_text)
    if origin is Literal:
        return click.Option(
            flags, type=click.Choice([str(a) for a in typing.get_args(annotation)]), help=help_text
        )
    if _structured_list(annotation):
        return click.Option(flags, help=help_text + "  (JSON list)", metavar="JSON")
    if origin is list:
        return click.Option(flags, help=help_text + "  (comma-separated)", metavar="A,B,…")
    if _json_object(annotation):
        return click.Option(flags, help=help_text + "  (JSON object)", metavar="JSON")
    click_type = {int: click.INT, float: click.FLOAT}.get(annotation, click.STRING)
    return click.Option(flags, type=click_type, required=field.is_required(), help=help_text)


def _parse_option(value, field: FieldInfo):
    annotation = _unwrap_optional(field.annotation)
    origin = typing.get_origin(annotation)
    if origin is list and not _structured_list(annotation):
        return [item.strip() for item in value.split(",") if item.strip()]
    if origin is list or _json_object(annotation):
        try:
            return json.loads(value)
        except json.JSONDecodeError as err:
            kind = "list" if origin is list else "object"
            raise UserError(f"expected a JSON {kind} ({err.msg})") from None
    return value


def _stage_command(stage: Stage) -> click.Command:
    fields = stage.config.model_fields

    def callback(run_dir: str, overwrite: bool, **options) -> None:
        from .rundir import RunDir

        _quiet_transformers()
        values = {}
        for name, value in options.items():
            if value is None:
                continue
            try:
                values[name] = _parse_option(value, fields[name])
            except UserError as err:
                raise UserError(f"{_flag((name,))}: {err}") from None
        try:
            config = stage.config.model_validate(values)
        except ValidationError as err:
            raise UserError(
                describe_validation_error(err, f"reasondistill {stage.name}", key=_flag)
            ) from None
        try:
            stage.requires(config)  # checks the model references it names, before anything runs
        except UserError as err:
            option, _, problem = str(err).partition(": ")
            raise UserError(f"reasondistill {stage.name} {_flag((option,))}: {problem}") from None
        run = RunDir(run_dir)
        with run.working():
            stage.run_in_job(config, run, overwrite)

    params = [
        click.Option(
            ["--run-dir"],
            required=stage.default_run_dir is None,
            default=stage.default_run_dir,
            show_default=stage.default_run_dir is not None,
            help="run directory (created if missing)",
        ),
        click.Option(
            ["--overwrite"], is_flag=True, help="recompute outputs made earlier with other settings"
        ),
        *[_option(name, field) for name, field in fields.items()],
    ]
    return click.Command(stage.name, callback=callback, params=params, help=stage.summary)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--debug", is_flag=True, help="show full tracebacks and library logs")
@click.option(
    "--trust-remote-code",
    is_flag=True,
    help="run Python code shipped with a model (auto_map in its config); off by default, recorded in the manifest",
)
@click.version_option(package_name="reasondistill")
def cli(debug: bool, trust_remote_code: bool) -> None:
    """Distil reasoning from a teacher model into a small student: generate → verify → curate → train → eval → report."""
    from .models import set_trust_remote_code

    _setup_logging(debug)
    set_trust_remote_code(trust_remote_code)


def _builtin_recipes() -> list[str]:
    return sorted(
        p.name.removesuffix(".yaml") for p in (resources.files("reasondistill") / "recipes").iterdir()
    )


@cli.command("run")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--run-dir", type=click.Path(path_type=Path), help="override the recipe's run_dir")
@click.option("--overwrite", is_flag=True, help="recompute steps whose settings changed since they ran")
def run_command(recipe: Path, run_dir: Path | None, overwrite: bool) -> None:
    """Run the steps of a YAML recipe in order (finished steps are skipped).

    RECIPE is a YAML file or the name of a recipe that comes with reasondistill (token-kd,
    sequence-level, negative-aware, demo).
    """
    from .recipe import run_recipe

    _quiet_transformers()
    if not recipe.exists() and str(recipe) in _builtin_recipes():
        with resources.as_file(resources.files("reasondistill") / "recipes" / f"{recipe}.yaml") as path:
            run_recipe(path, run_dir, overwrite)
    else:
        run_recipe(recipe, run_dir, overwrite)


@cli.command()
@click.option("--run-dir", type=click.Path(path_type=Path), default=Path("runs/demo"), show_default=True)
@click.option("--overwrite", is_flag=True, help="recompute steps whose settings changed since they ran")
def demo(run_dir: Path, overwrite: bool) -> None:
    """Quickstart: testbed teacher → traces → verify → distilled and answer-only students → eval → report."""
    from .recipe import run_recipe

    _quiet_transformers()
    with resources.as_file(resources.files("reasondistill") / "recipes" / DEMO_RECIPE) as recipe:
        run = run_recipe(recipe, run_dir, overwrite)
    console.print(
        f"\n[bold green]done[/bold green]: open {run.root / 'report.html'} (or read {run.root / 'report.md'})"
    )


@cli.command("benchmarks")
def list_benchmarks() -> None:
    """List the public benchmarks `eval` and `decontaminate` know: source, grader, contents; then each
    suite's members (name one suite, e.g. `--benchmarks logiglue`, to run them all)."""
    from rich.table import Column, Table

    from .tasks import BENCHMARKS, SINGLE_BENCHMARKS, SUITES

    table = Table("name", "grader", "what it is")
    table.add_column("default source", overflow="fold")  # URLs wrap instead of being cut
    for benchmark in SINGLE_BENCHMARKS.values():
        source = benchmark.source + (f" ({benchmark.split})" if "://" not in benchmark.source else "")
        table.add_row(benchmark.name, benchmark.grader.id, benchmark.description, source)
    console.print(table)
    for suite, members in SUITES.items():
        if any(other != suite and set(members) < set(SUITES[other]) for other in SUITES):
            continue  # a part of a larger suite (logiglue-in-domain): its members are listed there
        first = BENCHMARKS[members[0]]
        name_column = Column("name", no_wrap=True)  # what one types: never cut
        table = Table(
            name_column, "grader", "format", "reasoning", "group", title=f"suite {suite}: {first.source}"
        )
        table.add_column("configuration (split)", overflow="fold")
        for name in members:
            b = BENCHMARKS[name]
            groups = [b.tags.get(key, "") for key in ("format", "reasoning", "domain")]
            table.add_row(name, b.grader.id, *groups, f"{b.hub_config} ({b.split})")
        console.print(table)
        parts = [other for other in SUITES if other != suite and set(SUITES[other]) < set(members)]
        if parts:
            console.print(f"parts of {suite}: {', '.join(parts)}")


@cli.command("objectives")
@click.argument("names", nargs=-1)
def list_objectives(names: tuple[str, ...]) -> None:
    """List the training objectives (or those NAMES) with their options: type, bounds, default, help.

    Set one in a recipe's train step with `objective: NAME` and its options with `objective_args`.
    """
    from .objectives import OBJECTIVES, describe_objectives

    unknown = [name for name in names if name not in OBJECTIVES]
    if unknown:
        raise UserError(f"unknown objective {unknown[0]!r}; known: {', '.join(OBJECTIVES)}")
    click.echo(describe_objectives(names or None))


@cli.command("check-template")
@click.option(
    "--student", required=True, help="the student's folder or Hub id (its tokenizer and chat template)"
)
@click.option(
    "--teacher", help="the teacher's folder or Hub id, to compare how both tokenize <think> and </think>"
)
def check_template(student: str, teacher: str | None) -> None:
    """Pre-flight of reasoning templates: whether the generation prompt opens the reasoning block,
    how <think> and </think> tokenize (in teacher and student), whether the template keeps earlier
    turns' reasoning, and whether a completion is trained with its whole reasoning block (exit status
    1 if not). `train` runs the same check and records it."""
    from .chat import reasoning_preflight
    from .models import load_tokenizer

    check = reasoning_preflight(load_tokenizer(student), load_tokenizer(teacher) if teacher else None)
    click.echo(f"generation prompt opens the reasoning block: {check.opener!r}" if check.opener else
               "generation prompt opens no reasoning block (the model writes <think> itself)")  # fmt: skip
    for role, tags in check.think_tokens.items():
        click.echo(f"{role}: " + ", ".join(f"{tag} → {tokens}" for tag, tokens in tags.items()))
    click.echo({
        True: "earlier assistant turns keep their reasoning",
        False: "the template strips the reasoning of earlier assistant turns (a chat-format trainer rendering "
        "whole conversations would train on answers alone; reasondistill tokenizes prompt and completion apart)",
        None: "the template does not render a conversation with an earlier assistant turn",
    }[check.history_keeps_reasoning])  # fmt: skip
    for difference in check.differences:
        click.echo(f"warning: {difference}")
    if not check.trained_keeps_reasoning:
        raise UserError(f"{student}: a completion tokenized for training loses its reasoning block")
    click.echo("a completion is trained with its whole reasoning block: ok")


@cli.group()
def testbed() -> None:
    """The embedded testbed: tokenizer, tiny teacher and student models."""


@testbed.command("build")
@click.option("--force", is_flag=True, help="rebuild even if a cached build exists")
@click.option(
    "--train",
    is_flag=True,
    help="train the teacher even where the shipped weights fit this build (about 4 min on 2 CPU cores)",
)
def testbed_build(force: bool, train: bool) -> None:
    """Build (or rebuild) the testbed tokenizer, student initialisation and trained teacher.

    The default build's teacher ships with the package and is installed rather than trained, as long
    as the testbed code is the code that trained it; another build (REASONDISTILL_TESTBED_SEED) trains.
    """
    from .testbed.models import build_testbed

    _quiet_transformers()
    root = build_testbed(force=force, train=train)
    console.print(f"testbed models in {root}: {root / 'teacher'}, {root / 'student'}")


for _stage in all_stages().values():
    cli.add_command(_stage_command(_stage))


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    try:
        cli.main(args=args, prog_name="reasondistill", standalone_mode=False)
    except UserError as err:
        if "--debug" in args:
            raise
        console.print(f"[bold red]error:[/bold red] {err}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort):
        console.print("interrupted; rerun the same command to continue where it stopped")
        sys.exit(130)
    processes.finish()


if __name__ == "__main__":
    main()
