"""Analysis tools: sentence provenance, memorization of training traces, trace statistics."""

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from reasondistill.analyze.common import check_same_tokenizer
from reasondistill.analyze.memorization import extraction
from reasondistill.analyze.provenance import (
    BOOSTED,
    NOT_BOOSTED,
    ROLES,
    STUDENT,
    TEACHER,
    _by_share,
    classify,
    locate,
    score_steps,
)
from reasondistill.analyze.text import (
    count_keywords,
    count_steps,
    describe,
    segments,
    trace_features,
    word_count,
)
from reasondistill.chat import completion_ids, prompt_ids
from reasondistill.cli import main
from reasondistill.errors import UserError
from reasondistill.records import Message, TrainingExample
from reasondistill.rundir import RunDir
from reasondistill.stages.memorization import report_sections as memorization_sections
from reasondistill.stages.provenance import ProvenanceConfig
from reasondistill.stages.provenance import report_sections as provenance_sections
from reasondistill.stages.trace_stats import report_sections as trace_stats_sections
from reasondistill.tasks import TASKS
from reasondistill.train.hyperparameters import Hyperparameters
from reasondistill.train.trainer import train_model


# ---- text functions -------------------------------------------------------------------------------
def test_lines_and_sentences_are_spans_of_the_text():
    text = "  ones: 4 + 7 = 11, carry 1, so far 1.\n\nInes has 2.5 books. Start with 2.5!  Done?\n"
    lines = segments(text, "lines")
    assert [s.text for s in lines] == [
        "ones: 4 + 7 = 11, carry 1, so far 1.",
        "Ines has 2.5 books. Start with 2.5!  Done?",
    ]
    sentences = segments(text, "sentences")
    assert [s.text for s in sentences] == [
        "ones: 4 + 7 = 11, carry 1, so far 1.",
        "Ines has 2.5 books.",  # a decimal point is no sentence end
        "Start with 2.5!",
        "Done?",
    ]
    assert all(text[s.start : s.end] == s.text for s in lines + sentences)
    assert count_steps(text, "lines") == 2 and count_steps(text, "sentences") == 4
    assert count_steps(None) == 0 and word_count("a  b\nc") == 3


def test_reflection_keywords_are_case_insensitive_whole_words():
    text = (
        "Wait, 7 + 5 = 12. WAIT. I was waiting; await nothing. Hmm. Let me  check: LET ME CHECK.\n"
        "Let me double check, then double-check again. Verify it; verified is not verify. "
        "Alternatively, on second thought, hmmm."
    )
    counts = count_keywords(
        text, ["wait", "let me check", "double-check", "verify", "hmm", "on second thought"]
    )
    assert counts == {
        "wait": 2,  # not "waiting", not "await"
        "let me check": 2,  # any white space between the words
        "double-check": 2,  # "double check" too
        "verify": 2,  # not "verified"
        "hmm": 1,  # not "hmmm"
        "on second thought": 1,
    }
    assert count_keywords(None, ["wait"]) == {"wait": 0}
    features = trace_features(
        "<think>\nHmm, 2 + 2 = 4.\nWait. So 4.\n</think>\nThe answer is 4.", ["wait", "hmm"]
    )
    assert features == {"words": 13, "lines": 2, "sentences": 3, "keywords": {"wait": 1, "hmm": 1}}


def test_describe():
    assert describe([1, 2, 3, 4, 10]) == {"mean": 4.0, "median": 3.0, "p90": pytest.approx(7.6)}
    assert describe([]) == {"mean": None, "median": None, "p90": None}


