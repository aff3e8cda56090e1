"""`rewrite`: a teacher rewrites graded traces with a difficulty-aware prompt (DAP), and every rewrite
is graded again against the gold answer (the prompt, the reading of the reply and the judging are in
curate/rewrite.py).

Every rewrite is graded with its task's grader (the `verify`/`eval` graders, `graders` overrides
included). graded/<name> holds only the rewrites graded correct, under the original's problem_id and
sample_idx; the others are dropped, counted by reason in the step's stats and listed in
graded/<name>.dropped.json: `cut`, `unstructured`, `unparseable`, `incorrect`, `failed` (the request
failed after its retries; with allow_failures). The teacher's raw replies are kept in resumable shards
in traces/<name>/ (shared machinery with `generate`: a killed job continues with no row lost or
written twice).

A rewrite's `completion_tokens` is what the teacher generated (its own thinking included); the step's
`length` statistics count the stored texts before and after with one tokenizer (the teacher's, or
`tokenizer`; words with backend openai and no tokenizer), overall and per judged tier. A rewrite
keeps the original's sample_idx, so teacher log-probabilities stored for the original trace do not
describe it (`train` stops on a stored row that does not match its training tokens).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from ..curate.rewrite import (
    DAP_SYSTEM_PROMPT,
    DAP_USER_TEMPLATE,
    TEMPLATE_FIELDS,
    TRACE_BLOCK,
    dap_messages,
    judge_rewrite,
    rewrite_stats,
)
from ..curate.teacher_jobs import (
    LengthCounter,
    PromptRow,
    TeacherOptions,
    run_teacher_job,
    teacher_source,
    tokenizer_path,
)
from ..errors import UserError
from ..generate.shards import usage_stats, usage_totals
from ..modelref import backend_model, backend_requirements
from ..records import GradedTrace, Label, atomic_write_json, read_records, write_records
from ..rundir import RunDir, fingerprint
from ..store import graded_fingerprint, graded_requirement, problem_sets, problems_by_id, run_tasks
from ..tasks.selection import GraderChoice
from ..ui import note
from .base import Stage


class RewriteConfig(TeacherOptions, GraderChoice):
    model: str = Field(
        description="the rewriting teacher: testbed:teacher, a model trained in this run, a model folder, "
        "a Hub id, or (backend openai) the name the server knows it by"
    )
    traces: str = Field(description="graded traces to rewrite (graded/<name>)")
    name: str | None = Field(
        None, description="output name: graded/<name> (default: <traces>-dap); raw replies in traces/<name>"
    )
    select: list[Label] = Field(
        ["correct"], min_length=1, description="labels of the traces to rewrite (default: the correct ones)"
    )
    include_trace: bool = Field(
        False,
        description="also show the teacher the original reasoning to compress (the paper's generate-then-rewrite); "
        "default: the released one-call prompt with problem and answer only",
    )
    system_prompt: str | None = Field(
        None, description="system prompt instead of the DAP one (empty: no system message)"
    )
    template: str | None = Field(
        None,
        description="user message template instead of DAP's, with any of {question} {answer} {answer_format} "
        "{trace} {trace_block}",
    )
    tokenizer: str | None = Field(
        None,
        description="the teacher's tokenizer: for openai's completions endpoint, and to count the tokens of "
        "traces before and after (default: the model's own; words with backend openai)",
    )
    require_structure: bool = Field(
        True,
        description="drop replies without a Solution section (off: grade such a reply as written, without tier)",
    )

    @field_validator("template")
    @classmethod
    def _known_fields(cls, template: str | None) -> str | None:
        if template is not None:
            try:
                names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
            except ValueError as err:
                raise ValueError(f"not a valid template ({err}); write literal braces as {{{{ }}}}") from None
            unknown = sorted(names - set(TEMPLATE_FIELDS))
            if unknown:
                raise ValueError(f"unknown field {{{unknown[0]}}}; fields: {', '.join(TEMPLATE_FIELDS)}")
        return template

    @model_validator(mode="after")
    def _not_its_own_input(self) -> RewriteConfig:
        if self.output_name == self.traces:
            raise ValueError(f"name: the rewrites need their own name, not the input's ({self.traces!r})")
        return self

    @property
    def output_name(self) -> str:
        return self.name or f"{self.traces}-dap"


def dropped_file(run: RunDir, name: str) -> Path:
    """The rewrites left out of graded/<name>, with their reasons (beside it)."""
    return run.graded(name).with_name(f"{name}.dropped.json")


def run_rewrite(cfg: RewriteConfig, run: RunDir, overwrite: bool) -> None:
    cfg.bind_sets(problem_sets(run))  # the graders of the run's problem sets
    name = cfg.output_name
    key = f"rewrite:{name}"
    for other in (f"verify:{name}", f"generate:{name}"):
        if other in run.manifest()["steps"]:
            raise UserError(
                f"{key}: {other} already writes {name!r} in {run.root}; give the rewrites another name"
            )
    model = backend_model(cfg, cfg.model, run)
    prompt = {"system": cfg.system_prompt, "template": cfg.template, "include_trace": cfg.include_trace}
    inputs = {
        "graded": graded_fingerprint(run, cfg.traces),
        "problems": run.finished_step("problems")["fingerprint"],
        "model": model.fingerprint,
        # the built-in prompt's text, so that rewording it recomputes the step
        "prompt": fingerprint([DAP_SYSTEM_PROMPT, DAP_USER_TEMPLATE, TRACE_BLOCK]),
        "graders": {task: cfg.grader_for(task).id for task in run_tasks(run)},
    }
    out = run.traces(name)
    source = teacher_source(cfg, model, prompt={k: v for k, v in prompt.items() if v not in (None, False)})

    def body(step_fingerprint: str) -> dict:
        problems = problems_by_id(run)
        graded = read_records(run.graded(cfg.traces), GradedTrace)
        selected = [g for g in graded if g.label in cfg.select]
        if not selected:
            raise UserError(
                f"{key}: graded/{cfg.traces} has no traces labelled {' or '.join(cfg.select)} to rewrite"
            )
        missing = next((g for g in selected if g.problem_id not in problems), None)
        if missing:
            raise UserError(
                f"{key}: problem_id {missing.problem_id!r} of graded/{cfg.traces} is not in this run"
            )
        rows = [
            PromptRow(
                problems[g.problem_id],
                g.sample_idx,
                dap_messages(problems[g.problem_id], g, include_trace=cfg.include_trace,
                             system_prompt=cfg.system_prompt, template=cfg.template),
            )
            for g in selected
        ]  # fmt: skip
        replies, index = run_teacher_job(
            cfg, model, rows, out, step_key=key, step_fingerprint=step_fingerprint,
            source=json.dumps(source), overwrite=overwrite,
        )  # fmt: skip
        results = []
        for g in selected:
            problem = problems[g.problem_id]
            reply = replies.get((g.problem_id, g.sample_idx))
            results.append(
                judge_rewrite(g, reply, problem, cfg.grader_for(problem.task), traces=cfg.traces, source=source,
                              require_structure=cfg.require_structure)
            )  # fmt: skip
        write_records(run.graded(name), [r.graded for r in results if r.reason is None], GradedTrace)
        dropped = [
            {
                "problem_id": r.original.problem_id,
                "sample_idx": r.original.sample_idx,
                "task": r.original.task,
                "reason": r.reason,
                "label": r.graded.label if r.graded else None,
                "extracted": r.graded.extracted if r.graded else None,
                "gold": problems[r.original.problem_id].answer,
                "tier": r.reply.tier if r.reply else None,
            }
            for r in results
            if r.reason is not None
        ]
        count = LengthCounter(
            tokenizer_path(cfg.tokenizer, run) or (model.path if cfg.backend != "openai" else None)
        )
        stats = {"rewriter": model.path, "input": len(graded), **rewrite_stats(results, count)}
        atomic_write_json(dropped_file(run, name), {"dropped": stats["dropped"], "rows": dropped})
        return {**stats, "usage": usage_stats(index, cfg.pricing, cfg.backend)}

    outputs = [run.graded(name), dropped_file(run, name), out / "index.json"]
    result = run.step(key, cfg, inputs, body, outputs=outputs, overwrite=overwrite)
    run.update_manifest(teacher_usage=usage_totals(run.manifest()))
    stats = result["stats"]
    length = stats["length"]
    shorter = (
        f"; {length['unit']} per trace {length['before_mean']} → {length['after_mean']}"
        if length["rewrites"]
        else ""
    )
    note(
        f"{key}: kept {stats['kept']} of {stats['selected']} rewrites, dropped "
        f"{ {k: v for k, v in stats['dropped'].items() if v} }, tiers {stats['tiers']}{shorter}"
    )


STAGE = Stage(
    "rewrite",
    RewriteConfig,
    run_rewrite,
    "rewrite graded traces with a teacher's difficulty-aware prompt (DAP) and grade the rewrites again",
    produces=lambda cfg: [f"rewrite:{cfg.output_name}"],
    requires=lambda cfg: {"traces": graded_requirement(cfg.traces), **backend_requirements(cfg, cfg.model)},
)
