"""The evaluation harness end to end: real benchmark files, a real (testbed) model, every metric."""

import json

import pytest
from helpers import SHARED_BENCHMARKS

from reasondistill.cli import main
from reasondistill.evaluate.metrics import summarise
from reasondistill.records import GradedTrace, Problem, read_records
from reasondistill.rundir import RunDir
from reasondistill.stages.report import ReportConfig, render
from reasondistill.tasks import default_grader, get_benchmark

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SHARED_BENCHMARKS.exists(), reason=f"{SHARED_BENCHMARKS} not present"),
]

DATA = {
    "gsm8k": "gsm8k/test.jsonl",
    "math500": "math500/test.jsonl",
    "clutrr": "clutrr/gen_train23_test2to10/test.csv",
}


def test_eval_command_on_benchmarks_writes_every_metric_per_benchmark(testbed, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no --run-dir: results go to ./runs/eval
    data_files = ",".join(f"{name}={SHARED_BENCHMARKS / path}" for name, path in DATA.items())
    main([
        "eval", "--model", "testbed:teacher", "--benchmarks", "gsm8k,math500,clutrr", "--data-file", data_files,
        "--n", "4", "--temperature", "0.6", "--limit", "6", "--max-new-tokens", "24", "--batch-size", "32",
    ])  # fmt: skip
    run = RunDir(tmp_path / "runs" / "eval")
    for name in DATA:
        result = json.loads((run.eval_dir("teacher") / f"{name}.json").read_text())
        assert result["grader"] == default_grader(name).id and result["data"].endswith(DATA[name])
        sampled = result["sampled"]
        assert (
            sampled["temperature"] == 0.6 and sampled["problems"] == 6 and sampled["samples_per_problem"] == 4
        )
        graded = read_records(run.eval_dir("teacher") / f"{name}.sampled.parquet", GradedTrace)
        assert len(graded) == 24 and {g.grader for g in graded} == {result["grader"]}
        assert all(g.completion_tokens <= 24 for g in graded)
        # The JSON holds exactly what the graded completions give.
        problems = {p.id: p for p in get_benchmark(name).load(SHARED_BENCHMARKS / DATA[name], limit=6)}
        per_problem = [graded[i : i + 4] for i in range(0, 24, 4)]
        expected = summarise(per_problem, [problems[s[0].problem_id].difficulty for s in per_problem])
        flexible = sampled.pop("flexible", None)
        assert sampled == {"temperature": 0.6, **expected}
        # Numeric benchmarks are graded a second time with the last number read as well.
        assert (flexible is not None) == (name == "gsm8k")
        if flexible:
            lenient = default_grader(name).flexible()
            labels = [
                lenient.grade(g.completion, problems[g.problem_id], g.finish_reason).label for g in graded
            ]
            assert flexible == {
                "grader": lenient.id,
                "accuracy": pytest.approx(labels.count("correct") / 24),
                "unparseable_share": pytest.approx(labels.count("unparseable") / 24),
            }
            assert flexible["unparseable_share"] <= sampled["unparseable_share"]
        for key in (
            "pass@1",
            "pass@2",
            "pass@4",
            "maj@2",
            "maj@4",
            "median_completion_tokens",
            "correct_per_1k_tokens",
        ):
            assert key in sampled
        assert result["greedy"]["samples_per_problem"] == 1
    math = json.loads((run.eval_dir("teacher") / "math500.json").read_text())
    assert math["difficulty"] == "MATH level" and set(math["sampled"]["by_difficulty"]) <= {
        "1",
        "2",
        "3",
        "4",
        "5",
    }
    assert sum(level["problems"] for level in math["sampled"]["by_difficulty"].values()) == 6

    render(run, ReportConfig())
    report = (run.root / "report.md").read_text()
    assert "## Accuracy by difficulty" in report and "| math500 | MATH level |" in report
    assert "| clutrr | teacher |" in report and "maj@4" in report
    assert "## Answer extraction (strict and flexible)" in report
    assert (
        f"| gsm8k | teacher | greedy | {100 * result_of(run, 'gsm8k')['greedy']['accuracy']:.1f}% |" in report
    )


def result_of(run: RunDir, task: str) -> dict:
    return json.loads((run.eval_dir("teacher") / f"{task}.json").read_text())


def test_the_harness_scores_gold_solutions_as_perfect_on_every_math_level():
    """The metrics path without a model: MATH-500 gold solutions, graded and summarised by level."""
    from reasondistill.generate.base import Completion, make_traces
    from reasondistill.verify.grading import grade_trace

    problems: list[Problem] = get_benchmark("math500").load(SHARED_BENCHMARKS / DATA["math500"])[::10]
    grader = default_grader("math500")
    per_problem = [
        [
            grade_trace(trace, p, grader)
            for trace in make_traces(
                p, [Completion(p.solution, [], "stop", 1, len(p.solution.split()))], "{}"
            )
        ]
        for p in problems
    ]
    summary = summarise(per_problem, [p.difficulty for p in problems])
    assert summary["accuracy"] == 1.0 and summary["labels"] == {"correct": 50}
    assert set(summary["by_difficulty"]) == {"1", "2", "3", "4", "5"}
    assert all(level["accuracy"] == 1.0 for level in summary["by_difficulty"].values())


def test_the_report_warns_when_verify_and_eval_graded_a_task_differently(tmp_path):
    run = RunDir(tmp_path)
    verify = {
        "seconds": 1,
        "stats": {"labels": {"gsm8k": {"correct": 3}}, "graders": {"gsm8k": "numeric@1+aaaa"}},
    }
    run.update_manifest(steps={"verify:teacher": verify})
    result = {"task": "gsm8k", "model": "m", "parameters": 1, "grader": "math-verify@1+bbbb", "greedy": {
        "accuracy": 0.5, "mean_completion_tokens": 10, "correct_per_1k_tokens": 50.0}}  # fmt: skip
    (tmp_path / "eval" / "m").mkdir(parents=True)
    (tmp_path / "eval" / "m" / "gsm8k.json").write_text(json.dumps(result))
    render(run, ReportConfig())
    assert (
        "gsm8k was filtered by `verify:teacher` with grader `numeric@1+aaaa` but evaluated with `math-verify@1+bbbb`"
        in (tmp_path / "report.md").read_text()
    )


def test_the_report_shows_strict_and_flexible_accuracy_and_warns_above_ten_percent_unparseable(tmp_path):
    run = RunDir(tmp_path)
    results = {
        # answers "A: 18": the strict grader reads 1 in 5, the last number reads them all
        "a": {"accuracy": 0.2, "labels": {"correct": 1, "unparseable": 4}, "unparseable_share": 0.8,
              "flexible": {"grader": "numeric@2+ffff", "accuracy": 0.8, "unparseable_share": 0.0}},
        "b": {"accuracy": 0.9, "labels": {"correct": 9, "unparseable": 1}, "unparseable_share": 0.1,
              "flexible": {"grader": "numeric@2+ffff", "accuracy": 0.9, "unparseable_share": 0.1}},
    }  # fmt: skip
    for model, greedy in results.items():
        result = {"task": "gsm8k", "model": model, "parameters": 1, "grader": "numeric@2+aaaa",
                  "greedy": {**greedy, "mean_completion_tokens": 10, "correct_per_1k_tokens": 50.0}}  # fmt: skip
        (tmp_path / "eval" / model).mkdir(parents=True)
        (tmp_path / "eval" / model / "gsm8k.json").write_text(json.dumps(result))
    render(run, ReportConfig())
    report = (tmp_path / "report.md").read_text()
    assert "| gsm8k | a | greedy | 20.0% | 80.0% | 80.0% | 0.0% |" in report
    assert "| gsm8k | b | greedy | 90.0% | 10.0% | 90.0% | 10.0% |" in report
    warnings = [line for line in report.splitlines() if line.startswith("> **Warning:**")]
    # 10% is not above 10%: only model a is warned about
    assert warnings == [
        "> **Warning:** a on gsm8k (greedy): 80.0% of completions have no answer `numeric@2+aaaa` reads; "
        "flexible extraction scores 80.0%"
    ]
