"""A stored teacher's rows laid out for training (train/stored_teacher.py): the rows of the old
in-memory layout, read one store file at a time, memory-mapped, and refused with one line when the
store does not fit the examples."""

from __future__ import annotations

import pickle
import tracemalloc

import numpy as np
import pyarrow as pa
import pytest

from reasondistill.errors import UserError
from reasondistill.generate.logprobs import TokenLogprobs, logprobs_file, read_logprobs, write_logprobs
from reasondistill.objectives.base import IGNORE_INDEX
from reasondistill.records import TrainingExample
from reasondistill.train.data import TokenizedExample
from reasondistill.train.stored_teacher import StoredTeacher, TeacherRows, write_teacher_rows

K = 8


def distribution(rng: np.random.Generator, length: int, k: int = K) -> TokenLogprobs:
    top = -np.sort(rng.exponential(2.0, (length, k)), axis=1)
    return TokenLogprobs(
        token_ids=rng.integers(0, 1000, length, dtype=np.int32),
        logprobs=rng.uniform(-5, 0, length).astype(np.float16),
        topk_ids=rng.integers(0, 1000, (length, k), dtype=np.int32),
        topk_logprobs=top.astype(np.float16),
        tail_logprob=rng.uniform(-9, -1, length).astype(np.float16),
    )


def example(problem_id: str, sample_idx: int | None = 0) -> TrainingExample:
    return TrainingExample(problem_id=problem_id, task="t", messages=[], completion="", sample_idx=sample_idx)


def tokenized_as(stored: TokenLogprobs, prompt: int, keep: int | None = None) -> TokenizedExample:
    """The student's tokens of a trace: `prompt` prompt tokens, then the stored completion (cut to `keep`)."""
    completion = stored.token_ids.tolist()
    kept = completion[:keep] if keep is not None else completion
    return TokenizedExample(
        input_ids=list(range(prompt)) + kept,
        labels=[IGNORE_INDEX] * prompt + kept,
        full_length=prompt + len(completion),
    )


@pytest.fixture
def store(tmp_path):
    """Three logprobs files of 4 traces each, written as a score step writes them."""
    rng = np.random.default_rng(0)
    traces = {(f"p{i}", i % 2): distribution(rng, int(rng.integers(3, 30))) for i in range(12)}
    keys = list(traces)
    files = [logprobs_file(tmp_path / "logprobs", part) for part in range(3)]
    for part, path in enumerate(files):
        write_logprobs(path, [(*key, traces[key]) for key in keys[4 * part : 4 * part + 4]])
    # read back: the rows hold what the files hold (float16, top-k relative to the top-1)
    decoded = {(p, s): d for path in files for p, s, d in read_logprobs(path)}
    return StoredTeacher.from_files(files, "the store"), decoded


def test_each_example_gets_the_rows_of_its_trace_after_its_prompt(store, tmp_path):
    """Examples in another order than the store, one trace taught twice, one completion cut at
    max_length: example i's rows are zero on its prompt and its trace's stored rows (float32) on its
    completion, as the in-memory layout had them."""
    stored, decoded = store
    keys = list(decoded)[::-1]  # the store's last trace first
    examples = [example(*key) for key in keys] + [example(*keys[0])]
    tokenized = [tokenized_as(decoded[key], prompt=3 + j % 4) for j, key in enumerate(keys)]
    tokenized.append(tokenized_as(decoded[keys[0]], prompt=5, keep=2))  # truncated
    write_teacher_rows(examples, tokenized, stored, tmp_path / "rows.arrow")
    rows = TeacherRows(tmp_path / "rows.arrow")

    assert len(rows) == len(examples) and rows.k == K
    assert rows.max_id == max(int(d.topk_ids.max()) for d in decoded.values())
    for i, (ex, tokens) in enumerate(zip(examples, tokenized, strict=True)):
        trace, start = decoded[(ex.problem_id, ex.sample_idx)], tokens.prompt_length
        n = len(tokens.input_ids) - start
        row = rows[i]
        assert row.topk_ids.shape == (start + n, K) and row.topk_ids.dtype == np.int64
        assert not row.topk_ids[:start].any() and not row.topk_logprobs[:start].any()
        assert not row.tail_logprob[:start].any() and not row.token_logprob[:start].any()
        np.testing.assert_array_equal(row.topk_ids[start:], trace.topk_ids[:n])
        np.testing.assert_array_equal(row.topk_logprobs[start:], trace.topk_logprobs[:n].astype(np.float32))
        np.testing.assert_array_equal(row.tail_logprob[start:], trace.tail_logprob[:n].astype(np.float32))
        np.testing.assert_array_equal(row.token_logprob[start:], trace.logprobs[:n].astype(np.float32))
    # a DataLoader worker started by spawn maps the file again
    again = pickle.loads(pickle.dumps(rows))
    np.testing.assert_array_equal(again[3].topk_logprobs, rows[3].topk_logprobs)


