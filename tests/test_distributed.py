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


def launch_two_processes(command: list[str], env_home: Path, log) -> subprocess.Popen:
    """`accelerate launch` of `command` (a script and its arguments, or `-m module …`) on two local
    CPU processes joined by gloo.

    `--multi_gpu` selects the torchrun launcher, which starts the two local processes (`--cpu` would
    start one unless mpirun is configured); without an accelerator the processes join as a gloo
    group (`use_cpu=True` in the script; reasondistill's trainer sets it itself).
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
    launch = [
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
    ]
    return subprocess.Popen(
        [*launch, *command],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, so a hung launch is stopped with its workers
    )


def finished(launch: subprocess.Popen, timeout: float) -> int:
    """The launch's exit status; one still running after `timeout` is killed with its workers."""
    try:
        return launch.wait(timeout=timeout)
    finally:
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGKILL)
            launch.wait()


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
    runs = [f"{name}:{objective}:{b}:{a}" for name, (objective, _, (b, a)) in RUNS.items()]
    with log_path.open("w") as log:
        launch = launch_two_processes([str(SCRIPT), str(two_dir), *runs], tmp_path / "hf_home", log)
        try:
            # the one-process reference trains here, meanwhile
            one = {
                name: train(tmp_path / "one", name, objective, *single)
                for name, (objective, single, _) in RUNS.items()
            }
        finally:
            returncode = finished(launch, timeout=240)
    output = log_path.read_text()
    assert returncode == 0, f"accelerate launch failed:\n{output[-4000:]}"

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


# The stage, as a user runs it: `accelerate launch -m reasondistill run recipe.yaml`. Steps that are not
# training run on process 0; each train step runs in both processes. SGD: Adam divides each update by
# the gradient's running RMS, which turns the last-bit differences of a sum taken in another order
# (1e-9, on weights whose gradient is nearly zero) into differences of the learning rate's size.
STAGE_RECIPE = """
run_dir: {run_dir}
seed: 0
defaults:
  train: {{init: "testbed:student", data: all, epochs: 2, batch_size: {batch}, max_length: 256,
           learning_rate: 0.5, warmup_ratio: 0, logging_steps: 1, trainer_args: {{optim: sgd}}}}
steps:
  - problems: {{tasks: [arithmetic], train: 16, test: 4}}
  - generate: {{model: "testbed:teacher", name: teacher, n: 1, temperature: 0.8, max_new_tokens: 160}}
  - score: {{name: top5, model: "testbed:teacher", traces: teacher, top_k: 5}}
  - verify: {{traces: teacher}}
  # trains proxy students on process 0 alone, while the other process waits
  - select_teacher: {{name: pick, teachers: [teacher], student: "testbed:student", max_length: 256,
                     proxy: {{steps: 2, max_length: 256, batch_size: 4, problems: 4, max_new_tokens: 16}}}}
  - curate: {{name: all, traces: teacher, keep: [correct, incorrect, unparseable]}}
  - train: {{name: sft, objective: sft}}
  - train: {{name: kd, objective: forward_kl, teacher: "testbed:teacher"}}
  - train: {{name: kd-stored, objective: forward_kl, teacher_logprobs: top5}}
  - train: {{name: gkd, objective: jsd, objective_args: {{beta: 0.5}}, teacher: "testbed:teacher",
            on_policy: {{fraction: 0.5, max_new_tokens: 16}}}}
"""
TRAINED = ("sft", "kd", "kd-stored", "gkd")


