"""The base of every options model: a stage's config, an operator's, a shared group of options."""

from __future__ import annotations

import typing
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict


class StageConfig(BaseModel):
    """Options of one stage; unknown keys are errors, so a typo in a recipe cannot pass silently."""

    model_config = ConfigDict(extra="forbid")

    # Options that change how a step runs but not what it produces (connections, retries, prices):
    # left out of the step's fingerprint, so changing one resumes an interrupted job instead of
    # discarding its finished shards. Each class names its own; a config has those of all its bases.
    operational: ClassVar[frozenset[str]] = frozenset()

    def identity(self) -> dict:
        """The settings that determine a step's outputs: the options set to other than their defaults
        (so an option added later, at its default, leaves finished steps finished), without the
        operational ones, at any depth (`teacher_server.base_url` too). A tag (a field whose one
        possible value names the model, like an operator's `op`) is kept at its default: without it,
        two operators at their defaults would look the same."""
        return _without_operational(self, self.model_dump(mode="json", exclude_defaults=True))


def _without_operational(model: BaseModel, dumped: dict) -> dict:
    """`dumped` (a dump of `model`) without the operational options of `model` and of the options
    models it holds (nested StageConfigs and lists of them), with their tags."""
    kept = {name: getattr(model, name) for name in _tags(type(model)) if name not in dumped}
    for name, value in dumped.items():
        if name in _operational(type(model)):
            continue
        attribute = getattr(model, name)
        if isinstance(attribute, BaseModel) and isinstance(value, dict):
            value = _without_operational(attribute, value)
        elif isinstance(attribute, list) and isinstance(value, list) and len(attribute) == len(value):
            value = [
                _without_operational(a, v) if isinstance(a, BaseModel) and isinstance(v, dict) else v
                for a, v in zip(attribute, value, strict=True)
            ]
        kept[name] = value
    return kept


def _operational(model: type[BaseModel]) -> frozenset[str]:
    """The operational options `model` and its bases name."""
    return frozenset().union(*(vars(base).get("operational", ()) for base in model.__mro__))


def _tags(model: type[BaseModel]) -> list[str]:
    """The fields of `model` that can hold one value only (`op: Literal["dedup"]`): discriminators."""
    return [
        name
        for name, field in model.model_fields.items()
        if typing.get_origin(field.annotation) is Literal and len(typing.get_args(field.annotation)) == 1
    ]
