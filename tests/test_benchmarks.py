"""Benchmark loaders on the real files: counts, gold answers, prompts, graders, and bad rows."""

import json
from collections import Counter

import pytest
from helpers import SHARED_BENCHMARKS

from reasondistill.errors import UserError
from reasondistill.tasks import BENCHMARKS, SINGLE_BENCHMARKS, default_grader, get_benchmark
from reasondistill.tasks.benchmarks import BOXED

FILES = {
    "gsm8k": "gsm8k/test.jsonl", "math500": "math500/test.jsonl", "aime24": "aime24/test.jsonl",
    "aime25": "aime25/test.jsonl", "amc23": "amc23/test.jsonl", "folio": "folio/folio-validation.jsonl",
    "prontoqa": "prontoqa/dev.json", "proofwriter": "proofwriter/dev.json", "logiqa": "logiqa/Test.txt",
    "logiqa2": "logiqa2/test.txt", "clutrr": "clutrr/gen_train23_test2to10/test.csv",
}  # fmt: skip
# Row counts and gold-answer distributions as SOURCES.md documents them.
EXPECTED = {
    "gsm8k": (1319, None),
    "math500": (500, None),
    "aime24": (30, None),
    "aime25": (30, None),
    "amc23": (40, None),
    "folio": (204, {"True": 72, "Uncertain": 69, "False": 63}),
    "prontoqa": (500, {"True": 258, "False": 242}),
    "proofwriter": (600, {"True": 200, "False": 200, "Unknown": 200}),
    "logiqa": (651, {"A": 132, "B": 159, "C": 179, "D": 181}),
    "logiqa2": (1572, {"A": 347, "B": 384, "C": 417, "D": 424}),
    "clutrr": (1146, None),
}

needs_shared = pytest.mark.skipif(not SHARED_BENCHMARKS.exists(), reason=f"{SHARED_BENCHMARKS} not present")


@pytest.fixture(scope="module")
def loaded():
    return {name: BENCHMARKS[name].load(SHARED_BENCHMARKS / path) for name, path in FILES.items()}


def test_every_benchmark_has_a_local_file_format_and_a_test():
    # LogiGLUE's members have no local copies here: tests/test_logiglue.py builds rows in their format
    assert set(FILES) == set(SINGLE_BENCHMARKS) == {n for n in BENCHMARKS if not n.startswith("logiglue-")}


@needs_shared
@pytest.mark.parametrize("name", list(FILES))
def test_each_benchmark_loads_every_row_with_its_documented_answers(loaded, name):
    problems = loaded[name]
    rows, answers = EXPECTED[name]
    assert len(problems) == rows == len({p.id for p in problems})
    if answers:
        assert Counter(p.answer for p in problems) == answers
    assert all(p.task == name and p.answer and p.messages[0].role == "user" for p in problems)
    assert all(p.messages[0].content.endswith("within \\boxed{}.") for p in problems)


@needs_shared
def test_gold_answers_are_normalised_from_the_sources_quirks(loaded):
    assert loaded["gsm8k"][0].answer == "18" and loaded["gsm8k"][0].messages[0].content.endswith(BOXED)
    assert "2125" in {p.answer for p in loaded["gsm8k"]}  # written "2,125" upstream
    assert loaded["amc23"][0].answer == "27"  # a float, 27.0, upstream
    assert "025" in {p.answer for p in loaded["aime24"]}  # zero-padded upstream; graded as a number
    assert Counter(p.difficulty for p in loaded["math500"]) == {1: 43, 2: 90, 3: 105, 4: 128, 5: 134}
    clutrr_hops = Counter(p.difficulty for p in loaded["clutrr"])
    assert clutrr_hops[2] == 38 and clutrr_hops[10] == 119 and sum(clutrr_hops.values()) == 1146
    first = loaded["clutrr"][0]
    assert first.answer == "grandson" and "How is Lewis related to Jason?" in first.messages[0].content
    assert "[" not in first.messages[0].content  # names are bracketed upstream
    assert (
        "\nD. The business district is southeast of the leisure area"
        in loaded["logiqa"][0].messages[0].content
    )
    assert (
        json.loads(loaded["prontoqa"][0].meta) == {"letter": "B"} and loaded["prontoqa"][0].answer == "False"
    )


@needs_shared
@pytest.mark.parametrize(
    "name", ["aime24", "aime25", "amc23", "folio", "prontoqa", "proofwriter", "logiqa", "logiqa2", "clutrr"]
)
def test_each_benchmarks_grader_accepts_the_gold_answer_and_rejects_another(loaded, name):
    problems = loaded[name]
    grader = default_grader(name)
    other_answers = sorted({p.answer for p in problems})
    for p in problems:
        assert (
            grader.grade(f"<think>...</think>\nSo the answer is $\\boxed{{{p.answer}}}$.", p).label
            == "correct"
        ), p.id
        other = next(a for a in other_answers if a != p.answer)
        assert grader.grade(f"<think>...</think>\n\\boxed{{{other}}}", p).label == "incorrect", p.id


