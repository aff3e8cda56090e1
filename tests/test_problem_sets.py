"""Problem sets from files and Hub datasets: fields, answers, ids, splits, sources, and bad input."""

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import SHARED_BENCHMARKS

from reasondistill.cli import main
from reasondistill.errors import UserError
from reasondistill.records import Problem, TrainingExample, file_sha256, read_records
from reasondistill.rundir import RunDir
from reasondistill.stages.problems import ProblemsConfig, run_problems
from reasondistill.tasks.problem_sets import ProblemSetSpec, after_hash_mark, last_boxed, load_problem_set

GSM8K_TRAIN = SHARED_BENCHMARKS / "gsm8k" / "train.jsonl"
needs_gsm8k = pytest.mark.skipif(not GSM8K_TRAIN.exists(), reason=f"{GSM8K_TRAIN} not present")

ROWS = [
    {"uid": "a1", "problem": "What is 1 + 1?", "solution": "So \\boxed{2}.", "level": "Level 1"},
    {
        "uid": "a2",
        "problem": "Half of 1?",
        "solution": "It is \\boxed{\\frac{1}{2}} exactly.",
        "level": "Level 3",
    },
    {
        "uid": "a3",
        "problem": "Area of a unit circle?",
        "solution": "First \\boxed{1}, then \\boxed{\\pi}.",
        "level": "Level ?",
    },
]


