"""The openai backend against a local OpenAI-compatible server backed by the testbed teacher.

The server (testing/server.py) answers like vLLM: real logprobs and top logprobs from the model,
prompt logprobs for scoring, and, in its fault-injecting mode, 500s, 429s with Retry-After, hangs
past the client's timeout, malformed JSON and dropped connections.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from helpers import eval_runs

from reasondistill.chat import prompt_ids
from reasondistill.cli import main
from reasondistill.errors import UserError
from reasondistill.generate.base import SamplingParams
from reasondistill.generate.hf import HFGenerator
from reasondistill.generate.logprobs import TokenLogprobs, read_logprobs
from reasondistill.generate.openai import OpenAIGenerator, RetryPolicy, check_distribution, parse_retry_after
from reasondistill.records import GradedTrace, Problem, Trace, read_records
from reasondistill.rundir import RunDir
from reasondistill.stages.report import ReportConfig, render
from reasondistill.store import logprob_shards, trace_shards
from reasondistill.tasks import get_task
from reasondistill.testing.server import FAULT_KINDS, Faults, serve_in_thread, spawn_server

pytestmark = pytest.mark.slow  # needs the trained testbed teacher

SERVED = "teacher"
QWEN = Path(__file__).resolve().parents[2] / "shared" / "data" / "tokenizers" / "Qwen2.5-0.5B-Instruct"
FAST_RETRIES = ["--max-retries", "4", "--retry-backoff", "0.05"]


@pytest.fixture(scope="module")
def server(testbed):
    with serve_in_thread(testbed / "teacher", served_name=SERVED) as running:
        yield running


@pytest.fixture(scope="module")
def hf_teacher(testbed) -> HFGenerator:
    return HFGenerator(testbed / "teacher")


@pytest.fixture(scope="module")
def prompts():
    return [p.messages for p in get_task("arithmetic").sample("test", 3, seed=5)]


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_completions_carry_the_teachers_own_logprobs_and_top_k(
    endpoint, server, testbed, hf_teacher, prompts
):
    client = OpenAIGenerator(SERVED, server.base_url, endpoint=endpoint, tokenizer=str(testbed / "teacher"))
    results = client.generate(
        prompts, SamplingParams(n=2, temperature=0.9, max_new_tokens=60, top_logprobs=4, seed=2)
    )
    assert [len(r) for r in results] == [2, 2, 2]
    assert client.usage.requests == 6 + 2  # and the raw-logprobs check's two probes (temperature 0.9)
    for prompt, completions in zip(prompts, results, strict=True):
        for completion in completions:
            assert completion.logprobs.token_ids.tolist() == completion.token_ids
            assert completion.completion_tokens == len(completion.token_ids)
            ids = prompt_ids(hf_teacher.tokenizer, [prompt])
            reference = hf_teacher.score_ids(ids, [completion.token_ids], top_k=4)[0]
            np.testing.assert_allclose(completion.logprobs.logprobs, reference.logprobs, atol=1e-2)
            np.testing.assert_array_equal(completion.logprobs.topk_ids, reference.topk_ids)
            # the tail mass 1 − Σ top-k is small, so its log is ill-conditioned: compare masses
            tail_mass, reference_mass = (
                np.exp(completion.logprobs.tail_logprob),
                np.exp(reference.tail_logprob),
            )
            np.testing.assert_allclose(tail_mass, reference_mass, atol=1e-3)
    # per-request seeds: asking again gives the same samples
    again = client.generate(
        prompts, SamplingParams(n=2, temperature=0.9, max_new_tokens=60, top_logprobs=4, seed=2)
    )
    assert [[c.text for c in r] for r in again] == [[c.text for c in r] for r in results]


@pytest.mark.training_sensitive  # the teacher must be unsure of word problems
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_every_sample_is_drawn_with_its_own_seed(endpoint, server, testbed, hf_teacher, monkeypatch):
    """n samples of a prompt are n requests, each with a seed of its own that alone decides its tokens.

    (Two samples of an easy arithmetic prompt can still be the same text: the testbed teacher is
    sure of nearly every token there. Where it is unsure — word problems — they differ.)"""
    sent = []
    body = OpenAIGenerator._completion_body
    monkeypatch.setattr(
        OpenAIGenerator, "_completion_body", lambda self, *args: sent.append(body(self, *args)) or sent[-1]
    )
    prompts = [p.messages for p in get_task("word_problems").sample("test", 3, seed=5)]
    client = OpenAIGenerator(SERVED, server.base_url, endpoint=endpoint, tokenizer=str(testbed / "teacher"))
    sampling = SamplingParams(n=2, temperature=1.0, max_new_tokens=40, seed=2, logprobs=True)  # ids come back
    results = client.generate(prompts, sampling)
    seeds = [[2 + 2 * i + j for j in range(2)] for i in range(len(prompts))]  # seed + i·n + j by default
    assert sorted(b["seed"] for b in sent) == sorted(s for row in seeds for s in row)
    for prompt, row, completions in zip(prompts, seeds, results, strict=True):
        for seed, completion in zip(row, completions, strict=True):
            local = hf_teacher.generate([prompt], replace(sampling, n=1, seed=seed))[0][0]
            assert completion.token_ids == local.token_ids  # the server samples with the request's seed
    assert all(r[0].text != r[1].text for r in results)


def test_scoring_through_prompt_logprobs_equals_the_hf_forward_pass(server, testbed, hf_teacher, prompts):
    texts = ["<think>\nones: 1 + 2 = 3\n</think>\nThe answer is 3.", "The answer is 12."]
    client = OpenAIGenerator(
        SERVED, server.base_url, endpoint="completions", tokenizer=str(testbed / "teacher")
    )
    remote = client.score(prompts[:2], texts, top_k=6)
    local = hf_teacher.score(prompts[:2], texts, top_k=6)
    for r, lo in zip(remote, local, strict=True):
        np.testing.assert_array_equal(r.token_ids, lo.token_ids)
        np.testing.assert_array_equal(r.topk_ids, lo.topk_ids)
        np.testing.assert_allclose(r.logprobs, lo.logprobs, atol=1e-2)
    without_tokenizer = OpenAIGenerator(SERVED, server.base_url)
    with pytest.raises(UserError, match="^tokenizer: scoring .* needs the teacher's tokenizer"):
        without_tokenizer.score(prompts[:1], texts[:1], top_k=2)
    with pytest.raises(UserError, match="^tokenizer: the openai backend's completions endpoint"):
        OpenAIGenerator(SERVED, server.base_url, endpoint="completions")


def test_logprobs_after_the_temperature_are_refused_before_any_row_is_generated(testbed, prompts):
    """A server reporting processed logprobs (vLLM --logprobs-mode processed_logprobs) is caught by the
    probe; at temperature 1 processed and raw values coincide, so nothing is checked or refused."""
    with serve_in_thread(
        testbed / "teacher", served_name=SERVED, logprobs_mode="processed_logprobs"
    ) as server:
        client = OpenAIGenerator(SERVED, server.base_url)
        with pytest.raises(
            UserError, match="logprobs change with the sampling settings.*--logprobs-mode raw_logprobs"
        ):
            client.generate(prompts, SamplingParams(temperature=0.7, max_new_tokens=8, top_logprobs=3))
        assert server.requests == 2 and client.usage.requests == 2  # the two one-token probes, no row
        at_one = client.generate(
            prompts[:1], SamplingParams(temperature=1.0, max_new_tokens=8, top_logprobs=3)
        )
        assert at_one[0][0].logprobs.k == 3 and server.requests == 3


def test_every_server_of_a_pool_is_probed_for_raw_logprobs(testbed, prompts):
    """Among several servers, one started with processed logprobs is caught wherever it stands in the
    list: each server gets the two probes itself (the pool would otherwise send them wherever it
    likes), and the line names that server. Servers that all pass are each probed once, then used."""
    sampling = SamplingParams(temperature=0.7, max_new_tokens=4, top_logprobs=3)
    with (
        serve_in_thread(testbed / "teacher", served_name=SERVED) as raw,
        serve_in_thread(testbed / "teacher", served_name=SERVED) as other_raw,
        serve_in_thread(
            testbed / "teacher", served_name=SERVED, logprobs_mode="processed_logprobs"
        ) as processed,
    ):
        for raw_first in (True, False):
            before = (raw.requests, processed.requests)
            urls = [raw.base_url, processed.base_url] if raw_first else [processed.base_url, raw.base_url]
            with pytest.raises(UserError, match=f"^{processed.base_url}: the server's logprobs change"):
                OpenAIGenerator(SERVED, urls).generate(prompts, sampling)
            sent = (raw.requests - before[0], processed.requests - before[1])
            assert sent == ((2, 2) if raw_first else (0, 2)), (raw_first, sent)  # no row was sent
        before = (raw.requests, other_raw.requests)
        client = OpenAIGenerator(SERVED, [raw.base_url, other_raw.base_url])
        samples = client.generate(prompts, sampling)
        assert all(s[0].logprobs.k == 3 for s in samples)
        assert raw.requests - before[0] + other_raw.requests - before[1] == 4 + len(prompts)
        assert raw.requests - before[0] >= 2 and other_raw.requests - before[1] >= 2


def test_values_that_are_not_log_probabilities_are_refused():
    distribution = TokenLogprobs.build([5], [-0.7], [[5, 9]], [[-0.7, -1.2]])
    assert check_distribution(distribution) is distribution
    logits = TokenLogprobs.build([5], [-0.7], [[5, 9]], [[-0.1, -0.2]])  # probabilities summing to 1.7
    with pytest.raises(UserError, match="not log-probabilities"):
        check_distribution(logits)
    with pytest.raises(UserError, match="not log-probabilities"):
        check_distribution(TokenLogprobs.build([5], [3.5], np.zeros((1, 0)), np.zeros((1, 0))))


def test_retry_after_is_parsed_as_seconds_or_an_http_date():
    assert parse_retry_after("2") == 2.0 and parse_retry_after("0.25") == 0.25
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 < parse_retry_after(date) <= 30
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_a_429_waits_as_long_as_retry_after_says(testbed, prompts):
    faults = Faults(rate=1.0, kinds=("429",), retry_after="0.6", max_faults_per_request=1)
    with serve_in_thread(testbed / "teacher", served_name=SERVED, faults=faults) as server:
        client = OpenAIGenerator(SERVED, server.base_url, retry=RetryPolicy(backoff_base=0.0))
        started = time.perf_counter()
        ((completion,),) = client.generate(prompts[:1], SamplingParams(temperature=0, max_new_tokens=5))
        assert time.perf_counter() - started >= 0.6
    assert completion.text and client.usage.retries == 1 and server.fault_counts["429"] == 1


def _problems_run(root: Path, train: int = 6, task: str = "arithmetic") -> list[str]:
    main(["problems", "--run-dir", str(root), "--tasks", task, "--train", str(train), "--test", "1"])
    return ["generate", "--run-dir", str(root), "--model", SERVED, "--backend", "openai", "--name", "t"]


def _error_of(capsys, args: list[str]) -> str:
    """The one-line error the command fails with."""
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(args)
    return capsys.readouterr().err.replace("\n", " ")


def _rows(root: Path) -> list[Trace]:
    return [t for shard in trace_shards(root / "traces" / "t") for t in read_records(shard, Trace)]


def _keys(rows: list[Trace]) -> list[tuple[str, int]]:
    return sorted((t.problem_id, t.sample_idx) for t in rows)


def test_a_job_through_every_kind_of_fault_writes_every_row_exactly_once(testbed, server, tmp_path):
    sampling = [
        "--n",
        "3",
        "--temperature",
        "0.9",
        "--max-new-tokens",
        "24",
        "--shard-size",
        "8",
        "--top-logprobs",
        "3",
    ]
    reference = _problems_run(tmp_path / "clean")
    main([*reference, "--base-url", server.base_url, *sampling])

    # seed 4: the fault decisions (a hash of each request body: the 18 rows' and the raw-logprobs
    # probe's, all fixed) meet every kind of fault
    faults = Faults(rate=0.6, retry_after="0.1", hang_seconds=20, max_faults_per_request=2, seed=4)
    with serve_in_thread(testbed / "teacher", served_name=SERVED, faults=faults) as faulty:
        args = _problems_run(tmp_path / "faulty")
        main([*args, "--base-url", faulty.base_url, "--request-timeout", "1.5", *FAST_RETRIES, *sampling])
    assert set(faulty.fault_counts) >= set(FAULT_KINDS), faulty.fault_counts

    clean, survived = _rows(tmp_path / "clean"), _rows(tmp_path / "faulty")
    assert len(survived) == 18 and _keys(survived) == sorted(set(_keys(survived)))
    # every retried request kept its seed: the same completions as without faults
    assert {(t.problem_id, t.sample_idx, t.completion) for t in survived} == {
        (t.problem_id, t.sample_idx, t.completion) for t in clean
    }
    logprob_rows = [
        r for path in logprob_shards(tmp_path / "faulty" / "traces" / "t") for r in read_logprobs(path)
    ]
    assert sorted((p, s) for p, s, _ in logprob_rows) == _keys(survived)
    usage = RunDir(tmp_path / "faulty").manifest()["steps"]["generate:t"]["stats"]["usage"]
    assert (
        usage["requests"] == 18 + 2  # the rows, and the two one-token probes of the raw-logprobs check
        and usage["retries"] >= sum(faulty.fault_counts.values())
        and usage["failed"] == []
    )
    # every trace records the sampling it was drawn with, logprobs included
    recorded = json.loads(survived[0].source)["sampling"]
    assert (recorded["n"], recorded["logprobs"], recorded["top_logprobs"]) == (3, True, 3)
    assert RunDir(tmp_path / "faulty").manifest()["teacher_usage"]["retries"] == usage["retries"]


def test_a_request_that_keeps_failing_is_recorded_reported_and_retried_by_a_rerun(
    testbed, server, tmp_path, capsys
):
    """The rerun asks again for the failed rows only, and they come out as in an uninterrupted run:
    each row's seed comes from its identity, not from its place in the (shorter) request list."""
    sampling = ["--n", "2", "--temperature", "1.0", "--max-new-tokens", "24", "--shard-size", "4"]
    # word problems: the testbed teacher is unsure there, so another seed gives another completion
    main(
        [
            *_problems_run(tmp_path / "reference", task="word_problems"),
            "--base-url",
            server.base_url,
            *sampling,
        ]
    )
    args = [*_problems_run(tmp_path / "rerun", task="word_problems"), *sampling]
    # problem 3's rows are the last two of shard 1, the first two of the rerun's request list
    poisoned = read_records(tmp_path / "rerun" / "problems" / "word_problems" / "train.parquet", Problem)[3]
    faults = Faults(poison=poisoned.messages[-1].content)
    with serve_in_thread(testbed / "teacher", served_name=SERVED, faults=faults) as bad:
        error = _error_of(capsys, [*args, "--base-url", bad.base_url, *FAST_RETRIES])
    assert "2 request(s) failed after their retries" in error and "rerun the same command" in error
    index = json.loads((tmp_path / "rerun" / "traces" / "t" / "index.json").read_text())
    failed = [f for shard in index["failures"].values() for f in shard]
    assert {(f["problem_id"], f["sample_idx"]) for f in failed} == {(poisoned.id, 0), (poisoned.id, 1)}
    assert all(f["attempts"] == 5 and "HTTP 500" in f["error"] for f in failed)
    assert (
        len(_rows(tmp_path / "rerun")) == 10
        and "generate:t" not in RunDir(tmp_path / "rerun").manifest()["steps"]
    )

    # the server recovers (on another port: the URL is not part of the step's identity)
    with serve_in_thread(testbed / "teacher", served_name=SERVED) as good:
        main([*args, "--base-url", good.base_url, *FAST_RETRIES])
        assert good.requests == 2  # only the failed rows were asked again
    rows, reference = _rows(tmp_path / "rerun"), _rows(tmp_path / "reference")
    assert len(rows) == 12 and _keys(rows) == sorted(set(_keys(rows)))
    completions = {(t.problem_id, t.sample_idx): t.completion for t in rows}
    assert completions == {(t.problem_id, t.sample_idx): t.completion for t in reference}
    assert completions[poisoned.id, 0] != completions[poisoned.id, 1]  # two seeds, two samples
    usage = RunDir(tmp_path / "rerun").manifest()["steps"]["generate:t"]["stats"]["usage"]
    assert (usage["failures"], usage["recovered_by_rerun"], usage["failed"]) == (0, 2, [])


