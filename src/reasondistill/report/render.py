"""The run report: tables of a run's results, pipeline, curation and teacher usage, the accuracy
plot, and the markdown and self-contained html documents that hold them with the sections other
stages declare.

Library: everything comes in as data (the run's manifest, its evaluation results, the declared
sections, the package versions); the `report` stage reads the run directory and writes what
`render_report` returns.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..evaluate.metrics import UNPARSEABLE_WARNING
from ..generate.shards import step_usage, usage_totals
from ..tasks import BENCHMARKS
from .tables import Section, Table, html_table, markdown_table, percent

MODES = ("greedy", "sampled")
FIGURE = "figures/accuracy_vs_tokens.png"  # where the plot goes, relative to the run directory


def results_table(results: list[dict]) -> Table:
    ks = sorted(
        {key for r in results for key in r.get("sampled", {}) if key.startswith("pass@")},
        key=lambda k: int(k[5:]),
    )
    majority = f"maj@{ks[-1][5:]}" if len(ks) > 1 else None
    headers = [
        "task", "model", "parameters", "greedy acc.", "greedy tokens", "sampled acc. (pass@1)", *ks[1:],
        *([majority] if majority else []), "sampled tokens (mean / median)", "correct per 1k tokens",
    ]  # fmt: skip
    rows = []
    for r in sorted(results, key=lambda r: (r["task"], -(r.get("greedy") or r["sampled"])["accuracy"])):
        greedy, sampled = r.get("greedy", {}), r.get("sampled", {})
        rows.append([
            r["task"], r["model"], f"{r['parameters'] / 1e6:.2f}M" if r["parameters"] else "served",
            percent(greedy.get("accuracy")), f"{greedy['mean_completion_tokens']:.0f}" if greedy else "–",
            percent(sampled.get("accuracy")), *[percent(sampled.get(k)) for k in ks[1:]],
            *([percent(sampled.get(majority))] if majority else []),
            f"{sampled['mean_completion_tokens']:.0f} / {sampled['median_completion_tokens']:.0f}" if sampled else "–",
            f"{(sampled or greedy)['correct_per_1k_tokens']:.1f}",
        ])  # fmt: skip
    return headers, rows


def difficulty_table(results: list[dict]) -> Table:
    """Accuracy per difficulty level, one column per model: "greedy / sampled pass@1"."""
    with_levels = [r for r in results if any("by_difficulty" in r.get(mode, {}) for mode in MODES)]
    models = sorted({r["model"] for r in with_levels})
    by_task_model = {(r["task"], r["model"]): r for r in with_levels}
    rows = []
    for task in sorted({r["task"] for r in with_levels}):
        task_results = [r for r in with_levels if r["task"] == task]
        levels = {
            level: stats["problems"]
            for r in task_results
            for mode in MODES
            for level, stats in r.get(mode, {}).get("by_difficulty", {}).items()
        }
        for level in sorted(levels, key=int):
            cells = []
            for model in models:
                r = by_task_model.get((task, model), {})
                accuracies = [r[mode]["by_difficulty"].get(level) for mode in MODES if mode in r]
                cells.append(" / ".join(percent(a["accuracy"]) if a else "–" for a in accuracies) or "–")
            rows.append(
                [task, task_results[0].get("difficulty") or "difficulty", level, str(levels[level]), *cells]
            )
    return ["task", "difficulty", "level", "problems", *models], rows


def suite_table(results: list[dict]) -> Table:
    """Per suite (LogiGLUE) and model: the mean accuracy over the suite's datasets evaluated, by
    reasoning type and by in-domain / leave-out, each with the number of datasets it averages (greedy
    accuracy where there is one, else sampled pass@1; per-dataset accuracies are in the results)."""
    groups: dict[tuple[str, str], dict[str, list[float]]] = {}
    for r in results:
        tags = BENCHMARKS[r["task"]].tags if r["task"] in BENCHMARKS else {}
        if "suite" not in tags:
            continue
        accuracy = (r.get("greedy") or r["sampled"])["accuracy"]
        by = groups.setdefault((tags["suite"], r["model"]), {})
        for key in ("all", tags["reasoning"], tags["domain"]):
            by.setdefault(key, []).append(accuracy)
    columns = ["deductive", "abductive", "inductive", "mixed", "in-domain", "leave-out", "all"]
    rows = [
        [suite, model, *(_mean_of(by.get(column)) for column in columns)]
        for (suite, model), by in sorted(groups.items())
    ]
    return ["suite", "model", *columns], rows


def _mean_of(values: list[float] | None) -> str:
    return f"{percent(sum(values) / len(values))} ({len(values)})" if values else "–"


def _unparseable(summary: dict) -> float:
    """A mode's unparseable share (computed from its labels for results from before it was stored)."""
    if "unparseable_share" in summary:
        return summary["unparseable_share"]
    labels = summary.get("labels", {})
    return labels.get("unparseable", 0) / max(1, sum(labels.values()))


