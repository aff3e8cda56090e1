"""A zoo of testbed teachers that differ in size and in how they write their solutions.

Teacher selection (`select_teacher`) compares teachers by what a student learns from them; on the
testbed it needs teachers worth comparing. Each zoo teacher is the testbed teacher, or its first
decoder layers only (a smaller teacher), trained further with the project's own trainer on 2-digit
additions whose gold solutions are rewritten into one solution style from the problem's operands
(`problem.meta`):

    steps    the task's own format (the testbed teacher's):  "tens: 4 + 8 + 1 = 13, carry 1, so far 32."
    verbose  the plan, a sentence per column and a check:     "tens: 4 + 8 + 1 = 13. We write 3 and carry 1, so far 32."
    terse    compact column lines:                            "tens: 4+8+1=13, 32"

On 2-digit problems verbose solutions are about 2.6 times as long as the task's own (134 tokens
against 52), terse ones about 0.7 times (38). Every style ends with the task's final answer line
("The answer is 132."), so the task's grader grades zoo traces like any other.

A zoo teacher is a Hub-style folder at `<cache>/zoo-<fingerprint>/<name>`, named `testbed:<name>`
wherever a model reference is accepted. The default testbed build's zoo ships with the package
(`weights/zoo/<name>`, written by scripts/ship_testbed_teacher.py, installed where its fingerprint is
this code's); other builds train theirs on first use (10 to 40 seconds each on 2 idle CPU cores).
The fingerprint hashes the testbed's (the zoo starts from its teacher and uses its tokenizer), this
file and the zoo's specification, so a changed style or size rebuilds instead of reusing a stale
teacher.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..records import Problem, TrainingExample
from ..tasks import TASKS
from ..tasks.arithmetic import PLACES
from ..tasks.base import final_answer_text
from ..train.hyperparameters import Hyperparameters
from ..train.trainer import train_model
from ..verify.reasoning import format_completion
from .models import build_fingerprint, build_testbed, build_variant, cache_root, exclusive
from .shipped import ZOO_DIR, install_shipped_teacher, shipped_teacher

log = logging.getLogger(__name__)

ZOO_VERSION = "1"


def _columns(a: int, b: int) -> Iterator[tuple[str, str, str, int, int, int, str]]:
    """(place, digit of a, digit of b, carry in, column total, carry out, digits so far) per column,
    right to left, as the arithmetic task computes them; a final carry is a column of its own."""
    digits_a, digits_b = str(a)[::-1], str(b)[::-1]
    carry, written = 0, ""
    for i in range(max(len(digits_a), len(digits_b))):
        da = digits_a[i] if i < len(digits_a) else "0"
        db = digits_b[i] if i < len(digits_b) else "0"
        total = int(da) + int(db) + carry
        carry_in, (carry, digit) = carry, divmod(total, 10)
        written = f"{digit}{written}"
        yield PLACES[i], da, db, carry_in, total, carry, written
    if carry:
        yield PLACES[max(len(digits_a), len(digits_b))], "", "", carry, carry, 0, f"{carry}{written}"


def terse(a: int, b: int) -> str:
    """One compact line per column: the column's sum, then the digits so far ("tens: 4+8+1=13, 32")."""
    lines = []
    for place, da, db, carry_in, total, _carry, written in _columns(a, b):
        terms = f"{da} + {db}{f' + {carry_in}' if carry_in else ''} = " if da else ""
        lines.append(f"{place}: {terms}{total}, {written}")
    return "\n".join(lines)


def verbose(a: int, b: int) -> str:
    """Sentences around the column lines: the plan, what is written and carried, and a check."""
    lines = [f"We add {a} and {b} column by column, starting from the right."]
    for place, da, db, carry_in, total, carry, written in _columns(a, b):
        if not da:
            lines.append(f"{place}: only the carried {carry_in} is left, so far {written}.")
            continue
        terms = f"{da} + {db}" + (f" + {carry_in}" if carry_in else "")
        carried = f"carry {carry}" if carry else "carry nothing"
        lines.append(f"{place}: {terms} = {total}. We write {total % 10} and {carried}, so far {written}.")
    lines.append(f"Check: {a} + {b} = {a + b}.")
    return "\n".join(lines)


STYLES: dict[str, Callable[[int, int], str] | None] = {
    "steps": None,  # the task's own gold solution
    "verbose": verbose,
    "terse": terse,
}


def styled_solution(problem: Problem, style: str) -> str:
    """The gold solution of an arithmetic problem in `style`, ending with the task's answer line."""
    render = STYLES[style]
    if render is None:
        return problem.solution or ""
    a, b = json.loads(problem.meta)["operands"]
    return format_completion(render(a, b), final_answer_text(problem.answer))


@dataclass(frozen=True)
class ZooTeacher:
    """What one zoo teacher is: its solution style, its size and how it is trained."""

    description: str
    style: str
    layers: int  # the first `layers` decoder layers of the testbed teacher (of 3)
    examples: int  # 2-digit training problems, with gold solutions in `style`
    hyperparameters: Hyperparameters

    def spec(self) -> dict:
        return {**asdict(self), "hyperparameters": self.hyperparameters.model_dump()}