def test_options_that_cannot_work_together_are_refused_before_anything_runs(tmp_path, capsys):
    args = [*_problems_run(tmp_path, train=2), "--base-url", "http://127.0.0.1:9/v1"]  # nothing listens
    error = _error_of(capsys, [*args, "--endpoint", "completions"])
    assert "tokenizer: the openai backend's completions endpoint" in error
    error = _error_of(capsys, [*args, "--temperature", "0", "--n", "2"])
    assert "n: greedy decoding (temperature 0) gives one completion per problem, not 2" in error
    error = _error_of(capsys, ["score", "--run-dir", str(tmp_path), "--traces", "t", "--model", SERVED,
                               "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1"])  # fmt: skip
    assert "tokenizer: scoring with the openai backend" in error
    assert not (tmp_path / "traces").exists() and not (tmp_path / "logprobs").exists()


def test_with_allow_failures_the_step_finishes_and_the_report_lists_the_failed_rows(testbed, tmp_path):
    args = [*_problems_run(tmp_path, train=3), "--n", "1", "--temperature", "0", "--max-new-tokens", "8"]
    poisoned = read_records(tmp_path / "problems" / "arithmetic" / "train.parquet", Problem)[0]
    faults = Faults(poison=poisoned.messages[-1].content)
    with serve_in_thread(testbed / "teacher", served_name=SERVED, faults=faults) as bad:
        main(
            [
                *args,
                "--base-url",
                bad.base_url,
                "--allow-failures",
                *FAST_RETRIES,
                "--price-per-1m-prompt-tokens",
                "2",
                "--price-per-1m-completion-tokens",
                "8",
            ]
        )
    usage = RunDir(tmp_path).manifest()["steps"]["generate:t"]["stats"]["usage"]
    assert [f["problem_id"] for f in usage["failed"]] == [poisoned.id]
    expected_cost = usage["prompt_tokens"] * 2e-6 + usage["completion_tokens"] * 8e-6
    assert usage["cost"] == pytest.approx(expected_cost) and usage["cost"] > 0
    main(["report", "--run-dir", str(tmp_path)])
    report = (tmp_path / "report.md").read_text()
    assert "Teacher usage and cost" in report and f"{usage['cost']:.4f}" in report
    total_row = next(line for line in report.splitlines() if line.startswith("| total"))
    assert "| 1 |" in total_row  # one failed row


