"""The vllm backend against a fake `vllm` module: parameter mapping, token ids in, Completions and
TokenLogprobs out, prompt-logprob slicing for scoring. No GPU, no vLLM.

The real engine (vLLM's CPU build) is tested in test_vllm_engine.py (`make test-vllm`); the fake
stays for what that build cannot do or the main virtualenv cannot hold: weight pushes into a running
engine (on-policy sampling on a GPU), aborted requests, the error when vLLM is missing or broken, and
a quick check of the mapping in the main suite."""

import math
import os
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from reasondistill.chat import completion_ids, prompt_ids
from reasondistill.errors import UserError
from reasondistill.generate import vllm as backend
from reasondistill.generate.base import Completion, Failure, SamplingParams
from reasondistill.generate.vllm import VLLMGenerator, to_vllm_sampling
from reasondistill.records import Message

PROMPTS = [
    [Message(role="user", content="What is 12 + 30?")],
    [Message(role="system", content="Be brief."), Message(role="user", content="Sort 3 1 2.")],
]


# ---- a fake teacher and a fake vLLM ------------------------------------------------------------


def candidates(prefix: list[int]) -> dict[int, float]:
    """The fake teacher's three most likely next tokens after `prefix` (p = .5, .25, .125). They depend on
    the prefix's length and last token, so a distribution read one position off does not match."""
    base = (len(prefix) * 7 + prefix[-1]) % 300
    return {base: math.log(0.5), base + 300: math.log(0.25), base + 600: math.log(0.125)}


def token_logprob(prefix: list[int], token: int) -> float:
    return candidates(prefix).get(token, math.log(0.01 * (1 + len(prefix) % 5)))


def vllm_position(prefix: list[int], token: int, k: int) -> dict:
    """What vLLM reports at one position: the top k, plus the actual token wherever it ranks."""
    top = sorted(candidates(prefix).items(), key=lambda item: -item[1])[:k]
    entries = {tid: lp for tid, lp in top} | {token: token_logprob(prefix, token)}
    return {tid: SimpleNamespace(logprob=lp, rank=None, decoded_token=None) for tid, lp in entries.items()}


class FakeSamplingParams(SimpleNamespace):
    """Records its keyword arguments; reads as vLLM's defaults for the others."""

    def __getattr__(self, name):
        return {"n": 1, "logprobs": None, "prompt_logprobs": None, "seed": None}[name]


class FakeLLM:
    instances: list = []
    tokenizer = None
    max_model_len = 4096

    @staticmethod
    def reply(prompt: list[int], j: int, seed: int | None) -> tuple[str, list[int] | None, str]:
        """Sample j of a request for `prompt`, drawn with `seed`: (text, token ids or None, finish)."""
        return f"reply {j}", None, "stop"

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls: list[tuple[list, list]] = []
        self.loads: list[dict] = []  # weights pushed into the engine (a colocated one), per call
        self.model_config = SimpleNamespace(max_model_len=FakeLLM.max_model_len)
        self.prefix_cache_resets = 0
        FakeLLM.instances.append(self)

    def reset_prefix_cache(self):
        self.prefix_cache_resets += 1

    def collective_rpc(self, method, args=(), kwargs=None):
        assert method == "reload_weights" and kwargs["is_checkpoint_format"] is True
        self.loads.append(dict(kwargs["weights_iterator"]))

    def get_tokenizer(self):
        return FakeLLM.tokenizer

    def generate(self, prompts, sampling_params, use_tqdm=True):
        assert use_tqdm is False and len(prompts) == len(sampling_params)
        self.calls.append((prompts, sampling_params))
        return [
            self._output(p["prompt_token_ids"], params)
            for p, params in zip(prompts, sampling_params, strict=True)
        ]

    def _output(self, ids, params):
        outputs = []
        for j in range(params.n):
            # vLLM draws sample j of a seeded request with seed + j
            text, token_ids, finish = self.reply(ids, j, None if params.seed is None else params.seed + j)
            if token_ids is None:
                token_ids = completion_ids(self.tokenizer, [text])[0]
            logprobs = None
            if params.logprobs is not None:
                logprobs = [
                    vllm_position(ids + token_ids[:t], token_ids[t], params.logprobs)
                    for t in range(len(token_ids))
                ]
            outputs.append(
                SimpleNamespace(text=text, token_ids=token_ids, finish_reason=finish, logprobs=logprobs)
            )
        prompt_logprobs = None
        if params.prompt_logprobs is not None:
            prompt_logprobs = [None] + [
                vllm_position(ids[:i], ids[i], params.prompt_logprobs) for i in range(1, len(ids))
            ]
        return SimpleNamespace(prompt_token_ids=ids, prompt_logprobs=prompt_logprobs, outputs=outputs)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture
