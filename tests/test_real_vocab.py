"""The real Qwen2.5 vocabulary (151,665 tokens; heads of 151,936 and 152,064 rows) through the stages.

Random tiny Qwen2 models with the real tokenizer: chat templates, padded head rows, `<think>`
handling and the memory path at full vocabulary. The weights are random, so accuracy is ~0: the
tests check shapes, templates and mechanics.
"""

import json
import textwrap

import pytest
from helpers import SHARED_BENCHMARKS
from transformers import AutoTokenizer

from reasondistill.chat import completion_ids, prompt_ids, reasoning_preflight, with_opener, without_opener
from reasondistill.records import GradedTrace, Message, read_records
from reasondistill.rundir import RunDir
from reasondistill.testbed.real_vocab import (
    QWEN_7B_ROWS,
    QWEN_ROWS,
    build_real_tokenizer,
    save_random_model,
)

QWEN = SHARED_BENCHMARKS.parent / "tokenizers" / "Qwen2.5-0.5B-Instruct"
GSM8K_TRAIN = SHARED_BENCHMARKS / "gsm8k" / "train.jsonl"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (QWEN / "vocab.json").exists(), reason=f"{QWEN} not present"),
]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    root = tmp_path_factory.mktemp("real-vocab")
    qwen = build_real_tokenizer(QWEN, root / "qwen-tokenizer")
    r1 = build_real_tokenizer(
        qwen, root / "r1-tokenizer", template="r1-distill"
    )  # from the fast tokenizer.json
    return {
        "root": root,
        "qwen": qwen,
        "r1": r1,
        # a 0.5B/1.5B-shaped student (tied head, 151,936 rows) and a 7B-shaped teacher (untied, 152,064)
        "student": save_random_model(qwen, root / "student", rows=QWEN_ROWS, hidden_size=32, seed=1),
        "teacher": save_random_model(
            qwen, root / "teacher", rows=QWEN_7B_ROWS, hidden_size=48, tie=False, seed=2
        ),
    }


def test_the_qwen_tokenizer_is_the_published_one(real):
    tokenizer = AutoTokenizer.from_pretrained(real["qwen"])
    assert len(tokenizer) == 151_665 and tokenizer.vocab_size == 151_643
    assert tokenizer.encode("Hello world") == [9707, 1879] and tokenizer.encode("48") == [19, 23]
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == (
        "<|im_end|>",
        "<|endoftext|>",
        None,
    )
    messages = [
        Message(role="system", content="You are a helpful assistant."),
        Message(role="user", content="What is 2+3?"),
    ]
    assert prompt_ids(tokenizer, [messages])[0] == [
        151644,
        8948,
        198,
        2610,
        525,
        264,
        10950,
        17847,
        13,
        151645,
        198,
        151644,
        872,
        198,
        3838,
        374,
        220,
        17,
        10,
        18,
        30,
        151645,
        198,
        151644,
        77091,
        198,
    ]  # fmt: skip  (the ids SOURCES.md records for the original files)
    no_system = tokenizer.decode(prompt_ids(tokenizer, [[Message(role="user", content="Hi")]])[0])
    assert no_system.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")


def test_the_r1_distill_variant_opens_the_reasoning_block_and_strips_earlier_reasoning(real):
    tokenizer = AutoTokenizer.from_pretrained(real["r1"])
    assert len(tokenizer) == 151_665
    assert tokenizer.convert_tokens_to_ids(["<think>", "</think>"]) == [151648, 151649]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        151646,
        151643,
        151643,
    )
    assert tokenizer.encode("<think>\nok\n</think>", add_special_tokens=False)[0] == 151648
    assert tokenizer.encode("Hi")[0] == 151646  # the BOS every R1 encoding starts with
    prompt = prompt_ids(tokenizer, [[Message(role="user", content="What is 2+3?")]])[0]
    assert prompt.count(151646) == 1  # one BOS: the template's, not a second one from encoding
    assert tokenizer.decode(prompt).endswith("<｜User｜>What is 2+3?<｜Assistant｜><think>\n")
    history = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "<think>\nlong reasoning\n</think>\n\nA1"},
        {"role": "user", "content": "Q2"},
    ]
    rendered = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    assert "long reasoning" not in rendered and "<｜Assistant｜>\n\nA1<｜end▁of▁sentence｜>" in rendered