def test_the_api_key_comes_from_the_environment_and_is_written_nowhere(
    testbed, tmp_path, monkeypatch, capsys
):
    secret = "sk-test-0123456789abcdef"
    args = [*_problems_run(tmp_path, train=2), "--n", "1", "--temperature", "0", "--max-new-tokens", "8"]
    with serve_in_thread(testbed / "teacher", served_name=SERVED, api_key=secret) as server:
        monkeypatch.delenv("RD_TEST_KEY", raising=False)
        error = _error_of(capsys, [*args, "--base-url", server.base_url, "--api-key-env", "RD_TEST_KEY"])
        assert "HTTP 401" in error and "$RD_TEST_KEY" in error
        monkeypatch.setenv("RD_TEST_KEY", secret)
        main([*args, "--base-url", server.base_url, "--api-key-env", "RD_TEST_KEY"])
    assert len(_rows(tmp_path)) == 2
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_a_generation_killed_at_any_moment_resumes_with_no_lost_or_duplicated_rows(server, tmp_path):
    sampling = ["--n", "2", "--temperature", "0.9", "--max-new-tokens", "40", "--shard-size", "3"]
    sampling += ["--base-url", server.base_url, "--concurrency", "2", "--top-logprobs", "2"]
    main([*_problems_run(tmp_path / "reference", train=8), *sampling])
    args = [*_problems_run(tmp_path / "killed", train=8), *sampling]
    command = [sys.executable, "-m", "reasondistill.cli", *args]
    index = tmp_path / "killed" / "traces" / "t" / "index.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def run_until(condition) -> None:
        child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while not condition() and child.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert child.poll() is None, "the job finished before it could be killed"
        child.send_signal(signal.SIGKILL)
        child.wait()

    def finished_shards() -> int:
        try:
            return len(json.loads(index.read_text())["finished"])
        except (FileNotFoundError, json.JSONDecodeError):
            return 0

    run_until(lambda: finished_shards() >= 1)  # mid-job, between shards or inside one
    done = finished_shards()
    assert 1 <= done < 6
    run_until(
        lambda: finished_shards() > done or any(index.parent.glob(".*tmp*"))
    )  # while writing, if caught
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    resumed, reference = _rows(tmp_path / "killed"), _rows(tmp_path / "reference")
    assert len(resumed) == 16 and _keys(resumed) == sorted(set(_keys(resumed)))
    assert {(t.problem_id, t.sample_idx, t.completion) for t in resumed} == {
        (t.problem_id, t.sample_idx, t.completion) for t in reference
    }
    logprob_rows = [r for p in logprob_shards(index.parent) for r in read_logprobs(p)]
    assert sorted((p, s) for p, s, _ in logprob_rows) == _keys(resumed)


