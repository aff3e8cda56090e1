import re

import pytest
import torch
from datasets import Dataset
from transformers import Qwen2Config, Qwen2ForCausalLM, TrainingArguments

from reasondistill.objectives import make_objective
from reasondistill.objectives.base import IGNORE_INDEX
from reasondistill.train.data import CompletionCollator
from reasondistill.train.trainer import DistillationTrainer


def examples():
    """Four examples with very different completion lengths, so per-micro-batch averaging would differ."""
    rows = []
    for i, (prompt, completion) in enumerate([(3, 1), (2, 9), (4, 2), (1, 6)]):
        ids = [(7 * i + j) % 40 + 2 for j in range(prompt + completion)]
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:], "length": len(ids)})
    return Dataset.from_list(rows)


def weights_after_one_step(tmp_path, batch_size, accumulation, sort_within_step=False, strategy="sequential"):
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=48,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    args = TrainingArguments(
        output_dir=str(tmp_path / f"{batch_size}x{accumulation}-{strategy}"),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        learning_rate=1.0,
        optim="sgd",  # the update is the gradient itself (Adam's first step would hide its scale)
        lr_scheduler_type="constant",
        train_sampling_strategy=strategy,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        remove_unused_columns=False,  # the sampler reads `length`, as in train_model
    )
    trainer = DistillationTrainer(
        model=model,
        args=args,
        train_dataset=examples(),
        data_collator=CompletionCollator(0),
        objective=make_objective("sft"),
        sort_within_step=sort_within_step,
    )
    trainer.train()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_gradient_accumulation_gives_the_same_update_as_one_big_batch(tmp_path):
    full = weights_after_one_step(tmp_path, 4, 1)
    assert torch.allclose(weights_after_one_step(tmp_path, 2, 2), full, atol=1e-6)
    assert torch.allclose(weights_after_one_step(tmp_path, 1, 4), full, atol=1e-6)


def test_each_step_is_a_random_draw_sorted_by_length():
    import random

    from reasondistill.train.data import SortedStepSampler

    lengths = [random.Random(i).randint(10, 200) for i in range(1000)]
    sampler = SortedStepSampler(lengths, examples_per_step=32, seed=0)
    order = list(sampler)
    assert sorted(order) == list(range(1000))  # every example exactly once per epoch
    steps = [order[i : i + 32] for i in range(0, 1000, 32)]
    assert all([lengths[i] for i in step] == sorted(lengths[i] for i in step) for step in steps)
    unsorted = (
        __import__("torch").randperm(1000, generator=__import__("torch").Generator().manual_seed(0)).tolist()
    )
    assert [sorted(step) for step in steps] == [
        sorted(unsorted[i : i + 32]) for i in range(0, 1000, 32)
    ]  # same draws
    assert list(SortedStepSampler(lengths, 32, seed=0)) == order
    sampler.set_epoch(1)
    assert list(sampler) != order


def test_sorting_within_a_step_does_not_change_the_update(tmp_path):
    """The sampler reorders examples only inside a step; with the global normaliser the update is unchanged."""
    full = weights_after_one_step(tmp_path, 4, 1)
    assert torch.allclose(
        weights_after_one_step(tmp_path, 2, 2, sort_within_step=True, strategy="random"), full, atol=1e-6
    )


