"""Decontamination: planted benchmark overlaps are found and dropped; template text and near misses are not."""

import json

import pytest
from helpers import SHARED_BENCHMARKS

from reasondistill.cli import main
from reasondistill.curate.decontaminate import BenchmarkIndex
from reasondistill.records import Message, Problem, TrainingExample, read_records
from reasondistill.rundir import RunDir
from reasondistill.tasks import get_task
from reasondistill.tasks.benchmarks import BOXED

GSM8K_TEST = SHARED_BENCHMARKS / "gsm8k" / "test.jsonl"
# GSM8K test question 0 begins: "Janet’s ducks lay 16 eggs per day. She eats three for breakfast every
# morning and bakes muffins for her friends every day with four."
EIGHT_WORDS = "She eats three for breakfast every morning and"
SEVEN_WORDS = "She eats three for breakfast every morning"


def example(prompt: str, completion: str = "The answer is 1.") -> TrainingExample:
    return TrainingExample(
        problem_id=f"train-{abs(hash(prompt)) % 10**6}",
        task="t",
        messages=[Message(role="user", content=prompt)],
        completion=completion,
    )


@pytest.fixture
def training_file(tmp_path):
    clean = [example(p.messages[0].content) for p in get_task("word_problems").sample("train", 20, seed=0)]
    planted = [
        example(f"Tom has 5 apples. {EIGHT_WORDS.upper()}, says Tom. How many apples are left?"),  # row 20
        example(f"Ann's hens lay eggs. {SEVEN_WORDS} she counts them. How many are there?"),  # row 21
        example(f"What is 2 + 2?\n\n{BOXED}"),  # shares only the benchmark's instruction (template text)
        example("What is 3 + 3?", completion=f"Recall: Janet’s ducks lay 16 eggs per day. {EIGHT_WORDS}"),
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(e.model_dump_json() + "\n" for e in clean + planted))
    return path


def decontaminate(run_dir, data, name, *options):
    main([
        "decontaminate", "--run-dir", str(run_dir), "--name", name, "--data", str(data),
        "--benchmarks", "gsm8k", "--data-file", str(GSM8K_TEST), *options,
    ])  # fmt: skip
    run = RunDir(run_dir)
    return read_records(run.curated(name), TrainingExample), json.loads(run.decontamination(name).read_text())


@pytest.mark.skipif(not GSM8K_TEST.exists(), reason=f"{GSM8K_TEST} not present")
def test_a_planted_benchmark_overlap_is_reported_and_dropped(tmp_path, training_file):
    kept, report = decontaminate(tmp_path / "run", training_file, "clean")
    assert [o["row"] for o in report["overlaps"]] == [20]
    assert report["overlaps"][0]["benchmark_problem"] == "gsm8k-0000"
    assert report["overlaps"][0]["ngram"] == EIGHT_WORDS.casefold()
    assert (report["input"], report["contaminated"], report["dropped"]) == (24, 1, 1)
    assert report["by_benchmark"] == {"gsm8k": 1} and report["benchmarks"] == {"gsm8k": 1319}
    assert len(kept) == 23 and all(EIGHT_WORDS.upper() not in e.messages[0].content for e in kept)

    # Shorter n-grams catch the 7-word overlap too; completions are compared when asked.
    _, report = decontaminate(tmp_path / "run", training_file, "clean-7", "--ngram", "7")
    assert [o["row"] for o in report["overlaps"]] == [20, 21]
    kept, report = decontaminate(
        tmp_path / "run", training_file, "clean-both", "--check", "prompt,completion"
    )
    assert [o["row"] for o in report["overlaps"]] == [20, 23] and len(kept) == 22

    # Report only: every example is kept, the overlaps are still listed.
    kept, report = decontaminate(tmp_path / "run", training_file, "report-only", "--no-drop")
    assert len(kept) == 24 and report["contaminated"] == 1 and report["dropped"] == 0


def test_template_text_is_ignored_and_short_problems_are_matched_whole():
    def problem(i: int, text: str) -> Problem:
        return Problem(id=f"b-{i}", task="gsm8k", messages=[Message(role="user", content=text)], answer="1")

    boilerplate = "Answer with one word and explain nothing at all please"
    problems = [problem(i, f"Question number {i} about topic {i * 7}. {boilerplate}") for i in range(10)]
    problems.append(problem(10, "Who wrote Hamlet?"))
    index = BenchmarkIndex({"gsm8k": problems}, n=8, template_share=0.1)
    assert index.overlaps(f"Something else entirely. {boilerplate}") == {}
    assert index.overlaps("Quiz: who wrote hamlet? Shakespeare.") == {"b-10": ("who", "wrote", "hamlet")}
    assert set(index.overlaps("question number 3 about topic 21 answer with one")) == {"b-3"}