@pytest.mark.parametrize(
    "message, text",
    [
        ({"content": "The answer is 4."}, "The answer is 4."),
        # vLLM's --reasoning-parser (and DeepSeek's API) return the reasoning beside the answer
        (
            {"content": "The answer is 4.", "reasoning_content": " 2 + 2 = 4 \n"},
            "<think>\n2 + 2 = 4\n</think>\nThe answer is 4.",
        ),
        ({"content": None, "reasoning": "2 + 2 = 4"}, "<think>\n2 + 2 = 4\n</think>\n"),  # newer vLLM's name
    ],
)
def test_a_chat_answer_keeps_the_reasoning_a_server_parsed_out(message, text):
    from reasondistill.generate.openai import _reply_text
    from reasondistill.verify.reasoning import split_reasoning

    assert _reply_text(message) == text
    if "reasoning" in message or "reasoning_content" in message:
        assert split_reasoning(text).reasoning == "2 + 2 = 4"


def test_eval_through_the_server_equals_hf_eval_row_for_row(server, tmp_path):
    """`eval` on a served model: greedy completions and grades equal the hf backend's, and the sampled
    ones are seeded per problem, so a second evaluation gives them again."""
    sampling = ["--max-new-tokens", "120", "--n", "2", "--temperature", "0.9", "--batch-size", "4"]
    served = ["--model", SERVED, "--backend", "openai", "--base-url", server.base_url]
    runs = {
        name: RunDir(path)
        for name, path in eval_runs(
            tmp_path, {"hf": ["--model", "testbed:teacher"], "openai": served}, 5, *sampling
        ).items()
    }
    hf, api = runs["hf"].eval_dir("teacher"), runs["openai"].eval_dir(SERVED)
    for task in ("arithmetic", "logic"):
        expected = read_records(hf / f"{task}.greedy.parquet", GradedTrace)
        answered = read_records(api / f"{task}.greedy.parquet", GradedTrace)
        assert len(expected) == 5 and {g.label for g in expected} != {"unparseable"}
        assert [(g.problem_id, g.completion, g.label, g.completion_tokens) for g in answered] == [
            (g.problem_id, g.completion, g.label, g.completion_tokens) for g in expected
        ]
        result, reference = (json.loads((d / f"{task}.json").read_text()) for d in (api, hf))
        assert result["backend"] == "openai" and result["parameters"] is None
        assert reference["backend"] == "hf" and reference["parameters"] > 0
        assert result["greedy"] == reference["greedy"]
    stats = runs["openai"].manifest()["steps"][f"eval:{SERVED}"]["stats"]
    assert stats["usage"]["requests"] == 2 * (5 + 5 * 2) and stats["usage"]["failures"] == 0
    first = read_records(api / "logic.sampled.parquet", GradedTrace)
    main(["eval", "--run-dir", str(tmp_path / "openai"), *served, *sampling, "--overwrite"])
    again = read_records(api / "logic.sampled.parquet", GradedTrace)
    assert [g.completion for g in again] == [g.completion for g in first]
    assert len({g.completion for g in first}) > 1
    render(runs["openai"], ReportConfig())
    report = (runs["openai"].root / "report.md").read_text()
    assert f"| logic | {SERVED} | served |" in report
    assert "## Evaluation usage and cost" in report and f"| eval:{SERVED} | openai | 30 |" in report


