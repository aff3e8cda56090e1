"""The hf backend on the testbed teacher: batching, stop strings, logprobs and scoring."""

import json

import numpy as np
import pytest
import torch

from reasondistill.chat import completion_ids, prompt_ids
from reasondistill.cli import main
from reasondistill.generate import decoding
from reasondistill.generate.base import SamplingParams
from reasondistill.generate.decoding import KVBuffer, TokenPicker, row_uniforms
from reasondistill.generate.hf import HFGenerator
from reasondistill.generate.logprobs import read_logprobs
from reasondistill.records import Trace, read_records
from reasondistill.rundir import RunDir
from reasondistill.store import logprob_shards, trace_shards
from reasondistill.tasks import get_task

pytestmark = pytest.mark.slow  # needs the trained testbed teacher


@pytest.fixture(scope="module")
def teacher(testbed) -> HFGenerator:
    return HFGenerator(testbed / "teacher", batch_size=8)


@pytest.fixture(scope="module")
def prompts():
    return [p.messages for p in get_task("arithmetic").sample("test", 6, seed=3)]


def test_greedy_completions_do_not_depend_on_batching_or_left_padding(testbed, teacher, prompts):
    greedy = SamplingParams(temperature=0, max_new_tokens=120)
    batched = [c[0].text for c in teacher.generate(prompts, greedy)]
    one_by_one = HFGenerator(testbed / "teacher", batch_size=1)
    assert [c[0].text for c in one_by_one.generate(prompts, greedy)] == batched
    assert all("The answer is" in text for text in batched)


def test_greedy_completions_equal_model_generate_token_for_token(testbed, teacher, prompts):
    """The decoding loop (KV buffer, rows leaving the batch as they end) is `model.generate`'s greedy
    search: the same tokens, the end token included, for every row of a left-padded batch."""
    greedy = SamplingParams(temperature=0, max_new_tokens=120)
    ours = [c[0] for c in teacher.generate(prompts, greedy)]
    assert len({c.completion_tokens for c in ours}) > 1  # rows end at different steps
    rows = prompt_ids(teacher.tokenizer, prompts)
    inputs = teacher.tokenizer.pad({"input_ids": rows}, return_tensors="pt")
    with torch.inference_mode():
        output = teacher.model.generate(
            **inputs, do_sample=False, max_new_tokens=120, pad_token_id=teacher.tokenizer.pad_token_id
        )
    eos = teacher.tokenizer.eos_token_id
    for completion, ids in zip(ours, output[:, inputs["input_ids"].shape[1] :].tolist(), strict=True):
        assert completion.token_ids == (ids[: ids.index(eos) + 1] if eos in ids else ids)