def extraction_table(results: list[dict]) -> Table:
    """Per task, model and mode: accuracy and unparseable share under the task's grader (strict) and,
    for numeric tasks, under its flexible twin (the last number as well), as lm-eval-harness's
    strict-match and flexible-extract."""
    rows = []
    for r in sorted(results, key=lambda r: (r["task"], r["model"])):
        for mode in MODES:
            if mode not in r:
                continue
            summary, flexible = r[mode], r[mode].get("flexible")
            rows.append([
                r["task"], r["model"], mode,
                percent(summary["accuracy"]), percent(_unparseable(summary)),
                percent(flexible["accuracy"]) if flexible else "–",
                percent(flexible["unparseable_share"]) if flexible else "–",
            ])  # fmt: skip
    headers = [
        "task",
        "model",
        "mode",
        "strict acc.",
        "strict unparseable",
        "flexible acc.",
        "flexible unparseable",
    ]
    return headers, rows


def unparseable_warnings(results: list[dict]) -> list[str]:
    """Results where more than 10% of completions have no answer the grader reads."""
    return [
        f"{r['model']} on {r['task']} ({mode}): {percent(_unparseable(r[mode]))} of completions have no answer "
        f"`{r['grader']}` reads"
        + (
            f"; flexible extraction scores {percent(r[mode]['flexible']['accuracy'])}"
            if "flexible" in r[mode]
            else ""
        )
        for r in sorted(results, key=lambda r: (r["task"], r["model"]))
        for mode in MODES
        if mode in r and _unparseable(r[mode]) > UNPARSEABLE_WARNING
    ]


def pipeline_table(manifest: dict) -> Table:
    rows = []
    for key, step in manifest.get("steps", {}).items():
        stats = step.get("stats", {})
        if key.startswith("generate:"):
            detail = f"{stats['traces']} traces of {stats['problems']} problems, {stats['completion_tokens']} completion tokens, finish {stats['finish_reasons']}"
        elif key.startswith("score:"):
            detail = f"top-{stats['top_k']} teacher distribution over {stats['traces']} traces, {stats['tokens']} tokens, {stats['bytes_per_token']} bytes/token"
        elif key.startswith("verify:"):
            detail = "; ".join(
                f"{task}: {c.get('correct', 0)}/{sum(c.values())} correct"
                for task, c in stats["labels"].items()
            )
        elif key.startswith("curate:") and "contaminated" in stats:
            benchmarks = ", ".join(f"{name} ({n} problems)" for name, n in stats["benchmarks"].items())
            detail = (f"{stats['contaminated']} of {stats['input']} examples share a {stats['ngram']}-gram with "
                      f"{benchmarks} {stats['by_benchmark']}; dropped {stats['dropped']}")  # fmt: skip
        elif key.startswith("curate:"):
            detail = f"kept {sum(stats['kept'].values())} of {stats['input']} ({stats['kept']}), dropped {stats['dropped']}"
        elif key.startswith("train:"):
            detail = (f"{stats['examples']} examples, {stats['completion_tokens']} completion tokens, {stats['steps']} steps, "
                      f"loss {stats['train_loss']:.3f}, {stats['parameters'] / 1e6:.2f}M parameters"
                      + _truncation_detail(stats.get("truncation")))  # fmt: skip
        else:
            continue
        rows.append([key, detail, f"{step['seconds']:.0f}s"])
    return ["step", "result", "time"], rows