def test_a_job_over_three_servers_outlives_a_killed_one_and_a_faulty_one(testbed, tmp_path):
    """Requests are spread over three servers; one is SIGKILLed mid-job (its requests in flight are
    sent elsewhere, and it is rested), one fails 30% of attempts: every row exactly once, the same
    completions as one server gives (each request carries its own seed). The servers are processes
    alike, so that they compute alike."""
    model = ["--model", str(testbed / "teacher"), "--served-name", SERVED]
    faults = ["--faults-rate", "0.3", "--faults-kinds", "500,drop,malformed"]
    processes, urls = zip(
        *(spawn_server(*model), spawn_server(*model), spawn_server(*model, *faults)), strict=True
    )
    healthy, doomed, faulty = urls
    sampling = ["--n", "2", "--temperature", "0.9", "--max-new-tokens", "24", "--shard-size", "4"]
    index = tmp_path / "three" / "traces" / "t" / "index.json"
    killed_with_shards = []

    def kill_after_the_first_shard() -> None:
        deadline = time.time() + 120
        while time.time() < deadline:
            if index.exists() and json.loads(index.read_text())["finished"]:
                killed_with_shards.append(len(json.loads(index.read_text())["finished"]))
                processes[1].send_signal(signal.SIGKILL)
                return
            time.sleep(0.02)

    try:
        main([*_problems_run(tmp_path / "one", train=12), "--base-url", healthy, *sampling])
        killer = threading.Thread(target=kill_after_the_first_shard)
        killer.start()
        # the default 8 retries (a request may meet the dead server, then the faulty one), sooner
        main([*_problems_run(tmp_path / "three", train=12), "--base-url", ",".join(urls), "--concurrency", "6",
              "--retry-backoff", "0.05", *sampling])  # fmt: skip
        killer.join()
    finally:
        for process in processes:
            process.kill()
            process.wait()
    assert killed_with_shards and killed_with_shards[0] < 6, "the server was not killed mid-job"

    rows, reference = _rows(tmp_path / "three"), _rows(tmp_path / "one")
    assert len(rows) == 24 and _keys(rows) == sorted(set(_keys(rows)))
    assert {(t.problem_id, t.sample_idx, t.completion) for t in rows} == {
        (t.problem_id, t.sample_idx, t.completion) for t in reference
    }
    usage = RunDir(tmp_path / "three").manifest()["steps"]["generate:t"]["stats"]["usage"]
    servers = usage["servers"]
    assert set(servers) == set(urls)
    assert all(counts["requests"] > 0 for counts in servers.values())
    assert sum(counts["requests"] for counts in servers.values()) == usage["requests"] == 24
    assert servers[doomed]["errors"] > 0 and servers[faulty]["errors"] > 0 and servers[healthy]["errors"] == 0
    assert usage["retries"] == servers[doomed]["errors"] + servers[faulty]["errors"]


