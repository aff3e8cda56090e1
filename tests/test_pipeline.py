"""The whole slice on the testbed: teacher quality, every stage's outputs, reruns, resumption, errors."""

import json
import textwrap

import pytest
from transformers import AutoModelForCausalLM

from reasondistill.cli import main
from reasondistill.generate.base import SamplingParams
from reasondistill.generate.hf import HFGenerator
from reasondistill.recipe import run_recipe
from reasondistill.records import GradedTrace, Trace, TrainingExample, read_records
from reasondistill.rundir import RunDir
from reasondistill.store import trace_shards
from reasondistill.tasks import get_task

pytestmark = pytest.mark.slow

RECIPE = """
run_dir: {run_dir}
seed: 5
steps:
  - problems: {{tasks: [arithmetic, word_problems, logic], train: 12, test: 6, difficulty: {{arithmetic: [2, 3]}}}}
  - generate: {{model: "testbed:teacher", name: teacher, n: 2, temperature: 0.8, max_new_tokens: 160, shard_size: 10}}
  - verify: {{traces: teacher}}
  - curate: {{name: distill, traces: teacher, keep: [correct]}}
  - curate: {{name: answer-only, traces: teacher, keep: [correct], reasoning: drop}}
  - train: {{name: student, init: "testbed:student", data: distill, epochs: 1, learning_rate: 0.003, batch_size: 8}}
  - eval: {{models: ["testbed:teacher", student], n: 2, max_new_tokens: 160}}
  - report: {{}}
"""


def accuracy(model_dir, task_name, difficulty, n=100):
    task = get_task(task_name)
    problems = task.sample("test", n, seed=11, difficulties=[difficulty])
    outputs = HFGenerator(model_dir, batch_size=128).generate(
        [p.messages for p in problems], SamplingParams(temperature=0, max_new_tokens=200)
    )
    return (
        sum(
            task.grader.grade(o[0].text, p, o[0].finish_reason).label == "correct"
            for o, p in zip(outputs, problems, strict=True)
        )
        / n
    )


@pytest.mark.training_sensitive
def test_the_testbed_teacher_solves_three_digit_addition_and_beats_chance_elsewhere(testbed, margin):
    margin("teacher: 3-digit additions", accuracy(testbed / "teacher", "arithmetic", 3), ">=", 0.95)
    # guessing a number in 0-99: about 1%
    margin("teacher: 2-step word problems", accuracy(testbed / "teacher", "word_problems", 2), ">=", 0.05)
    margin("teacher: depth-2 logic", accuracy(testbed / "teacher", "logic", 2), ">=", 0.45)  # guessing: 33%


@pytest.fixture(scope="module")
def run(testbed, tmp_path_factory) -> RunDir:
    root = tmp_path_factory.mktemp("pipeline")
    recipe = root / "recipe.yaml"
    recipe.write_text(textwrap.dedent(RECIPE.format(run_dir=root / "run")))
    run_recipe(recipe)
    return RunDir(root / "run")


def test_every_stage_writes_its_documented_outputs(run):
    manifest = json.loads(run.manifest_path.read_text())
    assert set(manifest["steps"]) == {
        "problems", "generate:teacher", "verify:teacher", "curate:distill", "curate:answer-only", "train:student",
        "eval:teacher", "eval:student",
    }  # fmt: skip
    for step in manifest["steps"].values():
        assert step["fingerprint"] and step["environment"]["packages"]["torch"] and "config" in step
    assert manifest["steps"]["generate:teacher"]["config"]["seed"] == 5
    steps = manifest["steps"]  # model paths, resolved from the references in the recipe
    assert steps["generate:teacher"]["stats"]["model"].endswith("/teacher")
    assert steps["train:student"]["stats"]["init"].endswith("/student")
    assert steps["eval:student"]["stats"]["model"] == str(run.checkpoint("student"))
    assert "content" in manifest["recipe"]

    traces = [t for shard in trace_shards(run.traces("teacher")) for t in read_records(shard, Trace)]
    assert len(traces) == 3 * 12 * 2
    assert all(t.finish_reason in ("stop", "length") and t.completion_tokens > 0 for t in traces)
    assert json.loads(traces[0].source)["sampling"]["temperature"] == 0.8

    graded = read_records(run.graded("teacher"), GradedTrace)
    assert len(graded) == len(traces) and {g.label for g in graded} <= {"correct", "incorrect", "unparseable"}
    assert {g.grader for g in graded if g.task == "logic"} == {get_task("logic").grader.id}
    assert (
        manifest["steps"]["verify:teacher"]["stats"]["graders"]["arithmetic"]
        == get_task("arithmetic").grader.id
    )

    distill = read_records(run.curated("distill"), TrainingExample)
    answer_only = read_records(run.curated("answer-only"), TrainingExample)
    assert len(distill) == len(answer_only) == sum(g.label == "correct" for g in graded) > 0
    assert all("<think>" in e.completion for e in distill)
    assert all(e.completion.startswith("The answer is") for e in answer_only)

    student = AutoModelForCausalLM.from_pretrained(run.checkpoint("student"))
    assert student.config.model_type == "qwen2"
    assert (run.checkpoint("student") / "tokenizer.json").exists()

    result = json.loads((run.eval_dir("student") / "arithmetic.json").read_text())
    assert result["greedy"]["samples_per_problem"] == 1 and result["sampled"]["samples_per_problem"] == 2
    assert {"accuracy", "pass@1", "pass@2", "maj@2", "mean_completion_tokens", "labels"} <= set(
        result["sampled"]
    )
    assert set(result["sampled"]["by_difficulty"]) <= {"2", "3"}  # the recipe's arithmetic difficulties
    assert sum(level["problems"] for level in result["greedy"]["by_difficulty"].values()) == 6
    assert len(read_records(run.eval_dir("student") / "arithmetic.sampled.parquet", GradedTrace)) == 6 * 2

    report = (run.root / "report.md").read_text()
    assert "| arithmetic | teacher |" in report and "accuracy_vs_tokens.png" in report
    assert "| arithmetic | digits per number | 2 |" in report  # the accuracy-by-difficulty table
    assert "data:image/png;base64," in (run.root / "report.html").read_text()