def write(path, rows):
    """`rows` in the format of `path`'s suffix."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def math_set(file, **options) -> ProblemSetSpec:
    fields = {"question": "problem", "id": "uid", "difficulty": "level"}
    return ProblemSetSpec(
        **{"name": "mine", "file": str(file), "fields": fields, "answer_from": "last-boxed", **options}
    )


def test_answers_come_from_the_last_boxed_or_the_hash_mark():
    assert last_boxed("a \\boxed{3} b \\boxed{\\frac{1}{\\sqrt{2}}} c") == "\\frac{1}{\\sqrt{2}}"
    assert last_boxed("no box") is None and last_boxed("\\boxed{unclosed") is None
    assert after_hash_mark("work\n#### 1,234") == "1234" and after_hash_mark("no mark") is None


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_file_format_gives_the_same_problems(tmp_path, suffix):
    loaded = load_problem_set(math_set(write(tmp_path / f"set{suffix}", ROWS)))
    problems = loaded.train
    assert [p.id for p in problems] == ["mine-a1", "mine-a2", "mine-a3"]
    assert [p.answer for p in problems] == ["2", "\\frac{1}{2}", "\\pi"]
    assert [p.difficulty for p in problems] == [1, 3, None]  # "Level ?" has no level
    assert problems[1].solution == ROWS[1]["solution"] and problems[0].task == "mine"
    assert problems[0].messages[-1].content.startswith("What is 1 + 1?\n\nPlease reason step by step")
    assert loaded.test == [] and loaded.source["sha256"] == file_sha256(tmp_path / f"set{suffix}")
    assert loaded.source["format"] == suffix[1:]


@needs_gsm8k
def test_gsm8k_train_rows_through_the_preset_with_a_local_copy():
    spec = ProblemSetSpec(
        name="gsm", preset="gsm8k", file=str(GSM8K_TRAIN), limit=40, test_fraction=0.25, seed=3
    )
    assert spec.hub is None and spec.grader == "numeric" and spec.answer_from == "hash-mark"
    loaded = load_problem_set(spec)
    assert (len(loaded.train), len(loaded.test)) == (30, 10)
    first = next(
        p for p in loaded.train + loaded.test if p.messages[0].content.startswith("Natalia sold clips")
    )
    assert first.answer == "72" and first.solution.endswith("#### 72")
    # stable ids (a hash of the question), a seeded split that another seed changes
    again = load_problem_set(spec)
    assert [p.id for p in again.test] == [p.id for p in loaded.test]
    other = load_problem_set(spec.model_copy(update={"seed": 4}))
    assert {p.id for p in other.test} != {p.id for p in loaded.test}
    assert {p.id for p in other.test + other.train} == {p.id for p in loaded.test + loaded.train}
    assert loaded.source == {
        "file": str(GSM8K_TRAIN.resolve()),
        "format": "jsonl",
        "sha256": file_sha256(GSM8K_TRAIN),
    }


def test_a_hub_dataset_loads_through_datasets(tmp_path):
    """`load_dataset` pointed at a local file (the json builder): nothing downloads."""
    data = write(tmp_path / "rows.jsonl", ROWS)
    spec = ProblemSetSpec(
        name="hubset", hub="json", data_files=[str(data)], fields={"question": "problem", "id": "uid"},
        answer_from="last-boxed", system_prompt="You are careful.",
    )  # fmt: skip
    loaded = load_problem_set(spec)
    assert [p.answer for p in loaded.train] == ["2", "\\frac{1}{2}", "\\pi"]
    assert (
        loaded.train[0].messages[0].role == "system"
        and loaded.train[0].messages[0].content == "You are careful."
    )
    assert loaded.source["hub"] == "json" and loaded.source["split"] == "train"
    assert (
        loaded.source["data_files"] == {str(data.resolve()): file_sha256(data)}
        and loaded.source["fingerprint"]
    )


def test_bad_input_is_one_line_naming_the_set_row_and_field(tmp_path):
    rows = write(
        tmp_path / "rows.jsonl", [*ROWS, {"uid": "a4", "problem": "No answer here", "solution": "none"}]
    )
    with pytest.raises(UserError, match=r"rows.jsonl line 4: problem set mine: no answer by last-boxed"):
        load_problem_set(math_set(rows))
    dropped = load_problem_set(math_set(rows, bad_answer="drop"))
    assert len(dropped.train) == 3 and dropped.dropped == {"bad_answer": 1, "first": [f"{rows} line 4"]}

    with pytest.raises(
        UserError,
        match=r"line 1: problem set mine: no field 'question_text' \(question\); the row has: uid, problem",
    ):
        load_problem_set(math_set(rows, fields={"question": "question_text"}))
    with pytest.raises(UserError, match=r"problem set mine: file .*missing.jsonl not found"):
        load_problem_set(math_set(tmp_path / "missing.jsonl"))
    twice = write(tmp_path / "twice.jsonl", [ROWS[0], ROWS[1], ROWS[0]])
    with pytest.raises(
        UserError, match=r"twice.jsonl line 3: problem set mine: id 'mine-a1' already at .*line 1"
    ):
        load_problem_set(math_set(twice))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match=r"problem set mine: .*empty.jsonl holds no problems"):
        load_problem_set(math_set(tmp_path / "empty.jsonl"))
    (tmp_path / "set.txt").write_text("x")
    with pytest.raises(UserError, match=r"cannot tell the format from the suffix '.txt'; set format"):
        load_problem_set(math_set(tmp_path / "set.txt"))


def test_a_hub_id_that_cannot_be_reached_is_one_line(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    spec = ProblemSetSpec(name="far", hub="someone/not-cached-anywhere")
    with pytest.raises(
        UserError,
        match=r"problem set far: could not load someone/not-cached-anywhere .*give a local copy as file:",
    ):
        load_problem_set(spec)


def test_spec_errors_are_caught_when_the_config_is_read():
    with pytest.raises(ValueError, match="give one source, file or hub"):
        ProblemSetSpec(name="x")
    with pytest.raises(ValueError, match="unknown preset 'gsm9k'"):
        ProblemSetSpec(name="x", preset="gsm9k")
    with pytest.raises(ValueError, match="template must hold"):
        ProblemSetSpec(name="x", file="a.jsonl", template="no placeholder")
    with pytest.raises(ValueError, match="unknown grader"):
        ProblemSetSpec(name="x", file="a.jsonl", grader="nope")
    with pytest.raises(ValueError, match="problem set name 'arithmetic' is taken"):
        ProblemsConfig(sets=[{"name": "arithmetic", "file": "a.jsonl"}])


def test_the_problems_stage_writes_sets_and_records_their_sources(tmp_path):
    data = write(tmp_path / "rows.jsonl", ROWS * 1)
    run = RunDir(tmp_path / "run")
    cfg = ProblemsConfig(sets=[math_set(data, test_fraction=0.34).model_dump(exclude_unset=True)])
    assert cfg.task_names() == []  # sets alone: no testbed tasks unless named
    run_problems(cfg, run, overwrite=False)
    train = read_records(run.problems("mine", "train"), Problem)
    test = read_records(run.problems("mine", "test"), Problem)
    assert (len(train), len(test)) == (2, 1)
    stats = run.finished_step("problems")["stats"]
    assert stats["sets"]["mine"]["source"]["sha256"] == file_sha256(data)
    assert (
        stats["sets"]["mine"]["grader"] == "math-verify:latex"
        and stats["sets"]["mine"]["difficulty_label"] == "level"
    )
    missing = ProblemsConfig(sets=[math_set(tmp_path / "gone.jsonl").model_dump(exclude_unset=True)])
    with pytest.raises(UserError, match=r"problem set mine: file .*gone.jsonl not found"):
        run_problems(missing, RunDir(tmp_path / "run2"), overwrite=False)
    # an edited file is a changed input: the step runs again instead of keeping stale problems
    write(data, ROWS[:2])
    with pytest.raises(UserError, match="other settings"):
        run_problems(cfg, run, overwrite=False)


def test_a_set_that_fails_leaves_nothing_behind(tmp_path, capsys):
    good = write(tmp_path / "good.jsonl", ROWS)
    bad = write(tmp_path / "bad.jsonl", [{"problem": "x"}])
    sets = [
        {"name": "good", "file": str(good), "fields": {"question": "problem"}, "answer_from": "last-boxed"},
        {"name": "bad", "file": str(bad), "fields": {"question": "problem"}},
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "problems",
                "--run-dir",
                str(tmp_path / "run"),
                "--tasks",
                "arithmetic",
                "--sets",
                json.dumps(sets),
            ]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "bad.jsonl line 1: problem set bad: no field 'answer' (answer); the row has: problem" in " ".join(
        err.split()
    )
    assert not (tmp_path / "run" / "problems").exists()
    assert "problems" not in RunDir(tmp_path / "run").manifest()["steps"]


PIPELINE = """
run_dir: {run_dir}
seed: 1
steps:
  - problems: {{sets: [{{name: gsm, preset: gsm8k, file: "{gsm8k}", limit: 16, test_fraction: 0.25, seed: 2}}]}}
  - generate: {{model: "testbed:teacher", name: teacher, n: 2, temperature: 0.8, max_new_tokens: 40}}
  - verify: {{traces: teacher}}
  - curate: {{name: all, traces: teacher, keep: [correct, incorrect, unparseable]}}
  - train: {{name: student, init: "testbed:student", data: all, epochs: 1, batch_size: 8, learning_rate: 0.003}}
  - eval: {{models: [student], n: 2, max_new_tokens: 24}}
  - report: {{}}
