"""What a recipe says about its objective: one options model per objective, with help text.

`train.objective: NAME` and `train.objective_args: {...}` become one typed spec, the options model of
NAME (`parse_objective`); `ObjectiveSpec` is their union, discriminated by `name`. The models carry
what an objective needs (a teacher, a reference, pairs, on-policy samples), so a recipe is checked
before anything runs. This module imports pydantic only: the losses live beside it (`kd`, `policy`,
`sequence`, `preference`, `selective`, `self_distill`), each subclassing its options model, and
`build_objective` turns a spec into one of them.
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, ClassVar, Literal

from annotated_types import Ge, Gt, Le, Lt
from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic.fields import FieldInfo

from ..config import StageConfig
from ..errors import UserError


class ObjectiveOptions(StageConfig):
    """Base of the options models: `name` picks the objective, every other field is one of its options.

    `name` has no default, so that a dump without defaults (a step's identity) still says which
    objective it is.
    """

    name: str = Field(description="the objective, by registered name")

    needs_teacher: ClassVar[bool] = False
    needs_reference: ClassVar[bool] = False
    # DPO's reference is conventionally the policy it starts from; others need one named explicitly
    reference_defaults_to_init: ClassVar[bool] = False
    data: ClassVar[Literal["completions", "pairs"]] = "completions"
    # policy-gradient objectives estimate E_{y~q_θ}[·] from samples of the current weights only
    on_policy_only: ClassVar[bool] = False
    needs_rewards: ClassVar[bool] = False  # verifier rewards of groups of samples (GRPO)

    @classmethod
    def summary(cls) -> str:
        """The objective in one line: the first line of its options model's docstring (the class that
        computes it documents the rest)."""
        model = OBJECTIVES.get(cls.registered_name() or "", cls)
        return (model.__doc__ or "").strip().splitlines()[0]

    @classmethod
    def registered_name(cls) -> str | None:
        """The objective this model is the options of (its `name` Literal); None for a base class."""
        annotation = cls.model_fields["name"].annotation
        return typing.get_args(annotation)[0] if typing.get_origin(annotation) is Literal else None

    @classmethod
    def options(cls) -> dict[str, FieldInfo]:
        """The fields a recipe sets in `objective_args`: all but `name`."""
        return {key: field for key, field in cls.model_fields.items() if key != "name"}


# --- token-level distillation (kd.py) --------------------------------------------------------------


class TokenDistillationOptions(ObjectiveOptions):
    """Σ_t D(p_T(·|c_t), p_S(·|c_t)) over completion tokens, plus an optional SFT term."""

    needs_teacher = True
    temperature: float = Field(1.0, gt=0, description="softmax temperature of both models in the loss")
    sft_weight: float = Field(
        0.0, ge=0, description="weight of the completion NLL added to the divergence (DistillKit-style mix)"
    )


class ForwardKLOptions(TokenDistillationOptions):
    """Forward KL(teacher‖student) per token (mean-seeking; TRL β=0, DistillKit `kl`)."""

    name: Literal["forward_kl"]


class ReverseKLOptions(TokenDistillationOptions):
    """Reverse KL(student‖teacher) per token (mode-seeking; TRL β=1)."""

    name: Literal["reverse_kl"]


class JSDOptions(TokenDistillationOptions):
    """Generalized JSD_β(teacher‖student): β=0 forward KL, β=1 reverse KL (TRL/GKD convention)."""

    name: Literal["jsd"]
    beta: float = Field(
        0.5, ge=0, le=1, description="weight of the teacher in the mixture M = βp_T + (1−β)p_S"
    )


class SkewForwardKLOptions(TokenDistillationOptions):
    """Skew forward KL(teacher‖λ·teacher+(1−λ)·student) per token (DistiLLM)."""

    name: Literal["skew_forward_kl"]
    skew: float = Field(0.1, ge=0, lt=1, description="λ, the teacher's share of the mixture")


class SkewReverseKLOptions(TokenDistillationOptions):
    """Skew reverse KL(student‖λ·student+(1−λ)·teacher) per token (DistiLLM)."""

    name: Literal["skew_reverse_kl"]
    skew: float = Field(0.1, ge=0, lt=1, description="λ, the student's share of the mixture")


class TotalVariationOptions(TokenDistillationOptions):
    """Total variation ½·Σ|p_T − p_S| per token."""

    name: Literal["tvd"]


class AdaptiveKLOptions(TokenDistillationOptions):
    """Adaptive KL: forward KL(teacher‖student) on the teacher's head, reverse KL(student‖teacher) on its tail, weighted by the gaps."""

    name: Literal["akl"]
    head_mass: float = Field(0.5, gt=0, le=1, description="μ: cumulative teacher mass that makes up the head")