def test_rows_leave_the_batch_at_the_step_they_end(teacher, prompts):
    """After the prefill of every row, step t runs only the rows whose completion is longer than t
    tokens: an ended row is not decoded further (`model.generate` would run it to the batch's end)."""
    sizes = []
    hook = teacher.model.register_forward_pre_hook(
        lambda module, args, kwargs: sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        completions = teacher.generate(prompts, SamplingParams(temperature=0, max_new_tokens=120))
    finally:
        hook.remove()
    lengths = [c[0].completion_tokens for c in completions]
    assert len(set(lengths)) > 1
    assert sizes == [len(prompts)] + [sum(n > t for n in lengths) for t in range(1, max(lengths))]


def test_compiled_decoding_steps_give_the_eager_tokens_and_compile_once(
    testbed, teacher, prompts, monkeypatch
):
    """`compile`: the one-token steps run through torch.compile with dynamic shapes; the tokens are
    the eager ones, and another batch size and other lengths reuse the captured graph.

    Through dynamo's "eager" backend (capture, guards, recompiles), not inductor's code generation,
    which costs 20-50 s on a cold cache here: `benchmarks/hf_decode.py` runs that (its `compiled` side)."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(decoding, "COMPILE_BACKEND", "eager")

    compiled = HFGenerator(testbed / "teacher", batch_size=8, compile=True)
    greedy = SamplingParams(temperature=0, max_new_tokens=120)
    assert [c[0].token_ids for c in compiled.generate(prompts, greedy)] == [
        c[0].token_ids for c in teacher.generate(prompts, greedy)
    ]
    graphs = counters["stats"]["unique_graphs"]
    sampled = SamplingParams(n=3, temperature=1.0, max_new_tokens=60, seed=2)
    assert [[c.token_ids for c in row] for row in compiled.generate(prompts[:2], sampled)] == [
        [c.token_ids for c in row] for row in teacher.generate(prompts[:2], sampled)
    ]
    assert counters["stats"]["unique_graphs"] == graphs > 0


def test_compile_is_refused_off_the_hf_backend_and_the_hf_sampler():
    from reasondistill.generate.backends import BackendOptions
    from reasondistill.train.on_policy_options import OnPolicyOptions

    assert BackendOptions(compile=True).compile and OnPolicyOptions(compile=True).compile
    with pytest.raises(ValueError, match="compile: for the hf backend only \\(backend vllm"):
        BackendOptions(backend="vllm", compile=True)
    with pytest.raises(ValueError, match="compile: for the hf sampler only"):
        OnPolicyOptions(sampler="vllm", compile=True)


def test_the_kv_buffer_gives_the_dynamic_caches_logits_as_it_grows_and_drops_rows(teacher, prompts):
    """Written in place, grown past its reserve several times and cut to fewer rows (the first row
    leaving, compacted in place; then a middle one; then a selection that reorders, gathered anew),
    the buffer gives the logits transformers' own cache gives."""
    from transformers import DynamicCache
    from transformers.cache_utils import Cache

    rows = prompt_ids(teacher.tokenizer, prompts[:4])
    inputs = teacher.tokenizer.pad({"input_ids": rows}, return_tensors="pt")
    model, layers = teacher.model, teacher.model.config.num_hidden_layers
    caches = [Cache(layers=[KVBuffer(reserve=3) for _ in range(layers)]), DynamicCache(config=model.config)]
    selections = {3: [1, 2, 3], 6: [0, 2], 9: [1, 0]}  # after step t, the rows kept
    with torch.inference_mode():
        logits = []
        for cache in caches:
            ids, mask, steps = inputs["input_ids"], inputs["attention_mask"], []
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            for t in range(14):
                out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache)
                steps.append(out.logits[:, -1])
                ids = out.logits[:, -1].argmax(-1, keepdim=True)
                mask = torch.cat([mask, torch.ones_like(ids)], 1)
                positions = positions[:, -1:] + 1
                if t in selections:
                    kept = torch.tensor(selections[t])
                    cache.batch_select_indices(kept)
                    ids, mask, positions = ids[kept], mask[kept], positions[kept]
            logits.append(steps)
    buffer = caches[0].layers[0].key_buffer
    assert buffer.shape[0] == 2 and buffer.shape[-2] > inputs["input_ids"].shape[1] + 3  # cut, and grown
    for buffered, dynamic in zip(*logits, strict=True):
        torch.testing.assert_close(buffered, dynamic, rtol=0, atol=1e-5)
    caches[0].crop(-2)  # forgets the last 2 tokens, as the dynamic cache does
    caches[1].crop(-2)
    assert caches[0].layers[0].keys.shape == caches[1].layers[0].keys.shape
    assert caches[0].get_seq_length() == caches[1].get_seq_length()


def test_samples_depend_on_their_seed_and_prompt_only(testbed, prompts):
    """A prompt's samples are the same whichever prompts are decoded with it, in whatever batch
    size (so N processes sample what one does); other seeds give other samples."""
    sampling = SamplingParams(n=2, temperature=1.0, top_p=0.95, max_new_tokens=40, seed=5)
    # the untrained student, whose samples vary (the teacher is sure of nearly every token)
    together = HFGenerator(testbed / "student", batch_size=12)
    seeds = [101, 202, 303, 404, 505, 606]
    batched = [[c.token_ids for c in row] for row in together.generate(prompts, sampling, seeds=seeds)]
    alone = HFGenerator(testbed / "student", batch_size=2)
    for i in (4, 1):  # in another order, one prompt at a time
        assert [c.token_ids for c in alone.generate([prompts[i]], sampling, seeds=[seeds[i]])[0]] == batched[
            i
        ]
    assert all(first != second for first, second in batched)  # a prompt's samples: seeds 101 and 102 …
    other = together.generate(prompts, sampling, seeds=[s + 7 for s in seeds])
    assert all(row != [c.token_ids for c in o] for row, o in zip(batched, other, strict=True))
    # without seeds, prompt i's samples come from seed 5 + 2i (`prompt_seeds`)
    unseeded = together.generate(prompts, sampling)
    assert [[c.token_ids for c in row] for row in unseeded][3] == [
        c.token_ids for c in alone.generate([prompts[3]], sampling, seeds=[5 + 2 * 3])[0]
    ]