def test_server_urls_come_as_a_list_a_comma_separated_string_or_a_file(tmp_path):
    from reasondistill.generate.backends import BackendOptions

    (tmp_path / "urls").write_text("http://a:8000/v1  # node 1\n\nhttp://b:8000/v1\n")
    assert BackendOptions(base_url="http://a:8000/v1,http://b:8000/v1").base_url == [
        "http://a:8000/v1", "http://b:8000/v1",
    ]  # fmt: skip
    assert BackendOptions(base_url=f"@{tmp_path / 'urls'}").server_urls() == [
        "http://a:8000/v1",
        "http://b:8000/v1",
    ]
    for value, message in (("http://a/v1,http://a/v1", "given twice"), ("a:8000", "not an http"),
                           (f"@{tmp_path / 'none'}", "cannot read the file of server URLs")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            BackendOptions(base_url=value)


@pytest.mark.skipif(not QWEN.exists(), reason=f"{QWEN} not present")
def test_a_server_with_another_tokenizer_is_refused_in_one_line(server, tmp_path, prompts):
    """Ids that the local tokenizer decodes to other text than the server's: the logprobs would be
    stored under the wrong tokens, so the job stops on the first such completion."""
    from reasondistill.testbed.real_vocab import build_real_tokenizer

    other = build_real_tokenizer(QWEN, tmp_path / "qwen")
    client = OpenAIGenerator(SERVED, server.base_url, tokenizer=str(other))
    with pytest.raises(UserError, match=r"runs another tokenizer than --tokenizer names$"):
        client.generate(prompts[:1], SamplingParams(n=1, temperature=0.9, max_new_tokens=40, top_logprobs=2))


def test_a_job_killed_mid_shard_sends_none_of_its_finished_requests_again(server, tmp_path):
    """Rows that came back are journaled as they arrive: after a SIGKILL inside a shard, the rerun
    sends only the rows that had not (at most `concurrency` were in flight), counted by the server."""
    sampling = ["--n", "2", "--temperature", "0.9", "--max-new-tokens", "24", "--shard-size", "16"]
    sampling += ["--base-url", server.base_url, "--concurrency", "2", "--top-logprobs", "2"]
    main([*_problems_run(tmp_path / "reference", train=12), *sampling])
    args = [*_problems_run(tmp_path / "killed", train=12), *sampling]
    directory = tmp_path / "killed" / "traces" / "t"
    before = server.requests
    child = subprocess.Popen([sys.executable, "-m", "reasondistill.cli", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # fmt: skip
    journaled = 0
    deadline = time.time() + 120
    while journaled < 6 and child.poll() is None and time.time() < deadline:
        journal = directory / "journal-00000.jsonl"
        journaled = journal.read_text().count("\n") if journal.exists() else 0
        time.sleep(0.01)
    assert child.poll() is None, "the job finished before it could be killed"
    child.send_signal(signal.SIGKILL)
    child.wait()
    index = directory / "index.json"
    assert not index.exists() or 0 not in json.loads(index.read_text())["finished"]
    sent_before_kill = server.requests - before
    subprocess.run([sys.executable, "-m", "reasondistill.cli", *args], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)  # fmt: skip
    probes = 2  # the raw-logprobs check, once per run
    assert server.requests - before <= 24 + 2 * probes + 2  # every row once, and what was in flight
    assert server.requests - before - sent_before_kill < 24 + probes - journaled + 2
    resumed, reference = _rows(tmp_path / "killed"), _rows(tmp_path / "reference")
    assert len(resumed) == 24 and _keys(resumed) == sorted(set(_keys(resumed)))
    assert {(t.problem_id, t.sample_idx, t.completion) for t in resumed} == {
        (t.problem_id, t.sample_idx, t.completion) for t in reference
    }
    logprob_rows = [r for p in logprob_shards(directory) for r in read_logprobs(p)]
    assert sorted((p, s) for p, s, _ in logprob_rows) == _keys(resumed)
    assert not list(directory.glob("journal-*"))


def test_three_workers_one_killed_and_rerun_then_a_final_call_finish_the_step(server, tmp_path, capsys):
    """`--num-workers 3 --worker-index i`: each worker writes its own shards and index; a killed
    worker's rerun redoes its unfinished shards; the call without --worker-index takes in every
    worker's shards and records the step. Options that disagree are refused before any request."""
    sampling = ["--n", "2", "--temperature", "0.9", "--max-new-tokens", "24", "--shard-size", "4"]
    sampling += ["--base-url", server.base_url, "--concurrency", "2"]
    main([*_problems_run(tmp_path / "reference", train=18), *sampling])
    args = [*_problems_run(tmp_path / "workers", train=18), *sampling, "--num-workers", "3"]
    directory = tmp_path / "workers" / "traces" / "t"
    command = [sys.executable, "-m", "reasondistill.cli", *args]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    workers = [subprocess.Popen([*command, "--worker-index", str(i)], **quiet) for i in range(3)]
    doomed = directory / "index.worker-001-of-003.json"
    deadline = time.time() + 120
    while not doomed.exists() and workers[1].poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert workers[1].poll() is None, "worker 1 finished before it could be killed"
    workers[1].send_signal(signal.SIGKILL)
    for worker in workers:
        worker.wait()
    assert len(json.loads(doomed.read_text())["finished"]) < 3  # shards 1, 4, 7 are worker 1's
    assert sorted(p.name for p in directory.glob("index*.json")) == [
        f"index.worker-00{i}-of-003.json" for i in range(3)
    ]
    assert (
        not (tmp_path / "workers" / "manifest.json").exists()
        or "generate:t" not in RunDir(tmp_path / "workers").manifest()["steps"]
    )

    before = server.requests
    assert "worker_index: 3 is not below num_workers (3)" in _error_of(capsys, [*args, "--worker-index", "3"])
    error = _error_of(capsys, [*args[:-1], "2", "--worker-index", "0"])
    assert error.strip().endswith("every worker of a job must be given the same num_workers")
    assert server.requests == before
    subprocess.run([*command, "--worker-index", "1"], check=True, **quiet)  # the killed worker, again
    main(args)  # the final call: every shard is done; it records the step

    rows, reference = _rows(tmp_path / "workers"), _rows(tmp_path / "reference")
    assert len(rows) == 36 and _keys(rows) == sorted(set(_keys(rows)))
    assert {(t.problem_id, t.sample_idx, t.completion) for t in rows} == {
        (t.problem_id, t.sample_idx, t.completion) for t in reference
    }
    assert [p.name for p in directory.glob("index*.json")] == ["index.json"]
    index = json.loads((directory / "index.json").read_text())
    assert index["finished"] == list(range(9)) and index["usage"]["requests"] >= 36
    assert RunDir(tmp_path / "workers").manifest()["steps"]["generate:t"]["stats"]["traces"] == 36


def test_score_through_two_servers_equals_score_through_one(testbed, server, tmp_path):
    """`score` takes several servers like `generate` (one client): the same top-k store, both used."""
    root = tmp_path / "run"
    main([*_problems_run(root, train=8), "--base-url", server.base_url, "--n", "2", "--max-new-tokens", "24",
          "--temperature", "0.9"])  # fmt: skip
    score = ["score", "--run-dir", str(root), "--traces", "t", "--model", SERVED, "--backend", "openai",
             "--tokenizer", str(testbed / "teacher"), "--top-k", "3", "--shard-size", "4"]  # fmt: skip
    main([*score, "--name", "one", "--base-url", server.base_url])
    with serve_in_thread(testbed / "teacher", served_name=SERVED) as other:
        main([*score, "--name", "two", "--base-url", f"{server.base_url},{other.base_url}"])
    run = RunDir(root)
    one, two = (
        {(p, s): d for path in logprob_shards(run.logprobs(name)) for p, s, d in read_logprobs(path)}
        for name in ("one", "two")
    )
    assert one.keys() == two.keys() and len(one) == 16
    for key, distribution in one.items():
        np.testing.assert_array_equal(two[key].topk_ids, distribution.topk_ids)
        np.testing.assert_allclose(two[key].topk_logprobs, distribution.topk_logprobs, atol=2e-3)
    servers = run.manifest()["steps"]["score:two"]["stats"]["usage"]["servers"]
    assert len(servers) == 2 and all(counts["requests"] > 0 for counts in servers.values())
