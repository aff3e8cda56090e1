"""The sparse teacher distribution: its values, its tail mass and its on-disk store."""

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from reasondistill.errors import UserError
from reasondistill.generate.logprobs import (
    TokenLogprobs,
    encode_topk,
    from_candidates,
    from_logits,
    read_logprobs,
    store_error,
    write_logprobs,
)
from reasondistill.objectives.divergences import kl_teacher_student, shared_support
from reasondistill.objectives.heads import SparseTargets


def test_from_logits_keeps_the_k_most_likely_tokens_and_the_exact_mass_of_the_rest():
    torch.manual_seed(0)
    logits = torch.randn(5, 50) * 3
    tokens = torch.tensor([3, 7, 7, 0, 49])
    stored = from_logits(logits, tokens, k=4)
    reference = torch.log_softmax(logits.double(), dim=-1)
    for t in range(5):
        order = reference[t].argsort(descending=True)[:4]
        assert stored.topk_ids[t].tolist() == order.tolist()
        np.testing.assert_allclose(stored.topk_logprobs[t], reference[t, order].numpy(), atol=2e-3)
        outside = 1 - reference[t, order].exp().sum().item()
        assert stored.tail_logprob[t] == pytest.approx(math.log(outside), abs=2e-3)
        assert stored.logprobs[t] == pytest.approx(reference[t, tokens[t]].item(), abs=2e-3)
    assert stored.token_ids.dtype == np.int32 and stored.topk_logprobs.dtype == np.float16


def test_the_tail_stays_finite_when_the_top_k_holds_all_the_mass():
    logits = torch.full((1, 10), -1e4)
    logits[0, 2] = 0.0
    stored = from_logits(logits, torch.tensor([2]), k=1)
    assert np.isfinite(stored.tail_logprob).all() and stored.tail_logprob[0] < -50
    assert stored.logprobs[0] == 0


def test_server_candidates_keep_the_k_most_likely_even_when_the_sampled_token_is_added():
    # vLLM returns top-k plus the sampled token when that one is not among them.
    candidates = [{5: -0.1, 9: -2.5, 1: -7.0}, {2: -0.5, 4: -1.2}]
    stored = from_candidates([1, 2], [-7.0, -0.5], candidates, k=2)
    assert stored.topk_ids.tolist() == [[5, 9], [2, 4]]
    assert stored.logprobs.tolist() == pytest.approx([-7.0, -0.5], abs=1e-2)
    expected_tail = math.log(1 - math.exp(-0.1) - math.exp(-2.5))
    assert stored.tail_logprob[0] == pytest.approx(expected_tail, abs=1e-2)
    with pytest.raises(ValueError, match="position 1: 2 candidates, expected at least 3"):
        from_candidates([1, 2], [-7.0, -0.5], candidates, k=3)


def _random_logprobs(rng, length: int, k: int) -> TokenLogprobs:
    logits = torch.from_numpy(rng.normal(size=(length, 300)) * 4)
    return from_logits(logits, torch.from_numpy(rng.integers(0, 300, length)), k)


def test_the_store_round_trips_every_array_with_its_dtype(tmp_path):
    """Everything comes back as written except the top-k log-probabilities below the top-1, which come
    back within `store_error` and in the same order."""
    rng = np.random.default_rng(0)
    rows = [
        ("p1", 0, _random_logprobs(rng, 7, 3)),
        ("p1", 1, _random_logprobs(rng, 1, 3)),
        ("p2", 0, _random_logprobs(rng, 4, 0)),
        ("p3", 0, _random_logprobs(rng, 50, 64)),
    ]
    write_logprobs(tmp_path / "l.parquet", rows)
    back = read_logprobs(tmp_path / "l.parquet")
    assert [(p, s, lp.k, len(lp)) for p, s, lp in back] == [
        ("p1", 0, 3, 7), ("p1", 1, 3, 1), ("p2", 0, 0, 4), ("p3", 0, 64, 50),
    ]  # fmt: skip
    for (_, _, written), (_, _, read) in zip(rows, back, strict=True):
        for name in ("token_ids", "logprobs", "topk_ids", "topk_logprobs", "tail_logprob"):
            assert getattr(read, name).dtype == getattr(written, name).dtype
            assert getattr(read, name).shape == getattr(written, name).shape
        for name in ("token_ids", "logprobs", "topk_ids", "tail_logprob"):
            np.testing.assert_array_equal(getattr(read, name), getattr(written, name))
        np.testing.assert_array_equal(read.topk_logprobs[:, :1], written.topk_logprobs[:, :1])
        error = np.abs(read.topk_logprobs.astype(np.float32) - written.topk_logprobs.astype(np.float32))
        assert (error <= store_error(written.topk_logprobs)).all()
        assert (np.diff(read.topk_logprobs.astype(np.float32), axis=1) <= 0).all()
    schema = pq.read_schema(tmp_path / "l.parquet")
    assert schema.field("topk_ids").type == pa.list_(pa.int32())
    assert schema.metadata[b"reasondistill.logprobs_format"] == b"2"


