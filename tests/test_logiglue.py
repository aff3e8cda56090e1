"""LogiGLUE as a suite: rows in the Hub dataset's own format (built here; nothing downloads), one
grader per task format, accuracy per dataset, reasoning type and in-domain / leave-out, its training
splits as problem sets, and the LogiT5 recipe's steps at testbed scale."""

import json

import pytest
import yaml
from helpers import problem

from reasondistill.cli import main
from reasondistill.errors import UserError
from reasondistill.records import Problem, read_records
from reasondistill.report.render import suite_table
from reasondistill.rundir import RunDir
from reasondistill.tasks import BENCHMARKS, SUITES, expand_suites, get_benchmark
from reasondistill.tasks.selection import BenchmarkSelection


def row(context, question, choices, answer_text, answer_choice=0, **extra):
    """A row as logicreasoning/logi_glue serves it (its columns; `id_` repeats, as upstream)."""
    return {
        "context": context, "question": question, "choices": choices, "answer_choice": answer_choice,
        "answer_text": answer_text, "id_": "0", "category": "x", "original_dataset": "x",
        "input": f"{context} {question} {choices}", **extra,
    }  # fmt: skip


ROWS = {
    "logiglue-logiqa": [  # multiple choice, four options
        row("All cats sleep. Tom is a cat.", "Which follows?", ["Tom sleeps.", "Tom flies.", "No cat sleeps.", "Tom is a dog."], "Tom sleeps."),
        row("Some A are B.", "Which must be true?", ["All B are A.", "Some B are A.", "No A is B.", "All A are B."], "Some B are A.", 1),
        row("If it rains, the road is wet. It rains.", "What follows?", ["The road is dry.", "It snows.", "The road is wet.", "Nothing."], "The road is wet.", 2),
    ],
    "logiglue-alpha-nli": [  # two explanations; answer_choice is 1-based upstream and is not read
        row("Ann left her umbrella. Ann came home soaked.", "Which explanation is more plausible?",
            ["It rained on her way home.", "She took a taxi."], "It rained on her way home.", 1),
    ],
    "logiglue-folio": [  # NLI: the row's labels listed
        row("All men are mortal. Socrates is a man.", "Socrates is mortal.", ["entailment", "neutral", "contradiction"], "entailment"),
        row("No fish can fly.", "Nemo is a fish that flies.", ["entailment", "neutral", "contradiction"], "contradiction"),
    ],
    "logiglue-proofwriter": [  # fact verification
        row("The bear is big. If something is big then it is strong.", "The bear is strong.", ["True", "False"], "True"),
        row("The cat is red.", "The cat is blue.", ["True", "False"], "False", 1),
    ],
    "logiglue-cluttr": [  # free-form: choices [""]
        row("Timothy went hunting with his son, James. James's brother, John, stayed home.",
            "What is the relationship between John and Timothy?", [""], "Father"),
        row("Mary is Anna's mother.", "What is the relationship between Anna and Mary?", [""], "daughter"),
    ],
}  # fmt: skip


@pytest.fixture
def files(tmp_path):
    paths = {}
    for name, rows in ROWS.items():
        paths[name] = tmp_path / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def test_the_suite_has_its_24_datasets_with_their_groups():
    assert len(SUITES["logiglue"]) == 24
    assert len(SUITES["logiglue-in-domain"]) == 10 and len(SUITES["logiglue-leave-out"]) == 14
    tags = [BENCHMARKS[name].tags for name in SUITES["logiglue"]]
    assert {t["reasoning"] for t in tags} == {"deductive", "abductive", "inductive", "mixed"}
    assert {t["format"] for t in tags} == {"multiple-choice", "nli", "fact-verification", "free-form"}
    assert all(BENCHMARKS[n].train_split == "train" for n in SUITES["logiglue-in-domain"])
    assert all(BENCHMARKS[n].train_split is None for n in SUITES["logiglue-leave-out"])
    assert BENCHMARKS["logiglue-logiqa-2.0"].hub_config == "logiQA_2.0"  # the Hub's own spelling
    # a suite expands to its members; members and other benchmarks may be named beside it, once each
    assert expand_suites(["gsm8k", "logiglue-in-domain", "logiglue-folio"])[:3] == [
        "gsm8k", "logiglue-logiqa", "logiglue-cluttr",
    ]  # fmt: skip
    assert len(BenchmarkSelection(benchmarks=["logiglue", "logiglue-folio"]).benchmarks) == 24
    with pytest.raises(ValueError, match="unknown benchmark 'logiglue-nope'"):
        BenchmarkSelection(benchmarks=["logiglue-nope"])


