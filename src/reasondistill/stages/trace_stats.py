"""`trace_stats`: how long traces are, how many steps they take, how often they reflect.

For a graded set (teacher traces with labels), a curated set or a model's evaluation completions,
overall, by task, by label and by task and label:

* completion length in tokens (mean / median / p90) and in words (the <think> tags left out).
  Graded and evaluation sets carry the generator's token count; a curated set is counted with
  `tokenizer` when given;
* reasoning steps: the lines and the sentences of the reasoning block (`text.segments`);
* reflection keywords (`keywords`, default `text.REFLECTION_KEYWORDS`: "wait", "hmm",
  "let me check", "double-check", "verify", "alternatively", "on second thought", …), matched
  case-insensitively on word boundaries in the whole completion: occurrences per trace, and the
  share of traces with at least one, per keyword and for any of them.

The statistics are computed in `analyze.trace_stats`; the counting functions are pure and live in
`analyze.text` (`trace_features` for one completion), for curation operators and reports.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from ..analyze.selection import TextSelection
from ..analyze.text import REFLECTION_KEYWORDS
from ..analyze.trace_stats import trace_statistics
from ..modelref import required_steps, resolve_model
from ..report.tables import number, percent
from ..rundir import RunDir
from ..store import analyses, load_texts, selection_requirements, write_analysis
from ..ui import note
from .base import Section, Stage

KIND = "trace_stats"


class TraceStatsConfig(TextSelection):
    name: str = Field("trace-stats", description="output name: analysis/<name>.json")
    keywords: list[str] = Field(
        list(REFLECTION_KEYWORDS),
        min_length=1,
        description="reflection phrases, counted case-insensitively on word boundaries",
    )
    tokenizer: str | None = Field(
        None,
        description="a model whose tokenizer counts the tokens of a curated set (graded and evaluation sets "
        "carry their own counts)",
    )

    @model_validator(mode="after")
    def _texts_given(self) -> TraceStatsConfig:
        if self.traces is None and self.data is None and self.eval_model is None:
            raise ValueError("set traces (a graded set), data (a curated set) or eval_model")
        return self


def run_trace_stats(cfg: TraceStatsConfig, run: RunDir, overwrite: bool) -> None:
    texts, description, texts_fingerprint = load_texts(cfg, run, f"{KIND}:{cfg.name}")
    inputs = {"texts": texts_fingerprint}
    counter = resolve_model(cfg.tokenizer, run) if cfg.tokenizer else None
    if counter is not None:
        inputs["tokenizer"] = counter.fingerprint

    def body(_fingerprint: str) -> dict:
        counts: list[int | None] = [t.completion_tokens for t in texts]
        if counter is not None and any(n is None for n in counts):
            from ..chat import completion_ids
            from ..models import load_tokenizer

            tokenizer = load_tokenizer(counter.path, chat_template=False)
            counted = completion_ids(tokenizer, [t.completion for t in texts])
            counts = [n if n is not None else len(ids) for n, ids in zip(counts, counted, strict=True)]
        if all(t.completion_tokens is not None for t in texts):
            counted_by = "generator"
        else:
            counted_by = counter.name if counter is not None else None
        result = {
            "texts": description,
            "tokens_counted_by": counted_by,
            "keywords": cfg.keywords,
            **trace_statistics(texts, cfg.keywords, counts),
        }
        write_analysis(run, cfg.name, KIND, result)
        overall = result["all"]
        return {
            "traces": overall["traces"],
            "mean_tokens": overall["tokens"]["mean"],
            "share_reflecting": round(overall["share_reflecting"], 4),
        }

    stats = run.step(
        f"{KIND}:{cfg.name}", cfg, inputs, body, outputs=[run.analysis(cfg.name)], overwrite=overwrite
    )["stats"]
    note(
        f"trace_stats:{cfg.name}: {stats['traces']} traces, mean {number(stats['mean_tokens'], 0)} tokens, "
        f"{percent(stats['share_reflecting'])} with a reflection keyword"
    )


def report_sections(run: RunDir) -> list[Section]:
    """Two tables per trace-statistics analysis of the run: the statistics by group, and the keywords."""
    sections: list[Section] = []
    headers = [
        "group", "traces", "tokens (mean / median / p90)", "words (mean)", "lines (mean)",
        "sentences (mean)", "reflections per trace", "traces reflecting",
    ]  # fmt: skip
    for result in analyses(run, KIND):
        groups = [("all", result["all"])]
        groups += [(f"task {k}", v) for k, v in result["by_task"].items()]
        groups += [(f"label {k}", v) for k, v in result["by_label"].items()]
        groups += [(k, v) for k, v in result["by_task_and_label"].items()]
        rows = []
        for group, s in groups:
            tokens = s["tokens"]
            rows.append(
                [
                    group, str(s["traces"]),
                    "–" if tokens["mean"] is None
                    else f"{tokens['mean']:.0f} / {tokens['median']:.0f} / {tokens['p90']:.0f}",
                    number(s["words"]["mean"], 0), number(s["lines"]["mean"]), number(s["sentences"]["mean"]),
                    number(s["reflections_per_trace"], 2), percent(s["share_reflecting"]),
                ]
            )  # fmt: skip
        sections.append((f"Trace statistics of {result['texts']} ({result['name']})", (headers, rows)))
        keyword_rows = [
            [k, str(v["count"]), percent(v["share_of_traces"])] for k, v in result["all"]["keywords"].items()
        ]
        sections.append(
            (
                f"Reflection keywords in {result['texts']} ({result['name']})",
                (["keyword", "occurrences", "traces containing it"], keyword_rows),
            )
        )
    return sections


STAGE = Stage(
    KIND,
    TraceStatsConfig,
    run_trace_stats,
    "length, reasoning steps and reflection keywords of a set of traces, by task and label",
    produces=lambda cfg: [f"{KIND}:{cfg.name}"],
    requires=lambda cfg: {
        **selection_requirements(cfg),
        **(required_steps("tokenizer", [cfg.tokenizer]) if cfg.tokenizer else {}),
    },
    report_sections=report_sections,
)
