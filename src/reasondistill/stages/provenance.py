"""`provenance`: where did each sentence of a distilled model's reasoning come from?

Every sentence (or line) the distilled student wrote is scored under the teacher, the original
student and the distilled student, and classified teacher-originated, student-originated, or
pre-existing (boosted by distillation or not): the method, its thresholds and categories are
described in `analyze.provenance`.

Output analysis/<name>.json: counts and shares per category (overall and by task), the mean scores
of each category under each model, example sentences, and the accuracy of completions grouped by
their share of teacher-originated sentences (for graded and evaluation sets, which carry labels).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import Literal

from pydantic import Field, field_validator

from ..analyze.provenance import ROLES, score_steps, summarise
from ..analyze.selection import Text, TextSelection
from ..analyze.text import Unit
from ..errors import UserError
from ..modelref import ResolvedModel, reference_name, required_steps, resolve_model
from ..models import ModelLoading
from ..report.tables import number, percent
from ..rundir import RunDir
from ..store import analyses, load_texts, problems_by_id, selection_requirements, write_analysis
from ..ui import note
from .base import Section, Stage

KIND = "provenance"


class ProvenanceConfig(TextSelection, ModelLoading):
    name: str = Field("provenance", description="output name: analysis/<name>.json")
    teacher: str = Field(
        description="the teacher T (testbed:…, a model trained in the run, a folder, a Hub id)"
    )
    student: str = Field(description="the original student S0: the distilled student's starting weights")
    distilled: str = Field(
        description="the distilled student D; its greedy evaluation completions are traced unless "
        "traces, data or eval_model say otherwise"
    )
    unit: Unit = Field(
        "sentences", description="what a step is: sentences (real traces), or lines (testbed traces)"
    )
    scope: Literal["reasoning", "completion"] = Field(
        "reasoning",
        description="reasoning: the steps inside <think>…</think> (completions without one contribute none); "
        "completion: every step of the completion, the final answer included",
    )
    likely: float = Field(
        0.3,
        gt=0,
        lt=1,
        description="a model would write a sentence when its geometric-mean token probability exp(ℓ) is at "
        "least this (inferred default)",
    )
    origin_margin: float = Field(
        0.5,
        ge=0,
        description="nats per token by which the teacher (or the original student) must prefer a sentence "
        "for it to originate there (inferred default)",
    )
    boost_margin: float = Field(
        0.5,
        ge=0,
        description="nats per token by which the distilled student must prefer a pre-existing sentence over "
        "the original student for it to count as boosted (inferred default)",
    )
    share_bins: list[float] = Field(
        [0.0, 0.25, 0.5, 0.75, 1.0],
        description="edges of the bins of completions by share of teacher-originated sentences (0 … 1)",
    )
    examples: int = Field(3, ge=0, description="example sentences kept per category in the output")
    batch_size: int = Field(16, ge=1, description="sequences scored together")

    operational = frozenset({"batch_size"})

    @field_validator("share_bins")
    @classmethod
    def _bins_cover_zero_to_one(cls, edges: list[float]) -> list[float]:
        if len(edges) < 2 or edges[0] != 0 or edges[-1] != 1 or any(a >= b for a, b in pairwise(edges)):
            raise ValueError("share_bins must increase strictly from 0 to 1, e.g. [0, 0.5, 1]")
        return edges


def _join_prompts(texts: Sequence[Text], run: RunDir, description: str) -> None:
    """Give every text its prompt from the run's problems (graded and evaluation sets store only ids)."""
    if all(t.messages is not None for t in texts):
        return
    problems = problems_by_id(run)
    for text in texts:
        if text.messages is None:
            problem = problems.get(text.problem_id)
            if problem is None:
                raise UserError(
                    f"{description}: problem {text.problem_id!r} is not among the problems of {run.root} "
                    "(benchmark completions do not store their prompts; trace testbed tasks, or a curated set)"
                )
            text.messages = list(problem.messages)


def run_provenance(cfg: ProvenanceConfig, run: RunDir, overwrite: bool) -> None:
    references = {"teacher": cfg.teacher, "student": cfg.student, "distilled": cfg.distilled}
    models: dict[str, ResolvedModel] = {role: resolve_model(ref, run) for role, ref in references.items()}
    texts, description, texts_fingerprint = load_texts(
        cfg, run, f"{KIND}:{cfg.name}", models["distilled"].name
    )
    inputs = {"texts": texts_fingerprint, **{role: m.fingerprint for role, m in models.items()}}

    def body(_fingerprint: str) -> dict:
        _join_prompts(texts, run, description)
        located, scores = score_steps(
            {role: m.path for role, m in models.items()},
            [t.messages for t in texts],
            [t.completion for t in texts],
            cfg.unit,
            cfg.scope,
            cfg.batch_size,
            cfg.loading(),
        )
        result = {
            "texts": description,
            "models": {role: {"name": m.name, "path": m.path} for role, m in models.items()},
            "unit": cfg.unit,
            "scope": cfg.scope,
            "thresholds": {
                "likely": cfg.likely,
                "origin_margin": cfg.origin_margin,
                "boost_margin": cfg.boost_margin,
            },  # fmt: skip
            **summarise(texts, located, scores, cfg),
        }
        write_analysis(run, cfg.name, KIND, result)
        return {
            "steps": result["steps"],
            "shares": {c: _round(v["share"]) for c, v in result["categories"].items()},
        }

    stats = run.step(
        f"provenance:{cfg.name}", cfg, inputs, body, outputs=[run.analysis(cfg.name)], overwrite=overwrite
    )["stats"]
    note(f"provenance:{cfg.name}: {stats['steps']} steps, shares {stats['shares']}")


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def report_sections(run: RunDir) -> list[Section]:
    """Two tables per provenance analysis of the run: the categories, and accuracy by teacher share."""
    sections: list[Section] = []
    for result in analyses(run, KIND):
        names = {role: result["models"][role]["name"] for role in ROLES}
        heading = (
            f"Provenance of {result['texts']} ({result['name']}): teacher {names['teacher']}, "
            f"original student {names['student']}, distilled {names['distilled']}"
        )
        rows = [
            [
                category,
                str(v["count"]),
                percent(v["share"]),
                *[number(v["mean_logprob"][role], 2) for role in ROLES],
            ]  # fmt: skip
            for category, v in result["categories"].items()
        ]
        headers = [
            f"category ({result['unit']})",
            "count",
            "share",
            "mean ℓ teacher",
            "mean ℓ original",
            "mean ℓ distilled",
        ]
        sections.append((heading, (headers, rows)))
        share_rows = [
            [f"{100 * b['low']:.0f}–{100 * b['high']:.0f}%", str(b["completions"]), percent(b["accuracy"])]
            for b in result["accuracy_by_teacher_share"]
        ]
        sections.append(
            (
                f"Accuracy by share of teacher-originated {result['unit']} ({result['name']})",
                (["teacher-originated share", "completions", "accuracy"], share_rows),
            )
        )
    return sections


STAGE = Stage(
    KIND,
    ProvenanceConfig,
    run_provenance,
    "trace the sentences of a distilled model to the teacher or the original student",
    produces=lambda cfg: [f"{KIND}:{cfg.name}"],
    requires=lambda cfg: {
        **selection_requirements(cfg, reference_name(cfg.distilled)),
        **required_steps("teacher", [cfg.teacher]),
        **required_steps("student", [cfg.student]),
        **required_steps("distilled", [cfg.distilled]),
    },
    report_sections=report_sections,
)
