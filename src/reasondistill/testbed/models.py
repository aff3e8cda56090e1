"""Tiny Qwen2-architecture teacher and student for the testbed, built by the project and cached.

`testbed:teacher` is trained with the project's own SFT trainer on gold step-by-step solutions of
the testbed tasks; `testbed:student` is a smaller, randomly initialised model. Both are ordinary
Hub-style folders (config.json, model.safetensors, tokenizer.json), loaded with `from_pretrained`.

The default build's trained teacher also ships with the package (`weights/teacher`, written by
`scripts/ship_testbed_teacher.py`): a build whose fingerprint is the one it was trained under installs
those weights instead of training for minutes, so every machine gets the same teacher. Another build
(REASONDISTILL_TESTBED_SEED), changed testbed code, or `train=True` trains it here.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from ..errors import UserError
from ..records import TrainingExample
from ..tasks import TASKS
from ..train.hyperparameters import Hyperparameters
from ..train.trainer import train_model
from .shipped import install_shipped_teacher, shipped_teacher
from .tokenizer import build_tokenizer

log = logging.getLogger(__name__)

TESTBED_VERSION = "1"


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int = 4


TEACHER_SHAPE = ModelShape(hidden_size=128, num_hidden_layers=3, intermediate_size=512)
STUDENT_SHAPE = ModelShape(hidden_size=96, num_hidden_layers=3, intermediate_size=288)

# Gold solutions the teacher learns from: problems per task and the difficulties they cover. Sized so
# that training the teacher (another build, or after a testbed change) takes about 4 minutes on 2
# cores: 3-digit accuracy depends on the number of arithmetic examples (half as many gave 5%, or 62%
# in batches of 16 for as many steps), the other two tasks trade a few points of accuracy for a
# minute of training.
# With 14,000 arithmetic examples the teacher sat at the edge: float-level changes in the loss
# computation (same formula, other summation order) moved its 3-digit accuracy between 78% and 97.5%;
# 20,000 keep it clear of that edge.
TEACHER_DATA = {"arithmetic": (20000, (1, 2, 3)), "word_problems": (5000, (2, 3)), "logic": (5000, (1, 2))}
TEACHER_HYPERPARAMETERS = Hyperparameters(
    epochs=1,
    learning_rate=3e-3,
    warmup_ratio=0.05,
    batch_size=8,
    gradient_accumulation_steps=4,
    max_length=384,
    logging_steps=50,
    save_steps=200,
)
MODEL_NAMES = ("teacher", "student")
# Seeds of the student's and the teacher's initial weights and of the teacher's data order.
SEEDS = {"student": 1, "teacher": 2, "data_order": 0}
# Another build of the same testbed: `REASONDISTILL_TESTBED_SEED=N` (N ≥ 1) derives every seed above from N,
# so the models differ as much as two training runs can. Tests whose outcome depends on how well the
# testbed trained are checked against several such builds (`make check-builds`), standing in for the
# last-bit differences another CPU or library version makes.
SEED_VARIABLE = "REASONDISTILL_TESTBED_SEED"


def cache_root() -> Path:
    return Path(os.environ.get("REASONDISTILL_CACHE", Path.home() / ".cache" / "reasondistill"))


def build_variant() -> int | None:
    """The build seed from REASONDISTILL_TESTBED_SEED, or None for the default build."""
    value = os.environ.get(SEED_VARIABLE, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"{SEED_VARIABLE}={value!r}: expected a whole number >= 1 (unset: the default build)")
    return int(value)


def build_seeds() -> dict[str, int]:
    variant = build_variant()
    if variant is None:
        return dict(SEEDS)
    return {name: 1000 * variant + seed for name, seed in SEEDS.items()}


def build_fingerprint() -> str:
    """Changes whenever anything that shapes the testbed models changes, so stale caches are rebuilt.

    That includes the source of the task generators and of the testbed itself: a changed solution
    format must not reuse a teacher trained on the old one. Benchmark loaders are not part of it.
    """
    package = Path(__file__).resolve().parents[1]
    generators = {Path(inspect.getfile(type(task))) for task in TASKS.values()}
    # Named, not globbed: the teacher zoo (zoo.py) trains on this testbed but does not shape it.
    testbed = [package / "testbed" / name for name in ("__init__.py", "models.py", "tokenizer.py")]
    sources = sorted({*generators, package / "tasks" / "base.py", *testbed})
    spec = {
        "version": TESTBED_VERSION,
        "sources": {str(p.relative_to(package)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sources},
        "teacher": asdict(TEACHER_SHAPE),
        "student": asdict(STUDENT_SHAPE),
        "data": TEACHER_DATA,
        "hyperparameters": TEACHER_HYPERPARAMETERS.model_dump(),
    }
    if build_variant() is not None:  # only another build adds its seeds: the default one has fixed seeds
        spec["seeds"] = build_seeds()
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def testbed_dir() -> Path:
    return cache_root() / f"testbed-{build_fingerprint()}"


def _model_config(shape: ModelShape, tokenizer) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_attention_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def save_initial_model(shape: ModelShape, tokenizer_dir: Path, path: Path, seed: int) -> None:
    """A randomly initialised model with the testbed tokenizer, saved like any Hub checkpoint."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(_model_config(shape, tokenizer))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def teacher_training_examples() -> list[TrainingExample]:
    examples = []
    for name, (count, difficulties) in TEACHER_DATA.items():
        for problem in TASKS[name].sample("train", count, seed=-2, difficulties=difficulties):
            examples.append(
                TrainingExample(
                    problem_id=problem.id,
                    task=problem.task,
                    messages=problem.messages,
                    completion=problem.solution,
                )
            )
    return examples


