"""Model references in recipes and on the command line.

A reference is, in order: `testbed:teacher` / `testbed:student` (built and cached on first use);
the name of a model trained in this run (`checkpoints/<name>`); a local model folder; or a Hub id
such as `Qwen/Qwen2.5-1.5B-Instruct`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .generate.backends import BackendOptions
from .models import check_model_folder
from .rundir import RunDir, fingerprint
from .testbed.refs import TESTBED_PREFIX, resolve_testbed_model, testbed_names

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # short name for outputs: traces/<name>, eval/<name>
    path: str  # what from_pretrained receives
    fingerprint: str  # identifies the weights, so outputs made from other weights are not reused


def _folder_fingerprint(folder: Path) -> str:
    """Config plus the size and modification time of every weight file (hashing GBs of weights is too slow)."""
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
    return fingerprint([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files])


def reference_name(reference: str) -> str:
    """The short name of a model reference, without loading or building anything."""
    return reference.removeprefix(TESTBED_PREFIX).rstrip("/").split("/")[-1]


def trained_in_run(reference: str) -> bool:
    """A bare name (no `testbed:` prefix, no path separator) refers to a model trained in the run."""
    return (
        not reference.startswith(TESTBED_PREFIX)
        and "/" not in reference
        and not Path(reference).expanduser().is_dir()
    )


def required_steps(option: str, references: list[str]) -> dict[str, str]:
    """The steps that train the models in `references` trained in the run ({option: `train:<name>`}).

    Every other reference is checked now, without loading or building anything: a testbed name, a
    usable model folder (`check_model_folder`'s checks that need no weights), or a Hub id. Stages
    declare their inputs with this, so a recipe's model references are checked before its first step.
    """
    steps = {}
    for i, reference in enumerate(references):
        where = f"{option}[{i}]" if len(references) > 1 else option
        if trained_in_run(reference):
            steps[where] = f"train:{reference}"
            continue
        try:
            check_reference(reference)
        except UserError as err:
            raise UserError(f"{where}: {err}") from None
    return steps


def check_reference(reference: str) -> None:
    """UserError unless `reference` names a testbed model, a usable model folder, or looks like a Hub id."""
    if reference.startswith(TESTBED_PREFIX):
        if reference.removeprefix(TESTBED_PREFIX) not in testbed_names():
            resolve_testbed_model(reference)  # raises the error that lists the testbed models
        return
    folder = Path(reference).expanduser()
    if folder.is_dir():
        check_model_folder(folder, model=False, chat_template=False, weights=False)
        return
    # `models/qwen` is a Hub id in form, but when `models/` is a local folder a missing subfolder is meant
    local = reference.startswith((".", "/", "~")) or Path(reference.split("/")[0]).expanduser().is_dir()
    if local or not _HUB_ID.match(reference):
        raise UserError(f"model {reference!r}: no such model folder, and not a Hub id (owner/name)")


def resolve_model(reference: str, run: RunDir) -> ResolvedModel:
    if reference.startswith(TESTBED_PREFIX):
        path = resolve_testbed_model(reference)
        return ResolvedModel(
            # the folder above a testbed model is named after the fingerprint of its build
            reference_name(reference),
            str(path),
            f"{path.parent.name}-{path.name}",
        )
    if trained_in_run(reference) and run.checkpoint(reference).is_dir():
        trained = run.finished_step(f"train:{reference}")
        return ResolvedModel(reference, str(run.checkpoint(reference)), trained["fingerprint"])
    folder = Path(reference).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").exists():
            raise UserError(f"model {reference!r}: {folder} has no config.json; expected a model folder")
        return ResolvedModel(
            reference_name(str(folder.resolve())), str(folder.resolve()), _folder_fingerprint(folder)
        )
    if _HUB_ID.match(reference):
        return ResolvedModel(reference_name(reference), reference, fingerprint(reference))
    raise UserError(
        f"model {reference!r}: not a testbed model ({TESTBED_PREFIX}teacher, {TESTBED_PREFIX}student), "
        f"a model trained in {run.root}, a model folder, or a Hub id"
    )


def backend_model(options: BackendOptions, reference: str, run: RunDir) -> ResolvedModel:
    """The model a step calls: for `openai` the name the server knows it by, else a local model."""
    if options.backend == "openai":
        return ResolvedModel(reference_name(reference), reference, fingerprint(["openai", reference]))
    return resolve_model(reference, run)


def backend_requirements(
    options: BackendOptions, reference: str | list[str], option: str = "model"
) -> dict[str, str]:
    """`required_steps` of the models a step calls, except served ones (backend openai: a name)."""
    references = [reference] if isinstance(reference, str) else reference
    return {} if options.backend == "openai" else required_steps(option, references)