class TAIDOptions(TokenDistillationOptions):
    """TAID: KL(p_t‖student) toward p_t = softmax((1−t)·sg[z_S] + t·z_T), t rising adaptively to 1."""

    name: Literal["taid"]
    t_start: float = Field(0.4, ge=0, le=1, description="interpolation t at step 0")
    t_end: float = Field(1.0, ge=0, le=1, description="final t (1 = the teacher itself)")
    alpha: float = Field(5e-4, ge=0, description="step size of the adaptive increase of t")
    momentum: float = Field(0.99, ge=0, lt=1, description="β of the moving average of relative loss decrease")
    adaptive: bool = Field(True, description="false: t follows the linear schedule only")


# --- policy gradient on the student's own samples (policy.py) ------------------------------------


class ReverseKLPolicyGradientOptions(ObjectiveOptions):
    """Per-token reverse KL(student‖teacher) as a policy-gradient advantage: −sg[log p_T(y_t) − log q_θ(y_t)]·log q_θ(y_t)."""

    name: Literal["reverse_kl_pg"]
    needs_teacher = True
    on_policy_only = True


class GRPOOptions(ObjectiveOptions):
    """GRPO on verifier rewards: −Â_i·exp(ℓ_t − sg[ℓ_t]) per token, Â the group-normalised reward."""

    name: Literal["grpo"]
    on_policy_only = True
    needs_rewards = True
    scale_rewards: bool = Field(
        True, description="divide advantages by the group's reward std (false: Dr. GRPO, mean-centred only)"
    )


class KDRLOptions(GRPOOptions):
    """KDRL: GRPO on verifier rewards + β·k(log q_θ(y_t) − log p_T(y_t)), a sampled reverse KL(student‖teacher) per token."""

    name: Literal["kdrl"]
    needs_teacher = True
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k2", description="sampled reverse-KL estimator")
    kd_coef: float = Field(5e-3, ge=0, description="β at the start of training")
    kd_coef_end: float | None = Field(1e-3, ge=0, description="β at the end (None: constant kd_coef)")
    kd_schedule: Literal["linear", "cosine"] = Field("linear", description="how β moves from start to end")
    kd_on: Literal["all", "incorrect"] = Field(
        "all", description="incorrect: the KL term only on samples whose reward is below 1"
    )


# --- sequence level: the teacher's text alone (sequence.py) ---------------------------------------


class SFTOptions(ObjectiveOptions):
    """SFT: negative log-likelihood of the completion tokens under the student."""

    name: Literal["sft"]


class MaskedThoughtOptions(ObjectiveOptions):
    """Masked Thought (MFT): completion NLL with each completion input token masked with probability p(progress)."""

    name: Literal["masked_thought"]
    max_rate: float = Field(0.2, ge=0, le=1, description="p_max, the mask probability after the warm-up")
    warmup_fraction: float = Field(
        2 / 3, ge=0, le=1, description="fraction of training over which p rises linearly from 0 to p_max"
    )
    replacement: Literal["pad", "random"] = Field(
        "pad", description="what a masked token becomes: the pad token, or a uniformly random token id"
    )