def test_the_train_stage_on_two_processes_writes_once_and_trains_as_one(testbed, tmp_path):
    """`accelerate launch -m reasondistill run` on 2 processes with 4 examples each per step gives the
    weights of the one-process run with 8: SFT, forward KL from an online teacher and from a stored
    top-5, and on-policy GKD (λ = 0.5, each process sampling its share of the step's prompts with
    per-prompt seeds). Process 0 alone writes: one manifest record per step, one model per train
    step, nothing left of the tokenized data, the checkpoints or the staging folders."""
    import pyarrow.parquet as pq
    from safetensors.torch import load_file

    from reasondistill.cli import main

    recipes = {}
    for name, batch in (("one", 8), ("two", 4)):
        recipes[name] = tmp_path / f"{name}.yaml"
        recipes[name].write_text(STAGE_RECIPE.format(run_dir=tmp_path / name, batch=batch))
    log_path = tmp_path / "launch.log"
    with log_path.open("w") as log:
        launch = launch_two_processes(
            ["-m", "reasondistill", "run", str(recipes["two"])], tmp_path / "hf_home", log
        )
        try:
            main(["run", str(recipes["one"])])  # the one-process reference, meanwhile
        finally:
            returncode = finished(launch, timeout=300)
    output = log_path.read_text()
    assert returncode == 0, f"accelerate launch failed:\n{output[-4000:]}"

    manifests = {name: json.loads((tmp_path / name / "manifest.json").read_text()) for name in recipes}
    assert list(manifests["two"]["steps"]) == list(manifests["one"]["steps"])
    assert len(manifests["two"]["steps"]) == 10
    proxy = manifests["two"]["steps"]["select_teacher:pick"]["stats"]
    assert proxy == manifests["one"]["steps"]["select_teacher:pick"]["stats"]
    checkpoints = tmp_path / "two" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == sorted(
        TRAINED
    )  # no .work, .tokens, .teacher, .final
    for name in TRAINED:
        stats = {run: manifests[run]["steps"][f"train:{name}"]["stats"] for run in recipes}
        assert stats["one"]["processes"] == 1 and stats["two"]["processes"] == 2, name
        assert stats["one"]["steps"] == stats["two"]["steps"] == 4, name
        assert not any(p.name.startswith("checkpoint-") for p in (checkpoints / name).iterdir()), name
        one = load_file(tmp_path / "one" / "checkpoints" / name / "model.safetensors")
        two = load_file(checkpoints / name / "model.safetensors")
        moved = max(float((one[k] - two[k]).abs().max()) for k in one)
        assert moved < 1e-6, f"{name}: the 2-process weights differ from the 1-process ones by {moved:.2e}"
        assert [loss for _, loss in stats["two"]["loss_curve"]] == pytest.approx(
            [loss for _, loss in stats["one"]["loss_curve"]], rel=1e-5
        ), name
    # on-policy: the step's samples came from both processes, and they are those of one process
    sampled = [manifests[run]["steps"]["train:gkd"]["stats"]["on_policy"] for run in recipes]
    assert sampled[0]["on_policy_steps"] >= 1
    assert sampled[1] == {**sampled[0], "sample_seconds": sampled[1]["sample_seconds"],
                          "score_seconds": sampled[1]["score_seconds"]}  # fmt: skip
    # the traces were generated by process 0 alone: the rows of the one-process run
    shards = [sorted((tmp_path / run / "traces" / "teacher").glob("shard-*.parquet")) for run in recipes]
    assert [p.name for p in shards[0]] == [p.name for p in shards[1]] == ["shard-00000.parquet"]
    assert pq.read_table(shards[0][0]).equals(pq.read_table(shards[1][0]))


def test_a_step_that_fails_on_process_0_stops_every_process(tmp_path):
    """A step other than training runs on process 0; its failure stops the others too, with a line
    naming it (not a hang at the next barrier), and the run directory it created is removed."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1?", "answer": "2"}\n{"nothing": 1}\n')
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(
        f"run_dir: {tmp_path / 'run'}\nsteps:\n"
        f"  - problems: {{tasks: [], sets: [{{name: mine, file: {bad}}}]}}\n"
        "  - train: {name: sft, init: testbed:student, data: problems, on_policy: {fraction: 1}}\n"
    )
    log_path = tmp_path / "launch.log"
    with log_path.open("w") as log:
        returncode = finished(
            launch_two_processes(["-m", "reasondistill", "run", str(recipe)], tmp_path / "hf_home", log),
            timeout=120,
        )
    output = log_path.read_text()
    assert returncode != 0
    assert f"{bad} line 2: problem set mine: no field 'question'" in output
    assert "problems step failed on process 0" in output and "this process 1 stops too" in output
    assert not (tmp_path / "run").exists()


def torchrun_cases(script: str, out_dir: Path, timeout: float, **env_vars) -> list[dict]:
    """`torchrun --standalone` of a case script (fsdp2_run.py, zero3_run.py) on 2 CPU processes; each
    rank's results by case."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", **env_vars)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    done = subprocess.run(
        [*command, str(Path(__file__).with_name(script)), str(out_dir)],
        env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all(len(by_case) == 5 for by_case in results)
    return results


def test_the_loss_on_an_fsdp2_sharded_student_gives_the_unsharded_gradients(tmp_path):
    """FSDP2 runs on CPU processes in raw torch (accelerate enables it on accelerators only). The loss
    reads the output head's weight outside the model's forward, where FSDP2 has resharded it; the
    weight is then a DTensor, and the chunked projection through it is still exact: each process's
    half-batch gradients, reduced by FSDP, equal the unsharded model's on the whole batch for SFT,
    online and stored-top-k KD, with tied and untied embeddings (see fsdp2_run.py)."""
    for rank, results in enumerate(torchrun_cases("fsdp2_run.py", tmp_path, 180)):
        for case, worst in results.items():
            assert worst < 1e-5, f"{case}, rank {rank}: gradients differ by {worst:.2e} of the largest"


def test_the_loss_on_a_zero3_partitioned_student_trains_to_the_unsharded_weights(tmp_path):
    """DeepSpeed's CPU accelerator runs ZeRO-3 on gloo processes (accelerate does not use DeepSpeed for
    CPU processes, so the engine is made directly). Outside a forward the output head is an empty
    piece of itself; the trainer runs the loss as the head module's forward (`inside_forward`), where
    ZeRO-3 holds it whole. One SGD step of two half-batches gives the unsharded model's weights on the
    whole batch for SFT, online and stored-top-k KD, tied and untied embeddings (see zero3_run.py)."""
    for rank, results in enumerate(torchrun_cases("zero3_run.py", tmp_path, 240, DS_ACCELERATOR="cpu")):
        for case, worst in results.items():
            assert worst < 1e-6, f"{case}, rank {rank}: weights differ by {worst:.2e}"
