"""Empty sets of traces, examples and problems: every stage says so in one line naming the step and the
set, and leaves nothing behind, or handles it meaningfully (an empty curated set, a teacher with no
correct trace in `select_teacher`)."""

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from reasondistill.chat import completion_ids, encode_texts, prompt_ids
from reasondistill.curate.student_measures import completion_nll
from reasondistill.curate.teacher_selection import NO_CORRECT
from reasondistill.errors import UserError
from reasondistill.records import (
    GradedTrace,
    Problem,
    Trace,
    TrainingExample,
    atomic_write_json,
    read_records,
    write_records,
)
from reasondistill.rundir import RunDir, fingerprint
from reasondistill.stages.chunk import ChunkConfig, run_chunk
from reasondistill.stages.curate import CurateConfig, run_curate
from reasondistill.stages.decontaminate import DecontaminateConfig, run_decontaminate
from reasondistill.stages.evaluate import EvalConfig, run_eval
from reasondistill.stages.generate import GenerateConfig, run_generate
from reasondistill.stages.memorization import MemorizationConfig, run_memorization
from reasondistill.stages.problems import ProblemsConfig, run_problems
from reasondistill.stages.provenance import ProvenanceConfig, run_provenance
from reasondistill.stages.rewrite import RewriteConfig, run_rewrite
from reasondistill.stages.score import ScoreConfig, run_score
from reasondistill.stages.select_teacher import SelectTeacherConfig, run_select_teacher, selection_table
from reasondistill.stages.trace_stats import TraceStatsConfig, run_trace_stats
from reasondistill.stages.train import TrainConfig, run_train
from reasondistill.stages.verify import VerifyConfig, run_verify
from reasondistill.store import problems_by_id
from reasondistill.train.data import tokenize_examples

WRONG = "<think>\nno idea\n</think>\nThe answer is 0."


# ---- builders -------------------------------------------------------------------------------------
def make_run(root: Path, train: int = 3, test: int = 2) -> RunDir:
    run = RunDir(root / "run")
    config = ProblemsConfig(tasks=["arithmetic"], train=train, test=test, difficulty={"arithmetic": [2]})
    run_problems(config, run, overwrite=False)
    return run


def train_problems(run: RunDir) -> list[Problem]:
    return sorted((p for p in problems_by_id(run).values() if "train" in p.id), key=lambda p: p.id)


def graded(problem: Problem, sample_idx: int, label: str) -> GradedTrace:
    """A teacher's trace: the gold solution when `correct`, a wrong answer otherwise."""
    completion = problem.solution if label == "correct" else WRONG
    return GradedTrace(
        problem_id=problem.id, task=problem.task, sample_idx=sample_idx, source=json.dumps({"model": "t"}),
        completion=completion, reasoning=None, final=completion, prompt_tokens=5,
        completion_tokens=len(completion.split()), finish_reason="stop", label=label, extracted=None,
        grader="test",
    )  # fmt: skip


def add_graded(run: RunDir, name: str, traces: list[GradedTrace]) -> None:
    """A graded set recorded as the `verify` step that would have written it."""

    def body(_):
        write_records(run.graded(name), traces, GradedTrace)
        return {}

    inputs = {"content": fingerprint([t.model_dump() for t in traces])}
    run.step(f"verify:{name}", VerifyConfig(traces=name), inputs, body, outputs=[run.graded(name)])


def labelled(run: RunDir, name: str, labels: list[str]) -> None:
    """graded/<name>: one trace per train problem (the first len(labels)) with these labels."""
    problems = train_problems(run)[: len(labels)]
    add_graded(run, name, [graded(p, 0, label) for p, label in zip(problems, labels, strict=True)])


def add_empty_traces(run: RunDir, name: str) -> None:
    """traces/<name> of a finished `generate` step that kept no trace (say, every request failed)."""

    def body(_):
        write_records(run.traces(name) / "shard-00000.parquet", [], Trace)
        atomic_write_json(run.traces(name) / "index.json", {"finished": [0], "failures": {}})
        return {}

    run.step(
        f"generate:{name}", GenerateConfig(model=name), {}, body, outputs=[run.traces(name) / "index.json"]
    )


