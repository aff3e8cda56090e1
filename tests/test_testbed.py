"""The testbed build: the shipped teacher is the current code's, installed intact; the build still trains."""

import json
import logging

import pytest
from safetensors.torch import load_file

from reasondistill.errors import UserError
from reasondistill.records import file_sha256
from reasondistill.testbed import models
from reasondistill.testbed.shipped import (
    SHIPPED_DIR,
    SHIPPED_FILES,
    WEIGHTS,
    install_shipped_teacher,
    shipped_record,
    shipped_teacher,
    write_shipped_teacher,
)


def test_the_shipped_teacher_was_trained_by_this_code(monkeypatch):
    """Fails after a change that shapes the teacher until scripts/ship_testbed_teacher.py ships a new one
    (without it every cold build would train for minutes)."""
    monkeypatch.delenv(models.SEED_VARIABLE, raising=False)  # the default build's, under check-builds too
    record = shipped_record()
    assert record is not None, f"no shipped teacher in {SHIPPED_DIR}"
    assert record["fingerprint"] == models.build_fingerprint(), "run scripts/ship_testbed_teacher.py"
    assert file_sha256(SHIPPED_DIR / WEIGHTS) == record["sha256"]
    assert sorted(p.name for p in SHIPPED_DIR.iterdir()) == sorted([*SHIPPED_FILES, "shipped.json"])


def test_the_shipped_zoo_was_trained_by_this_code(monkeypatch):
    """Fails after a change to the zoo (or the testbed under it) until scripts/ship_testbed_teacher.py
    --zoo-only ships new zoo teachers."""
    from reasondistill.testbed.shipped import ZOO_DIR
    from reasondistill.testbed.zoo import ZOO, zoo_fingerprint

    monkeypatch.delenv(models.SEED_VARIABLE, raising=False)
    assert sorted(p.name for p in ZOO_DIR.iterdir()) == sorted(ZOO)
    for name in ZOO:
        record = shipped_record(ZOO_DIR / name)
        assert record is not None and record["fingerprint"] == zoo_fingerprint(), (
            "run ship_testbed_teacher.py --zoo-only"
        )
        assert file_sha256(ZOO_DIR / name / WEIGHTS) == record["sha256"]
        assert sorted(p.name for p in (ZOO_DIR / name).iterdir()) == sorted([*SHIPPED_FILES, "shipped.json"])


def test_the_default_build_installs_the_shipped_zoo(testbed, tmp_path, monkeypatch):
    """A zoo teacher of the default build is the shipped one, bit for bit; other builds train theirs."""
    from reasondistill.testbed import zoo
    from reasondistill.testbed.shipped import ZOO_DIR

    monkeypatch.setattr(zoo, "zoo_dir", lambda: tmp_path / "zoo")  # a cold zoo cache
    path = zoo.build_zoo_model("terse-small")
    done = json.loads((path / "DONE").read_text())
    if models.build_variant() is not None:
        assert not done.get("shipped") and (path / WEIGHTS).exists()
        return
    assert done["shipped"] is True
    assert file_sha256(path / WEIGHTS) == shipped_record(ZOO_DIR / "terse-small")["sha256"]


def test_the_default_build_installs_the_shipped_teacher(testbed):
    done = json.loads((testbed / "DONE").read_text())
    if models.build_variant() is not None:  # check-builds' other builds train their own teacher
        assert done["shipped"] is False and (testbed / "teacher" / WEIGHTS).exists()
        return
    assert done["shipped"] is True
    assert file_sha256(testbed / "teacher" / WEIGHTS) == shipped_record()["sha256"]
    assert done["teacher"] == json.loads((SHIPPED_DIR / "training_stats.json").read_text())


def test_the_shipped_teacher_fits_only_its_own_build(caplog):
    record = shipped_record()
    assert shipped_teacher(record["fingerprint"], None) == SHIPPED_DIR
    assert shipped_teacher(record["fingerprint"], 2) is None  # another build trains its own
    with caplog.at_level(logging.WARNING, logger="reasondistill.testbed.shipped"):
        assert shipped_teacher("0" * 12, None) is None
    assert "trained by other testbed code" in caplog.text and "000000000000" in caplog.text


def test_a_damaged_shipped_teacher_is_refused_before_anything_is_written(tmp_path):
    damaged = tmp_path / "shipped"
    damaged.mkdir()
    for name in [*SHIPPED_FILES, "shipped.json"]:
        (damaged / name).write_bytes((SHIPPED_DIR / name).read_bytes())
    weights = bytearray((damaged / WEIGHTS).read_bytes())
    weights[-1] ^= 1
    (damaged / WEIGHTS).write_bytes(bytes(weights))
    with pytest.raises(UserError, match=r"model\.safetensors: sha256 .* the shipped teacher is damaged"):
        install_shipped_teacher(damaged, tmp_path / "teacher")
    assert not (tmp_path / "teacher").exists()


def test_shipping_a_trained_teacher_and_installing_it_round_trips(tmp_path):
    trained = tmp_path / "trained"
    trained.mkdir()
    for name in SHIPPED_FILES:
        (trained / name).write_bytes((SHIPPED_DIR / name).read_bytes())
    (trained / "training_args.bin").write_bytes(b"a pickle that must not ship")
    record = write_shipped_teacher(trained, "abc123", {"trained": "today"}, folder=tmp_path / "ship")
    assert record == {"fingerprint": "abc123", "sha256": shipped_record()["sha256"], "trained": "today"}
    assert not (tmp_path / "ship" / "training_args.bin").exists()
    stats = install_shipped_teacher(tmp_path / "ship", tmp_path / "installed")
    assert stats == json.loads((trained / "training_stats.json").read_text())
    for name in SHIPPED_FILES:
        assert (tmp_path / "installed" / name).read_bytes() == (trained / name).read_bytes()
    (trained / "config.json").unlink()
    with pytest.raises(UserError, match="not a trained testbed teacher folder .no config.json"):
        write_shipped_teacher(trained, "abc123", {}, folder=tmp_path / "ship2")


def test_a_build_told_to_train_trains_its_teacher(tmp_path, monkeypatch):
    """The path every other build (and a changed testbed) takes, on a few examples: a teacher that
    learnt from the gold solutions, not the shipped one."""
    monkeypatch.setenv("REASONDISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(
        models, "TEACHER_DATA", {"arithmetic": (32, (2,)), "word_problems": (8, (2,)), "logic": (8, (1,))}
    )
    monkeypatch.setattr(
        models,
        "TEACHER_HYPERPARAMETERS",
        models.TEACHER_HYPERPARAMETERS.model_copy(update={"batch_size": 8, "gradient_accumulation_steps": 1}),
    )
    root = models.build_testbed(train=True)
    done = json.loads((root / "DONE").read_text())
    assert done["shipped"] is False and done["teacher"]["examples"] == 48 and done["teacher"]["steps"] == 6
    assert not (root / "teacher-init").exists() and not root.with_name(f".{root.name}.building").exists()
    trained = load_file(root / "teacher" / WEIGHTS)
    shipped = load_file(SHIPPED_DIR / WEIGHTS)
    assert trained.keys() == shipped.keys()
    assert all(trained[k].shape == shipped[k].shape for k in trained)
    assert any(not trained[k].equal(shipped[k]) for k in trained)
    assert models.build_testbed() == root  # cached: not built again