def test_files_of_the_first_format_are_still_read_exactly(tmp_path):
    """The float16 layout earlier runs wrote (topk_logprobs as float16 lists)."""
    rng = np.random.default_rng(3)
    rows = [("p", 0, _random_logprobs(rng, 5, 4)), ("q", 1, _random_logprobs(rng, 2, 4))]
    columns = {
        "problem_id": pa.array(["p", "q"]),
        "sample_idx": pa.array([0, 1], pa.int32()),
        "k": pa.array([4, 4], pa.int32()),
    }
    for name, dtype in (("token_ids", pa.int32()), ("logprobs", pa.float16()), ("topk_ids", pa.int32()),
                        ("topk_logprobs", pa.float16()), ("tail_logprob", pa.float16())):  # fmt: skip
        columns[name] = pa.array([getattr(r[2], name).ravel() for r in rows], pa.list_(dtype))
    pq.write_table(pa.table(columns), tmp_path / "old.parquet")
    for (_, _, written), (_, _, read) in zip(rows, read_logprobs(tmp_path / "old.parquet"), strict=True):
        for name in ("token_ids", "logprobs", "topk_ids", "topk_logprobs", "tail_logprob"):
            np.testing.assert_array_equal(getattr(read, name), getattr(written, name))


def test_unsorted_top_k_values_are_refused():
    with pytest.raises(ValueError, match="sorted, most likely first"):
        encode_topk(np.array([[-2.0, -1.0]], np.float16))


def test_the_store_changes_a_forward_kl_by_at_most_its_stated_bound(tmp_path):
    """With every teacher log-probability within ε of the one written (the top-1 and the tail exact),
    the per-token forward KL over top-k + tail changes by at most
    (e^ε − 1)·Σ_top-k p_T |log p_T − log p_S| + ε·e^ε."""
    rng = np.random.default_rng(4)
    written = _random_logprobs(rng, 200, 32)
    write_logprobs(tmp_path / "l.parquet", [("p", 0, written)])
    [(_, _, read)] = read_logprobs(tmp_path / "l.parquet")
    student_logits = torch.from_numpy(rng.normal(size=(200, 300)) * 3).float()

    def loss(stored: TokenLogprobs) -> tuple[torch.Tensor, torch.Tensor]:
        targets = SparseTargets(
            torch.tensor(stored.topk_ids, dtype=torch.long),
            torch.from_numpy(stored.topk_logprobs.astype(np.float32)),
            torch.from_numpy(stored.tail_logprob.astype(np.float32)),
        )
        student, teacher = shared_support(student_logits, targets)
        return kl_teacher_student(student, teacher), (teacher.exp() * (teacher - student).abs())[:, :-1].sum(
            -1
        )

    exact, spread = loss(written)
    stored, _ = loss(read)
    epsilon = float(store_error(written.topk_logprobs).max())
    bound = (math.exp(epsilon) - 1) * spread + epsilon * math.exp(epsilon)
    assert ((stored - exact).abs() <= bound + 1e-6).all()
    assert (stored - exact).abs().max() > 0  # the values did change


def test_a_row_whose_arrays_do_not_fit_its_length_is_a_located_error(tmp_path):
    rng = np.random.default_rng(1)
    write_logprobs(
        tmp_path / "l.parquet", [("p", 0, _random_logprobs(rng, 3, 2)), ("q", 0, _random_logprobs(rng, 3, 2))]
    )
    table = pq.read_table(tmp_path / "l.parquet")
    k = table.column("k").to_pylist()
    table = table.set_column(table.schema.get_field_index("k"), "k", pa.array([k[0], 5], pa.int32()))
    pq.write_table(table, tmp_path / "bad.parquet")
    with pytest.raises(
        UserError, match=r"bad.parquet row 1: topk_ids: expected 15 values \(3 tokens, k=5\), got 6"
    ):
        read_logprobs(tmp_path / "bad.parquet")


def test_a_realistic_shard_costs_at_most_4k_plus_16_bytes_per_token(tmp_path):
    rng = np.random.default_rng(2)
    k = 32
    rows = [(f"p{i}", 0, _random_logprobs(rng, 400, k)) for i in range(20)]
    write_logprobs(tmp_path / "l.parquet", rows)
    per_token = (tmp_path / "l.parquet").stat().st_size / sum(len(lp) for _, _, lp in rows)
    assert per_token <= 4 * k + 16