# ---- provenance categories ------------------------------------------------------------------------
def test_categories_follow_the_documented_rules():
    high, low = math.log(0.9), math.log(0.01)
    assert classify(high, low, high) == TEACHER  # the teacher's, learned by D
    assert classify(low, high, high) == STUDENT  # the teacher would not write it
    assert classify(low, low, high) == STUDENT  # nor would S0: D's own
    assert classify(math.log(0.4), math.log(0.99), math.log(0.99)) == STUDENT  # S0 clearly prefers it
    assert classify(high, high, high) == NOT_BOOSTED  # both had it, D no more than S0
    assert classify(math.log(0.6), math.log(0.5), math.log(0.95)) == BOOSTED  # both had it, D raised it
    # the thresholds are options
    assert classify(math.log(0.25), low, high) == STUDENT
    assert classify(math.log(0.25), low, high, likely=0.2) == TEACHER
    assert classify(high, math.log(0.6), high) == NOT_BOOSTED  # 0.41 nats apart: within the margin
    assert classify(high, math.log(0.6), high, origin_margin=0.4) == TEACHER
    assert classify(math.log(0.6), math.log(0.5), math.log(0.95), boost_margin=1.0) == NOT_BOOSTED


def test_completions_are_binned_by_teacher_share_with_their_accuracy():
    shares = [(0.0, "correct"), (0.1, "incorrect"), (0.5, "correct"), (1.0, "correct"), (1.0, None)]
    rows = _by_share(shares, [0, 0.5, 1])
    assert [(r["completions"], r["correct"], r["accuracy"]) for r in rows] == [(2, 1, 0.5), (3, 2, 1.0)]
    with pytest.raises(ValueError, match="share_bins"):
        ProvenanceConfig(teacher="t", student="s", distilled="d", share_bins=[0, 0.7, 0.5, 1])


def test_tokens_are_assigned_to_the_step_holding_their_text(testbed):
    tokenizer = AutoTokenizer.from_pretrained(testbed / "tokenizer")
    completion = (
        "<think>\nones: 4 + 7 = 11, carry 1, so far 1.\nSo far 11. Done.\n</think>\nThe answer is 11."
    )
    located = locate(tokenizer, completion, "sentences")
    assert located.token_ids == completion_ids(tokenizer, [completion])[0]
    assert [s.text for s in located.steps] == ["ones: 4 + 7 = 11, carry 1, so far 1.", "So far 11.", "Done."]
    for step, indices in zip(located.steps, located.step_tokens, strict=True):
        assert indices == list(range(indices[0], indices[-1] + 1))  # contiguous
        assert tokenizer.decode([located.token_ids[i] for i in indices]).strip() == step.text
    whole = locate(tokenizer, completion, "lines", scope="completion")
    assert [s.text for s in whole.steps][-1] == "The answer is 11."
    assert locate(tokenizer, "The answer is 11.", "lines").steps == []  # no reasoning block


# ---- provenance with models ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(testbed):
    return {"teacher": str(testbed / "teacher"), "student": str(testbed / "student")}


def arithmetic(n: int, seed: int, split: str = "train"):
    return TASKS["arithmetic"].sample(split, n, seed, difficulties=[2])


def test_step_scores_equal_a_direct_forward_pass(models, tmp_path):
    problems = arithmetic(3, seed=5)
    completions = [p.solution for p in problems]
    copy = shutil.copytree(models["teacher"], tmp_path / "teacher-copy")  # loaded and scored apart
    triple = {"teacher": models["teacher"], "student": models["student"], "distilled": str(copy)}
    located, scores = score_steps(triple, [p.messages for p in problems], completions, "lines", batch_size=2)
    assert scores["teacher"] == scores["distilled"]  # the same weights score every step exactly alike
    tokenizer = AutoTokenizer.from_pretrained(models["teacher"])
    for role in ("teacher", "student"):
        model = AutoModelForCausalLM.from_pretrained(models[role]).eval()
        for problem, where, got in zip(problems, located, scores[role], strict=True):
            prompt = prompt_ids(tokenizer, [problem.messages])[0]
            assert len(got) == len(where.steps) == len(problem.solution.strip().splitlines()) - 3
            for indices, score in zip(where.step_tokens, got, strict=True):
                # one unpadded sequence: the prompt and the completion up to the end of the step
                ids = torch.tensor([prompt + where.token_ids[: indices[-1] + 1]])
                with torch.no_grad():
                    logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
                expected = sum(logprobs[len(prompt) + i - 1, where.token_ids[i]].item() for i in indices)
                assert score == pytest.approx(expected / len(indices), abs=1e-4)
    categories = {
        classify(scores["teacher"][i][j], scores["student"][i][j], scores["distilled"][i][j])
        for i, where in enumerate(located)
        for j in range(len(where.steps))
    }
    assert categories == {TEACHER}  # the trained teacher's own steps, against a random-weight student