def test_row_uniforms_are_uniform_and_each_rows_own():
    """Counter-based: a row's draws do not depend on the rows computed with it, streams and seeds
    differ, and the values are uniform on [0, 1) (pinned: a change would silently change every trace)."""
    table = row_uniforms(range(2_000), 50)
    assert table.shape == (2_000, 50) and table.min() >= 0 and table.max() < 1
    assert np.array_equal(row_uniforms([7, 1_234], 50)[1], table[1_234])
    assert row_uniforms([0, 2**40 + 3], 3, stream=2).tolist() == [
        _splitmix64(s, 3, 2) for s in (0, 2**40 + 3)
    ]
    assert not np.array_equal(row_uniforms([5], 50, stream=1), row_uniforms([5], 50))
    counts = np.histogram(table, bins=10, range=(0, 1))[0] / table.size
    assert counts == pytest.approx([0.1] * 10, abs=0.005)
    assert abs(np.corrcoef(table[:, :-1].ravel(), table[:, 1:].ravel())[0, 1]) < 0.01  # step to step


def _splitmix64(seed: int, steps: int, stream: int) -> list[float]:
    """The reference, in Python integers: SplitMix64's next() (state += φ; output mix(state)) from the
    state mix(seed + stream·φ), each output's top 53 bits as a fraction."""
    mask, golden = 2**64 - 1, 0x9E3779B97F4A7C15

    def mix(z: int) -> int:
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    state, outputs = mix((seed + stream * golden) & mask), []
    for _ in range(steps):
        state = (state + golden) & mask
        outputs.append((mix(state) >> 11) * 2.0**-53)
    return outputs