PIPELINE = """
run_dir: {run_dir}
seed: 3
steps:
  - problems: {{sets: [{{name: gsm, preset: gsm8k, file: "{gsm8k}", limit: 10, test_fraction: 0.5}}]}}
  - generate: {{model: "{teacher}", name: teacher, n: 1, temperature: 1.0, max_new_tokens: 12, top_logprobs: 20, batch_size: 8}}
  - verify: {{traces: teacher}}
  - curate: {{name: all, traces: teacher, keep: [correct, incorrect, unparseable]}}
  - score: {{model: "{teacher}", traces: teacher, top_k: 20, name: top20}}
  - train: {{name: sft, init: "{student}", data: all, epochs: 1, batch_size: 4, max_length: 512}}
  - train: {{name: fkl-stored, init: "{student}", data: all, objective: forward_kl, teacher_logprobs: top20, epochs: 1, batch_size: 4, max_length: 512}}
  - train: {{name: fkl-online, init: "{student}", data: all, objective: forward_kl, teacher: "{teacher}", epochs: 1, batch_size: 4, max_length: 512}}
  - eval: {{models: [sft], n: 0, max_new_tokens: 8}}
  - report: {{}}
"""


@pytest.mark.skipif(not GSM8K_TRAIN.exists(), reason=f"{GSM8K_TRAIN} not present")
def test_every_stage_runs_at_the_real_vocabulary(real):
    from reasondistill.generate.logprobs import read_logprobs
    from reasondistill.recipe import run_recipe
    from reasondistill.store import logprob_shards

    recipe = real["root"] / "recipe.yaml"
    run_dir = real["root"] / "run"
    recipe.write_text(
        textwrap.dedent(
            PIPELINE.format(
                run_dir=run_dir, gsm8k=GSM8K_TRAIN, teacher=real["teacher"], student=real["student"]
            )
        )
    )
    run_recipe(recipe)
    run = RunDir(run_dir)
    steps = run.manifest()["steps"]
    assert steps["problems"]["stats"]["problems"] == {"gsm/train": 5, "gsm/test": 5}
    # the teacher's top-20 at every completion position, ids anywhere in the real vocabulary
    rows = [row for shard in logprob_shards(run.logprobs("top20")) for row in read_logprobs(shard)]
    assert len(rows) == 5 and all(lp.k == 20 for _, _, lp in rows)
    assert max(int(lp.topk_ids.max()) for _, _, lp in rows) > 100_000
    # the random teacher puts mass on its 399 padded head rows, but only real tokens are sampled
    assert all(int(lp.token_ids.max()) < 151_665 for _, _, lp in rows)
    for name in ("sft", "fkl-stored", "fkl-online"):
        stats = steps[f"train:{name}"]["stats"]
        assert stats["steps"] == 2 and stats["examples"] == 5, name
        weights = json.loads((run.checkpoint(name) / "config.json").read_text())
        assert weights["vocab_size"] == QWEN_ROWS, name  # the student keeps its own head
    result = json.loads((run.eval_dir("sft") / "gsm.json").read_text())
    assert result["greedy"]["problems"] == 5
    assert "gsm" in (run.root / "report.md").read_text()
    graded = read_records(run.graded("teacher"), GradedTrace)
    assert {g.task for g in graded} == {"gsm"} and len(graded) == 5