def fake_vllm(monkeypatch, tokenizer):
    fake = types.ModuleType("vllm")
    fake.__version__ = "0.0.fake"
    fake.LLM = FakeLLM
    fake.SamplingParams = FakeSamplingParams
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = dict  # a TypedDict in vLLM
    fake.inputs = inputs
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = SimpleNamespace(is_cpu=lambda: False)  # a GPU, whatever this machine is
    fake.platforms = platforms
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
    monkeypatch.setattr(FakeLLM, "instances", [])
    monkeypatch.setattr(FakeLLM, "tokenizer", tokenizer)
    return fake


def make(**kwargs) -> tuple[VLLMGenerator, FakeLLM]:
    generator = VLLMGenerator("/models/teacher", **kwargs)
    return generator, FakeLLM.instances[-1]


def sent_kwargs(params) -> dict:
    return dict(vars(params))


# ---- parameter mapping --------------------------------------------------------------------------

COMMON = {"include_stop_str_in_output": False}


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (  # greedy: temperature 0; top-k off is left to vLLM's default (-1 before 0.9, 0 since)
            SamplingParams(temperature=0, max_new_tokens=7),
            {
                "n": 1,
                "temperature": 0.0,
                "top_p": 1.0,
                "max_tokens": 7,
                "seed": 0,
                "stop": [],
                "logprobs": None,
            },
        ),
        (
            SamplingParams(
                n=4,
                temperature=0.7,
                top_p=0.9,
                top_k=20,
                max_new_tokens=64,
                seed=3,
                stop=("</answer>", "\n\n"),
            ),
            {
                "n": 4,
                "temperature": 0.7,
                "top_p": 0.9,
                "top_k": 20,
                "max_tokens": 64,
                "seed": 3,
                "stop": ["</answer>", "\n\n"],
                "logprobs": None,
            },
        ),
        (  # the sampled token's logprob only
            SamplingParams(logprobs=True),
            {
                "n": 1,
                "temperature": 1.0,
                "top_p": 1.0,
                "max_tokens": 512,
                "seed": 0,
                "stop": [],
                "logprobs": 0,
            },
        ),
        (  # and the top k (vLLM adds the sampled token to them)
            SamplingParams(top_logprobs=5),
            {
                "n": 1,
                "temperature": 1.0,
                "top_p": 1.0,
                "max_tokens": 512,
                "seed": 0,
                "stop": [],
                "logprobs": 5,
            },
        ),
        (
            SamplingParams(logprobs=True, top_logprobs=3),
            {
                "n": 1,
                "temperature": 1.0,
                "top_p": 1.0,
                "max_tokens": 512,
                "seed": 0,
                "stop": [],
                "logprobs": 3,
            },
        ),
    ],
)
def test_sampling_parameters_map_to_vllm(ours, theirs):
    assert to_vllm_sampling(ours) == theirs | COMMON


# ---- engine -------------------------------------------------------------------------------------


