"""The default testbed build's trained teacher (and the teacher zoo's, `ZOO_DIR`), shipped with the
package so no machine spends minutes on them.

`weights/teacher/` is the teacher folder a default build trains (config, tokenizer, model.safetensors,
training_stats.json) plus `shipped.json`: the build fingerprint it was trained under, the sha256 of its
weights, and where and when it was trained. A build installs it only where that fingerprint is the
build's own (same task generators, testbed code, data and hyperparameters; no
REASONDISTILL_TESTBED_SEED), so a change that would shape another teacher trains one instead of
reusing stale weights. `scripts/ship_testbed_teacher.py` trains and writes it.

Not part of the build fingerprint: how a teacher is installed does not change what it is.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from ..errors import UserError
from ..records import file_sha256

log = logging.getLogger(__name__)

SHIPPED_DIR = Path(__file__).resolve().parent / "weights" / "teacher"
ZOO_DIR = Path(__file__).resolve().parent / "weights" / "zoo"  # a folder per zoo teacher, like SHIPPED_DIR
RECORD = "shipped.json"
WEIGHTS = "model.safetensors"
# The teacher folder's files that ship: what `from_pretrained` reads, and the training stats.
# (training_args.bin, a pickle the Trainer writes, does not.)
SHIPPED_FILES = (
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    WEIGHTS,
    "tokenizer.json",
    "tokenizer_config.json",
    "training_stats.json",
)


def shipped_record(folder: Path = SHIPPED_DIR) -> dict | None:
    """The shipped teacher's record (fingerprint, sha256, provenance), or None if none ships."""
    path = folder / RECORD
    return json.loads(path.read_text()) if path.exists() else None


def shipped_teacher(fingerprint: str, variant: int | None, folder: Path = SHIPPED_DIR) -> Path | None:
    """The shipped teacher folder if it was trained under this build `fingerprint` (the zoo's, for a
    zoo teacher); else None (train it)."""
    record = shipped_record(folder)
    if record is None or variant is not None:
        return None
    if record["fingerprint"] != fingerprint:
        log.warning(
            "the shipped testbed teacher was trained by other testbed code (build %s, this code's is %s): "
            "training the teacher here instead (a few minutes; scripts/ship_testbed_teacher.py ships a new one)",
            record["fingerprint"],
            fingerprint,
        )
        return None
    return folder


def install_shipped_teacher(folder: Path, target: Path) -> dict:
    """Copy the shipped teacher into `target` after checking its weights' sha256; its training stats."""
    record = shipped_record(folder)
    if record is None:
        raise UserError(f"{folder}: no {RECORD}: not a shipped teacher folder")
    digest = file_sha256(folder / WEIGHTS)
    if digest != record["sha256"]:
        raise UserError(
            f"{folder / WEIGHTS}: sha256 {digest[:12]}…, expected {record['sha256'][:12]}… ({RECORD}): "
            "the shipped teacher is damaged; reinstall the package or build with `reasondistill testbed build --train`"
        )
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for name in SHIPPED_FILES:
        shutil.copy2(folder / name, target / name)
    return json.loads((target / "training_stats.json").read_text())


def write_shipped_teacher(
    teacher: Path, fingerprint: str, provenance: dict, folder: Path = SHIPPED_DIR
) -> dict:
    """Replace the shipped teacher by a trained `teacher` folder, recording its build fingerprint."""
    missing = [name for name in SHIPPED_FILES if not (teacher / name).exists()]
    if missing:
        raise UserError(f"{teacher}: not a trained testbed teacher folder (no {missing[0]})")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name in SHIPPED_FILES:
        shutil.copy2(teacher / name, folder / name)
    record = {"fingerprint": fingerprint, "sha256": file_sha256(folder / WEIGHTS), **provenance}
    (folder / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record
