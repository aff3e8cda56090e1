"""The decoding options of every stage that samples from a model."""

from __future__ import annotations

from pydantic import Field

from ..config import StageConfig
from .base import MaxNewTokens, Samples, SamplingParams, Seed, StopStrings, Temperature, TopK, TopP


class SamplingOptions(StageConfig):
    """Decoding options shared by every stage that generates (generate, eval); the fields and their
    bounds are `SamplingParams`' (see base.py), with a stage's defaults."""

    n: Samples = Field(4, description="completions per problem")
    temperature: Temperature = 0.8
    top_p: TopP = 1.0
    top_k: TopK = 0
    max_new_tokens: MaxNewTokens = Field(
        4096,
        description="completion token limit, sized for reasoning models (longer ones are cut and unparseable)",
    )
    stop: StopStrings = []
    batch_size: int = Field(64, ge=1, description="sequences decoded together (hf)")
    seed: Seed = 0

    def sampling(self, n: int, temperature: float, seed: int) -> SamplingParams:
        return SamplingParams(
            n=n,
            temperature=temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_new_tokens=self.max_new_tokens,
            seed=seed,
            stop=tuple(self.stop),
        )