def test_engine_gets_raw_logprobs_and_the_logprob_cap(fake_vllm):
    generator, llm = make(tensor_parallel_size=2, max_model_len=2048, max_logprobs=32, seed=5)
    assert llm.kwargs["model"] == "/models/teacher"
    assert llm.kwargs["logprobs_mode"] == "raw_logprobs"
    assert llm.kwargs["generation_config"] == "vllm"  # the model's generation_config.json is not applied
    assert llm.kwargs["max_logprobs"] == 32
    assert (llm.kwargs["tensor_parallel_size"], llm.kwargs["max_model_len"], llm.kwargs["seed"]) == (
        2,
        2048,
        5,
    )
    assert llm.kwargs["dtype"] == "auto"  # vLLM's own auto unless the step names a dtype
    assert generator.describe() == {"backend": "vllm", "model": "/models/teacher", "vllm": "0.0.fake"}
    generator.close()
    assert generator.llm is None
    assert make(dtype="bfloat16")[1].kwargs["dtype"] == "bfloat16"
    generator.close()  # twice is harmless


def test_missing_vllm_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(
        UserError, match=r"needs vLLM, which is not installed: pip install 'reasondistill\[vllm\]'"
    ):
        VLLMGenerator("/models/teacher")


def test_broken_vllm_install_says_so(fake_vllm, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm.inputs", None)
    with pytest.raises(UserError, match="installed but does not import"):
        VLLMGenerator("/models/teacher")


# ---- generation ---------------------------------------------------------------------------------


def test_prompts_go_in_as_chat_template_ids_with_a_seed_each(fake_vllm, tokenizer):
    generator, llm = make()
    sampling = SamplingParams(n=2, temperature=0.8, max_new_tokens=50, seed=10)
    generator.generate(PROMPTS, sampling)
    [(sent, params)] = llm.calls
    assert [p["prompt_token_ids"] for p in sent] == prompt_ids(tokenizer, PROMPTS)
    kwargs = [sent_kwargs(p) for p in params]
    assert [k.pop("seed") for k in kwargs] == [10, 12]  # n samples of a request get seed, seed + 1, ...
    expected = to_vllm_sampling(sampling)
    del expected["seed"]
    assert kwargs == [expected, expected]
    # seeds given per prompt (the rows' identity) are sent as they are
    generator.generate(PROMPTS, sampling, seeds=[7, 3])
    assert [sent_kwargs(p)["seed"] for p in llm.calls[-1][1]] == [7, 3]


def test_completions_carry_text_ids_finish_and_token_counts(fake_vllm, tokenizer):
    generator, llm = make()
    cut = tokenizer("twelve plus thirty", add_special_tokens=False)["input_ids"][:2]
    llm.reply = lambda prompt, j, seed: (
        ("forty-two", None, "stop") if j == 0 else (tokenizer.decode(cut), cut, "length")
    )
    rows = generator.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=2))

    prompt_lengths = [len(ids) for ids in prompt_ids(tokenizer, PROMPTS)]
    [eos_reply] = completion_ids(tokenizer, ["forty-two"])
    assert [len(row) for row in rows] == [2, 2]
    for row, prompt_length in zip(rows, prompt_lengths, strict=True):
        first, second = row
        assert (first.text, first.token_ids, first.finish_reason) == ("forty-two", eos_reply, "stop")
        assert (second.token_ids, second.finish_reason) == (cut, "length")
        assert [c.prompt_tokens for c in row] == [prompt_length, prompt_length]
        assert [c.completion_tokens for c in row] == [len(eos_reply), 2]
        assert first.logprobs is None
    usage = generator.usage
    assert (usage.requests, usage.failures) == (4, 0)
    assert usage.prompt_tokens == 2 * sum(prompt_lengths)
    assert usage.completion_tokens == 2 * (len(eos_reply) + 2)