class ChunkWiseTrainingOptions(ObjectiveOptions):
    """Skip-Thinking CWT: completion NLL on one randomly chosen chunk of each completion, earlier chunks as context."""

    name: Literal["cwt"]
    chunking: Literal["lines", "average"] = Field(
        "lines",
        description="lines: whole lines grouped to ≥ min_chunk_tokens; average: `chunks` equal pieces",
    )
    min_chunk_tokens: int = Field(16, ge=1, description="lines chunking: fewest tokens in a chunk")
    chunks: int = Field(4, ge=1, description="average chunking: pieces per completion")


# --- pairs of a correct and an incorrect completion (preference.py) -------------------------------


class PairOptions(ObjectiveOptions):
    """Objectives on (chosen, rejected) pairs: rows 0..P−1 chosen, P..2P−1 rejected."""

    data: ClassVar[Literal["completions", "pairs"]] = "pairs"


class REDIOptions(PairOptions):
    """REDI stage 2: −c⁺·log π(y⁺)/|y⁺| + c⁻·log π(y⁻)/|y⁻| per pair, reference-free, c⁻ < c⁺."""

    name: Literal["redi"]
    chosen_coef: float = Field(1.0, ge=0, description="c⁺, weight of the positive's mean log-prob")
    rejected_coef: float = Field(
        0.8, ge=0, description="c⁻ (the paper's α), weight of the negative's; keep < c⁺"
    )
    negative_weighting: bool = Field(False, description="multiply the negative term by exp(γ·log π(y⁻)/|y⁻|)")
    negative_weighting_gamma: float = Field(1.0, description="γ of the negative weighting")
    detach_negative_weight: bool = Field(
        False, description="treat the negative weighting as a constant (the reference code does not)"
    )


class DPOOptions(PairOptions):
    """DPO: −log σ(β·[(log π(y⁺) − log π_ref(y⁺)) − (log π(y⁻) − log π_ref(y⁻))]) per pair."""

    name: Literal["dpo"]
    needs_reference = True
    reference_defaults_to_init = True
    beta: float = Field(0.1, gt=0, description="β, inverse strength of the implicit KL to the reference")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="ε of conservative DPO (0: plain DPO)")


class SimPOOptions(PairOptions):
    """SimPO: −log σ(β·log π(y⁺)/|y⁺| − β·log π(y⁻)/|y⁻| − γ) per pair, reference-free."""

    name: Literal["simpo"]
    beta: float = Field(2.0, gt=0, description="β, scale of the length-normalised reward")
    gamma: float = Field(
        1.0, description="γ, target reward margin (γ = β · gamma_beta_ratio of the official code)"
    )


class AFTOptions(PairOptions):
    """AFT: token-mean NLL(y⁺) + log(1 + exp(s(y⁻) − s(y⁺))) + constraint per pair, s = log π(y)/|y|."""

    name: Literal["aft"]
    constraint: Literal["detach", "boundary"] = Field(
        "detach", description="detach: negatives get no gradient; boundary: keep s(n) above sg[s(p)] − γ"
    )
    boundary_margin: float = Field(1.0, ge=0, description="γ of the boundary constraint, in nats per token")
    sft_weight: float = Field(1.0, ge=0, description="weight of the positive's token-mean NLL")


# --- token-selective distillation (selective.py) --------------------------------------------------


class TSDKDOptions(ObjectiveOptions):
    """TSD-KD: Σ w_t·JSD_β(teacher‖student)/N + mean high-entropy H(student) + α·ListMLE(teacher order of student top-K)."""

    name: Literal["tsd_kd"]
    needs_teacher = True
    beta: float = Field(
        0.9, ge=0, le=1, description="β: the teacher's weight in the JSD mixture M = βp_T + (1−β)p_S"
    )
    temperature: float = Field(1.0, gt=0, description="softmax temperature of both models in all three terms")
    entropy_quantile: float = Field(
        0.1, ge=0, le=1, description="q: student entropies at or above their q-quantile enter the regulariser"
    )
    entropy_weight: float = Field(1.0, ge=0, description="weight of the entropy regulariser")
    top_k: int = Field(10, ge=2, description="K: student candidates the teacher re-ranks at each position")
    alpha: float = Field(0.1, ge=0, description="α: weight of the ranking (indirect distillation) term")
    ranking_entropy_share: float = Field(
        0.1,
        gt=0,
        le=1,
        description="the ranking term covers each sequence's first positions holding this share of its entropy",
    )