def test_each_task_format_is_posed_and_graded_in_its_own_way(files):
    logiqa = get_benchmark("logiglue-logiqa").load(files["logiglue-logiqa"])
    assert [p.answer for p in logiqa] == ["A", "B", "C"]  # the gold option's letter
    assert "A. Tom sleeps.\nB. Tom flies." in logiqa[0].messages[0].content
    assert [p.id for p in logiqa] == [
        "logiglue-logiqa-00000",
        "logiglue-logiqa-00001",
        "logiglue-logiqa-00002",
    ]
    (alpha,) = get_benchmark("logiglue-alpha-nli").load(files["logiglue-alpha-nli"])
    assert alpha.answer == "A"  # from answer_text, not the 1-based answer_choice
    folio = get_benchmark("logiglue-folio").load(files["logiglue-folio"])
    assert folio[0].answer == "entailment"
    assert "Answer with one of: entailment, neutral, contradiction." in folio[0].messages[0].content
    cluttr = get_benchmark("logiglue-cluttr").load(files["logiglue-cluttr"])
    assert cluttr[0].answer == "Father" and "Answer with one of" not in cluttr[0].messages[0].content
    assert json.loads(cluttr[0].meta) == {
        "dataset": "cluttr",
        "format": "free-form",
        "reasoning": "inductive",
    }

    graded = {
        ("logiglue-logiqa", "The answer is \\boxed{C}.", "C"): "correct",
        ("logiglue-logiqa", "So the answer is (B).", "C"): "incorrect",
        ("logiglue-logiqa", "Tom sleeps.", "A"): "unparseable",  # the option's text is not its letter
        ("logiglue-folio", "\\boxed{\\text{Entailment}}", "entailment"): "correct",
        ("logiglue-folio", "The answer is neutral.", "entailment"): "incorrect",
        ("logiglue-proofwriter", "The answer is **True**.", "True"): "correct",
        ("logiglue-cluttr", "Reasoning.\n\nThe answer is father.", "Father"): "correct",
        ("logiglue-cluttr", "\\boxed{grandfather}", "Father"): "incorrect",
    }
    for (name, completion, gold), label in graded.items():
        assert get_benchmark(name).grader.grade(completion, problem(gold)).label == label, completion


def test_a_row_that_does_not_fit_its_format_is_one_line_naming_it(tmp_path):
    bad = tmp_path / "logiqa.jsonl"
    bad.write_text(json.dumps(row("c", "q?", ["x", "y"], "z")) + "\n")
    with pytest.raises(
        UserError, match=r"logiqa.jsonl line 1: field 'answer_text': expected one of the row's 2-8 choices"
    ):
        get_benchmark("logiglue-logiqa").load(bad)
    bad.write_text(json.dumps({"context": "c", "choices": []}) + "\n")
    with pytest.raises(UserError, match=r"line 1: missing field 'question'"):
        get_benchmark("logiglue-cluttr").load(bad)
    bad.write_text(json.dumps(row("c", "q?", ["entailment", "neutral"], "maybe")) + "\n")
    with pytest.raises(UserError, match=r"field 'answer_text': expected one of the row's labels"):
        get_benchmark("logiglue-folio").load(bad)


def test_accuracy_by_reasoning_type_and_in_domain_or_leave_out():
    results = [
        {"task": "logiglue-folio", "model": "m", "greedy": {"accuracy": 0.5}},  # deductive, in-domain
        {"task": "logiglue-proofwriter", "model": "m", "greedy": {"accuracy": 1.0}},  # deductive, in-domain
        {"task": "logiglue-adv", "model": "m", "greedy": {"accuracy": 0.25}},  # abductive, in-domain
        {"task": "logiglue-babi-task-16", "model": "m", "greedy": {"accuracy": 0.0}},  # inductive, leave-out
        {"task": "gsm8k", "model": "m", "greedy": {"accuracy": 0.9}},  # not in a suite
    ]
    headers, rows = suite_table(results)
    assert headers == [
        "suite",
        "model",
        "deductive",
        "abductive",
        "inductive",
        "mixed",
        "in-domain",
        "leave-out",
        "all",
    ]
    assert rows == [
        ["logiglue", "m", "75.0% (2)", "25.0% (1)", "0.0% (1)", "–", "58.3% (3)", "0.0% (1)", "43.8% (4)"]
    ]