"""


@pytest.fixture(scope="module")
def gsm_run(testbed, tmp_path_factory) -> RunDir:
    """problems (GSM8K train rows from the file) → generate → verify → curate → train → eval → report."""
    from reasondistill.recipe import run_recipe

    root = tmp_path_factory.mktemp("gsm")
    recipe = root / "recipe.yaml"
    recipe.write_text(PIPELINE.format(run_dir=root / "run", gsm8k=GSM8K_TRAIN))
    run_recipe(recipe)
    return RunDir(root / "run")


@needs_gsm8k
@pytest.mark.slow
def test_a_file_of_gsm8k_train_rows_goes_through_the_pipeline(gsm_run):
    """The mechanics on someone else's problems (the testbed teacher solves next to none of them):
    the set's grader everywhere, its test split evaluated, the report naming it."""
    from reasondistill.records import GradedTrace

    run = gsm_run
    steps = run.manifest()["steps"]
    assert steps["problems"]["stats"]["problems"] == {"gsm/train": 12, "gsm/test": 4}
    graded = read_records(run.graded("teacher"), GradedTrace)
    assert len(graded) == 24 and {g.task for g in graded} == {"gsm"}
    assert {g.grader for g in graded} == {steps["verify:teacher"]["stats"]["graders"]["gsm"]}
    assert graded[0].grader.startswith("numeric")  # the preset's grader, not a testbed one
    assert steps["train:student"]["stats"]["examples"] == 24
    result = json.loads((run.eval_dir("student") / "gsm.json").read_text())
    assert result["data"] == "problem set test split" and result["grader"] == graded[0].grader
    assert result["sampled"]["problems"] == 4 and result["sampled"]["samples_per_problem"] == 2
    assert 0 <= result["sampled"]["pass@2"] <= 1 and sum(result["sampled"]["labels"].values()) == 8
    report = (run.root / "report.md").read_text()
    assert "gsm" in report and "student" in report


SUMS = """
run_dir: {run_dir}
seed: 1
steps:
  - problems:
      sets: [{{name: sums, file: "{file}", template: "{{question}}", grader: numeric, test_fraction: 0.25,
               fields: {{difficulty: level}}}}]
  - generate: {{model: "testbed:teacher", name: teacher, n: 2, temperature: 0.8, max_new_tokens: 120}}
  - verify: {{traces: teacher}}
  - generate: {{model: "testbed:teacher", name: hot, n: 2, temperature: 1.5, max_new_tokens: 120}}
  - verify: {{traces: hot}}
  - curate: {{name: all, traces: teacher}}
  - train: {{name: student, init: "testbed:student", data: all, epochs: 1, batch_size: 8, learning_rate: 0.003,
              report_to: [tensorboard]}}
"""


@pytest.fixture(scope="module")
def sums_run(testbed, tmp_path_factory) -> RunDir:
    """A set from a file of questions the testbed teacher can solve (2-digit additions, asked as the
    arithmetic task asks them), so the stages that keep correct traces have some."""
    from reasondistill.recipe import run_recipe
    from reasondistill.tasks import TASKS

    root = tmp_path_factory.mktemp("sums")
    rows = [
        {"id": f"s{i}", "question": p.messages[-1].content, "answer": p.answer, "level": f"Level {1 + i % 2}"}
        for i, p in enumerate(TASKS["arithmetic"].sample("train", 16, seed=9, difficulties=[2]))
    ]
    recipe = root / "recipe.yaml"
    recipe.write_text(SUMS.format(run_dir=root / "run", file=write(root / "sums.jsonl", rows)))
    run_recipe(recipe)
    return RunDir(root / "run")


