from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from reasondistill.chat import prompt_ids
from reasondistill.records import Message
from reasondistill.tasks import TASKS


def test_loads_with_autotokenizer_and_has_chat_and_reasoning_tokens(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    for tag in ("<think>", "</think>", "<|im_start|>", "<|im_end|>"):
        assert len(tokenizer(tag, add_special_tokens=False)["input_ids"]) == 1, tag
    assert [
        tokenizer.convert_ids_to_tokens(i) for i in tokenizer("2024", add_special_tokens=False)["input_ids"]
    ] == list("2024")


def test_chat_template_renders_chatml(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    messages = [Message(role="system", content="Be brief."), Message(role="user", content="What is 2 + 3?")]
    text = tokenizer.decode(prompt_ids(tokenizer, [messages])[0])
    assert (
        text
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_batched_prompt_ids_equal_the_chat_template_ids(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    prompts = [p.messages for task in TASKS.values() for p in task.sample("train", 20, seed=2)]
    expected = [
        tokenizer.apply_chat_template(
            [m.model_dump() for m in messages], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for messages in prompts
    ]
    assert prompt_ids(tokenizer, prompts) == expected


def test_training_examples_are_tokenized_in_chunks_into_int32_arrays(tokenizer_dir, monkeypatch):
    """Chunks of 3 (7 examples: 3, 3, 1) give what one chunk gives: the prompt's chat-template ids
    with ignored labels, then the completion's ids and end of turn as labels, cut at max_length (120: some are cut, some not)."""
    import numpy as np

    from reasondistill.chat import completion_ids
    from reasondistill.objectives.base import IGNORE_INDEX
    from reasondistill.records import TrainingExample
    from reasondistill.train import data

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    problems = [p for task in TASKS.values() for p in task.sample("train", 3, seed=4)][:7]
    examples = [
        TrainingExample(problem_id=p.id, task=p.task, messages=p.messages, completion=p.solution)
        for p in problems
    ]
    whole = data.tokenize_examples(tokenizer, examples, max_length=120)
    monkeypatch.setattr(data, "TOKENIZE_CHUNK", 3)
    chunked = data.tokenize_examples(tokenizer, examples, max_length=120)
    assert len(chunked) == len(whole) == 7
    for example, one, other in zip(examples, whole, chunked, strict=True):
        assert one.input_ids.dtype == one.labels.dtype == np.int32
        np.testing.assert_array_equal(one.input_ids, other.input_ids)
        np.testing.assert_array_equal(one.labels, other.labels)
        prompt = prompt_ids(tokenizer, [example.messages])[0]
        completion = completion_ids(tokenizer, [example.completion])[0]
        assert one.full_length == other.full_length == len(prompt) + len(completion)
        assert one.input_ids.tolist() == (prompt + completion)[:120] and one.prompt_length == len(prompt)
        assert one.labels.tolist() == ([IGNORE_INDEX] * len(prompt) + completion)[:120]
        assert one.truncated == (len(prompt) + len(completion) > 120)
    assert any(t.truncated for t in whole) and not all(t.truncated for t in whole)


def test_every_task_text_round_trips(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    for task in TASKS.values():
        for problem in task.sample("test", 30, seed=5, difficulties=task.difficulties):
            for text in (problem.messages[0].content, problem.solution):
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                assert tokenizer.decode(ids) == text
    # the decoded completion keeps <think> tags but drops the end-of-turn token
    ids = tokenizer("<think>\nok\n</think>\nThe answer is 3.<|im_end|>", add_special_tokens=False)[
        "input_ids"
    ]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>\nok\n</think>\nThe answer is 3."


@given(text=st.text(max_size=200))
@settings(max_examples=100, deadline=None)
def test_arbitrary_text_round_trips_through_byte_fallback(tokenizer_dir, text):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if any(tag in text for tag in ("<think>", "</think>", "<|im_start|>", "<|im_end|>", "<|endoftext|>")):
        return
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
