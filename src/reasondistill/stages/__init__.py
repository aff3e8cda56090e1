"""The stage adapters: one module per stage (its options, its run function, its `STAGE`), and the
registry. Only the command line and recipes import this package; library packages never do.

A stage module imports heavy libraries (torch, transformers) inside its run function, so that
listing the stages and printing a stage's options stays quick.
"""

from __future__ import annotations

from .base import Section, Stage, Table

__all__ = ["Section", "Stage", "Table", "all_stages"]


def all_stages() -> dict[str, Stage]:
    """Every stage by name, in pipeline order (the order the report renders their sections in)."""
    from . import (
        chunk,
        curate,
        decontaminate,
        evaluate,
        generate,
        memorization,
        problems,
        provenance,
        rewrite,
        score,
        select_teacher,
        trace_stats,
        train,
        verify,
    )
    from .report import report_stage

    pipeline = [
        module.STAGE
        for module in (
            problems, generate, score, verify, rewrite, curate, chunk, decontaminate, select_teacher, train,
            evaluate,
        )
    ]  # fmt: skip
    analyses = [module.STAGE for module in (trace_stats, provenance, memorization)]
    # the report renders the sections every other stage declares, so it is made from them
    sections = [stage.report_sections for stage in [*pipeline, *analyses] if stage.report_sections]
    return {stage.name: stage for stage in [*pipeline, report_stage(sections), *analyses]}
