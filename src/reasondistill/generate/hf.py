"""The `hf` backend: a local transformers model, decoded in batches by `decoding.decode` (a KV
cache written in place, finished rows leaving the batch, each sequence sampled from its own seeded
stream).

Seeds: sample j of prompt i is drawn from seed seeds[i] + j (`prompt_seeds`, as the openai and vllm
backends seed a request), so a prompt's completions depend on its seed, the prompt and the model
only: not on the prompts decoded with it, the batch size or the process. Before 2026-12-07 this
backend sampled through `model.generate`, one random stream per call; traces sampled then are not
reproduced by the same seed now.

Logprobs come from one teacher-forced forward pass over prompt + completion after decoding, so they
are the model's own distribution (temperature 1, no top-k/top-p filter), as vLLM's raw logprobs are,
and the [T, V] logits are projected in chunks of positions instead of being kept for every step
(`scoring.teacher_forced`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StopStringCriteria

from ..models import load_causal_lm, load_tokenizer, loading_kwargs, sampling_defaults
from .base import (
    Completion,
    ProgressCallback,
    ResultCallback,
    SamplingParams,
    TokenIdGenerator,
    Usage,
    notify_each,
    prompt_seeds,
)
from .decoding import Chooser, TokenPicker, compiled_steps, decode, row_uniforms
from .logprobs import TokenLogprobs, from_logits
from .scoring import teacher_forced

log = logging.getLogger(__name__)


class HFGenerator(TokenIdGenerator):
    backend = "hf"

    def __init__(
        self,
        path: Path | str,
        *,
        batch_size: int = 64,
        device: str | None = None,
        dtype: str = "auto",
        attn_implementation: str | None = None,
        compile: bool = False,
    ):
        """`batch_size` counts sequences (prompts × n) decoded or scored together; `dtype` and
        `attn_implementation` as `models.ModelLoading` describes them; `compile`: decoding steps
        through `torch.compile` (`decoding.compiled_steps`)."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        tokenizer = load_tokenizer(path)
        model = load_causal_lm(path, **loading_kwargs(dtype, attn_implementation, device))
        self._attach(str(path), model.to(device).eval(), tokenizer, batch_size, compile)

    @classmethod
    def around(
        cls,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int = 64,
        compile: bool = False,
    ) -> HFGenerator:
        """A generator over a model in memory: the student being trained samples its rollouts through it."""
        generator = cls.__new__(cls)
        # a copy: left padding for decoding must not leak into the trainer's tokenizer
        generator._attach(model.config.name_or_path, model, copy.deepcopy(tokenizer), batch_size, compile)
        return generator

    def _attach(
        self,
        path: str,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int,
        compile: bool,
    ):
        self.path, self.model, self.tokenizer, self.batch_size = path, model, tokenizer, batch_size
        self.compile, self._compiled = compile, None
        self.tokenizer.padding_side = "left"
        self.usage = Usage()
        # `model.generate` would fill every option a call leaves unset from the model's own
        # generation_config.json (a repetition penalty, top-k, min-p …); this backend decodes with the
        # step's sampling options only (`decoding`), and says which of the model's it leaves out
        self.not_applied = sampling_defaults(model.generation_config)
        if self.not_applied:
            log.warning(
                "%s: its generation_config.json sets %s; not applied: the step's sampling options are used",
                path,
                ", ".join(f"{k}={v}" for k, v in self.not_applied.items()),
            )
        # head rows beyond the tokenizer (Qwen2.5 pads 151,665 tokens to 151,936 or 152,064 rows) are
        # not tokens: never sampled
        self.vocab_size = len(tokenizer)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def describe(self) -> dict:
        return {
            "backend": self.backend,
            "model": self.path,
            "name_or_path": self.model.config.name_or_path,
            "generation_config_not_applied": self.not_applied,
        }

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def close(self) -> None:
        on_gpu = self.device.type == "cuda"
        del self.model
        if on_gpu:
            torch.cuda.empty_cache()

    # ---- generation ---------------------------------------------------------------------------
    def generate_ids(
        self,
        prompts: Sequence[list[int]],
        sampling: SamplingParams,
        progress: ProgressCallback | None = None,
        seeds: Sequence[int] | None = None,
    ) -> list[list[Completion]]:
        """Completions of prompts given as token ids (the chat template already applied); prompt i's
        samples are drawn from seeds[i], seeds[i] + 1, … (`prompt_seeds`)."""
        seeds = prompt_seeds(sampling, len(prompts), seeds)
        prompts_per_batch = max(1, self.batch_size // sampling.n)
        results: list[list[Completion]] = []
        for start in range(0, len(prompts), prompts_per_batch):
            batch = slice(start, start + prompts_per_batch)
            results.extend(self._generate_batch(prompts[batch], sampling, seeds[batch]))
            if progress:
                progress(len(prompts[batch]) * sampling.n)
        return results

    @torch.inference_mode()
    def _generate_batch(
        self, prompts: Sequence[list[int]], sampling: SamplingParams, seeds: Sequence[int]
    ) -> list[list[Completion]]:
        owners = [prompt for prompt in prompts for _ in range(sampling.n)]  # the prompt of each sequence
        uniforms = self._uniforms(seeds, sampling)
        pick = TokenPicker(sampling)
        tokens = self._decode(
            [self], owners, sampling, lambda logits, live, t: pick.at(logits[0], uniforms, live, t)
        )
        completions = [
            self._completion(ids, len(p), sampling.stop) for ids, p in zip(tokens, owners, strict=True)
        ]
        return self._finish_batch(owners, completions, sampling)

    def _uniforms(
        self, seeds: Sequence[int], sampling: SamplingParams, stream: int = 0
    ) -> torch.Tensor | None:
        """[sequences, max_new_tokens] uniforms of prompt i's j-th sequence from seeds[i] + j (None: greedy)."""
        if sampling.greedy:
            return None
        rows = [seed + j for seed in seeds for j in range(sampling.n)]
        return torch.from_numpy(row_uniforms(rows, sampling.max_new_tokens, stream)).to(self.device)

    def _decode(
        self,
        generators: Sequence[HFGenerator],
        rows: Sequence[list[int]],
        sampling: SamplingParams,
        choose: Chooser,
    ) -> list[list[int]]:
        """The new tokens of each row (`decoding.decode`) from the generators' models read together,
        the logits cut to the tokenizer's tokens."""
        inputs = self.tokenizer.pad({"input_ids": list(rows)}, return_tensors="pt").to(self.device)
        vocab = self.vocab_size
        return decode(
            [g.model for g in generators],
            inputs["input_ids"],
            inputs["attention_mask"],
            lambda logits, live, t: choose([each[:, :vocab] for each in logits], live, t),
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            stop=StopStringCriteria(self.tokenizer, list(sampling.stop)) if sampling.stop else None,
            step_forwards=[g._step_forward() for g in generators],
        )

    def _step_forward(self) -> Callable | None:
        """The compiled forward of the current model with `compile` (compiled once per model object)."""
        if not self.compile:
            return None
        if self._compiled is None or self._compiled[0] is not self.model:
            self._compiled = (self.model, compiled_steps(self.model))
        return self._compiled[1]

    def _finish_batch(
        self, prompts: Sequence[list[int]], completions: list[Completion], sampling: SamplingParams
    ) -> list[list[Completion]]:
        """Attach the logprobs asked for, count usage, and group each prompt's `n` completions.

        `prompts` holds the prompt of every completion (each prompt repeated n times)."""
        if sampling.wants_logprobs:
            scored = self._distributions(
                prompts, [c.token_ids for c in completions], sampling.top_logprobs, None
            )
            completions = [replace(c, logprobs=lp) for c, lp in zip(completions, scored, strict=True)]
        self.usage.add(
            Usage(
                requests=len(completions),
                prompt_tokens=sum(c.prompt_tokens for c in completions),
                completion_tokens=sum(c.completion_tokens for c in completions),
            )
        )
        return [completions[i : i + sampling.n] for i in range(0, len(completions), sampling.n)]

    def _completion(self, ids: list[int], prompt_tokens: int, stop: tuple[str, ...]) -> Completion:
        eos = self.tokenizer.eos_token_id
        finished = eos in ids
        ids = ids[: ids.index(eos) + 1] if finished else ids
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        hit = _first_stop(text, stop)
        if hit is not None:
            # Keep the tokens up to the one that completes the stop string (as vLLM reports them)
            # and the text before it (as OpenAI-compatible servers return it).
            ids = ids[: self._tokens_to_reach(ids, text[: hit[1]])]
            text, finished = text[: hit[0]], True
        return Completion(
            text=text,
            token_ids=ids,
            finish_reason="stop" if finished else "length",
            prompt_tokens=prompt_tokens,
            completion_tokens=len(ids),
        )

    def _tokens_to_reach(self, ids: list[int], prefix: str) -> int:
        """The fewest leading tokens whose text contains `prefix` (decoding is monotone: bisect)."""
        low, high = 1, len(ids)
        while low < high:
            middle = (low + high) // 2
            if len(self.tokenizer.decode(ids[:middle], skip_special_tokens=True)) >= len(prefix):
                high = middle
            else:
                low = middle + 1
        return low

    # ---- scoring ------------------------------------------------------------------------------
    def score_ids(
        self,
        prompts: Sequence[list[int]],
        completions: Sequence[list[int]],
        top_k: int,
        progress: ProgressCallback | None = None,
        on_result: ResultCallback | None = None,
    ) -> list[TokenLogprobs]:
        """The model's distribution at every completion token, prompt and completion given as ids."""
        scored = self._distributions(prompts, completions, top_k, progress)
        # scoring is prefill: every token read counts as a prompt token, as a server bills it
        read = sum(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
        self.usage.add(Usage(requests=len(prompts), prompt_tokens=read))
        notify_each(scored, on_result)
        return scored

    def _distributions(
        self,
        prompts: Sequence[list[int]],
        completions: Sequence[list[int]],
        top_k: int,
        progress: ProgressCallback | None,
        temperature: float = 1.0,
    ) -> list[TokenLogprobs]:
        """Top-k and tail at every completion token, in the given order (`teacher_forced`).

        `temperature` divides the logits first: 1, the model's own distribution, is what is stored;
        the test server uses other values to play a server that reports processed logprobs. Rows
        beyond the tokenizer (Qwen2.5 pads 151,665 tokens to 151,936) are never a token; the store,
        like the distillation loss against a teacher, covers the real tokens only."""
        chunks = teacher_forced(
            self.model,
            prompts,
            completions,
            lambda logits, targets: from_logits(_scaled(logits, temperature), targets, top_k),
            batch_size=self.batch_size,
            vocab_size=len(self.tokenizer),
            progress=progress,
        )
        return [TokenLogprobs.concat(parts, top_k) for parts in chunks]


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits if temperature == 1 else logits / temperature  # no copy of [chunk, V] when stored raw


def _first_stop(text: str, stop: tuple[str, ...]) -> tuple[int, int] | None:
    """(start, end) of the earliest stop string in `text`, or None."""
    hits = [(i, i + len(s)) for s in stop if (i := text.find(s)) >= 0]
    return min(hits) if hits else None
