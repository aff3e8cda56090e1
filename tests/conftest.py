import json
import operator
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

# Tests never touch the user's cache: the testbed is built once per session in a temporary folder,
# unless REASONDISTILL_TEST_CACHE names a folder to reuse between sessions (faster local iteration).
os.environ["REASONDISTILL_CACHE"] = os.environ.get("REASONDISTILL_TEST_CACHE") or str(
    Path(os.environ.get("TMPDIR", "/tmp")) / f"reasondistill-test-cache-{os.getpid()}"
)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def testbed() -> Path:
    """The built testbed (tokenizer, student initialisation, trained teacher)."""
    from reasondistill.testbed.models import build_testbed

    return build_testbed()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The testbed tokenizer alone (seconds), for tests that do not need the trained teacher."""
    from reasondistill.testbed.tokenizer import build_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(path)
    return path


RELATIONS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}


class Margins:
    """Checks on numbers that depend on how well a testbed model trained, recorded for check_builds.

    With REASONDISTILL_MARGINS naming a file, every check (and every number merely recorded) appends
    one JSON line (test, what, value, bound, margin), so `scripts/check_builds.py` can show how close
    each check came on each testbed build."""

    def __init__(self, test: str):
        self.test = test

    def __call__(self, what: str, value: float, relation: str, bound: float) -> None:
        """Assert `value <relation> bound` and record both."""
        margin = value - bound if relation.startswith(">") else bound - value
        self._write(what, value, relation=relation, bound=float(bound), margin=float(margin))
        assert RELATIONS[relation](value, bound), f"{what}: {value:.4g} is not {relation} {bound:.4g}"

    def record(self, what: str, value: float) -> None:
        """Record a number a test does not bound (it varies across builds), to see it in the table."""
        self._write(what, value, relation=None, bound=None, margin=None)

    def _write(self, what: str, value: float, **check) -> None:
        if os.environ.get("REASONDISTILL_MARGINS"):
            build = os.environ.get("REASONDISTILL_TESTBED_SEED") or "default"
            record = {"test": self.test, "what": what, "value": float(value), **check, "build": build}
            with open(os.environ["REASONDISTILL_MARGINS"], "a") as file:
                file.write(json.dumps(record) + "\n")


@pytest.fixture
def margin(request) -> Margins:
    """`margin(what, value, relation, bound)` asserts and records; `margin.record(what, value)` records."""
    return Margins(request.node.nodeid)


@dataclass(frozen=True)
class PartlyAble:
    """A partly able student: the testbed teacher with noise on its weights (tests/helpers.NoisyModel)."""

    path: Path
    noise: float  # the level the calibration chose
    accuracy: float  # greedy, on `problems`
    problems: list  # held-out 2-digit additions


# Where the partly able student starts: greedy accuracy on PARTLY_ABLE_PROBLEMS, far below the teacher's
# 90-100% and far above the random student's 0%, so a few optimizer steps show which way a method moves it.
PARTLY_ABLE_WINDOW = (0.30, 0.42)


@pytest.fixture(scope="session")
def partly_able(testbed, tmp_path_factory) -> PartlyAble:
    """The partly able student of every short training test, its starting accuracy set by construction:
    the noise level is chosen per testbed build so that its greedy accuracy on 128 held-out 2-digit
    additions lies in PARTLY_ABLE_WINDOW (a fixed level gave 30% on one build and 54% on another). The
    random testbed student needs hundreds of steps before its first right answer."""
    from helpers import calibrated_noisy_copy

    from reasondistill.tasks import TASKS

    problems = TASKS["arithmetic"].sample("test", 128, seed=6, difficulties=(2,))
    output = tmp_path_factory.mktemp("partly-able") / "student"
    path, noise, accuracy = calibrated_noisy_copy(testbed / "teacher", output, problems, PARTLY_ABLE_WINDOW)
    return PartlyAble(path, noise, accuracy, problems)
