"""Typed objective specs (objectives/options.py): recipe form → spec, one-line errors, help text, and
objectives built from specs that keep the defaults and losses of the untyped registry they replaced."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from pydantic import TypeAdapter

from reasondistill.errors import UserError
from reasondistill.objectives import (
    OBJECTIVES,
    ObjectiveSpec,
    build_objective,
    describe_objectives,
    make_objective,
    parse_objective,
)
from reasondistill.objectives.base import ObjectiveInputs
from reasondistill.objectives.heads import Head
from reasondistill.objectives.options import CurioSFTOptions, JSDOptions, TAIDOptions

# Each objective's options at their defaults, and its loss on `small_inputs`, as the registry before
# the typed specs (commit 86bc714's `OBJECTIVES[name]()` and `make_objective(name)`) gave them.
OLD_DEFAULTS = {
    "forward_kl": {"temperature": 1.0, "sft_weight": 0.0},
    "reverse_kl": {"temperature": 1.0, "sft_weight": 0.0},
    "jsd": {"temperature": 1.0, "sft_weight": 0.0, "beta": 0.5},
    "skew_forward_kl": {"temperature": 1.0, "sft_weight": 0.0, "skew": 0.1},
    "skew_reverse_kl": {"temperature": 1.0, "sft_weight": 0.0, "skew": 0.1},
    "tvd": {"temperature": 1.0, "sft_weight": 0.0},
    "akl": {"temperature": 1.0, "sft_weight": 0.0, "head_mass": 0.5},
    "taid": {
        "temperature": 1.0, "sft_weight": 0.0, "t_start": 0.4, "t_end": 1.0, "alpha": 0.0005, "momentum": 0.99,
        "adaptive": True,
    },
    "reverse_kl_pg": {},
    "grpo": {"scale_rewards": True},
    "kdrl": {
        "scale_rewards": True, "kl_estimator": "k2", "kd_coef": 0.005, "kd_coef_end": 0.001,
        "kd_schedule": "linear", "kd_on": "all",
    },
    "sft": {},
    "masked_thought": {"max_rate": 0.2, "warmup_fraction": 2 / 3, "replacement": "pad"},
    "cwt": {"chunking": "lines", "min_chunk_tokens": 16, "chunks": 4},
    "redi": {
        "chosen_coef": 1.0, "rejected_coef": 0.8, "negative_weighting": False, "negative_weighting_gamma": 1.0,
        "detach_negative_weight": False,
    },
    "dpo": {"beta": 0.1, "label_smoothing": 0.0},
    "simpo": {"beta": 2.0, "gamma": 1.0},
    "aft": {"constraint": "detach", "boundary_margin": 1.0, "sft_weight": 1.0},
    "tsd_kd": {
        "beta": 0.9, "temperature": 1.0, "entropy_quantile": 0.1, "entropy_weight": 1.0, "top_k": 10, "alpha": 0.1,
        "ranking_entropy_share": 0.1,
    },
    "first": {"k": 5, "tail": False, "epsilon": 1e-06, "teacher_temperature": 1.0},
    "adaspec": {"keep_fraction": 0.4},
    "curio_sft": {
        "alpha": 1.0, "tau_min": 1.1, "tau_max": 1.5, "top_n": 512, "entropy_midpoint": 1.2, "entropy_slope": 2.0,
        "max_entropy_increase": 0.5, "bisection_steps": 20, "deterministic_entropy": 0.03,
    },
}  # fmt: skip

OLD_LOSSES = {
    "forward_kl": 2.433274745941162,
    "reverse_kl": 2.724243640899658,
    "jsd": 0.3880622088909149,
    "skew_forward_kl": 1.2738914489746094,
    "skew_reverse_kl": 1.3321846723556519,
    "tvd": 0.7349554896354675,
    "akl": 2.60109543800354,
    "taid": 0.4557158350944519,
    "reverse_kl_pg": 0.7100179195404053,
    "grpo": -0.17675168812274933,
    "kdrl": -0.15450957417488098,
    "sft": 4.125644683837891,
    "masked_thought": 4.125644683837891,
    "cwt": 4.125644683837891,
    "redi": 0.8447718620300293,
    "dpo": 0.8684670329093933,
    "simpo": 1.9082825183868408,
    "aft": 4.820345878601074,
    "tsd_kd": 3.9559857845306396,
    "first": 1.431438684463501,
    "adaspec": 1.4786953926086426,
    "curio_sft": 4.340553283691406,
}


def small_inputs(needs_teacher: bool, needs_reference: bool, pairs: bool) -> ObjectiveInputs:
    """8 positions over a vocabulary of 11 in 4 sequences of 3, 1, 2 and 2 tokens (2 pairs), two
    GRPO groups with one correct sample each; logits from a fixed seed."""
    generator = torch.Generator().manual_seed(19)
    n, vocab = 8, 11

    def logits():
        return 2 * torch.randn(n, vocab, generator=generator)

    student, teacher, reference = Head(logits()), Head(logits()), Head(logits())
    return ObjectiveInputs(
        student=student,
        labels=torch.randint(vocab, (n,), generator=generator),
        normaliser=2 if pairs else n,
        sequence=torch.tensor([0, 0, 0, 1, 2, 2, 3, 3]),
        num_sequences=4,
        teacher=teacher if needs_teacher else None,
        reference=reference if needs_reference else None,
        rewards=torch.tensor([1.0, 0.0, 0.0, 1.0]),
        groups=torch.tensor([0, 0, 1, 1]),
        progress=0.3,
        chunk_size=3,
    )


def test_the_registry_holds_the_old_objectives_in_their_order():
    assert list(OBJECTIVES) == list(OLD_DEFAULTS)


@pytest.mark.parametrize("name", list(OLD_DEFAULTS))
def test_defaults_are_the_old_constructors(name):
    spec = parse_objective(name, {})
    assert spec.name == name
    assert spec.model_dump(exclude={"name"}) == OLD_DEFAULTS[name]


@pytest.mark.parametrize("name", list(OLD_LOSSES))
def test_built_objective_gives_the_old_loss(name):
    spec = parse_objective(name)
    objective = build_objective(spec)
    assert isinstance(objective, type(spec)) and objective.model_dump() == spec.model_dump()
    inputs = small_inputs(spec.needs_teacher, spec.needs_reference, spec.data == "pairs")
    assert objective(inputs).item() == pytest.approx(OLD_LOSSES[name], rel=1e-6)


def test_options_reach_the_built_objective():
    spec = parse_objective("taid", {"t_start": 0.2, "adaptive": False})
    assert isinstance(spec, TAIDOptions)
    taid = build_objective(spec)
    assert (taid.t_start, taid.adaptive, taid.t) == (0.2, False, 0.2)
    assert make_objective("jsd", {"beta": 0.0})(small_inputs(True, False, False)).item() == pytest.approx(
        OLD_LOSSES["forward_kl"], rel=1e-6
    )  # β = 0 is the forward KL


def test_the_union_is_discriminated_by_name():
    adapter = TypeAdapter(ObjectiveSpec)
    spec = adapter.validate_python({"name": "jsd", "beta": 0.25})
    assert isinstance(spec, JSDOptions) and spec.beta == 0.25
    assert adapter.validate_python({"name": "sft"}) == parse_objective("sft")
    # a dump without defaults (a step's identity) still names the objective: jsd ≠ forward_kl
    assert parse_objective("jsd").identity() == {"name": "jsd"}
    assert adapter.dump_python(parse_objective("jsd", {"beta": 0.0}), exclude_defaults=True) == {
        "name": "jsd",
        "beta": 0.0,
    }


def test_a_typo_names_the_key_and_the_options_in_one_line():
    with pytest.raises(UserError) as err:
        parse_objective("forward_kl", {"temprature": 2.0})
    assert str(err.value) == (
        "objective forward_kl: objective_args.temprature: Extra inputs are not permitted "
        "(forward_kl's options: temperature, sft_weight)"
    )
    with pytest.raises(UserError, match=r"^objective sft: objective_args.beta: .* \(sft has no options\)$"):
        parse_objective("sft", {"beta": 0.1})
    with pytest.raises(UserError, match=r"^objective jsd: objective_args.name: Extra inputs"):
        parse_objective("jsd", {"name": "forward_kl"})  # `objective` picks it, not objective_args


def test_bad_values_and_names_fail_in_one_line():
    with pytest.raises(UserError) as err:
        parse_objective("jsd", {"beta": 2})
    assert (
        str(err.value)
        == "objective jsd: objective_args.beta: Input should be less than or equal to 1 (got 2)"
    )
    with pytest.raises(UserError, match=r"^objective kdrl: objective_args.kd_on: Input should be 'all' or"):
        parse_objective("kdrl", {"kd_on": "some"})
    with pytest.raises(UserError, match=r"objective curio_sft: objective_args.tau_max: .*at least tau_min"):
        parse_objective("curio_sft", {"tau_min": 2.0})  # the default tau_max 1.5 is below it
    assert CurioSFTOptions(name="curio_sft", tau_min=1.2, tau_max=1.2).tau_max == 1.2
    with pytest.raises(UserError) as err:
        parse_objective("kl")
    assert str(err.value).startswith(
        "unknown objective 'kl'; known objectives: forward_kl, reverse_kl, jsd, "
    )
    assert "\n" not in str(err.value)


def test_help_text_lists_every_option_with_type_default_and_help():
    text = describe_objectives()
    for name, cls in OBJECTIVES.items():
        assert f"{name}: {cls.summary()}" in text
        for option, field in cls.options().items():
            assert option in text and field.description in text
    jsd = describe_objectives(["jsd"]).splitlines()
    assert jsd[:2] == [
        "jsd: Generalized JSD_β(teacher‖student): β=0 forward KL, β=1 reverse KL (TRL/GKD convention).",
        "  needs: a teacher",
    ]
    assert (
        jsd[-1]
        == "  beta         float in [0, 1] = 0.5  weight of the teacher in the mixture M = βp_T + (1−β)p_S"
    )
    dpo = describe_objectives(["dpo", "kdrl"])
    assert "needs: a reference model (default: the init weights), pairs" in dpo
    assert "kd_coef_end    float | None ≥ 0 = 0.001" in dpo
    assert "kd_on          all | incorrect = all" in dpo


def test_specs_parse_and_print_without_torch():
    code = (
        "import sys\n"
        "from reasondistill.objectives import describe_objectives, parse_objective\n"
        "assert parse_objective('jsd', {'beta': 0.3}).beta == 0.3\n"
        "describe_objectives()\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
