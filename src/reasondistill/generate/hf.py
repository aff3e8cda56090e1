"""Generation with a local transformers model: batched, left-padded, KV-cached `model.generate`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..chat import prompt_ids
from ..records import Message
from .base import Completion, ProgressCallback, SamplingParams


class HFGenerator:
    backend = "hf"

    def __init__(
        self, path: Path, *, batch_size: int = 64, device: str | None = None, trust_remote_code: bool = False
    ):
        """`batch_size` counts sequences (prompts × n) decoded together."""
        self.path = Path(path)
        self.batch_size = batch_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.tokenizer.padding_side = "left"
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code
        )
        self.model.to(self.device).eval()

    def describe(self) -> dict:
        return {
            "backend": self.backend,
            "model": str(self.path),
            "name_or_path": self.model.config.name_or_path,
        }

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[list[Message]],
        sampling: SamplingParams,
        progress: ProgressCallback | None = None,
    ) -> list[list[Completion]]:
        torch.manual_seed(sampling.seed)
        prompts_per_batch = max(1, self.batch_size // sampling.n)
        results: list[list[Completion]] = []
        for start in range(0, len(prompts), prompts_per_batch):
            batch = prompts[start : start + prompts_per_batch]
            results.extend(self._generate_batch(batch, sampling))
            if progress:
                progress(len(batch) * sampling.n)
        return results

    def _generate_batch(
        self, prompts: Sequence[list[Message]], sampling: SamplingParams
    ) -> list[list[Completion]]:
        encoded = prompt_ids(self.tokenizer, prompts)
        inputs = self.tokenizer.pad({"input_ids": encoded}, return_tensors="pt").to(self.device)
        sampling_kwargs = (
            {"do_sample": False}
            if sampling.greedy
            else {
                "do_sample": True,
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
                "top_k": sampling.top_k,
            }
        )
        output = self.model.generate(
            **inputs,
            max_new_tokens=sampling.max_new_tokens,
            num_return_sequences=sampling.n,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            **sampling_kwargs,
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :].tolist()
        completions = [
            self._completion(ids, len(encoded[i // sampling.n])) for i, ids in enumerate(new_tokens)
        ]
        return [completions[i : i + sampling.n] for i in range(0, len(completions), sampling.n)]

    def _completion(self, ids: list[int], prompt_tokens: int) -> Completion:
        eos = self.tokenizer.eos_token_id
        finished = eos in ids
        ids = ids[: ids.index(eos) + 1] if finished else ids
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return Completion(
            text=text,
            token_ids=ids,
            finish_reason="stop" if finished else "length",
            prompt_tokens=prompt_tokens,
            completion_tokens=len(ids),
        )