@pytest.mark.parametrize("objective", ["sft", "taid"])
def test_interrupted_training_resumes_to_the_same_weights(tmp_path, tokenizer_dir, monkeypatch, objective):
    """...and the same objective state: TAID's t continues its schedule from the checkpoint instead of
    starting again at t_start (it is saved in every checkpoint)."""
    from safetensors.torch import load_file

    from reasondistill.records import TrainingExample
    from reasondistill.tasks import get_task
    from reasondistill.testbed.models import ModelShape, save_initial_model
    from reasondistill.train.hyperparameters import Hyperparameters
    from reasondistill.train.trainer import Teachers, train_model

    init, teacher = tmp_path / "init", tmp_path / "teacher"
    shape = ModelShape(hidden_size=32, num_hidden_layers=1, intermediate_size=64)
    save_initial_model(shape, tokenizer_dir, init, seed=0)
    save_initial_model(shape, tokenizer_dir, teacher, seed=1)
    teachers = Teachers(model=teacher) if objective == "taid" else None
    examples = [
        TrainingExample(problem_id=p.id, task=p.task, messages=p.messages, completion=p.solution)
        for p in get_task("arithmetic").sample("train", 48, seed=0, difficulties=[2])
    ]
    hp = Hyperparameters(
        objective=objective,
        epochs=1,
        learning_rate=1e-3,
        batch_size=4,
        gradient_accumulation_steps=2,
        save_steps=2,
        trainer_args={"disable_tqdm": True},
    )
    whole = train_model(init, examples, tmp_path / "uninterrupted", hp, resume_key="k", teachers=teachers)

    original = DistillationTrainer.training_step

    def crash_after_step_3(self, *args, **kwargs):
        if self.state.global_step == 3:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DistillationTrainer, "training_step", crash_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_model(init, examples, tmp_path / "resumed", hp, resume_key="k", teachers=teachers)
    assert (tmp_path / ".resumed.work" / "checkpoint-2").is_dir() and not (tmp_path / "resumed").exists()
    monkeypatch.setattr(DistillationTrainer, "training_step", original)

    stats = train_model(init, examples, tmp_path / "resumed", hp, resume_key="k", teachers=teachers)
    assert stats["steps"] == 6 and not (tmp_path / ".resumed.work").exists()
    assert stats["objective_state"] == whole["objective_state"]
    if objective == "taid":  # t moved off its start, and was resumed from the checkpoint, not restarted
        assert whole["objective_state"]["t"] > 0.4
    expected, got = (
        load_file(tmp_path / name / "model.safetensors") for name in ("uninterrupted", "resumed")
    )
    assert all(torch.allclose(expected[k], got[k], atol=1e-6) for k in expected)


def test_checkpoints_of_other_settings_are_not_resumed(tmp_path, tokenizer_dir, caplog):
    import logging

    from reasondistill.records import TrainingExample
    from reasondistill.testbed.models import ModelShape, save_initial_model
    from reasondistill.train.hyperparameters import Hyperparameters
    from reasondistill.train.trainer import train_model

    init = tmp_path / "init"
    save_initial_model(
        ModelShape(hidden_size=32, num_hidden_layers=1, intermediate_size=64), tokenizer_dir, init, seed=0
    )
    stale = tmp_path / ".out.work" / "checkpoint-7"
    stale.mkdir(parents=True)
    (tmp_path / ".out.work" / "resume_key").write_text("other settings")
    examples = [
        TrainingExample(
            problem_id="p", task="t", messages=[{"role": "user", "content": "1 + 1?"}], completion="2"
        )
    ]
    with caplog.at_level(logging.INFO):
        stats = train_model(
            init,
            examples,
            tmp_path / "out",
            Hyperparameters(epochs=1, trainer_args={"disable_tqdm": True}),
            resume_key="new",
        )
    assert stats["steps"] == 1 and "discarding checkpoints" in caplog.text


def test_trainer_args_cannot_silently_override_first_class_options(tmp_path, tiny_init):
    from reasondistill.errors import UserError
    from reasondistill.records import TrainingExample
    from reasondistill.train.hyperparameters import Hyperparameters
    from reasondistill.train.trainer import train_model

    examples = [
        TrainingExample(problem_id="p", task="t", messages=[{"role": "user", "content": "q"}], completion="a")
    ]
    with pytest.raises(
        UserError, match="trainer_args.learning_rate is set by reasondistill; use its own option"
    ):
        train_model(
            tiny_init, examples, tmp_path / "out", Hyperparameters(trainer_args={"learning_rate": 1.0})
        )


@pytest.fixture
def tiny_init(tmp_path, tokenizer_dir):
    from reasondistill.testbed.models import ModelShape, save_initial_model

    init = tmp_path / "init"
    save_initial_model(
        ModelShape(hidden_size=16, num_hidden_layers=1, intermediate_size=32, num_attention_heads=2),
        tokenizer_dir,
        init,
        seed=0,
    )
    return init


def truncation_examples():
    from reasondistill.records import TrainingExample

    prompt = [{"role": "user", "content": "1 + 1?"}]
    return [
        TrainingExample(problem_id="short", task="t", messages=prompt, completion="2"),
        TrainingExample(
            problem_id="long", task="t", messages=prompt, completion="1 + 1 = 2. " * 40, sample_idx=3
        ),
    ]


