"""Sharded setups the loss is not correct under (FSDP1) or that cannot run are refused in one line,
before any weights load; FSDP2 and ZeRO-3 (checked for exactness in test_distributed.py), DDP and
ZeRO-2 pass."""

import importlib.util
import json

import pytest

from reasondistill.cli import main
from reasondistill.errors import UserError
from reasondistill.train.sharding import check_sharding

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


@pytest.mark.parametrize(
    ("trainer_args", "environ"),
    [
        ({}, {}),  # one process or DDP
        ({"fsdp": "full_shard"}, {}),  # transformers' FSDP2 by default
        ({"fsdp": "full_shard", "fsdp_config": {"version": 2, "reshard_after_forward": True}}, {}),
        ({}, {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}),  # an accelerate config with FSDP2
        *(
            [
                ({"deepspeed": {"zero_optimization": {"stage": "auto"}}}, {}),
                ({"deepspeed": {"zero_optimization": {"stage": 3}}}, {}),  # run inside the head's forward
                ({}, {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}),
            ]
            if HAS_DEEPSPEED
            else []
        ),
    ],
)
def test_setups_the_loss_is_correct_under_pass(trainer_args, environ):
    check_sharding(trainer_args, environ, "train:x")


@pytest.mark.parametrize(
    ("trainer_args", "environ", "message"),
    [
        ({"fsdp": "full_shard", "fsdp_config": {"version": 1}}, {}, "FSDP version 1 flattens"),
        ({}, {"ACCELERATE_USE_FSDP": "true"}, "FSDP version 1 flattens"),  # accelerate's default is FSDP1
        (
            {"fsdp": "full_shard", "fsdp_config": {"reshard": True}},
            {},
            "fsdp_config.reshard: unknown FSDP option",
        ),
        ({"deepspeed": "missing.json"}, {}, "trainer_args.deepspeed: missing.json not found"),
    ],
)
def test_setups_the_loss_is_not_correct_under_are_refused(trainer_args, environ, message):
    with pytest.raises(UserError, match=message) as refused:
        check_sharding(trainer_args, environ, "train:x")
    assert "\n" not in str(refused.value)


def test_zero_2_needs_deepspeed_installed(tmp_path):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_batch_size": "auto"}))
    if HAS_DEEPSPEED:
        check_sharding({"deepspeed": str(config)}, {}, "train:x")
    else:
        with pytest.raises(UserError, match="DeepSpeed is asked for but not installed"):
            check_sharding({"deepspeed": str(config)}, {}, "train:x")


def test_the_train_stage_refuses_fsdp1_before_loading_weights(testbed, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(
        json.dumps({"problem_id": "p", "task": "t", "messages": [{"role": "user", "content": "1+1"}],
                    "completion": "2", "sample_idx": 0}) + "\n"
    )  # fmt: skip
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exited:
        main(["train", "--run-dir", str(run), "--name", "s", "--init", "testbed:student", "--data", str(data),
              "--trainer-args", json.dumps({"fsdp": "full_shard", "fsdp_config": {"version": 1}})])  # fmt: skip
    assert exited.value.code == 2
    assert "FSDP version 1 flattens the parameters" in capsys.readouterr().err
    assert not run.exists()  # the run directory it created is gone: nothing was written
