"""Teacher selection: the zoo of testbed teachers, the student's NLL, the ranked table, reruns, errors."""

import json
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from reasondistill.chat import completion_ids, prompt_ids
from reasondistill.curate.student_measures import completion_nll
from reasondistill.curate.teacher_selection import NO_CORRECT, rank
from reasondistill.errors import UserError
from reasondistill.recipe import run_recipe
from reasondistill.records import GradedTrace, Message, TrainingExample, read_records
from reasondistill.rundir import RunDir
from reasondistill.stages.generate import GenerateConfig, run_generate
from reasondistill.stages.select_teacher import SelectTeacherConfig, report_sections, run_select_teacher
from reasondistill.stages.verify import VerifyConfig, run_verify
from reasondistill.tasks import TASKS
from reasondistill.testbed.zoo import STYLES, ZOO, styled_solution

pytestmark = [pytest.mark.slow, pytest.mark.training_sensitive]

ZOO_TEACHERS = ["verbose-large", "verbose-small", "terse-small"]  # sizes and styles differ
# ... and a "teacher" that never answers right: the random testbed student
TEACHERS = [*ZOO_TEACHERS, "student"]
# The student is the partly able student (tests/conftest.py), whose NLL and proxy accuracy differ
# between teachers (the random testbed student needs hundreds of steps to answer anything).
PROXY = {"steps": 12, "learning_rate": 3e-4, "batch_size": 8, "problems": 16, "max_new_tokens": 200}
RECIPE = """
run_dir: {run_dir}
steps:
  - problems: {{tasks: [arithmetic], train: 12, test: 16, difficulty: {{arithmetic: [2]}}}}
{generate}
  - select_teacher:
      name: zoo
      teachers: {teachers}
      student: "{student}"
      batch_size: 8
      proxy: {proxy}
      curate_winner: winner
"""


def test_every_zoo_style_is_graded_correct_and_the_styles_differ_in_length(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    task = TASKS["arithmetic"]
    problems = task.sample("train", 30, seed=4, difficulties=[2])
    lengths = {}
    for style in STYLES:
        solutions = [styled_solution(p, style) for p in problems]
        assert all(
            s.endswith(f"\nThe answer is {p.answer}.") for s, p in zip(solutions, problems, strict=True)
        )
        assert all(
            task.grader.grade(s, p, "stop").label == "correct"
            for s, p in zip(solutions, problems, strict=True)
        )
        lengths[style] = sum(len(ids) for ids in completion_ids(tokenizer, solutions)) / len(problems)
    assert lengths["terse"] < 0.75 * lengths["steps"] < 0.75 * lengths["verbose"]
    assert {ZOO[name].style for name in ZOO} >= {"terse", "verbose"}
    assert len({ZOO[name].layers for name in ZOO}) >= 2


def test_the_student_nll_equals_a_direct_forward_pass(testbed):
    model = AutoModelForCausalLM.from_pretrained(testbed / "teacher").eval()
    tokenizer = AutoTokenizer.from_pretrained(testbed / "teacher")
    problems = TASKS["arithmetic"].sample("train", 3, seed=8, difficulties=[2, 3])
    examples = [
        TrainingExample(
            problem_id=p.id, task=p.task, messages=p.messages, completion=styled_solution(p, style)
        )
        for p, style in zip(problems, ["steps", "verbose", "terse"], strict=True)
    ]
    examples.append(
        TrainingExample(
            problem_id="odd", task="arithmetic", messages=[Message(role="user", content="What is 1 + 1?")],
            completion="<think>\nno idea\n</think>\nThe answer is 7.",
        )
    )  # fmt: skip
    scored = completion_nll(model, tokenizer, examples, batch_size=3, max_length=512, chunk_size=7)
    for example, (nll, tokens) in zip(examples, scored, strict=True):
        prompt = prompt_ids(tokenizer, [example.messages])[0]
        completion = completion_ids(tokenizer, [example.completion])[0]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + completion])).logits[0]
        logprobs = torch.log_softmax(logits.double(), dim=-1)
        expected = -sum(logprobs[len(prompt) + i - 1, token].item() for i, token in enumerate(completion))
        assert tokens == len(completion)
        assert nll == pytest.approx(expected, rel=1e-3, abs=1e-3)  # float32, batched and padded
    assert scored[3][0] / scored[3][1] > 2 * scored[0][0] / scored[0][1]  # nonsense is unlikely