def test_truncation_is_counted_named_and_can_drop_the_examples(tmp_path, tiny_init, caplog):
    """A completion cut at max_length loses its final answer and end-of-turn token: the step says so,
    names the example, counts it in its statistics (and the report), and `drop` leaves it out."""
    import logging

    from reasondistill.report.render import pipeline_table
    from reasondistill.train.hyperparameters import Hyperparameters
    from reasondistill.train.trainer import train_model

    hp = dict(epochs=1, max_length=48, batch_size=2, trainer_args={"disable_tqdm": True})
    with caplog.at_level(logging.WARNING):
        cut = train_model(tiny_init, truncation_examples(), tmp_path / "cut", Hyperparameters(**hp))
    assert cut["examples"] == 2
    assert cut["truncation"]["longer_than_max_length"] == 1 and cut["truncation"]["completion_end_cut"] == 1
    assert cut["truncation"]["first"][0].startswith("long sample 3 (")
    full_length = int(cut["truncation"]["first"][0].split("(")[1].split()[0])
    assert cut["truncation"]["tokens_beyond_max_length"] == full_length - 48 > 0
    assert "1 of 2 examples are longer than max_length=48" in caplog.text and "lost their end" in caplog.text

    dropped = train_model(
        tiny_init, truncation_examples(), tmp_path / "drop", Hyperparameters(**hp, truncation="drop")
    )
    assert dropped["examples"] == 1 and dropped["truncation"]["dropped"] == 1
    assert dropped["completion_tokens"] < cut["completion_tokens"]

    manifest = {"steps": {"train:s": {"stats": {**cut, "train_loss": 1.0}, "seconds": 1}}}
    _, rows = pipeline_table(manifest)
    assert (
        f"1 examples cut at max_length=48 (their completions lost their end, {full_length - 48} completion "
        "tokens lost)" in rows[0][1]
    )


def test_every_example_longer_than_max_length_dropped_is_an_error(tmp_path, tiny_init):
    from reasondistill.errors import UserError
    from reasondistill.train.hyperparameters import Hyperparameters
    from reasondistill.train.trainer import train_model

    hp = Hyperparameters(epochs=1, max_length=48, truncation="drop", trainer_args={"disable_tqdm": True})
    with pytest.raises(UserError, match="all 1 examples are longer than max_length=48"):
        train_model(tiny_init, truncation_examples()[1:], tmp_path / "out", hp)


def test_max_length_beyond_the_model_positions_is_warned(tmp_path, tiny_init, caplog):
    import logging

    from reasondistill.train.hyperparameters import Hyperparameters
    from reasondistill.train.trainer import train_model

    hp = Hyperparameters(epochs=1, max_length=2048, trainer_args={"disable_tqdm": True})
    with caplog.at_level(logging.WARNING):
        train_model(tiny_init, truncation_examples()[:1], tmp_path / "out", hp)
    assert "max_length=2048 exceeds the 1024 positions of" in caplog.text


def test_the_student_trains_and_is_saved_in_its_dtype_with_the_attention_kernel_asked_for(
    tmp_path, tiny_init, monkeypatch
):
    """float32 (master weights) by default; bfloat16 weights train and are saved as bfloat16, and
    config.json says so (vLLM and from_pretrained(dtype="auto") read it); attn_implementation reaches
    from_pretrained."""
    import json

    from safetensors import safe_open

    from reasondistill.train import trainer
    from reasondistill.train.hyperparameters import Hyperparameters

    loads = []

    def spy(path, **kwargs):
        loads.append(kwargs)
        return load(path, **kwargs)

    load = trainer.load_causal_lm
    monkeypatch.setattr(trainer, "load_causal_lm", spy)
    hp = dict(epochs=1, max_length=48, batch_size=2, trainer_args={"disable_tqdm": True})
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        stats = trainer.train_model(
            tiny_init,
            truncation_examples(),
            out,
            Hyperparameters(**hp, dtype=dtype, attn_implementation="eager"),
        )
        assert stats["dtype"] == dtype and loads[-1]["attn_implementation"] == "eager"
        with safe_open(out / "model.safetensors", "pt") as weights:
            assert {str(weights.get_tensor(name).dtype) for name in weights.keys()} == {f"torch.{dtype}"}  # noqa: SIM118 (safe_open is not iterable)
        assert json.loads((out / "config.json").read_text())["dtype"] == dtype