@pytest.mark.slow
def test_eval_on_the_suite_from_local_files_reports_each_group(testbed, files, tmp_path):
    names = ["logiglue-logiqa", "logiglue-folio", "logiglue-cluttr"]
    run = RunDir(tmp_path / "run")
    main([
        "eval", "--run-dir", str(run.root), "--model", "testbed:teacher", "--benchmarks", ",".join(names),
        "--data-file", ",".join(f"{n}={files[n]}" for n in names), "--n", "0", "--max-new-tokens", "24",
    ])  # fmt: skip
    for name in names:
        result = json.loads((run.eval_dir("teacher") / f"{name}.json").read_text())
        assert result["grader"] == get_benchmark(name).grader.id
        assert result["greedy"]["problems"] == len(ROWS[name])
    main(["report", "--run-dir", str(run.root)])
    report = (run.root / "report.md").read_text()
    assert "## Suites: mean accuracy over datasets" in report
    assert "| logiglue | teacher |" in report and "(3) |" in report  # all three datasets averaged


def test_an_in_domain_training_split_is_a_problem_set(files, tmp_path):
    """LogiGLUE's fine-tuning data through `problems`: read as the benchmark reads rows, graded alike."""
    run = RunDir(tmp_path / "run")
    sets = [
        {"name": "lg-logiqa", "benchmark": "logiglue-logiqa", "file": str(files["logiglue-logiqa"])},
        {"name": "lg-folio", "benchmark": "logiglue-folio", "file": str(files["logiglue-folio"]), "test_fraction": 0.5},
    ]  # fmt: skip
    main(["problems", "--run-dir", str(run.root), "--sets", json.dumps(sets)])
    stats = run.manifest()["steps"]["problems"]["stats"]
    assert stats["problems"] == {
        "lg-logiqa/train": 3,
        "lg-logiqa/test": 0,
        "lg-folio/train": 1,
        "lg-folio/test": 1,
    }
    assert stats["sets"]["lg-logiqa"]["grader"] == "choice:ABCDEFGH"
    assert stats["sets"]["lg-folio"]["source"]["benchmark"] == "logiglue-folio"
    problems = read_records(run.problems("lg-logiqa", "train"), Problem)
    reference = get_benchmark("logiglue-logiqa").load(files["logiglue-logiqa"])
    assert [(p.messages, p.answer) for p in problems] == [(p.messages, p.answer) for p in reference]
    assert {p.task for p in problems} == {"lg-logiqa"} and problems[0].id == "lg-logiqa-00000"
    with pytest.raises(SystemExit):  # a benchmark's split reads rows its own way: no field mapping
        main(
            [
                "problems",
                "--run-dir",
                str(run.root),
                "--sets",
                json.dumps([{**sets[0], "fields": {"question": "q"}}]),
            ]
        )
    with pytest.raises(SystemExit):  # leave-out datasets have no training split
        main(
            [
                "problems",
                "--run-dir",
                str(run.root),
                "--sets",
                '[{"name": "x", "benchmark": "logiglue-wanli"}]',
            ]
        )


@pytest.mark.slow
def test_the_logit5_recipe_runs_at_testbed_scale(testbed, files, tmp_path):
    """The packaged recipe's steps, with local copies of two in-domain datasets for its Hub sets and the
    testbed's teacher and student for its models: multi-task chain-of-thought distillation end to end."""
    from importlib import resources

    from reasondistill.recipe import run_recipe

    with resources.as_file(resources.files("reasondistill") / "recipes" / "logiglue-logit5.yaml") as path:
        recipe = yaml.safe_load(path.read_text())
    steps = {next(iter(step)): next(iter(step.values())) for step in recipe["steps"]}
    kept = {"logiglue-logiqa", "logiglue-folio"}
    steps["problems"]["sets"] = [
        {**s, "file": str(files[s["benchmark"]])} for s in steps["problems"]["sets"] if s["benchmark"] in kept
    ]
    steps["generate"].update(model="testbed:teacher", backend="hf", max_new_tokens=48)
    steps["train"].update(init="testbed:student", max_length=384, trainer_args={"max_steps": 2})
    steps["eval"].update(
        models=["testbed:teacher", "logit5-cot"], benchmarks=sorted(kept), max_new_tokens=24,
        data_file=[f"{n}={files[n]}" for n in sorted(kept)],
    )  # fmt: skip
    steps["curate"]["keep"] = [
        "correct",
        "incorrect",
        "unparseable",
    ]  # the testbed teacher knows no logic puzzles
    recipe["steps"] = [{name: options} for name, options in steps.items()]
    recipe["run_dir"] = str(tmp_path / "run")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run = run_recipe(tmp_path / "recipe.yaml")
    manifest = run.manifest()["steps"]
    assert manifest["train:logit5-cot"]["stats"]["examples"] == 4 * (3 + 2)  # both datasets, 4 samples each
    assert set(manifest["verify:teacher"]["stats"]["graders"]) == {"lg-logiqa", "lg-folio"}
    report = (run.root / "report.md").read_text()
    assert "| logiglue | logit5-cot |" in report and "| logiglue | teacher |" in report
