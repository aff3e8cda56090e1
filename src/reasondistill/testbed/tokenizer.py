"""The testbed tokenizer: a byte-level BPE trained on the testbed tasks, saved as a Hub-style folder.

Like Qwen's tokenizer it splits numbers into single digits and falls back to bytes, so any text
round-trips exactly; it has a ChatML chat template and `<think>` / `</think>` tokens, so testbed
models go through the same `AutoTokenizer.from_pretrained(path)` code as real ones.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ..tasks import TASKS
from ..verify.reasoning import THINK_CLOSE, THINK_OPEN

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CONTROL_TOKENS = [PAD, IM_START, IM_END]
VOCAB_SIZE = 1024
CORPUS_PROBLEMS_PER_TASK = 2000

# ChatML, as used by Qwen2.5: the assistant turn ends with <|im_end|>, which is also the EOS token.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _corpus() -> list[str]:
    texts = []
    for task in TASKS.values():
        for problem in task.sample(
            "train", CORPUS_PROBLEMS_PER_TASK, seed=-1, difficulties=task.difficulties
        ):
            texts.extend([problem.messages[0].content, problem.solution])
    return texts


def build_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    """Train the BPE on generated problems and save tokenizer.json + config with the chat template."""
    tokenizer = Tokenizer(models.BPE())
    # One digit per token, but a digit keeps its leading space (" 42" → " 4", "2"): spaced numbers are
    # everywhere in step-by-step arithmetic, and a separate space token would make traces ~25% longer.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r" ?\d"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=CONTROL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token=IM_END,
        pad_token=PAD,
        additional_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
        padding_side="left",  # decoder-only generation pads on the left
        model_max_length=1024,
    )
    # Reasoning tags are ordinary added tokens (not special), so decoding keeps them, as in Qwen3.
    wrapped.add_tokens([THINK_OPEN, THINK_CLOSE], special_tokens=False)
    wrapped.save_pretrained(path)
    return wrapped
