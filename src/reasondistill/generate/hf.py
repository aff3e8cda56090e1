"""The `hf` backend: a local transformers model; batched, left-padded, KV-cached `model.generate`.

Logprobs come from one teacher-forced forward pass over prompt + completion after decoding, so they
are the model's own distribution (temperature 1, no top-k/top-p filter), as vLLM's raw logprobs are,
and the [T, V] logits are projected in chunks of positions instead of being kept for every step
(`scoring.teacher_forced`).

Seeds: `model.generate` samples a whole batch with one draw from torch's global random stream per
step, so rows cannot be seeded one by one. A call seeds that stream once with `sampling.seed` and
its batches follow one another: the same call (same prompts, order and batch size) gives the same
completions, but a prompt's completions depend on the prompts sent with it, and per-prompt `seeds`
are not used. (Sharded `generate` jobs stay exact on resumption all the same: this backend has no
per-row failures, so an unfinished shard is always redone whole.)

With `seed_rows` (the on-policy sampler, whose prompts are split over the processes of a job) each
sequence instead draws from its own stream, seeded as the openai and vllm backends seed a request
(`prompt_seeds`: sample j of prompt i from seeds[i] + j), by Gumbel-max (`RowSeededSampling`): a
prompt's completions then do not depend on the prompts decoded with it. The generate stage keeps
the one-stream sampling for now: every trace it has made, and the numbers measured on them, would
change.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

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
from .logprobs import TokenLogprobs, from_logits
from .scoring import teacher_forced

log = logging.getLogger(__name__)


class RealTokensOnly(LogitsProcessor):
    """Head rows beyond the tokenizer (Qwen2.5 pads 151,665 tokens to 151,936 or 152,064 rows) are
    never sampled: they are not tokens, and a trained model gives them next to nothing anyway."""

    def __init__(self, tokens: int):
        self.tokens = tokens

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores[:, self.tokens :] = float("-inf")
        return scores


class RowSeededSampling(LogitsProcessor):
    """Draws each row's next token from that row's own random stream (Gumbel-max over the warped
    logits: argmax(logits + G), G ~ Gumbel(0, 1), is a draw from their softmax), and leaves it the
    only finite score, so that greedy decoding takes it.

    A row's t-th token uses the t-th draw of its stream whatever else is in the batch, so its
    completion depends on its seed, prompt and the model alone."""

    def __init__(self, seeds: Sequence[int], sampling: SamplingParams, device: torch.device):
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
        warpers = [TemperatureLogitsWarper(sampling.temperature)]
        if sampling.top_k:
            warpers.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p < 1:
            warpers.append(TopPLogitsWarper(sampling.top_p))
        self.warpers = LogitsProcessorList(warpers)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = self.warpers(input_ids, scores).float()
        uniform = torch.stack(
            [torch.rand(scores.shape[1], generator=g, device=scores.device) for g in self.generators]
        )
        gumbel = -torch.log(-torch.log(uniform.clamp(torch.finfo(uniform.dtype).tiny, 1.0)))
        chosen = (scores + gumbel).argmax(dim=-1, keepdim=True)
        return torch.full_like(scores, float("-inf")).scatter_(1, chosen, 0.0)


class HFGenerator(TokenIdGenerator):
    backend = "hf"
    seed_rows = False  # True: each sequence samples from its own seeded stream (see the module docstring)

    def __init__(
        self,
        path: Path | str,
        *,
        batch_size: int = 64,
        device: str | None = None,
        dtype: str = "auto",
        attn_implementation: str | None = None,
    ):
        """`batch_size` counts sequences (prompts × n) decoded or scored together; `dtype` and
        `attn_implementation` as `models.ModelLoading` describes them."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        tokenizer = load_tokenizer(path)
        model = load_causal_lm(path, **loading_kwargs(dtype, attn_implementation, device))
        self._attach(str(path), model.to(device).eval(), tokenizer, batch_size)

    @classmethod
    def around(
        cls, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int = 64
    ) -> HFGenerator:
        """A generator over a model in memory: the student being trained samples its rollouts through it."""
        generator = cls.__new__(cls)
        # a copy: left padding for decoding must not leak into the trainer's tokenizer
        generator._attach(model.config.name_or_path, model, copy.deepcopy(tokenizer), batch_size)
        return generator

    def _attach(self, path: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int):
        self.path, self.model, self.tokenizer, self.batch_size = path, model, tokenizer, batch_size
        self.tokenizer.padding_side = "left"
        self.usage = Usage()
        # transformers fills every option a generate() call leaves unset from the model's own
        # generation_config.json (a repetition penalty, top-k, min-p …): a clean config stands in for it
        # while this backend decodes, so the step's sampling options are all that is used
        self.not_applied = sampling_defaults(model.generation_config)
        if self.not_applied:
            log.warning(
                "%s: its generation_config.json sets %s; not applied: the step's sampling options are used",
                path,
                ", ".join(f"{k}={v}" for k, v in self.not_applied.items()),
            )
        padded = model.get_output_embeddings().weight.shape[0] > len(tokenizer)
        self._logits_processors = LogitsProcessorList([RealTokensOnly(len(tokenizer))] if padded else [])
        self._clean_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )

    @contextlib.contextmanager
    def _own_settings_only(self) -> Iterator[None]:
        own, self.model.generation_config = self.model.generation_config, self._clean_config
        try:
            yield
        finally:
            self.model.generation_config = own

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
        """Completions of prompts given as token ids (the chat template already applied). `seeds`
        (one per prompt) are used with `seed_rows` only (see the module docstring)."""
        torch.manual_seed(sampling.seed)
        row_seeds = prompt_seeds(sampling, len(prompts), seeds) if self.seed_rows else None
        prompts_per_batch = max(1, self.batch_size // sampling.n)
        results: list[list[Completion]] = []
        for start in range(0, len(prompts), prompts_per_batch):
            batch = prompts[start : start + prompts_per_batch]
            batch_seeds = None if row_seeds is None else row_seeds[start : start + prompts_per_batch]
            results.extend(self._generate_batch(batch, sampling, batch_seeds))
            if progress:
                progress(len(batch) * sampling.n)
        return results

    @torch.inference_mode()
    def _generate_batch(
        self, prompts: Sequence[list[int]], sampling: SamplingParams, seeds: Sequence[int] | None = None
    ) -> list[list[Completion]]:
        owners = [prompt for prompt in prompts for _ in range(sampling.n)]  # the prompt of each sequence
        row_seeded = seeds is not None and not sampling.greedy
        # seeded rows are decoded as given (each prompt already n times), their tokens drawn by the processor
        padded = self.tokenizer.pad(
            {"input_ids": owners if row_seeded else list(prompts)}, return_tensors="pt"
        )
        inputs = padded.to(self.device)
        processors, sampling_kwargs = self._logits_processors, {"do_sample": False}
        if row_seeded:  # prompt i's j-th sequence from seeds[i] + j
            rows = [seed + j for seed in seeds for j in range(sampling.n)]
            processors = LogitsProcessorList([*processors, RowSeededSampling(rows, sampling, self.device)])
        elif not sampling.greedy:
            sampling_kwargs = {
                "do_sample": True,
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
                "top_k": sampling.top_k,
                "num_return_sequences": sampling.n,
            }
        stop_kwargs = (
            {"stop_strings": list(sampling.stop), "tokenizer": self.tokenizer} if sampling.stop else {}
        )
        with self._own_settings_only():
            output = self.model.generate(
                **inputs,
                logits_processor=processors,
                max_new_tokens=sampling.max_new_tokens,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
                **sampling_kwargs,
                **stop_kwargs,
            )
        new_tokens = output[:, inputs["input_ids"].shape[1] :].tolist()
        completions = [
            self._completion(ids, len(p), sampling.stop) for ids, p in zip(new_tokens, owners, strict=True)
        ]
        return self._finish_batch(owners, completions, sampling)

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