def test_the_reasoning_preflight_of_both_templates(real, capsys):
    """`<think>` tokenization compared between teacher and student, the R1 opener not trained twice,
    and the reasoning block of the trained completion kept although R1's template strips it from
    earlier turns."""
    from reasondistill.cli import main

    qwen, r1 = AutoTokenizer.from_pretrained(real["qwen"]), AutoTokenizer.from_pretrained(real["r1"])
    plain = reasoning_preflight(qwen)
    assert plain.opener == "" and plain.history_keeps_reasoning and plain.trained_keeps_reasoning
    assert len(plain.think_tokens["student"]["<think>"]) > 1  # Qwen2.5 has no <think> token
    opened = reasoning_preflight(r1)
    assert opened.opener == "<think>\n" and opened.trained_keeps_reasoning
    assert not opened.history_keeps_reasoning  # R1's template drops earlier turns' reasoning
    assert opened.think_tokens["student"] == {"<think>": ["<think>"], "</think>": ["</think>"]}
    assert opened.differences == []

    # a completion holding the opener is trained as what the model writes after the prompt's opener
    reply = "<think>\nTwelve and thirty.\n</think>\n\nThe answer is 42."
    assert (
        without_opener(with_opener("Twelve.\n</think>\n42", "<think>\n"), "<think>\n")
        == "Twelve.\n</think>\n42"
    )
    assert completion_ids(r1, [reply]) == completion_ids(r1, [reply.removeprefix("<think>\n")])
    prompt = prompt_ids(r1, [[Message(role="user", content="What is 12 + 30?")]])[0]
    assert (prompt + completion_ids(r1, [reply])[0]).count(151648) == 1
    assert completion_ids(qwen, [reply]) != completion_ids(qwen, [reply.removeprefix("<think>\n")])

    mixed = reasoning_preflight(qwen, teacher=r1)
    assert len(mixed.differences) == 2 and mixed.differences[0].startswith(
        "<think> is 1 token(s) ['<think>'] for the teacher and"
    )
    main(["check-template", "--student", str(real["r1"]), "--teacher", str(real["qwen"])])
    out = capsys.readouterr().out
    assert "generation prompt opens the reasoning block: '<think>\\n'" in out
    assert "strips the reasoning of earlier assistant turns" in out and out.count("warning:") == 2
    assert "trained with its whole reasoning block: ok" in out


R1_PIPELINE = """
run_dir: {run_dir}
seed: 3
steps:
  - problems: {{sets: [{{name: gsm, preset: gsm8k, file: "{gsm8k}", limit: 6, test_fraction: 0.5}}]}}
  - generate: {{model: "{model}", name: r1, n: 1, temperature: 1.0, max_new_tokens: 8, batch_size: 8}}
  - verify: {{traces: r1}}
  - curate: {{name: all, traces: r1, keep: [correct, incorrect, unparseable]}}
  - train: {{name: sft, init: "{model}", data: all, epochs: 1, batch_size: 2, max_length: 512}}
  - eval: {{models: [sft], n: 0, max_new_tokens: 8}}
"""


@pytest.mark.skipif(not GSM8K_TRAIN.exists(), reason=f"{GSM8K_TRAIN} not present")
def test_a_pipeline_with_the_r1_reasoning_template(real):
    """Generate → verify → curate → train → eval with an R1-Distill-templated model: the completions
    are whole replies (the prompt's `<think>` opener first), a reasoning block left open is
    unparseable (not graded as an answer), and training sees the opener once."""
    from reasondistill.recipe import run_recipe
    from reasondistill.records import Trace
    from reasondistill.store import trace_shards
    from reasondistill.train.data import tokenize_examples

    model = save_random_model(real["r1"], real["root"] / "r1-model", hidden_size=32, seed=3)
    recipe, run_dir = real["root"] / "r1.yaml", real["root"] / "r1-run"
    recipe.write_text(textwrap.dedent(R1_PIPELINE.format(run_dir=run_dir, gsm8k=GSM8K_TRAIN, model=model)))
    run_recipe(recipe)
    run = RunDir(run_dir)
    traces = [t for shard in trace_shards(run.traces("r1")) for t in read_records(shard, Trace)]
    assert len(traces) == 3 and all(t.completion.startswith("<think>\n") for t in traces)
    graded = read_records(run.graded("r1"), GradedTrace)
    assert {g.label for g in graded} == {"unparseable"}  # 8 random tokens never close the block
    stats = run.manifest()["steps"]["train:sft"]["stats"]
    assert stats["reasoning_template"]["opener"] == "<think>\n"
    assert stats["reasoning_template"]["trained_keeps_reasoning"] and stats["examples"] == 3
    tokenizer = AutoTokenizer.from_pretrained(model)
    from reasondistill.records import TrainingExample

    examples = [TrainingExample(problem_id=t.problem_id, task=t.task, messages=[Message(role="user", content="q")],
                                completion=t.completion) for t in traces]  # fmt: skip
    for tokenized in tokenize_examples(tokenizer, examples, 512):
        assert tokenized.input_ids.tolist().count(151648) == 1  # the prompt's opener, not a second one
    result = json.loads((run.eval_dir("sft") / "gsm.json").read_text())
    assert result["greedy"]["problems"] == 3 and result["greedy"]["labels"] == {"unparseable": 3}