def test_limit_keeps_the_first_problems_in_source_order(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    path.write_text(
        "".join(json.dumps({"question": f"q{i}", "answer": f"x\n#### {i}"}) + "\n" for i in range(5))
    )
    problems = get_benchmark("gsm8k").load(path, limit=2)
    assert [p.answer for p in problems] == ["0", "1"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        (
            "gsm8k",
            '{"question": "q", "answer": "x\\n#### 1"}\n{"question": "q2"}\n',
            r"line 2: missing field 'answer'",
        ),
        (
            "gsm8k",
            '{"question": "q", "answer": "no final line"}\n',
            r"line 1: field 'answer': expected a worked solution ending in '#### <number>'",
        ),
        (
            "math500",
            '{"problem": "p", "answer": "1", "level": "hard"}\n',
            r"line 1: field 'level': expected int, got 'hard'",
        ),
        (
            "prontoqa",
            '[{"id": "x", "context": "c", "question": "q", "options": ["A) True", "B) False"], "answer": "C"}]',
            r"item 0: field 'answer': expected one of the option letters A, B",
        ),
        (
            "logiqa",
            "\na\ncontext\nquestion\nA.one\nB.two\nC.three\n",
            r"line 1: expected a blank line, a gold letter a-d",
        ),
        (
            "folio",
            '{"premises": ["p"], "conclusion": "c", "label": "Maybe"}\n',
            r"field 'label': expected True / False / Uncertain",
        ),
    ],
)
def test_a_malformed_row_is_one_error_naming_file_row_and_field(tmp_path, name, content, message):
    path = tmp_path / "data"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        get_benchmark(name).load(path)


def test_unknown_benchmarks_and_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="unknown benchmark 'gsm9k'; known benchmarks: gsm8k, math500"):
        get_benchmark("gsm9k")
    with pytest.raises(UserError, match=f"benchmark gsm8k: data file {tmp_path}/nope.jsonl not found"):
        get_benchmark("gsm8k").load(tmp_path / "nope.jsonl")


def test_without_a_data_file_the_hub_dataset_is_read_with_its_config_and_split(monkeypatch):
    calls = []

    def load_dataset(path, name, split):  # stands in for the network; rows in the Hub copy's format
        calls.append((path, name, split))
        return [{"problem": "Find x.", "answer": "025", "id": 60, "url": "u", "solution": "s"}]

    monkeypatch.setattr("datasets.load_dataset", load_dataset)
    (problem,) = get_benchmark("aime24").load()
    assert calls == [("HuggingFaceH4/aime_2024", None, "train")]
    assert (problem.id, problem.answer) == ("aime24-60", "025")
    monkeypatch.setattr(
        "datasets.load_dataset", lambda *a, **k: (_ for _ in ()).throw(ConnectionError("offline"))
    )
    with pytest.raises(UserError, match="could not load openai/gsm8k .*offline.*pass --data-file"):
        get_benchmark("gsm8k").load()


def test_kd_loss_memory_benchmark_runs_its_variants_at_a_tiny_size(capsys):
    """benchmarks/kd_loss_memory.py in-process at a tiny size: naive, TRL, reasondistill (fused and the
    previous checkpointed chunks) rows with equal losses; Liger's row runs where a GPU is, else says why not."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "kd_loss_memory.py"
    spec = importlib.util.spec_from_file_location("kd_loss_memory", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    sizes = ["--vocab", "64", "--seq", "4", "--batch", "2", "--student-hidden", "8", "--teacher-hidden", "12"]
    benchmark.main([*sizes, "--chunk-size", "3", "--in-process"])
    lines = capsys.readouterr().out.splitlines()
    losses = {}
    for label, kind, _ in benchmark.VARIANTS.values():
        (row,) = [line for line in lines if line.startswith(label + " ")]
        status, loss = row[len(label) :].split()[:2]
        if kind == "liger" and benchmark.liger_unavailable():
            assert status == "not" and any("Liger-Kernel's kernels are Triton" in line for line in lines)
            continue
        assert status == "ok", row
        losses[label] = float(loss)
    assert {label.split()[0] for label in losses} >= {"naive", "TRL", "reasondistill", "rd"}
    forward_kl = [
        losses["naive forward KL"],
        losses["TRL generalized_jsd β=0"],
        losses["reasondistill forward_kl"],
        losses["rd forward_kl, checkpointed"],
    ]
    assert max(forward_kl) - min(forward_kl) < 1e-4
    assert abs(losses["TRL generalized_jsd β=0.5"] - losses["reasondistill jsd β=0.5"]) < 1e-4


def run_quick(name: str, capsys):
    """benchmarks/<name>.py --quick, with torch's thread setting left as it is: (module, printed text)."""
    import importlib.util
    from pathlib import Path

    import torch

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    benchmark.main(["--quick", "--threads", str(torch.get_num_threads())])
    return benchmark, capsys.readouterr().out


