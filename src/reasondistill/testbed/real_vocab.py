"""Real-vocabulary rehearsal models: Qwen2.5's tokenizer (151,665 tokens) on tiny random Qwen2 models.

The testbed's own vocabulary has 594 tokens; real students and teachers have about 152,000, padded
head rows, ChatML special tokens and reasoning templates. These builders make models with exactly
those shapes from the real tokenizer files (vocab.json + merges.txt, no download) so every stage can
be rehearsed at full vocabulary on a CPU: weights are random, so the numbers mean nothing; shapes,
templates, memory and mechanics are what is checked.

Tokenizers:
- `qwen2.5`: Qwen2.5-Instruct's tokenizer as published (its tokenizer_config.json, chat template and
  22 added tokens; ../shared/data/tokenizers/Qwen2.5-0.5B-Instruct/SOURCES.md says where it came from).
- `r1-distill`: the same BPE with DeepSeek-R1-Distill-Qwen's added tokens and chat template
  (R1_DISTILL_TOKENS below says where those came from): `<think>` / `</think>` are single tokens, the
  generation prompt opens the reasoning block, and earlier assistant turns lose their reasoning.

Model shapes: Qwen2.5-0.5B/1.5B pad the embedding to 151,936 rows (tied head); Qwen2.5-7B to
152,064 (untied). `save_random_model` builds either from a tokenizer folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

QWEN_ROWS = 151_936  # Qwen2.5-0.5B/1.5B/3B: len(tokenizer) = 151,665, padded
QWEN_7B_ROWS = 152_064  # Qwen2.5-7B/14B/32B/72B
Template = Literal["qwen2.5", "r1-distill"]


def build_real_tokenizer(source: Path, out: Path, template: Template = "qwen2.5") -> Path:
    """A complete fast tokenizer folder from the Qwen2.5 vocab.json + merges.txt in `source` (or from
    a folder this wrote before: its tokenizer.json loads in a fraction of the time)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    if template == "r1-distill":
        tokenizer = _r1_distill(tokenizer)
    tokenizer.save_pretrained(out)
    return out


# DeepSeek-R1-Distill-Qwen's added tokens (its tokenizer.json; ids 151650-151664 stay Qwen's) and
# chat template (templates/r1-distill.jinja: the tokenizer_config.json revision of 2025-02-09, Hub
# commit 530ca3e, whose generation prompt opens `<think>\n`). Neither file is in an open repository
# byte for byte; both were rebuilt from quotations that agree on every token and template character
# (BerriAI/litellm litellm/constants.py at 1e5416b, and two guides quoting the whole file).
R1_DISTILL_TOKENS = {
    151643: ("<｜end▁of▁sentence｜>", True),  # eos and pad
    151644: ("<｜User｜>", True),
    151645: ("<｜Assistant｜>", True),
    151646: ("<｜begin▁of▁sentence｜>", True),  # bos, prepended to every encoding
    151647: ("<|EOT|>", True),
    151648: ("<think>", False),
    151649: ("</think>", False),
}
R1_BOS, R1_EOS = R1_DISTILL_TOKENS[151646][0], R1_DISTILL_TOKENS[151643][0]


def _r1_distill(tokenizer):
    """Qwen2.5's BPE with R1-Distill's added tokens, BOS post-processor and chat template."""
    import json

    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    for token in spec["added_tokens"]:
        if token["id"] in R1_DISTILL_TOKENS:
            token["content"], token["special"] = R1_DISTILL_TOKENS[token["id"]]
    backend = Tokenizer.from_str(json.dumps(spec))
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{R1_BOS} $A", pair=f"{R1_BOS} $A {R1_BOS} $B", special_tokens=[(R1_BOS, 151646)]
            ),
        ]
    )
    template = (Path(__file__).parent / "templates" / "r1-distill.jinja").read_text()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=R1_BOS,
        eos_token=R1_EOS,
        pad_token=R1_EOS,
        chat_template=template,
        model_max_length=16384,
        clean_up_tokenization_spaces=False,
    )


def save_random_model(
    tokenizer_dir: Path,
    out: Path,
    *,
    rows: int = QWEN_ROWS,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    tie: bool = True,
    seed: int = 0,
) -> Path:
    """A randomly initialised Qwen2 model with `rows` embedding rows (≥ the tokenizer's length), saved
    with its tokenizer like a Hub checkpoint."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if rows < len(tokenizer):
        raise ValueError(f"{rows} embedding rows cannot hold {len(tokenizer)} tokens")
    config = Qwen2Config(
        vocab_size=rows,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=tie,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
