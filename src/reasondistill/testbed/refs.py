"""Testbed model references (`testbed:teacher`, `testbed:student`, a zoo teacher) → cached folders.

Light on purpose: the modules that build models (and import torch) are imported when one is resolved.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError

TESTBED_PREFIX = "testbed:"


def testbed_names() -> list[str]:
    """The testbed's own models, then the teacher zoo's."""
    from .models import MODEL_NAMES
    from .zoo import ZOO

    return [*MODEL_NAMES, *ZOO]


def resolve_testbed_model(reference: str) -> Path:
    """`testbed:teacher`, `testbed:student` or a zoo teacher → the cached model folder, built on first use."""
    from .models import MODEL_NAMES, build_testbed
    from .zoo import ZOO, build_zoo_model

    name = reference.removeprefix(TESTBED_PREFIX)
    if name in MODEL_NAMES:
        return build_testbed() / name
    if name in ZOO:
        return build_zoo_model(name)
    raise UserError(
        f"unknown testbed model {reference!r}; use one of: "
        f"{', '.join(TESTBED_PREFIX + n for n in testbed_names())}"
    )