def trainer_rows(benchmark, out: str) -> list[list[float]]:
    """The numbers of the trainers' rows (ours — online first where there is such a row —, then the
    baseline), each row printed once."""
    rows = []
    for label in (
        *([benchmark.OURS_ONLINE] if hasattr(benchmark, "OURS_ONLINE") else []),
        benchmark.OURS,
        benchmark.BASELINE,
    ):
        (row,) = [line for line in out.splitlines() if line.startswith(label + " ")]
        rows.append([float(value.replace(",", "")) for value in row[len(label) :].split()])
    return rows


def test_kd_throughput_benchmark_times_every_trainer_and_prints_the_ratios(capsys):
    """benchmarks/kd_throughput.py --quick: the three trainers (ours online and from the store, TRL) take
    their steps, each gets a row, and both ratios to TRL are printed, each saying what it compares."""
    import re

    benchmark, out = run_quick("kd_throughput", capsys)
    rows = trainer_rows(benchmark, out)
    assert len(rows) == 3 and all(value > 0 for row in rows for value in row), out
    for name, note in (
        (benchmark.OURS_ONLINE, "like for like"),
        (benchmark.OURS, "skips the teacher's forward pass"),
    ):
        ratio = re.search(
            rf"^ratio {re.escape(name)} / TRL GKDTrainer λ=0, online teacher: ([\d.]+)x tokens/s \({note}",
            out,
            re.M,
        )
        assert ratio and float(ratio.group(1)) > 0, out


def test_on_policy_step_benchmark_times_both_trainers_and_prints_their_ratio(capsys):
    """benchmarks/on_policy_step.py --quick: both trainers sample and step, each gets a row and the ratio is printed."""
    import re

    benchmark, out = run_quick("on_policy_step", capsys)
    for values in trainer_rows(benchmark, out):
        assert all(value > 0 for value in values), out
        assert values[-1] <= 8, out  # mean sampled completion length, at most --quick's 8 new tokens
    ratio = re.search(r"^ratio reasondistill / TRL GKDTrainer λ=1: ([\d.]+)x step time", out, re.M)
    assert ratio and float(ratio.group(1)) > 0, out


def test_hf_decode_benchmark_times_every_side_in_both_scenarios(capsys):
    """benchmarks/hf_decode.py --quick: both scenarios print a row per side, with tokens/s, a mean
    completion length within --quick's 16 new tokens, and the ratio to plain `model.generate`."""
    benchmark, out = run_quick("hf_decode", capsys)
    for scenario in ("trained", "full-length"):
        section = out.split(f"\n{scenario}: ")[1].split("\n\n")[0]
        rows = {
            label: section.split(f"\n{label} ")[1].split("\n")[0].split()
            for label in (benchmark.BASELINE, benchmark.STREAMS, benchmark.OURS)
        }
        for seconds, rate, length, ratio in rows.values():
            assert float(seconds) > 0 and float(rate.replace(",", "")) > 0, out
            assert 0 < float(length) <= 16 and float(ratio.rstrip("x")) > 0, out
        assert rows[benchmark.BASELINE][-1] == "1.00x", out


def test_packing_benchmark_compares_padded_and_packed_batches(capsys):
    """benchmarks/packing.py --quick: three ways over the same examples, the same loss, no padding packed."""
    _, out = run_quick("packing", capsys)
    rows = {
        line[:28].strip(): line[28:].split()
        for line in out.splitlines()
        if line.startswith(("padded", "packed"))
    }
    assert set(rows) == {"padded, random", "padded, sorted within step", "packed"}
    assert rows["packed"][1] == "0.0%" and float(rows["padded, random"][1].rstrip("%")) > 0
    assert len({row[-1] for row in rows.values()}) == 1  # the same training loss every way


def test_stored_teacher_memory_benchmark_runs_both_ways(capsys):
    """benchmarks/stored_teacher_memory.py --quick: both ways lay out and read every row, each in a
    process of its own, and report their memory and times."""
    benchmark, out = run_quick("stored_teacher_memory", capsys)
    rows = {}
    for label in (benchmark.OURS, benchmark.BASELINE):
        (line,) = [line for line in out.splitlines() if line.startswith(label)]
        rows[label] = [float(value) for value in line[len(label) :].split()]
    assert all(len(row) == 4 and row[2] > 0 for row in rows.values()), out
    assert "private memory:" in out


def test_tokenized_memory_benchmark_runs_both_ways(capsys):
    """benchmarks/tokenized_memory.py --quick: both ways tokenize the same tokens, each in a process
    of its own, and report their memory."""
    benchmark, out = run_quick("tokenized_memory", capsys)
    for label in (benchmark.OURS, benchmark.BASELINE):
        (line,) = [line for line in out.splitlines() if line.startswith(label)]
        assert len(line[len(label) :].split()) == 2, out
    assert "tokens: 327,530;" in out
