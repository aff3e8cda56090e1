"""The pre-flight check between teacher and student: one clear line for an incompatible pair, padded heads cut."""

import json
import logging
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer, Qwen2ForCausalLM

from reasondistill.errors import UserError
from reasondistill.records import TrainingExample
from reasondistill.tasks import TASKS
from reasondistill.testbed.models import ModelShape, _model_config
from reasondistill.train import trainer as trainer_module
from reasondistill.train.hyperparameters import Hyperparameters
from reasondistill.train.teachers import check_head, preflight
from reasondistill.train.trainer import Teachers, train_model

QWEN_TOKENIZER = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "tokenizers" / "Qwen2.5-0.5B-Instruct"
)
TINY = ModelShape(hidden_size=32, num_hidden_layers=1, intermediate_size=64, num_attention_heads=2)
PREFIX = "teacher T is not compatible with the student"


@pytest.fixture
def student(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture
def teacher(tokenizer_dir):
    """A fresh copy of the student's tokenizer, for a test to change one thing about."""
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def said(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "reasondistill.train.teachers"]


def cut_line(student_rows: int, teacher_rows: int, tokens: int) -> str:
    return (
        f"vocabulary rows beyond the tokenizer's {tokens} tokens (student {student_rows}, teacher "
        f"{teacher_rows}) are padding: both heads are cut to the first {tokens} rows"
    )


def check(student, teacher, student_rows=None, teacher_rows=None) -> int:
    rows = len(student)
    return preflight(student, teacher, student_rows or rows, teacher_rows or rows, "T")


def test_the_same_tokenizer_passes_and_keeps_every_row(student, teacher, caplog):
    caplog.set_level(logging.INFO, logger="reasondistill.train.teachers")
    assert check(student, teacher) == len(student)
    assert said(caplog) == []  # nothing cut, nothing said


def test_another_tokenizer_is_refused_naming_the_first_token_that_differs(student, tokenizer_dir, tmp_path):
    """Two ids swapped in the vocabulary: every other id agrees, training would silently mix them up."""
    changed = tmp_path / "swapped"
    shutil.copytree(tokenizer_dir, changed)
    spec = json.loads((changed / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[-2:]  # the last two merged tokens
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (changed / "tokenizer.json").write_text(json.dumps(spec))
    swapped = AutoTokenizer.from_pretrained(changed)

    with pytest.raises(UserError) as err:
        check(student, swapped)
    assert str(err.value) == (
        f"{PREFIX}: different tokenizers: token {first!r} is id {vocab[second]} for the student, "
        f"id {vocab[first]} for the teacher"
    )


def test_a_teacher_vocabulary_with_an_extra_token_is_refused(student, teacher):
    teacher.add_tokens(["<tool_call>"])
    with pytest.raises(UserError) as err:
        check(student, teacher)
    assert str(err.value) == (
        f"{PREFIX}: different tokenizers: token '<tool_call>' (teacher id {len(student)}) is absent "
        "from the student's vocabulary"
    )


@pytest.mark.skipif(
    not QWEN_TOKENIZER.is_dir(), reason="the shared Qwen2.5 tokenizer is not beside the checkout"
)
def test_a_real_qwen_teacher_for_a_testbed_student_is_refused(student):
    """The classic mistake: a Hub teacher of another family. The special tokens sit at other ids."""
    qwen = AutoTokenizer.from_pretrained(QWEN_TOKENIZER)
    with pytest.raises(UserError) as err:
        check(student, qwen, teacher_rows=151936)
    assert str(err.value) == (
        f"{PREFIX}: different tokenizers: token '<|endoftext|>' is id 0 for the student, id 151643 for the teacher"
    )


def test_another_eos_is_refused_naming_both_tokens(student, teacher):
    teacher.eos_token = "<|endoftext|>"
    with pytest.raises(UserError) as err:
        check(student, teacher)
    assert str(err.value) == (
        f"{PREFIX}: EOS differs: student '<|im_end|>' (id 2), teacher '<|endoftext|>' (id 0)"
    )


def test_another_chat_template_is_refused(student, teacher):
    teacher.chat_template = teacher.chat_template.replace("'\\n'", "'\\n\\n'")
    assert teacher.chat_template != student.chat_template
    with pytest.raises(UserError) as err:
        check(student, teacher)
    assert str(err.value) == (
        f"{PREFIX}: chat templates differ, so the same conversation becomes different token ids "
        "(save the student's template with the teacher's tokenizer, or the reverse)"
    )


@pytest.mark.parametrize("short", ["student", "teacher"])
def test_a_head_with_fewer_rows_than_the_tokenizer_is_refused(student, teacher, short):
    """Ids past the head would have no logit: indexing would fail mid-run, or read a wrong row."""
    tokens = len(student)
    rows = {"student_rows": tokens, "teacher_rows": tokens, f"{short}_rows": tokens - 2}
    with pytest.raises(UserError) as err:
        check(student, teacher, **rows)
    assert str(err.value) == f"{PREFIX}: a head has {tokens - 2} rows for a tokenizer of {tokens} tokens"


@pytest.mark.parametrize("student_padding, teacher_padding", [(0, 64), (32, 64), (64, 64)])
def test_padded_rows_are_cut_to_the_tokenizer_with_a_log_line(
    student, teacher, caplog, student_padding, teacher_padding
):
    """Qwen2.5 pads its heads (151,936 or 152,064 rows for 151,665 tokens): never a real token,
    whether the two models are padded alike or not."""
    caplog.set_level(logging.INFO, logger="reasondistill.train.teachers")
    tokens = len(student)
    rows = {"student_rows": tokens + student_padding, "teacher_rows": tokens + teacher_padding}
    assert check(student, teacher, **rows) == tokens
    assert said(caplog) == [cut_line(tokens + student_padding, tokens + teacher_padding, tokens)]


def test_models_that_rescale_their_logits_are_refused():
    """The loss projects hidden states with the output embeddings itself; a softcap would be skipped."""
    gemma_like = SimpleNamespace(config=SimpleNamespace(final_logit_softcapping=30.0))
    with pytest.raises(UserError, match=r"^teacher: models that rescale their logits"):
        check_head(gemma_like, "teacher")
    check_head(SimpleNamespace(config=SimpleNamespace()), "student")  # a plain head passes


# --- through train_model, with tiny random Qwen2 models ------------------------------------------


def save_model(tokenizer, path: Path, rows: int, seed: int) -> Path:
    """A random tiny Qwen2 with `rows` head rows, saved with `tokenizer` like a Hub checkpoint."""
    config = _model_config(TINY, tokenizer)
    config.vocab_size = rows
    torch.manual_seed(seed)
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def examples(n=4) -> list[TrainingExample]:
    return [
        TrainingExample(problem_id=p.id, task=p.task, messages=p.messages, completion=p.solution)
        for p in TASKS["arithmetic"].sample("train", n, seed=0, difficulties=[1])
    ]


HYPERPARAMETERS = Hyperparameters(
    objective="forward_kl", epochs=1, batch_size=2, logging_steps=1, learning_rate=1e-3, max_length=256
)


def test_a_padded_teacher_distils_end_to_end(student, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="reasondistill.train.teachers")
    tokens = len(student)
    init = save_model(student, tmp_path / "student", tokens, seed=1)
    teacher_dir = save_model(student, tmp_path / "teacher", tokens + 64, seed=2)

    stats = train_model(
        init, examples(), tmp_path / "out", HYPERPARAMETERS, teachers=Teachers(model=teacher_dir)
    )
    assert stats["steps"] == 2 and len(stats["loss_curve"]) == 2
    assert all(math.isfinite(loss) and loss > 0 for _, loss in stats["loss_curve"])
    assert said(caplog) == [cut_line(tokens, tokens + 64, tokens)]
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_a_teacher_with_another_eos_stops_the_run_before_training(student, tmp_path, monkeypatch):
    init = save_model(student, tmp_path / "student", len(student), seed=1)
    other = AutoTokenizer.from_pretrained(init)
    other.eos_token = "<|endoftext|>"
    teacher_dir = save_model(other, tmp_path / "teacher", len(student), seed=2)

    def no_trainer(*args, **kwargs):
        raise AssertionError("the trainer was built although the pre-flight check should have failed")

    monkeypatch.setattr(trainer_module, "DistillationTrainer", no_trainer)
    with pytest.raises(UserError) as err:
        train_model(init, examples(), tmp_path / "out", HYPERPARAMETERS, teachers=Teachers(model=teacher_dir))
    assert str(err.value) == (
        f"teacher {teacher_dir} is not compatible with the student: "
        "EOS differs: student '<|im_end|>' (id 2), teacher '<|endoftext|>' (id 0)"
    )
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / ".out.work").exists()  # refused before any work folder is made