def test_half_precision_weights_that_cannot_train_are_refused():
    from reasondistill.train.hyperparameters import Hyperparameters

    with pytest.raises(ValueError, match="dtype bfloat16 with precision fp16"):
        Hyperparameters(dtype="bfloat16", precision="fp16")
    with pytest.raises(ValueError, match="dtype"):
        Hyperparameters(dtype="float16")


def test_tensorboard_gets_the_loss_and_the_objectives_own_terms(tmp_path, tiny_init):
    """report_to: tensorboard writes event files (offline) holding the loss and each objective's terms:
    TAID's t, TSD-KD's direct, entropy and ranking parts."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from reasondistill.train.hyperparameters import Hyperparameters
    from reasondistill.train.trainer import Teachers, train_model

    terms = {"taid": ["t"], "tsd_kd": ["direct", "entropy", "ranking"]}
    for objective, names in terms.items():
        hp = Hyperparameters(
            objective=objective, epochs=2, max_length=48, batch_size=1, logging_steps=1,
            trainer_args={"disable_tqdm": True},
        )  # fmt: skip
        logs = tmp_path / "tensorboard" / objective
        stats = train_model(
            tiny_init, truncation_examples(), tmp_path / objective, hp, teachers=Teachers(model=tiny_init),
            report_to=["tensorboard"], logging_dir=logs,
        )  # fmt: skip
        events = EventAccumulator(str(logs))
        events.Reload()
        scalars = events.Tags()["scalars"]
        assert len(events.Scalars("train/loss")) == stats["steps"] == 4, objective
        for name in names:
            assert len(events.Scalars(f"train/{objective}/{name}")) == 4, (objective, name)
        if objective == "taid":  # the logged t is the objective's
            assert events.Scalars("train/taid/t")[-1].value == pytest.approx(stats["objective_state"]["t"])
        assert "train/learning_rate" in scalars


@pytest.mark.parametrize(
    "tracker, message",
    [("tensorbored", "report_to: unknown tracker 'tensorbored'; transformers knows"),
     ("wandb", "report_to: wandb is not installed (pip install wandb)")],
)  # fmt: skip
def test_a_tracker_that_cannot_report_is_refused_before_weights_load(tmp_path, tiny_init, tracker, message):
    from reasondistill.errors import UserError
    from reasondistill.train.hyperparameters import Hyperparameters
    from reasondistill.train.trainer import train_model

    with pytest.raises(UserError, match=re.escape(message)):
        train_model(
            tiny_init, truncation_examples(), tmp_path / "out", Hyperparameters(), report_to=[tracker]
        )
    assert not list(tmp_path.glob(".out*"))  # no work folder: refused before training started


def packing_model(seed: int, attention: str = "sdpa") -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, attn_implementation=attention,
    )  # fmt: skip
    return Qwen2ForCausalLM(config)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_examples_attend_only_within_themselves(attention):
    """An example's final hidden states packed beside others equal those it has alone."""
    from reasondistill.train.teachers import final_hidden_states

    model = packing_model(0, attention).eval()
    features = [{"input_ids": row["input_ids"], "labels": row["labels"]} for row in examples()]
    batch = CompletionCollator(0, packed=True)(features)
    assert batch["input_ids"].shape == (1, sum(len(f["input_ids"]) for f in features))  # no padding
    with torch.no_grad():
        packed = final_hidden_states(model, batch["input_ids"], {"position_ids": batch["position_ids"]})[0]
        start = 0
        for feature in features:
            ids = torch.tensor([feature["input_ids"]])
            alone = final_hidden_states(model, ids, torch.ones_like(ids))[0]
            torch.testing.assert_close(packed[start : start + len(ids[0])], alone, atol=1e-5, rtol=1e-5)
            start += len(ids[0])