def test_the_token_picker_draws_from_the_warped_softmax():
    """Inverse CDF at the row's uniform is a draw from the softmax of the temperature-scaled logits;
    top-k keeps the k best tokens only; a token of probability 0 is never drawn, even at u = 0."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]]).repeat(20_000, 1)
    uniforms = torch.from_numpy(row_uniforms(range(20_000), 1)[:, 0])
    drawn = TokenPicker(SamplingParams(temperature=0.7))(logits, uniforms)
    frequencies = torch.bincount(drawn, minlength=5) / 20_000
    assert frequencies.tolist() == pytest.approx(torch.softmax(logits[0] / 0.7, -1).tolist(), abs=0.01)
    top2 = TokenPicker(SamplingParams(temperature=1.0, top_k=2))(logits[:2_000], uniforms[:2_000])
    assert set(top2.tolist()) == {0, 1}
    masked = torch.tensor([[float("-inf"), 0.0, float("-inf"), 0.0]] * 3)
    edges = TokenPicker(SamplingParams(temperature=1.0))(masked, torch.tensor([0.0, 0.5, 1 - 2**-53]))
    assert edges.tolist() == [1, 3, 3]


def test_the_model_runs_in_the_dtype_and_attention_kernel_asked_for(testbed, teacher, prompts):
    assert teacher.model.dtype == torch.float32  # auto, on a CPU
    half = HFGenerator(testbed / "teacher", batch_size=8, dtype="bfloat16", attn_implementation="eager")
    assert half.model.dtype == torch.bfloat16 and half.model.config._attn_implementation == "eager"
    greedy = SamplingParams(temperature=0, max_new_tokens=120)
    texts = [c[0].text for c in half.generate(prompts, greedy)]
    assert all("The answer is" in text for text in texts)  # the trained teacher still answers in bfloat16


def test_a_stop_string_ends_the_completion_before_it(teacher, prompts):
    (completion,) = teacher.generate(
        prompts[:1], SamplingParams(temperature=0, max_new_tokens=60, stop=("carry",))
    )[0]
    assert "carry" not in completion.text and completion.finish_reason == "stop"
    # the token ids run up to the one completing the stop string, as vLLM reports them
    assert teacher.tokenizer.decode(completion.token_ids).endswith("carry")
    (unstopped,) = teacher.generate(prompts[:1], SamplingParams(temperature=0, max_new_tokens=60))[0]
    assert unstopped.text.startswith(completion.text) and "carry" in unstopped.text


def test_generated_logprobs_are_the_teachers_own_distribution_over_the_completion(teacher, prompts):
    sampling = SamplingParams(n=2, temperature=1.5, max_new_tokens=40, top_logprobs=5, seed=1)
    requests_before = teacher.usage.requests
    results = teacher.generate(prompts[:2], sampling)
    assert teacher.usage.requests == requests_before + 4
    for prompt, completions in zip(prompts[:2], results, strict=True):
        for completion in completions:
            logprobs = completion.logprobs
            assert logprobs.token_ids.tolist() == completion.token_ids and logprobs.k == 5
            # a full forward pass of the untruncated model gives the same values
            ids = prompt_ids(teacher.tokenizer, [prompt])[0]
            full = torch.tensor([ids + completion.token_ids])
            with torch.no_grad():
                reference = torch.log_softmax(teacher.model(full).logits[0].double(), -1)[len(ids) - 1 : -1]
            expected = reference.gather(-1, torch.tensor(completion.token_ids)[:, None])[:, 0]
            np.testing.assert_allclose(logprobs.logprobs, expected.numpy(), atol=5e-3, rtol=5e-3)
            assert logprobs.topk_ids.tolist() == reference.topk(5).indices.tolist()
    # sampled at temperature 1.5, not every token is the teacher's first choice: raw, not warped, logprobs
    assert any((c.logprobs.topk_ids[:, 0] != c.logprobs.token_ids).any() for cs in results for c in cs)


def test_scoring_a_given_text_matches_the_logprobs_of_generating_it(teacher, prompts):
    (completion,) = teacher.generate(
        prompts[:1], SamplingParams(temperature=0, max_new_tokens=160, top_logprobs=4)
    )[0]
    assert completion.finish_reason == "stop"  # ends with the end-of-turn token, as scoring appends it
    (scored,) = teacher.score(prompts[:1], [completion.text], top_k=4)
    assert scored.token_ids.tolist() == completion_ids(teacher.tokenizer, [completion.text])[0]
    assert scored.token_ids.tolist() == completion.token_ids
    np.testing.assert_allclose(scored.logprobs, completion.logprobs.logprobs, atol=1e-2)
    np.testing.assert_array_equal(scored.topk_ids, completion.logprobs.topk_ids)


def test_scoring_batches_of_different_lengths_gives_each_its_own_values(teacher, prompts):
    texts = [
        "<think>\nshort\n</think>\nThe answer is 1.",
        "The answer is 12345 and then a much longer tail of words.",
    ]
    together = teacher.score(prompts[:2], texts, top_k=3)
    alone = [teacher.score([p], [t], top_k=3)[0] for p, t in zip(prompts[:2], texts, strict=True)]
    for a, b in zip(together, alone, strict=True):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-2)
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)


def test_the_score_stage_stores_the_teachers_top_k_for_every_trace(testbed, tmp_path):
    run = ["--run-dir", str(tmp_path)]
    main(
        [
            "problems",
            *run,
            "--tasks",
            "arithmetic",
            "--train",
            "4",
            "--test",
            "1",
            "--difficulty",
            '{"arithmetic": [1]}',
        ]
    )
    main(
        ["generate", *run, "--model", "testbed:teacher", "--name", "t", "--n", "2", "--max-new-tokens", "80"]
    )
    main(
        [
            "generate",
            *run,
            "--model",
            "testbed:teacher",
            "--name",
            "tk",
            "--n",
            "2",
            "--max-new-tokens",
            "80",
            "--top-logprobs",
            "3",
        ]
    )
    main(["score", *run, "--model", "testbed:teacher", "--traces", "t", "--top-k", "3", "--shard-size", "3"])
    directory = tmp_path / "logprobs" / "t.teacher"
    scored = {(p, s): lp for path in logprob_shards(directory) for p, s, lp in read_logprobs(path)}
    traces = [t for path in trace_shards(tmp_path / "traces" / "t") for t in read_records(path, Trace)]
    assert sorted(scored) == sorted((t.problem_id, t.sample_idx) for t in traces) and len(scored) == 8
    # the same completions generated with --top-logprobs carry the same distribution (same seeds)
    generated = {
        (p, s): lp for path in logprob_shards(tmp_path / "traces" / "tk") for p, s, lp in read_logprobs(path)
    }
    generated_traces = read_records(trace_shards(tmp_path / "traces" / "tk")[0], Trace)
    recorded = json.loads(generated_traces[0].source)["sampling"]  # what the traces were drawn with
    assert (recorded["logprobs"], recorded["top_logprobs"], recorded["n"]) == (True, 3, 2)
    for key, lp in scored.items():
        # scoring appends the end-of-turn token; a finished completion already ends with it
        length = len(generated[key])
        assert lp.k == 3 and lp.token_ids[:length].tolist() == generated[key].token_ids.tolist()
        np.testing.assert_array_equal(lp.topk_ids[:length], generated[key].topk_ids)
        np.testing.assert_allclose(lp.logprobs[:length], generated[key].logprobs, atol=1e-2)
    stats = RunDir(tmp_path).manifest()["steps"]["score:t.teacher"]["stats"]
    assert stats["tokens"] == sum(len(lp) for lp in scored.values()) and stats["usage"]["failed"] == []
    assert stats["usage"]["requests"] == 8 and stats["usage"]["prompt_tokens"] > stats["tokens"]
    main(["report", *run])
    assert "score:t.teacher" in (tmp_path / "report.md").read_text()


def test_a_models_own_generation_config_is_not_applied(testbed, teacher, prompts, tmp_path, caplog):
    """transformers would fill every option a call leaves unset from generation_config.json: a
    repetition penalty and a no-repeat n-gram size there would change every arithmetic answer."""
    import shutil

    from reasondistill.models import model_sampling_defaults

    folder = tmp_path / "teacher"
    shutil.copytree(testbed / "teacher", folder)
    config = json.loads((folder / "generation_config.json").read_text())
    extra = {"repetition_penalty": 5.0, "no_repeat_ngram_size": 2, "min_new_tokens": 150, "top_k": 3}
    (folder / "generation_config.json").write_text(json.dumps({**config, **extra}))
    assert model_sampling_defaults(folder) == extra
    with caplog.at_level("WARNING", logger="reasondistill.generate.hf"):
        own = HFGenerator(folder, batch_size=8)
    assert "repetition_penalty=5.0" in caplog.text and "not applied" in caplog.text
    assert own.describe()["generation_config_not_applied"] == extra
    greedy = SamplingParams(temperature=0, max_new_tokens=120)
    assert [c[0].text for c in own.generate(prompts, greedy)] == [
        c[0].text for c in teacher.generate(prompts, greedy)
    ]
    sampled = SamplingParams(temperature=1.0, max_new_tokens=40, n=2, seed=4)
    assert [[c.text for c in cs] for cs in own.generate(prompts, sampled)] == [
        [c.text for c in cs] for cs in teacher.generate(prompts, sampled)
    ]
    assert own.model.generation_config.repetition_penalty == 5.0  # the model itself is left as it was

    run_dir = tmp_path / "run"
    main(["problems", "--run-dir", str(run_dir), "--tasks", "arithmetic", "--train", "2", "--test", "0"])
    main(
        [
            "generate",
            "--run-dir",
            str(run_dir),
            "--model",
            str(folder),
            "--name",
            "own",
            "--max-new-tokens",
            "20",
        ]
    )
    stats = RunDir(run_dir).finished_step("generate:own")["stats"]
    assert stats["generation_config_not_applied"] == extra  # recorded in the manifest
    # 20 tokens cut every 2-digit addition short: said once for the step
    assert stats["finish_reasons"] == {"length": 8}  # 2 problems, 4 samples each
    assert "generate:own: 8 of 8 traces (100%) reached max_new_tokens=20 and were cut" in caplog.text