# Each teacher starts from the testbed teacher, which already adds column by column, and learns its
# new style in 300 optimizer steps (two passes over its 1,200 examples). 150 steps sat on an edge: the
# 3-layer verbose teacher answered 40% on one testbed build and 2% and 8% on two others; after 300 it
# answered 95% and 77% of those two greedily (the 2-layer verbose one stays weak on some builds: 13%).
# From random weights the same budget teaches nothing: a model
# the testbed teacher's size trained on 4,000 verbose solutions from scratch (125 steps of 32, over
# 5 minutes on 2 busy cores) still answered 0% of held-out problems. Fewer layers make a smaller
# teacher (pruning by depth, as in Minitron or Sheared LLaMA) that recovers by the same training.
HYPERPARAMETERS = Hyperparameters(
    epochs=2,
    learning_rate=1e-3,  # the teacher's own peak of 3e-3 with fresh Adam moments wrecks it at once
    warmup_ratio=0.1,
    batch_size=8,
    max_length=256,
    logging_steps=25,
    save_steps=50,
)
ZOO: dict[str, ZooTeacher] = {
    "verbose-large": ZooTeacher("3 layers, full sentences", "verbose", 3, 1200, HYPERPARAMETERS),
    "verbose-small": ZooTeacher("2 layers, full sentences", "verbose", 2, 1200, HYPERPARAMETERS),
    "terse-large": ZooTeacher("3 layers, compact column lines", "terse", 3, 1200, HYPERPARAMETERS),
    "terse-small": ZooTeacher("2 layers, compact column lines", "terse", 2, 1200, HYPERPARAMETERS),
}
DIFFICULTY = 2  # digits per operand
DATA_SEED = -3  # the testbed teacher's data uses -2; test problems are held out by either


def zoo_fingerprint() -> str:
    """Changes with the testbed (whose tokenizer the zoo uses), this file or the zoo specification."""
    spec = {
        "version": ZOO_VERSION,
        "testbed": build_fingerprint(),
        "source": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        "zoo": {name: teacher.spec() for name, teacher in ZOO.items()},
        "difficulty": DIFFICULTY,
        "data_seed": DATA_SEED,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def zoo_dir() -> Path:
    return cache_root() / f"zoo-{zoo_fingerprint()}"


def training_examples(teacher: ZooTeacher) -> list[TrainingExample]:
    problems = TASKS["arithmetic"].sample(
        "train", teacher.examples, seed=DATA_SEED, difficulties=(DIFFICULTY,)
    )
    return [
        TrainingExample(
            problem_id=p.id, task=p.task, messages=p.messages, completion=styled_solution(p, teacher.style)
        )
        for p in problems
    ]


def save_first_layers(model_dir: Path, layers: int, path: Path) -> None:
    """The model at `model_dir` cut to its first `layers` decoder layers (embeddings, final norm and
    head kept), saved with its tokenizer like any Hub checkpoint."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    decoder = model.get_decoder()
    if not 1 <= layers <= len(decoder.layers):
        raise ValueError(f"{model_dir} has {len(decoder.layers)} layers; cannot keep {layers}")
    decoder.layers = torch.nn.ModuleList(list(decoder.layers)[:layers])
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:layers]
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(staging)
    staging.rename(path)


def build_zoo_model(name: str, force: bool = False, train: bool = False) -> Path:
    """Build (or reuse) the zoo teacher `name`; returns its model folder. Installs the shipped
    weights where they are this code's, unless `train` is set."""
    teacher = ZOO[name]
    root = zoo_dir()
    path = root / name
    if (path / "DONE").exists() and not force:
        return path
    testbed = build_testbed()
    with exclusive(root / f".{name}.lock"):
        if (path / "DONE").exists() and not force:
            return path  # another process built it while this one waited
        started = time.time()
        shutil.rmtree(path, ignore_errors=True)
        shipped = None if train else shipped_teacher(zoo_fingerprint(), build_variant(), ZOO_DIR / name)
        if shipped is not None:
            stats = install_shipped_teacher(shipped, path.with_name(f".{name}.shipped"))
            done = {"seconds": round(time.time() - started, 1), "teacher": teacher.spec(), "training": stats}
            (path.with_name(f".{name}.shipped") / "DONE").write_text(
                json.dumps({**done, "shipped": True}, indent=2)
            )
            path.with_name(f".{name}.shipped").rename(path)
            return path
        log.info("building zoo teacher %s in %s (under a minute on 2 CPU cores, once)", name, path)
        # As for the testbed: an interrupted build continues in its staging folder (the initial
        # weights are deterministic, the training resumes from its last checkpoint).
        staging = root / f".{name}.building"
        if not (staging / "init").exists():
            save_first_layers(testbed / "teacher", teacher.layers, staging / "init")
        stats = train_model(
            staging / "init",
            training_examples(teacher),
            staging / "model",
            teacher.hyperparameters,
            description=f"zoo teacher {name}",
            resume_key=f"{zoo_fingerprint()}-{name}",
        )
        done = {"seconds": round(time.time() - started, 1), "teacher": teacher.spec(), "training": stats}
        (staging / "model" / "DONE").write_text(json.dumps(done, indent=2))
        (staging / "model").rename(path)
        shutil.rmtree(staging)
        return path