def test_a_sentence_no_teacher_would_write_is_not_the_teachers(models):
    problem = arithmetic(1, seed=6)[0]
    odd = problem.solution.replace("\n</think>", "\nBanana purple elephants sing loudly.\n</think>")
    triple = {"teacher": models["teacher"], "student": models["student"], "distilled": models["teacher"]}
    located, scores = score_steps(triple, [problem.messages], [odd], "lines")
    categories = [classify(*triple) for triple in zip(*(scores[role][0] for role in ROLES), strict=True)]
    assert located[0].steps[-1].text == "Banana purple elephants sing loudly."
    assert categories == [TEACHER] * (len(categories) - 1) + [STUDENT]
    assert math.exp(scores["teacher"][0][-1]) < 0.3 < math.exp(scores["teacher"][0][0])


def test_models_with_other_tokenizers_are_refused_before_loading(models, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(models["student"], other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ messages[0]['content'] }}"
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    (other / "chat_template.jinja").unlink(missing_ok=True)
    pair = [
        ("teacher", AutoTokenizer.from_pretrained(models["teacher"])),
        ("student", AutoTokenizer.from_pretrained(other)),
    ]
    with pytest.raises(
        UserError, match="share one tokenizer; teacher and student do not: the chat templates"
    ):
        check_same_tokenizer(pair, "provenance")


def test_the_provenance_stage_traces_eval_completions(models, tmp_path, capsys):
    run_dir = tmp_path / "run"
    main(["problems", "--run-dir", str(run_dir), "--tasks", "arithmetic", "--train", "1", "--test", "6",
          "--difficulty", '{"arithmetic": [2]}'])  # fmt: skip
    main(
        [
            "eval",
            "--run-dir",
            str(run_dir),
            "--models",
            "testbed:teacher",
            "--n",
            "0",
            "--max-new-tokens",
            "80",
        ]
    )
    main(["provenance", "--run-dir", str(run_dir), "--teacher", "testbed:teacher", "--student", "testbed:student",
          "--distilled", "testbed:teacher", "--unit", "lines", "--share-bins", "0,0.5,1"])  # fmt: skip
    run = RunDir(run_dir)
    result = json.loads(run.analysis("provenance").read_text())
    assert result["kind"] == "provenance" and result["texts"] == "eval/teacher (greedy)"
    assert result["completions"] == 6 and result["steps"] >= 6 * 2
    assert result["categories"][TEACHER]["count"] == result["steps"]
    assert result["accuracy_by_teacher_share"][-1]["completions"] == 6
    [(heading, (headers, rows)), (_, (_, share_rows))] = provenance_sections(run)
    assert "teacher teacher, original student student" in heading
    assert rows[0][:3] == [TEACHER, str(result["steps"]), "100.0%"]
    assert share_rows[-1] == ["50–100%", "6", "100.0%"]
    # a changed batch size does not change the result: the finished step is skipped
    main(["provenance", "--run-dir", str(run_dir), "--teacher", "testbed:teacher", "--student", "testbed:student",
          "--distilled", "testbed:teacher", "--unit", "lines", "--share-bins", "0,0.5,1", "--batch-size", "2"])  # fmt: skip
    assert (
        "provenance:provenance: finished earlier with the same settings, skipped" in capsys.readouterr().err
    )
    main(["trace_stats", "--run-dir", str(run_dir), "--eval-model", "teacher", "--keywords", "carry,wait"])
    stats = json.loads(run.analysis("trace-stats").read_text())
    assert stats["all"]["traces"] == 6 and stats["by_label"]["correct"]["traces"] == 6
    assert stats["all"]["lines"]["mean"] == result["steps"] / 6
    assert stats["all"]["keywords"]["wait"]["count"] == 0 and stats["all"]["keywords"]["carry"]["count"] > 0
    [(_, (_, stat_rows)), (_, (_, keyword_rows))] = trace_stats_sections(run)
    assert stat_rows[0][:2] == ["all", "6"] and keyword_rows[1] == ["wait", "0", "0.0%"]