def test_ranking_puts_missing_measurements_last_and_breaks_ties_by_nll():
    def row(name, proxy, nll, accuracy=0.5, length=10.0):
        return {
            "teacher": name, "proxy": None if proxy is None else {"accuracy": proxy}, "student_nll": nll,
            "accuracy": accuracy, "length_mean": length,
        }  # fmt: skip

    rows = [
        row("a", 0.5, 2.0),
        row("b", 0.5, 1.0),
        row("c", 0.9, 3.0),
        row("d", None, 0.5),
        row("e", 0.1, None),
    ]
    assert rank(rows, "proxy_accuracy") == ["c", "b", "a", "e", "d"]
    assert rank(rows, "student_nll") == ["d", "b", "a", "c", "e"]
    rows = [row("x", None, 1.0, accuracy=0.2, length=30), row("y", None, 2.0, accuracy=0.9, length=20)]
    assert rank(rows, "accuracy") == ["y", "x"] and rank(rows, "length") == ["y", "x"]


def test_config_errors_are_caught_when_the_recipe_loads():
    with pytest.raises(ValueError, match="needs proxy options"):
        SelectTeacherConfig(teachers=["a", "b"], student="s", rank_by="proxy_accuracy")
    with pytest.raises(ValueError, match="objective 'forward_kl' needs a teacher; the proxy trains on"):
        SelectTeacherConfig(teachers=["a"], student="s", proxy={"objective": "forward_kl"})
    with pytest.raises(ValueError, match="listed twice"):
        SelectTeacherConfig(teachers=["a", "a"], student="s")
    cfg = SelectTeacherConfig(teachers=["a"], student="s", proxy={"steps": 5})
    assert cfg.proxy.hyperparameters().trainer_args == {"max_steps": 5} and cfg.ranking() == "proxy_accuracy"


@pytest.fixture(scope="module")
def student(partly_able) -> str:
    return str(partly_able.path)


@pytest.fixture(scope="module")
def run(student, tmp_path_factory) -> RunDir:
    root = tmp_path_factory.mktemp("teacher-selection")
    generate = "\n".join(
        f'  - generate: {{model: "testbed:{name}", n: 2, temperature: 0.8, max_new_tokens: 200}}\n'
        f"  - verify: {{traces: {name}}}"
        for name in TEACHERS
    )
    recipe = root / "recipe.yaml"
    recipe.write_text(
        textwrap.dedent(RECIPE).format(
            run_dir=root / "run",
            generate=generate,
            teachers=json.dumps(TEACHERS),
            proxy=json.dumps(PROXY),
            student=student,
        )
    )
    run_recipe(recipe)
    return RunDir(root / "run")


