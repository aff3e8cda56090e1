"""`report`: report.md and a self-contained report.html from the run's manifest, its evaluation
results and the sections the other stages declare (their `report_sections`)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

from pydantic import Field

from ..config import StageConfig
from ..records import atomic_write_bytes
from ..report.render import FIGURE, render_report
from ..rundir import RunDir, environment
from ..ui import note
from .base import Section, Stage

SectionsOf = Callable[[RunDir], list[Section]]  # a stage's `report_sections`


class ReportConfig(StageConfig):
    title: str = Field("reasondistill report", description="report heading")


def load_results(run: RunDir) -> list[dict]:
    """Every evaluation result of the run: eval/<model>/<task>.json."""
    return [json.loads(p.read_text()) for p in sorted((run.root / "eval").glob("*/*.json"))]


def render(run: RunDir, cfg: ReportConfig, sections: Sequence[SectionsOf] = ()) -> dict:
    """Write report.md, report.html and the accuracy plot of the run, with the sections that each
    of `sections` (the stages' `report_sections`, in registry order) finds in it."""
    manifest, results = run.manifest(), load_results(run)
    declared = [section for sections_of in sections for section in sections_of(run)]
    report = render_report(cfg.title, run.root, manifest, results, declared, environment())
    if report.figure is not None:
        atomic_write_bytes(run.root / FIGURE, report.figure)
    atomic_write_bytes(run.root / "report.md", report.markdown.encode())
    atomic_write_bytes(run.root / "report.html", report.html.encode())
    return {"results": len(results), "models": sorted({r["model"] for r in results})}


def report_stage(sections: Sequence[SectionsOf]) -> Stage:
    """The `report` stage, rendering the sections of the other stages (their `report_sections`)."""

    def run_report(cfg: ReportConfig, run: RunDir, overwrite: bool) -> None:
        # The report reads everything the run has produced, so it is redrawn on every call: cheap,
        # and never stale.
        stats = render(run, cfg, sections)
        note(f"report: {run.root / 'report.md'} and {run.root / 'report.html'} ({stats['results']} results)")

    return Stage("report", ReportConfig, run_report, "write report.md and a self-contained report.html")