# ---- memorization ---------------------------------------------------------------------------------
def planted(n: int, seed: int) -> list[TrainingExample]:
    """Arithmetic prompts with completions of random digits and words: predictable only by rote."""
    rng = random.Random(seed)
    words = ["carry", "tens", "ones", "so", "far", "books", "Erin", "red"] + [str(d) for d in range(10)]
    return [
        TrainingExample(
            problem_id=p.id,
            task=p.task,
            messages=p.messages,
            sample_idx=0,
            completion="<think>\n"
            + " ".join(rng.choice(words) for _ in range(40))
            + "\n</think>\nThe answer is 1.",
        )  # fmt: skip
        for p in arithmetic(n, seed)
    ]


@pytest.mark.training_sensitive
def test_a_model_trained_hard_on_few_traces_gives_them_back(models, tmp_path, margin):
    seen, unseen = planted(4, seed=1), planted(4, seed=2)
    short = TrainingExample(
        problem_id="short", task="arithmetic", messages=[Message(role="user", content="What is 1 + 1?")],
        completion="The answer is 2.",
    )  # fmt: skip
    data, heldout = tmp_path / "seen.jsonl", tmp_path / "unseen.jsonl"
    data.write_text("".join(e.model_dump_json() + "\n" for e in [*seen, short]))
    heldout.write_text("".join(e.model_dump_json() + "\n" for e in unseen))
    # 300 optimizer steps at a constant 3e-3 take the loss on these four to ~0.001 on every testbed build
    # (after 150 it was 0.06 on one build, and two of the four were not given back exactly)
    hp = Hyperparameters(epochs=300, learning_rate=3e-3, batch_size=4, warmup_ratio=0.0, lr_scheduler="constant",
                         save_steps=10_000, logging_steps=1_000)  # fmt: skip
    trained = tmp_path / "rote"
    train_model(Path(models["student"]), seen, trained, hp)
    run_dir = tmp_path / "run"
    main(["memorization", "--run-dir", str(run_dir), "--model", str(trained), "--data", str(data),
          "--prefix-tokens", "8", "--suffix-tokens", "24", "--heldout", str(heldout)])  # fmt: skip
    result = json.loads(RunDir(run_dir).analysis("memorization").read_text())
    assert (result["examples"], result["tested"], result["too_short"]) == (5, 4, 1)  # counted, not dropped
    margin("exact rate (memorised)", result["exact_rate"], ">=", 0.75)
    margin("token match rate", result["token_match_rate"], ">=", 0.9)
    assert result["by_task"]["arithmetic"]["memorised"] == result["memorised"]
    untested = result["per_example"][4]
    assert (
        untested["tested"] is False and untested["memorised"] is None and untested["completion_tokens"] < 32
    )
    assert all(r["zlib_entropy"] > 0 for r in result["per_example"])
    [(heading, (headers, rows))] = memorization_sections(RunDir(run_dir))
    assert "prefix 8 tokens, suffix 24" in heading and rows[-1][:4] == ["all", "5", "4", "1"]
    assert headers[-1] == f"held-out exact ({heldout})" and rows[-1][-1] == "0.0% of 4"
    # what it was not trained on, it does not give back; nor does the student before training
    assert (result["heldout"]["tested"], result["heldout"]["exact_rate"]) == (4, 0.0)
    assert result["excess_exact_rate"] == result["exact_rate"]
    before = extraction(models["student"], seen, 8, 24)
    assert not any(r["memorised"] for r in before)
    assert max(r["token_match"] for r in before) < 0.5