@contextlib.contextmanager
def exclusive(lock: Path) -> Iterator[None]:
    """One build at a time across processes (test workers, parallel recipes) of what `lock` guards."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_testbed(force: bool = False, train: bool = False) -> Path:
    """Build (or reuse) the tokenizer, the student initialisation and the trained teacher.

    The teacher comes from the shipped weights where they fit this build, unless `train` is set.
    """
    root = testbed_dir()
    if (root / "DONE").exists() and not force:
        return root
    with exclusive(root.with_name(f".{root.name}.lock")):
        if (root / "DONE").exists() and not force:
            return root  # another process built it while this one waited
        return _build(root, train)


def _build(root: Path, train: bool) -> Path:
    started = time.time()
    shutil.rmtree(root, ignore_errors=True)
    # An interrupted build continues in its staging folder: every piece is deterministic, and the
    # teacher's training resumes from its last checkpoint.
    staging = root.with_name(f".{root.name}.building")
    if not (staging / "tokenizer").exists():
        build_tokenizer(staging / "tokenizer")
    seeds = build_seeds()
    if not (staging / "student").exists():
        save_initial_model(STUDENT_SHAPE, staging / "tokenizer", staging / "student", seed=seeds["student"])
    shipped = None if train else shipped_teacher(build_fingerprint(), build_variant())
    if shipped is not None:
        log.info("testbed in %s: the shipped teacher weights (trained by this testbed code)", root)
        stats = install_shipped_teacher(shipped, staging / "teacher")
    else:
        log.info("building the testbed models in %s (a few minutes on 2 CPU cores, once)", root)
        stats = _train_teacher(staging, seeds)
    (staging / "DONE").write_text(
        json.dumps(
            {"seconds": time.time() - started, "shipped": shipped is not None, "teacher": stats}, indent=2
        )
    )
    staging.rename(root)
    return root


def _train_teacher(staging: Path, seeds: dict[str, int]) -> dict:
    """Train the teacher from its seeded initialisation into staging/teacher; its training stats."""
    if not (staging / "teacher-init").exists():
        save_initial_model(
            TEACHER_SHAPE, staging / "tokenizer", staging / "teacher-init", seed=seeds["teacher"]
        )
    stats = train_model(
        staging / "teacher-init",
        teacher_training_examples(),
        staging / "teacher",
        TEACHER_HYPERPARAMETERS.model_copy(update={"seed": seeds["data_order"]}),
        description="testbed teacher",
        resume_key=build_fingerprint(),
    )
    shutil.rmtree(staging / "teacher-init")
    return stats
