"""Turn (chat prompt, completion) examples into token ids with the loss on completion tokens only."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Sampler
from transformers import PreTrainedTokenizerBase

from ..chat import completion_ids, prompt_ids
from ..objectives import IGNORE_INDEX
from ..records import TrainingExample


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def tokenize_examples(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[TrainingExample], max_length: int
) -> list[TokenizedExample]:
    """Prompt ids (labels ignored) followed by completion ids and EOS (labels = ids), per example.

    Prompt and completion are tokenized separately, so the boundary is exact: this is also how the
    completion's tokens follow the prompt at generation time.
    """
    prompts = prompt_ids(tokenizer, [e.messages for e in examples])
    completions = completion_ids(tokenizer, [e.completion for e in examples])
    tokenized = []
    for prompt, completion in zip(prompts, completions, strict=True):
        input_ids = (prompt + completion)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt) + completion)[:max_length]
        tokenized.append(
            TokenizedExample(input_ids, labels, truncated=len(prompt) + len(completion) > max_length)
        )
    return tokenized


@dataclass
class CompletionCollator:
    """Right-pads a batch; padded positions get attention 0 and label IGNORE_INDEX."""

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)

        def pad(values: list[int], fill: int) -> list[int]:
            return values + [fill] * (width - len(values))

        return {
            "input_ids": torch.tensor([pad(f["input_ids"], self.pad_token_id) for f in features]),
            "attention_mask": torch.tensor([pad([1] * len(f["input_ids"]), 0) for f in features]),
            "labels": torch.tensor([pad(f["labels"], IGNORE_INDEX) for f in features]),
        }


class SortedStepSampler(Sampler[int]):
    """Random order, except that the examples of each optimizer step are sorted by length.

    A step's examples (micro-batch size × accumulation steps × processes) are drawn at random as
    usual, then sorted so each micro-batch holds similar lengths. The loss is normalised over the whole
    step, so the update is the one an unsorted random batch would give, with far less padding when
    short and long examples are mixed. (Grouping whole batches by length instead, as transformers'
    `group_by_length` does, makes each update single-task on the testbed and stalled learning.)
    """

    def __init__(self, lengths: Sequence[int], examples_per_step: int, seed: int):
        self.lengths, self.examples_per_step, self.seed = list(lengths), examples_per_step, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer / accelerate at each epoch, so a resumed run replays the same order."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        for start in range(0, len(order), self.examples_per_step):
            yield from sorted(order[start : start + self.examples_per_step], key=self.lengths.__getitem__)