def test_the_rows_are_read_from_the_map_not_held_in_memory(store, tmp_path):
    """Opening the file and reading every example's rows allocates nothing in Arrow's memory pool:
    the record batches are views of the memory-mapped file."""
    stored, decoded = store
    examples = [example(*key) for key in decoded]
    write_teacher_rows(examples, [tokenized_as(d, 2) for d in decoded.values()], stored, tmp_path / "r.arrow")
    before = pa.total_allocated_bytes()
    rows = TeacherRows(tmp_path / "r.arrow")
    total = sum(rows[i].topk_ids.shape[0] for i in range(len(rows)))
    assert total == sum(len(d) + 2 for d in decoded.values())
    assert pa.total_allocated_bytes() == before


def test_the_store_is_read_one_part_at_a_time(tmp_path):
    """20 parts of 16 traces of 400 tokens (0.36 MB a part, decoded): laying them out holds at most
    a few parts in memory at once (2.3 here), where the old dictionary of every trace held all 20."""
    length, parts, per_part = 400, 20, 16
    keys = [[(f"p{part}-{i}", 0) for i in range(per_part)] for part in range(parts)]

    def generated_parts():
        rng = np.random.default_rng(1)
        for part in keys:
            yield [(p, s, distribution(rng, length)) for p, s in part]

    rng = np.random.default_rng(1)  # the same draws, for the students' tokens
    tokenized = [tokenized_as(distribution(rng, length), 4) for part in keys for _ in part]
    examples = [example(p, s) for part in keys for p, s in part]
    one_part = per_part * sum(
        a.nbytes for a in distribution(np.random.default_rng(2), length).__dict__.values()
    )
    # once untraced first, so that what it imports on the way is not counted
    write_teacher_rows(
        examples[:1], tokenized[:1], StoredTeacher("generated", generated_parts), tmp_path / "w"
    )
    tracemalloc.start()
    try:
        write_teacher_rows(
            examples, tokenized, StoredTeacher("generated", generated_parts), tmp_path / "r.arrow"
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * one_part < parts * one_part / 4, (peak, one_part)
    assert len(TeacherRows(tmp_path / "r.arrow")) == len(examples)


def test_a_store_that_does_not_fit_the_examples_is_one_line_naming_the_earliest_example(store, tmp_path):
    stored, decoded = store
    keys = list(decoded)
    path = tmp_path / "rows" / "r.arrow"

    def refused(examples, tokenized) -> str:
        with pytest.raises(UserError) as err:
            write_teacher_rows(examples, tokenized, stored, path)
        assert not path.parent.exists() or not any(path.parent.iterdir())  # nothing half-written
        return str(err.value)

    fine = [tokenized_as(decoded[key], 2) for key in keys]
    examples = [example(*key) for key in keys]
    # a trace the store lacks, after one whose tokens differ: the earlier example is named
    other = tokenized_as(decoded[keys[5]], 2)
    message = refused(
        [*examples[:3], examples[3], example("missing")],
        [*fine[:3], other, tokenized_as(decoded[keys[0]], 2)],
    )
    assert message == (
        f"the store: problem {keys[3][0]!r} sample {keys[3][1]}: the stored token ids differ from the "
        "student's tokenization of the completion (training data other than the scored traces, another "
        "tokenizer or chat template, or traces changed since scoring) (1 more of the 5 examples fail too)"
    )
    assert refused([example("missing"), *examples[1:]], fine) == (
        "the store: problem 'missing' sample 0: no stored teacher log-probabilities for this training example"
    )
    assert refused([example(keys[0][0], None)], fine[:1]).endswith(
        "no stored teacher log-probabilities for this training example"
    )
    # a completion shorter than its (untruncated) trace
    short = tokenized_as(decoded[keys[1]], 2, keep=1)
    short.full_length = len(short.input_ids)
    assert "differ from the student's tokenization" in refused(examples[1:2], [short])


def test_traces_with_another_k_or_none_are_refused(tmp_path):
    rng = np.random.default_rng(3)
    traces = {"a": distribution(rng, 5), "b": distribution(rng, 5, k=4), "c": distribution(rng, 5, k=0)}
    stored = StoredTeacher.from_rows({(p, 0): d for p, d in traces.items()}, "mixed")
    tokenized = {p: tokenized_as(d, 1) for p, d in traces.items()}
    path = tmp_path / "r.arrow"
    with pytest.raises(
        UserError, match=r"^mixed: problem 'b' sample 0: stored with k=4; expected k=8 like the other rows$"
    ):
        write_teacher_rows([example("a"), example("b")], [tokenized["a"], tokenized["b"]], stored, path)
    with pytest.raises(
        UserError, match=r"problem 'c' sample 0: stored with k=0; expected top-k log-probabilities"
    ):
        write_teacher_rows([example("c")], [tokenized["c"]], stored, path)
    assert not path.exists() and not list(tmp_path.iterdir())