def test_the_zoo_teachers_are_ranked_into_a_table(run, student, margin):
    result = json.loads(run.teacher_selection("zoo").read_text())
    rows = {row["teacher"]: row for row in result["teachers"]}
    assert list(rows) == TEACHERS and result["rank_by"] == "proxy_accuracy"
    for name, row in rows.items():
        graded = read_records(run.graded(name), GradedTrace)
        correct = sum(g.label == "correct" for g in graded)
        assert row["traces"] == len(graded) == 24 and row["correct"] == correct
        assert row["accuracy"] == pytest.approx(correct / 24) == pytest.approx(row["pass_rate"])
        assert row["model"] == name
        if correct:
            assert 0 < row["student_nll"] < 10 and row["nll_tokens"] > 10 * correct
            assert row["proxy"]["steps"] == PROXY["steps"] and row["proxy"]["examples"] == correct
            assert 0 <= row["proxy"]["accuracy"] <= 1 and row["proxy"]["problems"] == {"arithmetic": 16}
            assert (run.root / "teacher-selection" / "zoo" / "checkpoints" / name / "config.json").exists()
        else:  # nothing to learn from: no NLL, no proxy student, ranked last
            assert row["student_nll"] is None and row["nll_tokens"] == 0
            assert row["rank"] > sum(r["correct"] > 0 for r in rows.values())
            assert row["proxy"]["accuracy"] is None and row["proxy"]["examples"] == 0
            assert not (run.root / "teacher-selection" / "zoo" / "checkpoints" / name).exists()
    assert rows["student"]["correct"] == 0  # the random student never answers right
    # terse traces are shorter than verbose ones, in the student's tokens and the teacher's own
    terse = [r for r in rows.values() if r["teacher"] in ZOO and ZOO[r["teacher"]].style == "terse"]
    verbose = [r for r in rows.values() if r["teacher"] in ZOO and ZOO[r["teacher"]].style == "verbose"]
    assert max(r["length_mean"] for r in terse) < min(r["length_mean"] for r in verbose)
    assert max(r["teacher_tokens_mean"] for r in terse) < min(r["teacher_tokens_mean"] for r in verbose)
    # the student, a noisy copy of the testbed teacher, knows its column lines: terse traces keep them,
    # verbose ones wrap them in sentences it has never seen (NLL over correct traces: a style needs some)
    for style, group in (("terse", terse), ("verbose", verbose)):
        margin(f"{style} zoo teachers: correct traces", sum(r["correct"] for r in group), ">", 0)
    ratio = max(r["student_nll"] for r in terse if r["correct"]) / min(
        r["student_nll"] for r in verbose if r["correct"]
    )
    margin("student NLL of terse / verbose traces", ratio, "<", 0.75)

    # best proxy accuracy first, ties broken by the lower student NLL
    def proxy_accuracy(teacher: str) -> float:
        accuracy = rows[teacher]["proxy"]["accuracy"]
        return -1 if accuracy is None else accuracy

    keys = [(-proxy_accuracy(t), rows[t]["student_nll"] or 99) for t in result["ranking"]]
    assert keys == sorted(keys) and [rows[t]["rank"] for t in result["ranking"]] == [1, 2, 3, 4]
    assert result["winner"] == result["ranking"][0]

    ((heading, (headers, table)),) = report_sections(run)
    assert (
        heading == f"Teacher selection: zoo (student {student}; ranked by proxy accuracy (then student NLL))"
    )
    assert headers == [
        "rank", "teacher", "traces", "verified acc.", "pass rate", "length (student tokens)",
        "length (teacher tokens)", "student NLL/token", "proxy acc. (greedy)",
    ]  # fmt: skip
    assert [line[1] for line in table] == result["ranking"] and [line[0] for line in table] == list("1234")
    # teachers without a correct trace (the random student; on some builds a weak zoo teacher too) come
    # last, in either order, with no NLL and no proxy student
    without = [line for line in table if not rows[line[1]]["correct"]]
    assert table[len(table) - len(without) :] == without and "student" in [line[1] for line in without]
    assert all(line[7:] == [NO_CORRECT, NO_CORRECT] for line in without)
    first = rows[result["ranking"][0]]
    assert table[0][3] == f"{100 * first['accuracy']:.1f}%" and table[0][7] == f"{first['student_nll']:.3f}"
    assert " ± " in table[0][5]
    print(
        "\n" + "\n".join(["| " + " | ".join(headers) + " |"] + ["| " + " | ".join(r) + " |" for r in table])
    )

    manifest = run.manifest()
    stats = manifest["steps"]["select_teacher:zoo"]["stats"]
    assert stats["ranking"] == result["ranking"] and set(stats["teachers"]) == set(TEACHERS)
    # the winner's correct traces, curated for `train`
    winner = read_records(run.curated("winner"), TrainingExample)
    assert len(winner) == rows[result["winner"]]["correct"]
    assert manifest["steps"]["curate:winner"]["config"]["traces"] == [result["winner"]]
    # proxy students and their evaluations stay out of the run's own checkpoints and eval results
    assert not (run.root / "eval").exists() and not (run.root / "checkpoints").exists()


def test_a_rerun_skips_the_finished_step_and_a_lost_output_reuses_the_proxy_students(run, student, capsys):
    cfg = SelectTeacherConfig(
        name="zoo", teachers=TEACHERS, student=student, batch_size=8, proxy=PROXY,
        curate_winner="winner",
    )  # fmt: skip
    output = run.teacher_selection("zoo")
    checkpoints = run.root / "teacher-selection" / "zoo" / "checkpoints"
    before = {p: p.stat().st_mtime_ns for p in [output, *checkpoints.rglob("*.safetensors")]}
    capsys.readouterr()
    run_select_teacher(cfg, run, overwrite=False)
    assert "select_teacher:zoo: finished earlier with the same settings, skipped" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in before} == before

    expected = json.loads(output.read_text())
    output.unlink()
    run_select_teacher(cfg, run, overwrite=False)
    assert "proxy student of" in capsys.readouterr().err  # reused, not retrained
    assert json.loads(output.read_text()) == expected
    assert all(p.stat().st_mtime_ns == t for p, t in before.items() if p != output)

    with pytest.raises(UserError, match=r"already ran with other settings \(batch_size\)"):
        run_select_teacher(cfg.model_copy(update={"batch_size": 4}), run, overwrite=False)


def test_teachers_on_different_prompts_are_refused_with_one_line(run, student):
    name = ZOO_TEACHERS[0]
    run_generate(
        GenerateConfig(model=f"testbed:{name}", name="fewer", n=1, limit=5, max_new_tokens=160), run, False
    )
    run_verify(VerifyConfig(traces="fewer"), run, False)
    cfg = SelectTeacherConfig(name="mismatch", teachers=[name, "fewer"], student=student)
    with pytest.raises(UserError) as err:
        run_select_teacher(cfg, run, overwrite=False)
    message = str(err.value)
    assert "\n" not in message
    assert f"teachers {name!r} and 'fewer' answered different prompts (fewer lacks 7 problem(s)" in message
    assert not run.teacher_selection("mismatch").exists()
