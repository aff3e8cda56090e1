"""A corpus of malformed inputs — recipes, training data, evaluation data, model folders — each run
through the command line as a user would: one line naming the file (and line/row/field), exit
status 2, and nothing partial left behind (no run directory where none was before).

Every model folder here is built in the test from the testbed tokenizer and a tiny random model
(seconds); none of the cases needs the trained testbed.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from reasondistill.cli import main
from reasondistill.testbed.models import ModelShape, save_initial_model

TINY = ModelShape(hidden_size=16, num_hidden_layers=1, intermediate_size=32, num_attention_heads=2)
EXAMPLE = {
    "problem_id": "p1",
    "task": "arithmetic",
    "messages": [{"role": "user", "content": "What is 2 + 3?"}],
    "completion": "<think>2 + 3 = 5</think>The answer is 5.",
}


@pytest.fixture(scope="module")
def model_folder(tokenizer_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "model"
    save_initial_model(TINY, tokenizer_dir, path, seed=0)
    return path


@pytest.fixture
def variant(model_folder, tmp_path):
    """A copy of the tiny model folder to damage."""

    def make(name: str) -> Path:
        return Path(shutil.copytree(model_folder, tmp_path / name))

    return make


@pytest.fixture
def data_file(tmp_path) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(EXAMPLE) + "\n")
    return path


def fails(capsys, argv: list[str]) -> str:
    """Run the CLI; assert exit status 2 and one error line, the last thing printed; return it."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.strip().endswith(errors[0]) and "Traceback" not in err, err
    return errors[0]


def edit_json(path: Path, **changes) -> None:
    content = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            content.pop(key, None)
        else:
            content[key] = value
    path.write_text(json.dumps(content))


def train_argv(run: Path, init: Path | str, data: Path | str, *extra: str) -> list[str]:
    return ["train", "--run-dir", str(run), "--name", "s", "--init", str(init), "--data", str(data), *extra]


# ---- model folders ------------------------------------------------------------------------------

MARKER_CODE = 'import pathlib; pathlib.Path(__file__).with_name("RAN").write_text("remote code ran")\n'


def with_remote_code(folder: Path) -> Path:
    """A folder whose config points at its own Python module, which leaves a marker when imported."""
    (folder / "custom_model.py").write_text(MARKER_CODE)
    edit_json(folder / "config.json", auto_map={"AutoModelForCausalLM": "custom_model.CustomModel"})
    return folder


def test_a_folder_with_remote_code_is_refused_naming_the_option(variant, data_file, tmp_path, capsys):
    folder = with_remote_code(variant("remote"))
    run = tmp_path / "run"
    line = fails(capsys, train_argv(run, folder, data_file))
    assert str(folder) in line and "--trust-remote-code" in line and "auto_map" in line
    assert not (folder / "RAN").exists() and not run.exists()
    line = fails(capsys, ["generate", "--run-dir", str(run), "--model", str(folder)])
    assert "--trust-remote-code" in line and not run.exists()