def snapshot(run: RunDir) -> dict:
    """Modification times of every output except the manifest and the report (always redrawn)."""
    skip = {"manifest.json", "report.md", "report.html", "accuracy_vs_tokens.png"}
    return {p: p.stat().st_mtime_ns for p in run.root.rglob("*") if p.is_file() and p.name not in skip}


def test_a_rerun_skips_all_finished_work(run):
    before = snapshot(run)
    run_recipe(run.root.parent / "recipe.yaml")
    assert snapshot(run) == before


def test_a_finished_step_whose_output_is_gone_is_recomputed(run):
    path = run.curated("answer-only")
    before = read_records(path, TrainingExample)
    path.unlink()
    run_recipe(run.root.parent / "recipe.yaml")
    assert read_records(path, TrainingExample) == before
    manifest = json.loads(run.manifest_path.read_text())
    assert manifest["steps"]["curate:answer-only"]["outputs"] == [
        "curated/answer-only.parquet",
        "curation/answer-only.parquet",
    ]


def test_changed_settings_stop_unless_overwrite(run, capsys):
    args = [
        "curate",
        "--run-dir",
        str(run.root),
        "--name",
        "distill",
        "--traces",
        "teacher",
        "--seed",
        "5",  # the recipe's seed, as its steps get it
        "--max-per-problem",
        "1",
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert (
        "step 'curate:distill' already ran with other settings (max_per_problem)" in capsys.readouterr().err
    )
    main([*args, "--overwrite"])
    capped = read_records(run.curated("distill"), TrainingExample)
    assert len(capped) == len({e.problem_id for e in capped})
    main([*args[:-2], "--overwrite"])  # back to the recipe's settings for the other tests


def test_an_interrupted_generation_resumes_with_no_lost_or_duplicated_rows(run):
    directory = run.traces("teacher")
    expected = [t for shard in trace_shards(directory) for t in read_records(shard, Trace)]
    # A crash after shard 2 was written but before it was recorded, with shard 1 not written yet:
    index = json.loads((directory / "index.json").read_text())
    index["finished"] = [i for i in index["finished"] if i not in (1, 2)]
    (directory / "index.json").write_text(json.dumps(index))
    (directory / "shard-00001.parquet").unlink()
    manifest = json.loads(run.manifest_path.read_text())
    del manifest["steps"]["generate:teacher"]
    run.manifest_path.write_text(json.dumps(manifest))

    run_recipe(run.root.parent / "recipe.yaml")
    resumed = [t for shard in trace_shards(directory) for t in read_records(shard, Trace)]
    assert resumed == expected
    assert len({(t.problem_id, t.sample_idx) for t in resumed}) == len(resumed)


def test_a_malformed_training_file_row_is_one_clear_error(run, tmp_path, capsys):
    data = tmp_path / "examples.jsonl"
    good = {
        "problem_id": "p",
        "task": "arithmetic",
        "messages": [{"role": "user", "content": "1 + 1?"}],
        "completion": "2",
    }
    data.write_text(json.dumps(good) + "\n" + json.dumps({**good, "completion": 2}) + "\n")
    with pytest.raises(SystemExit):
        main(
            [
                "train",
                "--run-dir",
                str(run.root),
                "--name",
                "from-file",
                "--init",
                "testbed:student",
                "--data",
                str(data),
            ]
        )
    err = capsys.readouterr().err.strip()
    assert err == f"error: {data} line 2: completion: Input should be a valid string (got 2)"


def test_the_testbed_build_command_reuses_the_cache(testbed, capsys):
    before = (testbed / "teacher" / "model.safetensors").stat().st_mtime_ns
    main(["testbed", "build"])
    assert f"testbed models in {testbed}" in capsys.readouterr().err.replace("\n", "")
    assert (testbed / "teacher" / "model.safetensors").stat().st_mtime_ns == before