def _truncation_detail(truncation: dict | None) -> str:
    if not truncation or not truncation["longer_than_max_length"]:
        return ""
    n, limit = truncation["longer_than_max_length"], truncation["max_length"]
    beyond = truncation.get("tokens_beyond_max_length")  # absent from runs made before it was counted
    if truncation["mode"] == "drop":
        return f"; {n} examples longer than max_length={limit} dropped"
    lost = f", {beyond} completion tokens lost" if beyond is not None else ""
    return f"; {n} examples cut at max_length={limit} (their completions lost their end{lost})"


def curation_table(manifest: dict) -> Table:
    """What each curation operator of each curate step kept and dropped, in the order they ran."""
    rows = []
    for key, step in manifest.get("steps", {}).items():
        for op in step.get("stats", {}).get("operators", []):
            dropped = ", ".join(f"{reason} {n}" for reason, n in op["dropped"].items()) or "–"
            rows.append([key, op["op"], str(op["input"]), str(op["kept"]), dropped])
    return ["step", "operator", "in", "kept", "dropped"], rows


def usage_table(manifest: dict, evaluation: bool = False) -> Table:
    """What calling the teachers (with `evaluation`: the evaluated models) took: requests, retries,
    failures, tokens, time and money, with a total."""
    steps = step_usage(manifest, evaluation)
    if not steps:
        return [], []

    def row(name: str, backend: str, usage: dict, failed_rows: int) -> list[str]:
        rate = usage["completion_tokens"] / usage["seconds"] if usage["seconds"] else 0
        cost = "–" if usage["cost"] is None else f"{usage['cost']:.4f}"
        counts = [
            usage["requests"],
            usage["retries"],
            failed_rows,
            usage.get("recovered_by_rerun", 0),  # absent from runs made before it was counted
            usage["prompt_tokens"],
            usage["completion_tokens"],
        ]
        return [name, backend, *(f"{c:,}" for c in counts), f"{usage['seconds']:.0f}s", f"{rate:,.0f}", cost]

    rows = [row(key, u["backend"], u, len(u["failed"])) for key, u in steps.items()]
    totals = usage_totals(manifest, evaluation)
    rows.append(row("total", "", totals, totals["failed_rows"]))
    header = [
        "step",
        "backend",
        "requests",
        "retries",
        "failed rows",
        "recovered by a rerun",
        "prompt tokens",
        "completion tokens",
        "time",
        "tok/s",
        "cost",
    ]
    return header, rows


def grader_mismatches(manifest: dict, results: list[dict]) -> list[str]:
    """Tasks whose training data was filtered by one grader and whose scores come from another."""
    filtered = {
        (task, grader, key)
        for key, step in manifest.get("steps", {}).items()
        if key.startswith("verify:")
        for task, grader in step.get("stats", {}).get("graders", {}).items()
    }
    scored = {(r["task"], r["grader"]) for r in results}
    return [
        f"{task} was filtered by `{key}` with grader `{grader}` but evaluated with `{other}`"
        for task, grader, key in sorted(filtered)
        for scored_task, other in sorted(scored)
        if scored_task == task and other != grader
    ]