def test_remote_code_is_never_offered_on_stdin(variant, data_file, tmp_path):
    """transformers asks `[y/N]` when trust_remote_code is left unset; here it never is, so a `y`
    waiting on stdin is never read and the folder's code never runs."""
    folder = with_remote_code(variant("remote"))
    result = subprocess.run(
        [sys.executable, "-m", "reasondistill.cli", *train_argv(tmp_path / "run", folder, data_file)],
        input="y\ny\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--trust-remote-code" in result.stderr and "[y/N]" not in result.stdout + result.stderr
    assert not (folder / "RAN").exists()


def test_the_remote_code_setting_is_recorded_in_the_manifest(tmp_path):
    main(["problems", "--run-dir", str(tmp_path), "--tasks", "arithmetic", "--train", "2", "--test", "1"])
    step = json.loads((tmp_path / "manifest.json").read_text())["steps"]["problems"]
    assert step["trust_remote_code"] is False


def test_remote_code_runs_only_when_asked(variant):
    from reasondistill.errors import UserError
    from reasondistill.models import check_model_folder, remote_code_allowed_if, trust_remote_code

    folder = with_remote_code(variant("remote"))
    with pytest.raises(UserError, match="--trust-remote-code"):
        check_model_folder(folder)
    with remote_code_allowed_if(True):
        check_model_folder(folder)  # allowed: the architecture check is left to the shipped code
    assert trust_remote_code() is False  # restored after the block


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda f: edit_json(f / "tokenizer_config.json", chat_template=None) or (f / "chat_template.jinja").unlink(), "no chat template"),
        (lambda f: [(f / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")], "no tokenizer"),
        (lambda f: edit_json(f / "config.json", model_type="frobnicator"), "model_type 'frobnicator' is not an architecture"),
        (lambda f: (f / "config.json").write_text("{not json"), "config.json: not valid JSON"),
        (lambda f: (f / "config.json").unlink(), "no config.json"),
        (lambda f: (f / "model.safetensors").unlink(), "no weights"),
    ],
    ids=["no-chat-template", "no-tokenizer", "unknown-architecture", "bad-config-json", "no-config", "no-weights"],
)  # fmt: skip
@pytest.mark.parametrize("command", ["train", "generate"])
def test_model_folder_problems_are_caught_before_work_starts(
    variant, data_file, tmp_path, capsys, damage, expected, command
):
    folder = variant("damaged")
    damage(folder)
    run = tmp_path / "run"
    argv = (
        train_argv(run, folder, data_file)
        if command == "train"
        else ["generate", "--run-dir", str(run), "--model", str(folder), "--n", "1"]
    )
    if command == "generate":  # generate needs problems: a run directory that has them
        main(["problems", "--run-dir", str(run), "--tasks", "arithmetic", "--train", "2", "--test", "1"])
    before = sorted(p.relative_to(run) for p in run.rglob("*")) if run.exists() else None
    line = fails(capsys, argv)
    assert expected in line and str(folder) in line
    after = sorted(p.relative_to(run) for p in run.rglob("*")) if run.exists() else None
    assert after == before  # nothing partial: no traces folder, no empty run directory


class Evil:
    """Pickled as a call to exec: a weights-only load must refuse it, never run it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pickle ran')",)


def test_a_pickle_only_checkpoint_that_a_safe_load_refuses_is_one_line(variant, data_file, tmp_path, capsys):
    folder = variant("pickled")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "PICKLE-RAN"
    torch.save(
        {"model.embed_tokens.weight": torch.zeros(2, 2), "payload": Evil(marker)},
        folder / "pytorch_model.bin",
    )
    line = fails(capsys, train_argv(tmp_path / "run", folder, data_file))
    assert "pytorch_model.bin" in line and "weights-only" in line
    assert not marker.exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_a_plain_tensor_pickle_checkpoint_passes_the_pre_flight_and_loads(variant, zip_format):
    from safetensors.torch import load_file

    from reasondistill.models import load_causal_lm

    folder = variant("bin")
    weights = load_file(folder / "model.safetensors")
    torch.save(weights, folder / "pytorch_model.bin", _use_new_zipfile_serialization=zip_format)
    (folder / "model.safetensors").unlink()
    model = load_causal_lm(folder)  # tensors only: the pre-flight and the weights-only load accept it
    assert torch.equal(model.state_dict()["model.embed_tokens.weight"], weights["model.embed_tokens.weight"])


def test_a_missing_model_is_one_line_naming_it(data_file, tmp_path, capsys):
    (tmp_path / "models").mkdir()
    line = fails(capsys, train_argv(tmp_path / "run", tmp_path / "models" / "qwen", data_file))
    assert "no such model folder" in line and not (tmp_path / "run").exists()
    line = fails(capsys, train_argv(tmp_path / "run", "testbed:professor", data_file))
    assert "unknown testbed model 'testbed:professor'" in line


# ---- training data ------------------------------------------------------------------------------


def write_jsonl_bytes(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


GOOD = json.dumps(EXAMPLE).encode()


@pytest.mark.parametrize(
    "lines, expected",
    [
        ([GOOD, GOOD.replace(b"2 + 3", b"2 \xff 3")], "line 2: not valid UTF-8 (byte 0xff at column"),
        ([GOOD, b"{not json"], "line 2: invalid JSON"),
        ([b"[1, 2]"], "line 1: expected a JSON object, got list"),
        ([json.dumps({"question": "q", "answer": "a"}).encode()],
         "line 1: unknown columns question, answer; missing problem_id, task, messages, completion; "
         "expected columns: problem_id, task, messages, completion (sample_idx optional)"),
        ([json.dumps({**EXAMPLE, "messages": "hi"}).encode()], "line 1: messages: Input should be a valid list"),
        ([json.dumps({k: v for k, v in EXAMPLE.items() if k != "task"}).encode()], "line 1: missing task; expected columns"),
    ],
    ids=["invalid-utf8", "invalid-json", "not-an-object", "wrong-columns", "wrong-type", "missing-column"],
)  # fmt: skip
def test_malformed_training_jsonl_is_one_line_naming_the_line(
    model_folder, tmp_path, capsys, lines, expected
):
    data = write_jsonl_bytes(tmp_path / "bad.jsonl", lines)
    line = fails(capsys, train_argv(tmp_path / "run", model_folder, data))
    assert f"{data} {expected}" in line, line
    assert not (tmp_path / "run").exists()


def test_a_parquet_with_the_wrong_columns_lists_the_expected_ones(model_folder, tmp_path, capsys):
    data = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "q", "response": "a"}]), data)
    line = fails(capsys, train_argv(tmp_path / "run", model_folder, data))
    assert f"{data} row 0: unknown columns prompt, response" in line
    assert "expected columns: problem_id, task, messages, completion" in line


def test_a_file_that_is_not_parquet_is_one_line(model_folder, tmp_path, capsys):
    data = tmp_path / "bad.parquet"
    data.write_text("problem_id,task\n")
    assert "not a readable parquet file" in fails(capsys, train_argv(tmp_path / "run", model_folder, data))


def test_a_failed_train_keeps_an_existing_run_directory_as_it_was(model_folder, tmp_path, capsys):
    run = tmp_path / "run"
    main(["problems", "--run-dir", str(run), "--tasks", "arithmetic", "--train", "2", "--test", "1"])
    before = sorted(run.rglob("*"))
    data = write_jsonl_bytes(tmp_path / "bad.jsonl", [b"\xff"])
    fails(capsys, train_argv(run, model_folder, data))
    assert sorted(run.rglob("*")) == before


# ---- evaluation data ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, expected",
    [
        (b'{"question": "q", "answer": "#### 5"}\n{"question": "\xc3\x28"}\n', "line 2: not valid UTF-8"),
        (b'{"question": "q", "answer": "5"}\n', "line 1: field 'answer': expected a worked solution"),
        (b'{"question": "q"\n', "line 1: invalid JSON"),
    ],
    ids=["invalid-utf8", "no-worked-solution", "invalid-json"],
)
def test_malformed_benchmark_files_are_one_line(model_folder, tmp_path, capsys, content, expected):
    data = tmp_path / "gsm8k.jsonl"
    data.write_bytes(content)
    run = tmp_path / "run"
    argv = ["eval", "--run-dir", str(run), "--model", str(model_folder), "--benchmarks", "gsm8k"]
    line = fails(capsys, [*argv, "--data-file", str(data)])
    assert f"{data} {expected}" in line, line
    assert not run.exists()


# ---- recipes ------------------------------------------------------------------------------------


def write_recipe(tmp_path: Path, steps: list[dict], **top) -> Path:
    import yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), **top, "steps": steps}))
    return path


PROBLEMS_STEP = {"problems": {"tasks": ["arithmetic"], "train": 2, "test": 1}}


def test_a_recipe_naming_a_missing_model_fails_before_the_first_step(data_file, tmp_path, capsys):
    steps = [
        PROBLEMS_STEP,
        {"train": {"name": "s", "init": str(tmp_path / "nowhere" / "model"), "data": str(data_file)}},
    ]
    recipe = write_recipe(tmp_path, steps)
    line = fails(capsys, ["run", str(recipe)])
    assert f"{recipe}: steps[1].train.init: model" in line and "no such model folder" in line
    assert not (tmp_path / "run").exists()  # not even the problems step ran


def test_a_recipe_naming_a_folder_with_remote_code_fails_before_the_first_step(
    variant, data_file, tmp_path, capsys
):
    folder = with_remote_code(variant("remote"))
    recipe = write_recipe(tmp_path, [PROBLEMS_STEP, {"eval": {"models": [str(folder)]}}])
    line = fails(capsys, ["run", str(recipe)])
    assert f"{recipe}: steps[1].eval.models: " in line and "--trust-remote-code" in line
    assert not (tmp_path / "run").exists() and not (folder / "RAN").exists()


def test_a_failing_step_names_the_recipe_and_the_step(model_folder, tmp_path, capsys):
    data = write_jsonl_bytes(tmp_path / "bad.jsonl", [GOOD, b"\xfe"])
    recipe = write_recipe(
        tmp_path, [PROBLEMS_STEP, {"train": {"name": "s", "init": str(model_folder), "data": str(data)}}]
    )
    line = fails(capsys, ["run", str(recipe)])
    assert line.startswith(f"error: {recipe}: steps[1].train: {data} line 2: not valid UTF-8")
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert list(manifest["steps"]) == ["problems"]  # the finished step stays; nothing of the failed one


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"run_dir: r\nsteps: [\n", "invalid YAML"),
        (b"run_dir: r\nsteps:\n  - problems: {tasks: [arithm\xe9tic]}\n", "line 3: not valid UTF-8"),
        (b"run_dir: r\nsteps:\n  - problems: {trian: 2}\n", "steps[0].problems: trian: unknown key"),
        (b"run_dir: r\nsteps:\n  - problem: {}\n", "steps[0]: unknown stage 'problem'"),
        (b"run_dir: r\nsteps:\n  - train: {name: s, init: testbed:student, data: x}\n", "steps[0].train.data: needs a `curate` step named 'x'"),
        (b"run_dir: r\ntrust_remote_code: maybe\nsteps:\n  - problems: {}\n", "trust_remote_code: Input should be a valid boolean"),
        (b"- problems: {}\n", "expected a mapping with run_dir and steps"),
    ],
    ids=["invalid-yaml", "invalid-utf8", "unknown-key", "unknown-stage", "missing-input", "bad-top-key", "not-a-mapping"],
)  # fmt: skip
def test_malformed_recipes_are_one_line(tmp_path, capsys, content, expected, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(content)
    line = fails(capsys, ["run", str(recipe)])
    assert f"{recipe}" in line and expected in line, line
    assert not (tmp_path / "r").exists()


def test_a_failed_command_keeps_resumable_work_in_the_run_directory_it_created(tmp_path):
    from reasondistill.rundir import RunDir

    run = RunDir(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt), run.working():
        run.update_manifest(recipe={"path": "r.yaml"})  # written before the first step: no finished step
        (run.root / "traces" / "teacher").mkdir(parents=True)
        checkpoint = run.root / "checkpoints" / ".s.work" / "checkpoint-2"
        checkpoint.mkdir(parents=True)
        (checkpoint / "model.safetensors").write_bytes(b"weights")
        raise KeyboardInterrupt  # interrupted while training
    left = sorted(str(p.relative_to(run.root)) for p in run.root.rglob("*"))
    assert left == ["checkpoints", "checkpoints/.s.work", "checkpoints/.s.work/checkpoint-2",
                    "checkpoints/.s.work/checkpoint-2/model.safetensors"]  # fmt: skip