class FIRSTOptions(ObjectiveOptions):
    """FIRST: KL(teacher top-k target‖student) over the teacher's top-k ids (renormalised, or + one tail bin)."""

    name: Literal["first"]
    needs_teacher = True
    k: int = Field(5, ge=1, description="teacher tokens per position that make up the target")
    tail: bool = Field(False, description="add the rest of each distribution as one extra bin (k + 1 bins)")
    epsilon: float = Field(1e-6, gt=0, description="ε of the (p + ε)/Σ(p + ε) renormalisation (tail: false)")
    teacher_temperature: float = Field(
        1.0,
        gt=0,
        description="calibration temperature T of the target bins (see fit_calibration_temperature)",
    )


class AdaSPECOptions(ObjectiveOptions):
    """AdaSPEC: forward KL(teacher‖student) on the tokens where it exceeds the reference draft's KL(teacher‖reference) most."""

    name: Literal["adaspec"]
    needs_teacher = True
    needs_reference = True
    keep_fraction: float = Field(
        0.4, gt=0, le=1, description="k: the share of tokens (largest Δ) that is trained"
    )


# --- self-distillation (self_distill.py) ----------------------------------------------------------


class CurioSFTOptions(ObjectiveOptions):
    """CurioSFT: NLL + α·½·(log π_θ(y_t) − log softmax(sg[z_t]/τ_t)(y_t))², τ_t heated per token by entropy."""

    name: Literal["curio_sft"]
    alpha: float = Field(
        1.0, ge=0, description="weight of the self-distillation term (hard-coded 1 in the paper)"
    )
    tau_min: float = Field(1.1, gt=0, description="lowest per-token temperature of the self-teacher")
    tau_max: float = Field(
        1.5, gt=0, validate_default=True, description="highest per-token temperature of the self-teacher"
    )
    top_n: int = Field(
        512, ge=2, description="the entropies that set τ are over each position's top-n logits"
    )
    entropy_midpoint: float = Field(
        1.2,
        description="H_now at which the entropy increase δ is half its maximum (δ = max·σ(slope·(H_now − mid)))",
    )
    entropy_slope: float = Field(2.0, description="slope of the sigmoid that sets the entropy increase δ")
    max_entropy_increase: float = Field(
        0.5, ge=0, description="the largest entropy increase δ the heating aims for"
    )
    bisection_steps: int = Field(20, ge=0, description="bisection steps that solve for τ")
    deterministic_entropy: float = Field(
        0.03, ge=0, description="positions whose full-vocabulary entropy is at most this get tau_min"
    )

    @field_validator("tau_max")
    @classmethod
    def _at_least_tau_min(cls, tau_max: float, info: ValidationInfo) -> float:
        if tau_max < info.data.get("tau_min", 0.0):
            raise ValueError("must be at least tau_min")
        return tau_max


# --- the union -------------------------------------------------------------------------------------

ObjectiveSpec = Annotated[
    ForwardKLOptions
    | ReverseKLOptions
    | JSDOptions
    | SkewForwardKLOptions
    | SkewReverseKLOptions
    | TotalVariationOptions
    | AdaptiveKLOptions
    | TAIDOptions
    | ReverseKLPolicyGradientOptions
    | GRPOOptions
    | KDRLOptions
    | SFTOptions
    | MaskedThoughtOptions
    | ChunkWiseTrainingOptions
    | REDIOptions
    | DPOOptions
    | SimPOOptions
    | AFTOptions
    | TSDKDOptions
    | FIRSTOptions
    | AdaSPECOptions
    | CurioSFTOptions,
    Field(discriminator="name"),
]

# name → options model, in the order of the union
OBJECTIVES: dict[str, type[ObjectiveOptions]] = {
    cls.registered_name(): cls for cls in typing.get_args(typing.get_args(ObjectiveSpec)[0])
}


