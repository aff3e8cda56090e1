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

The counting functions are pure and live in `analyze.text` (`trace_features` for one completion),
for curation operators and reports.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from pydantic import Field, model_validator

from ..modelref import required_steps, resolve_model
from ..rundir import RunDir
from ..stages import Stage
from ..ui import note
from .common import (
    Section,
    Text,
    TextSelection,
    analyses,
    load_texts,
    number,
    percent,
    selection_requirements,
    write_analysis,
)
from .text import REFLECTION_KEYWORDS, describe, trace_features

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


def group_stats(rows: Sequence[dict], keywords: Sequence[str]) -> dict:
    """Statistics of a group of traces (rows of `trace_features` plus `tokens`)."""
    tokens = [r["tokens"] for r in rows if r["tokens"] is not None]
    reflecting = [r for r in rows if any(r["keywords"].values())]
    return {
        "traces": len(rows),
        "tokens": describe(tokens),
        "words": describe([r["words"] for r in rows]),
        "lines": describe([r["lines"] for r in rows]),
        "sentences": describe([r["sentences"] for r in rows]),
        "reflections_per_trace": sum(sum(r["keywords"].values()) for r in rows) / len(rows),
        "share_reflecting": len(reflecting) / len(rows),
        "keywords": {
            k: {
                "count": sum(r["keywords"][k] for r in rows),
                "share_of_traces": sum(r["keywords"][k] > 0 for r in rows) / len(rows),
            }
            for k in keywords
        },
    }


def trace_statistics(
    texts: Sequence[Text], keywords: Sequence[str], token_counts: Sequence[int | None]
) -> dict:
    rows = [
        {"task": t.task, "label": t.label, "tokens": n, **trace_features(t.completion, keywords)}
        for t, n in zip(texts, token_counts, strict=True)
    ]
    groups: dict[str, dict[str, list[dict]]] = {"by_task": defaultdict(list), "by_label": defaultdict(list),
                                                "by_task_and_label": defaultdict(list)}  # fmt: skip
    for row in rows:
        groups["by_task"][row["task"]].append(row)
        if row["label"] is not None:
            groups["by_label"][row["label"]].append(row)
            groups["by_task_and_label"][f"{row['task']} / {row['label']}"].append(row)
    return {
        "all": group_stats(rows, keywords),
        **{
            kind: {key: group_stats(members, keywords) for key, members in sorted(grouped.items())}
            for kind, grouped in groups.items()
        },
    }


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
)
