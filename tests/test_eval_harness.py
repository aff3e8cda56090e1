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
        assert sampled == {"temperature": 0.6, **expected}
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