def plot_accuracy_vs_tokens(results: list[dict]) -> bytes:
    """One panel per task: each model's accuracy against its mean completion tokens, as a PNG."""
    # Imported here: matplotlib is slow to import, and only a report with results draws a plot.
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers and CI
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in results})
    models = sorted({r["model"] for r in results})
    markers = {model: "osD^v<>pP*"[i % 10] for i, model in enumerate(models)}
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for r in (r for r in results if r["task"] == task):
            for mode, filled in (("greedy", True), ("sampled", False)):
                if mode in r:
                    ax.scatter(
                        r[mode]["mean_completion_tokens"], 100 * r[mode]["accuracy"], s=60, marker=markers[r["model"]],
                        facecolors=None if filled else "none", edgecolors="C" + str(models.index(r["model"])),
                        color="C" + str(models.index(r["model"])), label=f"{r['model']} ({mode})",
                    )  # fmt: skip
        ax.set_title(task)
        ax.set_xlabel("mean completion tokens")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), frameon=False)
    fig.tight_layout(rect=(0, 0.08 + 0.05 * (len(labels) // 3), 1, 1))
    png = io.BytesIO()
    fig.savefig(png, dpi=120, format="png")
    plt.close(fig)
    return png.getvalue()


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f3f3f3}tr:nth-child(even) td{background:#fafafa}img{max-width:100%}code{background:#f3f3f3;padding:1px 4px}"""


@dataclass(frozen=True)
class Report:
    markdown: str  # report.md
    html: str  # report.html, the plot embedded
    figure: bytes | None  # the PNG of FIGURE; None without evaluation results


def render_report(
    title: str,
    run_root: Path,
    manifest: dict,
    results: list[dict],
    declared: Sequence[Section],
    env: dict,
) -> Report:
    """The report of a run from its manifest, its evaluation results (eval/<model>/<task>.json) and
    the sections its stages declare (rendered after the curation table, in their order); `env` is
    `rundir.environment()`, for the footer. Empty tables are left out."""
    sections = [
        ("Results", results_table(results)),
        ("Accuracy by difficulty (greedy / sampled pass@1)", difficulty_table(results)),
        ("Suites: mean accuracy over datasets (datasets averaged)", suite_table(results)),
        ("Answer extraction (strict and flexible)", extraction_table(results)),
        ("Pipeline", pipeline_table(manifest)),
        ("Curation", curation_table(manifest)),
        *declared,
        ("Teacher usage and cost", usage_table(manifest)),
        ("Evaluation usage and cost", usage_table(manifest, evaluation=True)),
    ]
    sections = [(heading, table) for heading, table in sections if table[1]]
    graders = sorted({(r["task"], r["grader"]) for r in results})
    intro = (
        f"Run directory `{run_root}`. Accuracy is graded by each task's grader "
        f"({', '.join(f'{t}: `{g}`' for t, g in graders)}); sampled accuracy is pass@1 averaged over all samples, "
        f"pass@k uses the unbiased estimator, maj@k grades the most frequent answer of k samples."
    )
    footer = f"reasondistill {env['packages']['reasondistill']}, torch {env['packages']['torch']}, transformers {env['packages']['transformers']}, Python {env['python']}"
    figure = plot_accuracy_vs_tokens(results) if results else None

    warnings = grader_mismatches(manifest, results) + unparseable_warnings(results)
    md = [f"# {title}", "", intro, "", *[f"> **Warning:** {w}\n" for w in warnings]]
    page = [f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(intro)}</p>"]
    page += [f"<p><strong>Warning:</strong> {html.escape(w)}</p>" for w in warnings]
    for heading, table in sections:
        md += [f"## {heading}", "", markdown_table(table), ""]
        page += [f"<h2>{heading}</h2>", html_table(table)]
        if heading == "Results" and figure is not None:
            md += [f"![accuracy against mean completion tokens]({FIGURE})", ""]
            encoded = base64.b64encode(figure).decode()
            page.append(
                f'<img alt="accuracy against mean completion tokens" src="data:image/png;base64,{encoded}">'
            )
    md.append(f"_{footer}_")
    page.append(f"<p><small>{html.escape(footer)}</small></p>")
    document = f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{_CSS}</style></head><body>{''.join(page)}</body></html>"
    return Report("\n".join(md) + "\n", document, figure)