def parse_objective(name: str, args: Mapping[str, Any] | None = None) -> ObjectiveSpec:
    """The typed spec of a recipe's `objective: NAME` and `objective_args: {...}`, or a one-line
    UserError naming the unknown objective or the bad `objective_args` key."""
    try:
        cls = OBJECTIVES[name]
    except KeyError:
        raise UserError(f"unknown objective {name!r}; known objectives: {', '.join(OBJECTIVES)}") from None
    args = dict(args or {})
    if unknown := [key for key in args if key not in cls.options()]:
        known = f"{name}'s options: {', '.join(cls.options())}" if cls.options() else f"{name} has no options"
        raise UserError(
            f"objective {name}: objective_args.{unknown[0]}: Extra inputs are not permitted ({known})"
        )
    try:
        return cls.model_validate({**args, "name": name})
    except ValidationError as err:
        problem = err.errors(include_url=False)[0]
        where = ".".join(["objective_args", *map(str, problem["loc"])])
        raise UserError(f"objective {name}: {where}: {problem['msg']} (got {problem['input']!r})") from None


# --- help text -------------------------------------------------------------------------------------


def _type_text(annotation: Any) -> str:
    """`float`, `int | None`, `lines | average` (a Literal's choices)."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " | ".join(str(choice) for choice in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_text(part) for part in typing.get_args(annotation))
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _bounds_text(field: FieldInfo) -> str:
    """The field's numeric constraints: ` > 0`, ` in [0, 1)`, or ''."""
    lower = upper = None
    for rule in field.metadata:
        if isinstance(rule, Gt | Ge):
            lower = ("(" if isinstance(rule, Gt) else "[", getattr(rule, "gt", getattr(rule, "ge", None)))
        elif isinstance(rule, Lt | Le):
            upper = (")" if isinstance(rule, Lt) else "]", getattr(rule, "lt", getattr(rule, "le", None)))
    if lower and upper:
        return f" in {lower[0]}{lower[1]}, {upper[1]}{upper[0]}"
    if lower:
        return f" {'>' if lower[0] == '(' else '≥'} {lower[1]}"
    if upper:
        return f" {'<' if upper[0] == ')' else '≤'} {upper[1]}"
    return ""


def _value_text(value: Any) -> str:
    """A default as a recipe writes it: 1.0, 0.666667, true, null, pad."""
    if isinstance(value, float):
        return repr(value) if len(repr(value)) <= 8 else f"{value:.6g}"
    return value if isinstance(value, str) else json.dumps(value)


def _needs_text(cls: type[ObjectiveOptions]) -> str:
    """What the objective needs besides completions: `needs: a teacher, on_policy (fraction 1)`, or ''."""
    needs = []
    if cls.needs_teacher:
        needs.append("a teacher")
    if cls.needs_reference:
        needs.append(
            "a reference model" + (" (default: the init weights)" if cls.reference_defaults_to_init else "")
        )
    if cls.data == "pairs":
        needs.append("pairs (a curate step with pairs: true)")
    if cls.on_policy_only:
        needs.append("on_policy (fraction 1)")
    if cls.needs_rewards:
        needs.append("on_policy.samples_per_prompt ≥ 2")
    return "needs: " + ", ".join(needs) if needs else ""


def describe_objectives(names: Iterable[str] | None = None) -> str:
    """Every objective (or those named) with its summary, needs and options (name, type, default,
    help), for `reasondistill objectives` and `train --help`."""
    blocks = []
    for name in names if names is not None else OBJECTIVES:
        cls = OBJECTIVES[name]
        lines = [f"{name}: {cls.summary()}"]
        if needs := _needs_text(cls):
            lines.append(f"  {needs}")
        rows = [
            (
                key,
                f"{_type_text(field.annotation)}{_bounds_text(field)} = {_value_text(field.default)}",
                field.description or "",
            )
            for key, field in cls.options().items()
        ]
        key_width = max((len(row[0]) for row in rows), default=0)
        type_width = max((len(row[1]) for row in rows), default=0)
        lines += [f"  {key:<{key_width}}  {kind:<{type_width}}  {help_}" for key, kind, help_ in rows]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