def test_sampled_token_logprobs_only(fake_vllm, tokenizer):
    generator, llm = make()
    llm.reply = lambda prompt, j, seed: ("42", None, "stop")
    [[completion], _] = generator.generate(PROMPTS, SamplingParams(logprobs=True))
    prompt = prompt_ids(tokenizer, PROMPTS)[0]
    ids = completion.token_ids
    assert completion.logprobs.k == 0
    expected = [token_logprob(prompt + ids[:t], ids[t]) for t in range(len(ids))]
    np.testing.assert_allclose(completion.logprobs.logprobs.astype(float), expected, atol=2e-3)


def test_aborted_requests_become_failures(fake_vllm):
    generator, llm = make()
    llm.reply = lambda prompt, j, seed: ("", [], "abort") if j == 1 else ("ok", None, "stop")
    rows = generator.generate(PROMPTS, SamplingParams(n=2))
    for ok, aborted in rows:
        assert isinstance(ok, Completion) and ok.text == "ok"
        assert isinstance(aborted, Failure) and "abort" in aborted.error
    assert (generator.usage.requests, generator.usage.failures) == (4, 2)


def test_prompts_longer_than_the_context_fail_without_being_sent(fake_vllm, monkeypatch, tokenizer):
    lengths = [len(ids) for ids in prompt_ids(tokenizer, PROMPTS)]
    monkeypatch.setattr(FakeLLM, "max_model_len", (lengths[0] + lengths[1]) // 2)
    longer = lengths.index(max(lengths))
    generator, llm = make()
    rows = generator.generate(PROMPTS, SamplingParams(n=2))
    assert all(isinstance(c, Failure) and "max_model_len" in c.error for c in rows[longer])
    assert all(isinstance(c, Completion) for c in rows[1 - longer])
    assert [p["prompt_token_ids"] for p in llm.calls[0][0]] == [prompt_ids(tokenizer, PROMPTS)[1 - longer]]


def test_progress_counts_rows_over_several_calls(fake_vllm, monkeypatch):
    monkeypatch.setattr(backend, "PROMPTS_PER_CALL", 1)
    generator, llm = make()
    done = []
    rows = generator.generate(PROMPTS * 2, SamplingParams(n=3), progress=done.append)
    assert len(rows) == 4 and len(llm.calls) == 4
    assert done == [3, 3, 3, 3]
    seeds = [sent_kwargs(params[0])["seed"] for _, params in llm.calls]
    assert seeds == [0, 3, 6, 9]  # as in one call: no prompt shares another's seeds


def test_k_above_max_logprobs_is_a_user_error(fake_vllm):
    generator, _ = make(max_logprobs=4)
    with pytest.raises(UserError, match="max_logprobs=4"):
        generator.generate(PROMPTS, SamplingParams(top_logprobs=5))
    with pytest.raises(UserError, match="max_logprobs=4"):
        generator.score(PROMPTS, ["a", "b"], top_k=8)


# ---- scoring ------------------------------------------------------------------------------------


def test_score_fails_sequences_longer_than_the_context(fake_vllm, monkeypatch, tokenizer):
    prompt_length = len(prompt_ids(tokenizer, PROMPTS[:1])[0])
    monkeypatch.setattr(FakeLLM, "max_model_len", prompt_length + 5)
    generator, llm = make()
    done = []
    short, long = generator.score(
        PROMPTS[:1] * 2, ["1", "a much longer reply than fits"], top_k=1, progress=done.append
    )
    assert len(short) == len(completion_ids(tokenizer, ["1"])[0])
    assert isinstance(long, Failure) and "max_model_len" in long.error
    assert len(llm.calls[0][0]) == 1 and done == [2]


# ---- a colocated engine for on-policy sampling ----------------------------------------------------


def test_on_policy_sampling_pushes_the_current_weights_before_every_step(fake_vllm, tokenizer, monkeypatch):
    """sampler: vllm — each sampling step first writes every training parameter into the engine."""
    from transformers import Qwen2ForCausalLM

    from reasondistill.records import TrainingExample
    from reasondistill.testbed.models import STUDENT_SHAPE, _model_config
    from reasondistill.train.on_policy import StepBatches, prompt_rows
    from reasondistill.train.on_policy_options import OnPolicyOptions

    # the engine's rendezvous defaults go into a copy of the environment, gone after the test
    environment = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR")}
    monkeypatch.setattr(os, "environ", environment)
    model = Qwen2ForCausalLM(_model_config(STUDENT_SHAPE, tokenizer))
    options = OnPolicyOptions(sampler="vllm", samples_per_prompt=2, max_new_tokens=8)
    examples = [TrainingExample(problem_id="p", task="arithmetic", messages=PROMPTS[0], completion="x")]
    builder = StepBatches(
        prompt_rows(tokenizer, examples, None, options, False, "t"), options, tokenizer, 64, 0, None
    )
    for step in range(2):
        samples = builder._sample(model, builder.rows, seed=step, seeds=[step])
        engine = FakeLLM.instances[-1]
        assert (
            len(FakeLLM.instances) == 1
            and engine.kwargs["distributed_executor_backend"] == "external_launcher"
        )
        pushed = engine.loads[-1]
        assert len(engine.loads) == step + 1 and engine.prefix_cache_resets == step + 1
        assert pushed.keys() == dict(model.named_parameters()).keys()
        assert all(torch.equal(pushed[name], param.data) for name, param in model.named_parameters())
        assert [s.text for s in samples] == ["reply 0", "reply 1"]
        with torch.no_grad():  # an optimizer step
            next(model.parameters()).add_(1.0)
    assert sent_kwargs(engine.calls[-1][1][0])["n"] == 2


# ---- the generate stage -------------------------------------------------------------------------


def test_a_rerun_of_failed_rows_gives_the_rows_of_an_uninterrupted_job(fake_vllm, tmp_path, monkeypatch):
    """Each row is sampled with the seed of its identity, so the rows a rerun asks for again (now
    first in a shorter request list) come out as they would have in one go."""
    from reasondistill.cli import main
    from reasondistill.records import Problem, Trace, read_records
    from reasondistill.rundir import RunDir
    from reasondistill.store import trace_shards

    failing: set[tuple[int, ...]] = set()  # prompts whose requests the engine aborts

    def reply(prompt, j, seed):
        if tuple(prompt) in failing:
            return "", [], "abort"
        return f"drawn with seed {seed}", None, "stop"

    monkeypatch.setattr(FakeLLM, "reply", staticmethod(reply))

    def generate(root) -> list[str]:
        main(["problems", "--run-dir", str(root), "--tasks", "arithmetic", "--train", "6", "--test", "1"])
        return ["generate", "--run-dir", str(root), "--model", "org/teacher", "--backend", "vllm",
                "--name", "t", "--n", "2", "--temperature", "1", "--shard-size", "4"]  # fmt: skip

    def rows(root) -> dict[tuple[str, int], str]:
        traces = [t for path in trace_shards(root / "traces" / "t") for t in read_records(path, Trace)]
        assert len(traces) == 12
        return {(t.problem_id, t.sample_idx): t.completion for t in traces}

    main(generate(tmp_path / "reference"))
    args = generate(tmp_path / "rerun")
    # problem 3's rows are the last two of shard 1; the rerun sends them alone
    problem = read_records(tmp_path / "rerun" / "problems" / "arithmetic" / "train.parquet", Problem)[3]
    failing.add(tuple(prompt_ids(FakeLLM.tokenizer, [problem.messages])[0]))
    with pytest.raises(SystemExit):
        main(args)
    failing.clear()
    main(args)
    assert len(FakeLLM.instances[-1].calls[-1][0]) == 2  # the rerun asked for the two failed rows only
    assert rows(tmp_path / "rerun") == rows(tmp_path / "reference")
    assert len(set(rows(tmp_path / "reference").values())) == 12  # every row its own seed
    usage = RunDir(tmp_path / "rerun").manifest()["steps"]["generate:t"]["stats"]["usage"]
    assert (usage["failures"], usage["recovered_by_rerun"], usage["failed"]) == (0, 2, [])
