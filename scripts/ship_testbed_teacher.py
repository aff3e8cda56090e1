#!/usr/bin/env python
"""Train the default testbed build's teacher and its teacher zoo, and ship them in the package
(src/reasondistill/testbed/weights: teacher/ and zoo/<name>/).

Run after a change to the testbed's tasks, tokenizer, shapes, data or hyperparameters (the build
fingerprint changes; `tests/test_testbed.py` fails until the shipped teacher is the current code's):

    .venv/bin/python scripts/ship_testbed_teacher.py            # trains in a fresh cache (about 4 min, 2 cores)
    .venv/bin/python scripts/ship_testbed_teacher.py --cache DIR  # reuse DIR's trained default build if there

Prints whether the new weights equal the ones shipped before (on the machine that trained those, a
rebuild reproduces them bit for bit). Then run `make check-builds` and commit the folder.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance_now(seconds: float) -> dict:
    import torch
    import transformers

    return {
        "trained": datetime.date.today().isoformat(),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "seconds": round(seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cache", type=Path, help="testbed cache to build in (default: a fresh temporary one)"
    )
    parser.add_argument(
        "--zoo-only",
        action="store_true",
        help="ship the zoo only, from the testbed as it is (after a zoo change)",
    )
    args = parser.parse_args()
    cache = args.cache or Path(tempfile.mkdtemp(prefix="reasondistill-ship-"))
    os.environ["REASONDISTILL_CACHE"] = str(cache)
    if os.environ.get("REASONDISTILL_TESTBED_SEED"):
        sys.exit("ship_testbed_teacher: unset REASONDISTILL_TESTBED_SEED: only the default build ships")

    from reasondistill.testbed.models import build_fingerprint, build_testbed, testbed_dir
    from reasondistill.testbed.shipped import shipped_record, write_shipped_teacher

    if args.zoo_only:
        build_testbed()
        ship_zoo(provenance_now(0))
        return
    root = testbed_dir()
    done = root / "DONE"
    if not done.exists() or json.loads(done.read_text()).get("shipped", False):
        root = build_testbed(force=True, train=True)
    before = shipped_record()
    stats = json.loads((root / "DONE").read_text())
    provenance = provenance_now(stats["seconds"])
    trained_under = root.name.removeprefix("testbed-")  # the build that trained it, not code edited since
    if trained_under != build_fingerprint():
        sys.exit("ship_testbed_teacher: the testbed code changed during the build; run it again")
    record = write_shipped_teacher(root / "teacher", trained_under, provenance)
    print(f"shipped the teacher of build {record['fingerprint']} (sha256 {record['sha256'][:16]}…)")
    if before is not None:
        same = before["sha256"] == record["sha256"]
        print(
            f"weights {'identical to' if same else 'differ from'} the ones shipped before ({before['sha256'][:16]}…)"
        )
    ship_zoo(provenance)


def ship_zoo(provenance: dict) -> None:
    """Train the zoo teachers from the shipped teacher and ship them too (weights/zoo/<name>)."""
    import shutil
    import time

    from reasondistill.testbed.shipped import ZOO_DIR, shipped_record, write_shipped_teacher
    from reasondistill.testbed.zoo import ZOO, build_zoo_model, zoo_fingerprint

    before = {name: shipped_record(ZOO_DIR / name) for name in ZOO}
    shutil.rmtree(ZOO_DIR, ignore_errors=True)
    for name in ZOO:
        started = time.time()
        path = build_zoo_model(name, force=True, train=True)
        record = write_shipped_teacher(
            path, zoo_fingerprint(), {**provenance, "seconds": round(time.time() - started)}, ZOO_DIR / name
        )
        print(f"shipped zoo teacher {name} of zoo {record['fingerprint']} (sha256 {record['sha256'][:16]}…)")
        if before[name] is not None and before[name]["sha256"] != record["sha256"]:
            print(f"  weights differ from the ones shipped before ({before[name]['sha256'][:16]}…)")


if __name__ == "__main__":
    main()
