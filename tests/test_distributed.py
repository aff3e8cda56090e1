"""Data-parallel training through `accelerate launch` matches one process with the same global batch."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from distributed_run import train

SCRIPT = Path(__file__).with_name("distributed_run.py")
# name: (objective, (per-device batch, accumulation) on one process, the same on each of two)
RUNS = {
    "sft": ("sft", (4, 1), (2, 1)),
    "kd": ("forward_kl", (4, 1), (1, 2)),  # an online teacher, and accumulation on the two processes
    "taid": ("taid", (4, 1), (2, 1)),  # a stateful objective: its t must move alike on every process
    "lora": ("sft", (4, 1), (2, 1)),  # LoRA adapters (peft) under DDP
    # FSDP2 asked for on CPU processes: accelerate enables it on accelerators only, so this trains as
    # DDP (the same weights as one process), and the trainer says so rather than pretend to shard
    "fsdp-on-cpu": ("sft", (4, 1), (2, 1)),
}


def launch_two_processes(out_dir: Path, env_home: Path, log) -> subprocess.Popen:
    """`accelerate launch` of the script on two local CPU processes joined by gloo.

    `--multi_gpu` selects the torchrun launcher, which starts the two local processes (`--cpu` would
    start one unless mpirun is configured); the script's `use_cpu=True` makes them a gloo group.
    HF_HOME points at an empty folder, so no accelerate config file of the user is read.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env.update(
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HOME=str(env_home),
        HF_HUB_OFFLINE="1",
        CUDA_VISIBLE_DEVICES="",
    )
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.accelerate_cli",
        "launch",
        "--multi_gpu",
        "--num_processes=2",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        "--main_process_port=0",  # a free port, chosen by accelerate
        str(SCRIPT),
        str(out_dir),
        *(f"{name}:{objective}:{b}:{a}" for name, (objective, _, (b, a)) in RUNS.items()),
    ]
    return subprocess.Popen(
        command,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, so a hung launch is stopped with its workers
    )


def assert_close(got: list[float], expected: list[float], what: str, rel: float = 1e-4, abs_: float = 1e-6):
    assert len(got) == len(expected), what
    assert got == pytest.approx(expected, rel=rel, abs=abs_), what


def test_two_processes_follow_the_loss_trajectory_of_one_with_the_same_global_batch(tmp_path):
    """The same global batch must give the same run on 1 or 2 processes: same logged loss, gradient
    norm and weights at every step.

    The objectives divide by the completion tokens of the global batch and compute_loss undoes DDP's
    gradient averaging; the Trainer logs the mean over processes of each process's share, which is
    then the same quantity as one process's loss. Examples have very different completion lengths,
    so a per-process normalisation or a missing scale changes the trajectory (by 4-50% in loss when
    tried), far beyond the tolerance.
    """
    two_dir = tmp_path / "two"
    two_dir.mkdir()
    log_path = tmp_path / "launch.log"
    with log_path.open("w") as log:
        launch = launch_two_processes(two_dir, tmp_path / "hf_home", log)
        try:
            # the one-process reference trains here, meanwhile
            one = {
                name: train(tmp_path / "one", name, objective, *single)
                for name, (objective, single, _) in RUNS.items()
            }
            launch.wait(timeout=240)
        finally:
            if launch.poll() is None:
                os.killpg(launch.pid, signal.SIGKILL)
                launch.wait()
    output = log_path.read_text()
    assert launch.returncode == 0, f"accelerate launch failed:\n{output[-4000:]}"

    ranks = [json.loads((two_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for name, reference in one.items():
        assert reference["world_size"] == 1 and reference["steps"] == 8
        # TAID's target moves from the student towards the teacher: its loss rises; LoRA's adapters on
        # random-token data cannot lower the loss in 8 steps, but must move
        if name not in ("taid", "lora"):
            assert reference["loss"][-1] < 0.95 * reference["loss"][0], f"{name}: training hardly moved"
        assert reference["moved"] > 1e-3, f"{name}: the trainable weights did not move"
        for rank, runs in enumerate(ranks):
            run, what = runs[name], f"{name}, rank {rank}"
            assert run["world_size"] == 2, f"{what}: not a 2-process group\n{output[-4000:]}"
            assert run["examples_per_step"] == reference["examples_per_step"] == 4
            assert run["steps"] == reference["steps"]
            assert_close(run["loss"], reference["loss"], f"{what}: logged loss per step")
            assert_close(run["grad_norm"], reference["grad_norm"], f"{what}: gradient norm per step")
            assert_close(run["parameters"], reference["parameters"], f"{what}: final weights")
            # the objective's state, but for the loss of the step under way: each process holds its share
            state, expected = run["objective_state"], reference["objective_state"]
            assert state.keys() == expected.keys(), what
            shared = [key for key in state if key != "loss"]
            assert_close(
                [state[k] or 0.0 for k in shared],
                [expected[k] or 0.0 for k in shared],
                f"{what}: objective state",
            )
    assert output.count("fsdp was asked for but accelerate did not enable it") == 2, output[
        -4000:
    ]  # each rank
    # the two processes hold one t, not two that drift apart
    assert ranks[0]["taid"]["objective_state"]["t"] == ranks[1]["taid"]["objective_state"]["t"]
    assert one["taid"]["objective_state"]["t"] > 0.4  # it moved
