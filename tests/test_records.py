import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reasondistill.errors import UserError
from reasondistill.records import Problem, TrainingExample, read_records, write_records
from reasondistill.tasks import get_task


def test_parquet_round_trip_is_lossless_and_leaves_no_temporary_files(tmp_path):
    problems = get_task("logic").sample("train", 20, seed=3)
    path = tmp_path / "sub" / "problems.parquet"
    assert write_records(path, problems, Problem) == 20
    assert read_records(path, Problem) == problems
    assert [p.name for p in path.parent.iterdir()] == ["problems.parquet"]


def test_a_malformed_jsonl_row_names_the_file_line_and_field(tmp_path):
    path = tmp_path / "data.jsonl"
    good = {
        "problem_id": "p1",
        "task": "arithmetic",
        "messages": [{"role": "user", "content": "1+1?"}],
        "completion": "2",
    }
    bad = {**good, "messages": [{"role": "robot", "content": "hi"}]}
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(UserError) as err:
        read_records(path, TrainingExample)
    assert str(err.value).startswith(f"{path} line 3: messages.0.role: ")
    assert "\n" not in str(err.value)

    path.write_text(json.dumps(good) + "\n" + "{not json\n")
    with pytest.raises(UserError, match=r"line 2: invalid JSON"):
        read_records(path, TrainingExample)

    path.write_text(json.dumps({**good, "answer": "2"}) + "\n")
    with pytest.raises(UserError, match=r"line 1: unknown column answer; expected columns: problem_id, task"):
        read_records(path, TrainingExample)


def test_a_malformed_parquet_row_names_the_row_and_field(tmp_path):
    path = tmp_path / "problems.parquet"
    rows = [p.model_dump() for p in get_task("arithmetic").sample("train", 3, seed=0)]
    rows[2]["answer"] = None
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(UserError, match=rf"^{path} row 2: answer: Input should be a valid string"):
        read_records(path, Problem)
    with pytest.raises(UserError, match="file not found"):
        read_records(tmp_path / "missing.parquet", Problem)


def test_a_step_fingerprint_ignores_options_at_their_defaults_and_operational_ones_at_any_depth(tmp_path):
    """An option added later, at its default, must not turn finished steps into 'other settings';
    a connection setting of a nested backend (`teacher_server.base_url`) changes no output."""
    from pydantic import Field

    from reasondistill.config import StageConfig
    from reasondistill.rundir import RunDir
    from reasondistill.stages.train import TrainConfig

    class Before(StageConfig):
        name: str
        n: int = 4

    class After(Before):  # the same stage, one release later
        temperature: float = Field(1.0)

    run, calls = RunDir(tmp_path), []
    run.step("s:x", Before(name="x"), {}, lambda fp: calls.append(fp) or {}, outputs=[])
    assert run.step("s:x", After(name="x"), {}, lambda fp: calls.append(fp) or {}, outputs=[])["skipped"]
    with pytest.raises(UserError, match=r"already ran with other settings \(temperature\)"):
        run.step("s:x", After(name="x", temperature=0.5), {}, lambda fp: {}, outputs=[])
    assert len(calls) == 1

    served = dict(name="s", init="i", data="problems", objective="forward_kl", on_policy={})
    first = TrainConfig(**served, teacher_server={"model": "m", "backend": "openai", "base_url": "http://a"})
    moved = TrainConfig(**served, teacher_server={"model": "m", "backend": "openai", "base_url": "http://b"})
    other = TrainConfig(**served, teacher_server={"model": "m2", "backend": "openai", "base_url": "http://a"})
    assert first.identity() == moved.identity() != other.identity()


def test_a_step_fingerprint_tells_operators_at_their_defaults_apart():
    """Operators are told apart by their tag (`op`), which has a default: it stays in the fingerprint."""
    from reasondistill.stages.curate import CurateConfig

    dedup = CurateConfig(traces=["t"], name="x", ops=[{"op": "select", "problems": 3}, {"op": "dedup"}])
    length = CurateConfig(traces=["t"], name="x", ops=[{"op": "select", "problems": 3}, {"op": "length"}])
    assert dedup.identity() != length.identity()
    assert dedup.identity()["ops"] == [{"op": "select", "problems": 3}, {"op": "dedup"}]