def stored_rows(teacher: Qwen2ForCausalLM):
    """The teacher's top-5 at every completion token of examples(), as a store holds them."""
    from reasondistill.generate.logprobs import TokenLogprobs
    from reasondistill.train.data import SparseTeacherRows

    rows = []
    for row in examples():
        ids, start = (
            row["input_ids"],
            next(i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX),
        )
        with torch.no_grad():
            logprobs = teacher(input_ids=torch.tensor([ids])).logits[0, start - 1 : -1].log_softmax(-1)
        top, top_ids = logprobs.topk(5, dim=-1)
        scored = TokenLogprobs(
            token_ids=torch.tensor(ids[start:]).numpy(), logprobs=logprobs.gather(1, torch.tensor(ids[start:])[:, None])[:, 0].numpy(),
            topk_ids=top_ids.numpy(), topk_logprobs=top.numpy(), tail_logprob=torch.log1p(-top.exp().sum(-1)).numpy(),
        )  # fmt: skip
        rows.append(SparseTeacherRows.on_positions(scored, start, len(ids) - start))
    return rows


@pytest.mark.parametrize("case", ["sft", "online", "stored"])
def test_packing_trains_to_the_weights_of_padded_batches(tmp_path, case):
    """Two SGD steps of two examples per micro-batch, packed into one row or padded: the same weights
    (SFT, forward KL from an online teacher, and from a stored top-5)."""
    teacher = packing_model(1).eval().requires_grad_(False)
    stored = stored_rows(teacher) if case == "stored" else None
    weights = []
    for packed in (False, True):
        model = packing_model(0)
        dataset = examples().add_column("index", list(range(4)))
        args = TrainingArguments(
            output_dir=str(tmp_path / f"{case}-{packed}"), per_device_train_batch_size=2, max_steps=2,
            learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", report_to=[], save_strategy="no",
            disable_tqdm=True, dataloader_pin_memory=False, remove_unused_columns=False,
        )  # fmt: skip
        objective = make_objective("sft" if case == "sft" else "forward_kl")
        trainer = DistillationTrainer(
            model=model, args=args, train_dataset=dataset, objective=objective,
            data_collator=CompletionCollator(0, objective, stored, packed=packed),
            teacher=teacher if case == "online" else None,
        )  # fmt: skip
        trainer.train()
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(weights[1], weights[0], atol=1e-6, rtol=1e-5)
    initial = torch.cat([p.detach().flatten() for p in packing_model(0).parameters()])
    assert (weights[0] - initial).abs().max() > 1e-3  # it trained


@pytest.mark.parametrize(
    ("objective", "on_policy", "message"),
    [
        ("dpo", False, "does not apply to pairs"),
        ("forward_kl", True, "does not apply to on-policy samples"),
        ("masked_thought", False, "objective 'masked_thought', which chooses or corrupts tokens"),
        ("cwt", False, "objective 'cwt', which chooses or corrupts tokens"),
    ],
)
def test_packing_is_refused_where_examples_are_not_independent_rows(objective, on_policy, message):
    from reasondistill.errors import UserError
    from reasondistill.train.on_policy_options import OnPolicyOptions
    from reasondistill.train.trainer import Efficiency

    with pytest.raises(UserError, match=message):
        Efficiency(packing=True).check(
            make_objective(objective), OnPolicyOptions() if on_policy else None, "train:x"
        )


def test_packing_and_gradient_checkpointing_through_train_model(tmp_path, tiny_init):
    """The train stage's `packing` and `gradient_checkpointing` reach the run (the same loss as the
    padded run without checkpointing), and the statistics say the batches were packed; trainer_args
    cannot set gradient checkpointing behind the first-class option's back."""
    from reasondistill.errors import UserError
    from reasondistill.train.hyperparameters import Hyperparameters
    from reasondistill.train.trainer import Efficiency, train_model

    hp = Hyperparameters(epochs=1, max_length=96, batch_size=2, seed=3, trainer_args={"disable_tqdm": True})
    plain = train_model(tiny_init, truncation_examples(), tmp_path / "plain", hp)
    packed = train_model(
        tiny_init, truncation_examples(), tmp_path / "packed", hp,
        efficiency=Efficiency(packing=True, gradient_checkpointing=True),
    )  # fmt: skip
    assert packed["packing"] is True and plain["packing"] is False
    assert packed["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-5)
    with pytest.raises(UserError, match="trainer_args.gradient_checkpointing is set by reasondistill"):
        train_model(
            tiny_init, truncation_examples(), tmp_path / "x",
            Hyperparameters(epochs=1, trainer_args={"gradient_checkpointing": True}),
        )  # fmt: skip