@needs_gsm8k
@pytest.mark.slow
def test_the_other_stages_work_on_a_problem_set(sums_run, capsys):
    """score, rewrite, chunk, select_teacher, decontaminate, the analyses and on-policy training with
    `data: problems`, each on a problem set read from a file."""
    run, root = sums_run, str(sums_run.root)
    teacher = ["--model", "testbed:teacher"]
    main(["score", "--run-dir", root, *teacher, "--traces", "teacher", "--top-k", "5"])
    main(["rewrite", "--run-dir", root, *teacher, "--traces", "teacher", "--max-new-tokens", "120"])
    main(["chunk", "--run-dir", root, "--name", "stt", "--traces", "teacher"])
    main(["decontaminate", "--run-dir", root, "--name", "clean", "--data", "all", "--benchmarks", "gsm8k",
          "--data-file", str(SHARED_BENCHMARKS / "gsm8k" / "test.jsonl")])  # fmt: skip
    proxy = {"steps": 2, "batch_size": 4, "problems": 4, "max_new_tokens": 16}
    main(["select_teacher", "--run-dir", root, "--name", "pick", "--teachers", "teacher,hot",
          "--student", "testbed:student", "--proxy", json.dumps(proxy)])  # fmt: skip
    main(["curate", "--run-dir", root, "--name", "level2", "--traces", "teacher",
          "--ops", '[{"difficulty": {"source": "level", "keep_levels": [2]}}]'])  # fmt: skip
    main(["trace_stats", "--run-dir", root, "--traces", "teacher"])
    main(["provenance", "--run-dir", root, "--traces", "teacher", "--teacher", "testbed:teacher",
          "--student", "testbed:student", "--distilled", "student"])  # fmt: skip
    main(["memorization", "--run-dir", root, "--model", "student", "--data", "all"])
    main(["train", "--run-dir", root, "--name", "kdrl", "--init", "testbed:student", "--data", "problems",
          "--teacher", "testbed:teacher", "--objective", "kdrl", "--on-policy", '{"samples_per_prompt": 2, "max_new_tokens": 16}',
          "--batch-size", "4", "--epochs", "1"])  # fmt: skip
    steps = run.manifest()["steps"]
    for step in (
        "verify:teacher",
        "rewrite:teacher-dap",
        "train:kdrl",
    ):  # the set's grader, not a testbed task's
        assert list(steps[step]["inputs"]["graders"]) == ["sums"], step
        assert steps[step]["inputs"]["graders"]["sums"].startswith("numeric"), step
    assert steps["rewrite:teacher-dap"]["stats"]["selected"] == 24
    assert steps["chunk:stt"]["stats"]
    sampled = steps["train:kdrl"]["stats"]["on_policy"]
    assert (
        sampled["on_policy_steps"] == 3 and sampled["samples"] == 24
    )  # 12 prompts of the set, 2 samples each
    assert steps["curate:clean"]["stats"]  # decontaminate writes a curated set
    # difficulty from the set's level field ("Level 2" → 2): only those problems' traces are kept
    levels = {p.id: p.difficulty for p in read_records(run.problems("sums", "train"), Problem)}
    every = read_records(run.curated("all"), TrainingExample)
    level2 = read_records(run.curated("level2"), TrainingExample)
    assert {levels[e.problem_id] for e in every} == {1, 2}
    assert [e.problem_id for e in level2] == [e.problem_id for e in every if levels[e.problem_id] == 2]
    selection = json.loads((run.root / "teacher-selection" / "pick.json").read_text())
    assert sorted(selection["ranking"]) == ["hot", "teacher"]
    assert all(
        row["proxy"]["problems"] == {"sums": 4} for row in selection["teachers"]
    )  # the set's test split
    for name in ("trace-stats", "provenance", "memorization"):
        assert run.analysis(name).exists(), name
    # report_to: the train step's tensorboard events, in the run, outside the fingerprint
    assert list((run.root / "tensorboard" / "student").glob("events.out.tfevents.*"))
    from reasondistill.stages.train import TrainConfig

    tracked = TrainConfig(name="s", init="testbed:student", data="all", report_to=["tensorboard"])
    assert tracked.identity() == TrainConfig(name="s", init="testbed:student", data="all").identity()
    main(["report", "--run-dir", root])
    assert "gsm" in (run.root / "report.md").read_text()