def add_empty_curated(run: RunDir, name: str) -> None:
    """curated/<name>: an empty set, as a curate step whose operators dropped everything writes it."""
    add_graded(run, f"{name}-source", [])
    run_curate(CurateConfig(name=name, traces=f"{name}-source"), run, overwrite=False)


def one_line_error(call, *parts: str) -> str:
    """The UserError `call` raises: one line, naming every part."""
    with pytest.raises(UserError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, (part, message)
    return message


def steps(run: RunDir) -> set[str]:
    return set(run.manifest()["steps"])


@pytest.fixture
def model_folder(tmp_path) -> str:
    """A model reference that resolves (a folder with config.json); the refusals come before any loading."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return str(folder)


# ---- tokenisation helpers -----------------------------------------------------------------------
def test_the_tokenisation_helpers_return_nothing_for_nothing(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert encode_texts(tokenizer, []) == prompt_ids(tokenizer, []) == completion_ids(tokenizer, []) == []
    assert tokenize_examples(tokenizer, [], max_length=64) == []
    assert completion_ids(tokenizer, ["7"]) == [[*encode_texts(tokenizer, ["7"])[0], tokenizer.eos_token_id]]


def test_the_student_nll_of_no_examples_is_no_scores(testbed):
    model = AutoModelForCausalLM.from_pretrained(testbed / "student")
    tokenizer = AutoTokenizer.from_pretrained(testbed / "student")
    assert completion_nll(model, tokenizer, [], batch_size=4, max_length=64) == []


# ---- problems: generate, eval ---------------------------------------------------------------------
def test_generate_on_no_problems_names_the_empty_split(tmp_path, model_folder):
    run = make_run(tmp_path, train=0)
    cfg = GenerateConfig(model=model_folder, name="teacher", n=1)
    one_line_error(
        lambda: run_generate(cfg, run, False),
        "generate:teacher: problems/arithmetic/train.parquet holds no train",
    )
    assert not run.traces("teacher").exists() and "generate:teacher" not in steps(run)


def test_eval_with_zero_test_problems_says_so(tmp_path, model_folder):
    run = make_run(tmp_path, test=0)
    cfg = EvalConfig(models=[model_folder], n=0)
    one_line_error(lambda: run_eval(cfg, run, False), "eval: problems/arithmetic/test.parquet holds no test")
    assert not (run.root / "eval").exists() and steps(run) == {"problems"}


# ---- trace sets: verify, score --------------------------------------------------------------------
def test_verify_of_an_empty_trace_set_says_so_and_writes_nothing(tmp_path):
    run = make_run(tmp_path)
    add_empty_traces(run, "teacher")
    one_line_error(
        lambda: run_verify(VerifyConfig(traces="teacher"), run, False),
        "verify:teacher: traces/teacher holds no traces to grade",
    )
    assert not run.graded("teacher").exists() and "verify:teacher" not in steps(run)


def test_score_of_an_empty_trace_set_says_so_and_writes_nothing(tmp_path, model_folder):
    run = make_run(tmp_path)
    add_empty_traces(run, "teacher")
    cfg = ScoreConfig(model=model_folder, traces="teacher", name="scored")
    one_line_error(
        lambda: run_score(cfg, run, False), "score:scored: traces/teacher holds no traces to score"
    )
    assert not run.logprobs("scored").exists()


# ---- curate: an empty curated set is legitimate, and said --------------------------------------------
@pytest.mark.parametrize(
    ("labels", "options", "cause"),
    [
        (["incorrect"] * 3, {}, "keep dropped the last 3 traces (label incorrect 3)"),
        (["correct"] * 3, {"ops": [{"length": {"max_tokens": 1}}]}, "length dropped the last 3 traces (over max_tokens 3)"),
        (["correct"] * 3, {"pairs": True}, "pairs dropped the last 3 traces (no partner of the other label 3)"),
        ([], {}, "graded/teacher holds no traces"),
    ],
    ids=["keep", "operator", "pairs", "empty-input"],
)  # fmt: skip
def test_curate_writes_an_empty_set_with_a_warning_naming_what_emptied_it(
    tmp_path, capsys, labels, options, cause
):
    run = make_run(tmp_path)
    labelled(run, "teacher", labels)
    run_curate(CurateConfig(name="out", traces="teacher", **options), run, overwrite=False)
    assert read_records(run.curated("out"), TrainingExample) == []
    what = "pairs" if options.get("pairs") else "examples"
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning:" in line]
    assert warnings == [f"warning: curate:out: curated/out holds no {what}: {cause}"]


# ---- train on an empty set ------------------------------------------------------------------------
def test_train_on_an_empty_curated_set_names_the_set(tmp_path, model_folder):
    run = make_run(tmp_path)
    add_empty_curated(run, "none")
    cfg = TrainConfig(name="student", init=model_folder, data="none")
    one_line_error(lambda: run_train(cfg, run, False), "train:student: curated/none holds no examples")
    assert not (run.root / "checkpoints").exists() and "train:student" not in steps(run)


def test_train_on_an_empty_jsonl_file_names_the_file(tmp_path, model_folder):
    run = make_run(tmp_path)
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    cfg = TrainConfig(name="student", init=model_folder, data=str(data))
    one_line_error(lambda: run_train(cfg, run, False), f"train:student: {data} holds no examples")
    assert not (run.root / "checkpoints").exists()


def test_on_policy_training_on_no_train_problems_names_the_empty_split(tmp_path, model_folder):
    run = make_run(tmp_path, train=0)
    cfg = TrainConfig(
        name="kdrl", init=model_folder, data="problems", teacher=model_folder, objective="kdrl",
        on_policy={"samples_per_prompt": 2},
    )  # fmt: skip
    one_line_error(
        lambda: run_train(cfg, run, False),
        "train:kdrl: problems/arithmetic/train.parquet holds no train problems",
    )
    assert not (run.root / "checkpoints").exists()


# ---- chunk, rewrite, decontaminate ----------------------------------------------------------------
def test_chunk_of_a_set_without_the_labels_it_keeps_says_so(tmp_path):
    run = make_run(tmp_path)
    labelled(run, "teacher", ["incorrect"] * 3)
    one_line_error(
        lambda: run_chunk(ChunkConfig(name="stt", traces="teacher"), run, False),
        "chunk:stt: graded/teacher holds no traces labelled correct to chunk",
    )
    assert not run.chunks("stt").exists() and not run.curated("stt").exists()
    add_empty_curated(run, "none")
    one_line_error(
        lambda: run_chunk(ChunkConfig(name="stt", data="none"), run, False),
        "chunk:stt: curated/none holds no examples to chunk",
    )


def test_rewrite_of_a_set_without_correct_traces_says_so(tmp_path, model_folder):
    run = make_run(tmp_path)
    labelled(run, "teacher", ["incorrect"] * 3)
    one_line_error(
        lambda: run_rewrite(RewriteConfig(model=model_folder, traces="teacher", name="dap"), run, False),
        "rewrite:dap: graded/teacher has no traces labelled correct to rewrite",
    )
    assert not run.graded("dap").exists()


def test_decontaminate_of_an_empty_set_says_so(tmp_path):
    run = make_run(tmp_path)
    add_empty_curated(run, "none")
    benchmark = tmp_path / "gsm8k.jsonl"
    benchmark.write_text(json.dumps({"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"}) + "\n")
    cfg = DecontaminateConfig(name="clean", data="none", benchmarks=["gsm8k"], data_file=[str(benchmark)])
    one_line_error(
        lambda: run_decontaminate(cfg, run, False), "decontaminate:clean: curated/none holds no examples"
    )
    assert not run.curated("clean").exists() and not run.decontamination("clean").exists()


# ---- analysis stages ------------------------------------------------------------------------------
def test_the_analysis_stages_name_the_step_and_the_empty_set(tmp_path, model_folder):
    run = make_run(tmp_path)
    add_graded(run, "teacher", [])
    add_empty_curated(run, "none")
    one_line_error(
        lambda: run_trace_stats(TraceStatsConfig(name="stats", traces="teacher"), run, False),
        "trace_stats:stats: graded/teacher holds no texts to analyse",
    )
    memorization = MemorizationConfig(name="mem", model=model_folder, data="none")
    one_line_error(
        lambda: run_memorization(memorization, run, False), "memorization:mem: curated/none holds no texts"
    )
    models = {"teacher": model_folder, "student": model_folder, "distilled": model_folder}
    one_line_error(
        lambda: run_provenance(ProvenanceConfig(name="prov", traces="teacher", **models), run, False),
        "provenance:prov: graded/teacher holds no texts to analyse",
    )
    assert not (run.root / "analysis").exists()


# ---- select_teacher: a teacher with no correct trace ----------------------------------------------
def test_a_teacher_without_a_correct_trace_gets_no_nll_nor_proxy_and_ranks_last(tmp_path, testbed, capsys):
    run = make_run(tmp_path)
    labelled(run, "good", ["correct", "correct", "incorrect"])
    labelled(run, "bad", ["incorrect"] * 3)  # WRONG is shorter than a solution: first by length
    proxy = {"steps": 1, "batch_size": 2, "problems": 2, "max_new_tokens": 4, "eval_batch_size": 4}
    cfg = SelectTeacherConfig(
        name="zoo", teachers=["good", "bad"], student=str(testbed / "student"), batch_size=4,
        proxy=proxy, rank_by="length", curate_winner="winner",
    )  # fmt: skip
    run_select_teacher(cfg, run, overwrite=False)

    result = json.loads(run.teacher_selection("zoo").read_text())
    rows = {row["teacher"]: row for row in result["teachers"]}
    assert rows["bad"]["length_mean"] < rows["good"]["length_mean"]
    assert result["ranking"] == ["good", "bad"] and result["winner"] == "good"
    assert (
        rows["bad"]["correct"] == 0 and rows["bad"]["student_nll"] is None and rows["bad"]["nll_tokens"] == 0
    )
    assert rows["bad"]["proxy"]["accuracy"] is None and rows["bad"]["proxy"]["examples"] == 0
    assert rows["good"]["student_nll"] > 0 and rows["good"]["proxy"]["examples"] == 2
    assert len(read_records(run.curated("winner"), TrainingExample)) == 2

    headers, table = selection_table(result)
    bad = dict(zip(headers, table[1], strict=True))
    assert bad["teacher"] == "bad" and bad["rank"] == "2"
    assert bad["student NLL/token"] == bad["proxy acc. (greedy)"] == NO_CORRECT == "– (no correct traces)"
    good = dict(zip(headers, table[0], strict=True))
    assert good["student NLL/token"] == f"{rows['good']['student_nll']:.3f}"

    err = capsys.readouterr().err
    assert "select_teacher:zoo: no proxy student for bad: it has no correct traces" in err
    (summary,) = [line for line in err.splitlines() if line.startswith("select_teacher:zoo: ranked by")]
    assert (
        f"2. bad: accuracy 0.0%, length {rows['bad']['length_mean']:.1f}, student NLL {NO_CORRECT}, proxy {NO_CORRECT}"
        in summary
    )


def test_curate_winner_with_no_correct_trace_anywhere_stops_before_writing(tmp_path, testbed):
    run = make_run(tmp_path)
    labelled(run, "a", ["incorrect"] * 3)
    labelled(run, "b", ["incorrect", "unparseable", "incorrect"])
    cfg = SelectTeacherConfig(
        name="zoo", teachers=["a", "b"], student=str(testbed / "student"), curate_winner="w"
    )
    one_line_error(
        lambda: run_select_teacher(cfg, run, overwrite=False),
        "select_teacher:zoo: no teacher has a correct trace (graded/a, graded/b)",
        "curate_winner 'w' would be an empty training set",
    )
    assert not (run.root / "teacher-selection").exists() and not run.curated("w").exists()
    assert not any(key.startswith(("select_teacher", "curate")) for key in steps(run))

    # without curate_winner the comparison is still made: every teacher without an NLL
    run_select_teacher(cfg.model_copy(update={"curate_winner": None}), run, overwrite=False)
    result = json.loads(run.teacher_selection("zoo").read_text())
    assert [row["student_nll"] for row in result["teachers"]] == [None, None]
    assert all(line[7] == NO_CORRECT for line in selection_table(result)[1])


def test_the_proxy_without_test_problems_stops_before_training(tmp_path, model_folder):
    run = make_run(tmp_path, test=0)
    labelled(run, "good", ["correct"] * 3)
    cfg = SelectTeacherConfig(name="zoo", teachers=["good"], student=model_folder, proxy={"steps": 1})
    one_line_error(
        lambda: run_select_teacher(cfg, run, overwrite=False),
        "select_teacher:zoo: proxy: problems/arithmetic/test.parquet holds no test problems",
    )
    assert not (run.root / "teacher-selection").exists()
