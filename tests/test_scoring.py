"""Teacher-forced scoring, the one pass behind the hf backend's logprobs, the analyses and the student NLL."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from reasondistill.errors import UserError
from reasondistill.generate.scoring import teacher_forced

VOCAB = 50


def tiny_qwen(**config) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    shape = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return Qwen2ForCausalLM(Qwen2Config(**shape, **config)).eval()


PAIRS = [([3, 7, 1], [4, 4, 9, 2, 11, 5, 8]), ([5], [1, 2]), ([9, 8, 7, 6, 5, 4], [3]), ([2, 2], [])]
CHUNKS = [[3, 3, 1], [2], [1], [0]]  # positions per chunk of 3; an empty completion has one empty chunk


def chosen_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None])[:, 0]


def full_forward(model, prompt: list[int], completion: list[int], vocab_size: int | None) -> torch.Tensor:
    """log p of each completion token from the model's own logits over the whole sequence, unbatched."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0, :, :vocab_size]
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(completion) - 1)
    return torch.log_softmax(logits[positions], dim=-1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


@pytest.mark.parametrize("by_length", [False, True])
@pytest.mark.parametrize("vocab_size", [None, VOCAB - 8])
def test_chosen_token_logprobs_equal_a_full_forward(by_length, vocab_size):
    """Batched, right-padded, chunked (3 positions), with or without the head's last rows: the
    log-softmax of the model's logits at the completion tokens, each pair in its own place."""
    model = tiny_qwen()
    prompts, completions = [p for p, _ in PAIRS], [c for _, c in PAIRS]
    heard = []
    scored = teacher_forced(
        model, prompts, completions, chosen_logprobs, batch_size=3, vocab_size=vocab_size,
        chunk_size=3, by_length=by_length, progress=heard.append,
    )  # fmt: skip
    assert heard == [3, 1]
    for (prompt, completion), parts, chunks in zip(PAIRS, scored, CHUNKS, strict=True):
        assert [len(part) for part in parts] == chunks
        if completion:
            torch.testing.assert_close(
                torch.cat(parts), full_forward(model, prompt, completion, vocab_size), atol=1e-5, rtol=0
            )


@pytest.mark.parametrize("rescaling", [{"final_logit_softcapping": 30.0}, {"logit_scale": 0.25}])
def test_a_model_that_rescales_its_logits_is_refused(rescaling):
    """Scoring multiplies hidden states by the output embeddings itself: a softcap or scale applied
    after the head would be silently missed."""
    model = tiny_qwen(**rescaling)
    with pytest.raises(UserError, match="models that rescale their logits"):
        teacher_forced(model, [[1, 2]], [[3]], chosen_logprobs, batch_size=1, vocab_size=None)
