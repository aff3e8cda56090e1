"""Curation operators: each keeps what its rule says, respects its budget, and logs every drop."""

import json
import random
from collections import Counter

import pytest
from helpers import SHARED_BENCHMARKS
from hypothesis import given, settings
from hypothesis import strategies as st

from reasondistill.cli import main
from reasondistill.curate.operators import Candidate, Context, Dedup
from reasondistill.curate.pipeline import CurationDecision
from reasondistill.curate.similarity import farthest_first, jaccard, shingles, word_edit_distance
from reasondistill.errors import UserError
from reasondistill.recipe import load_recipe
from reasondistill.records import (
    GradedTrace,
    Message,
    PairExample,
    Problem,
    TrainingExample,
    read_records,
    write_records,
)
from reasondistill.rundir import RunDir, fingerprint
from reasondistill.stages.curate import CurateConfig, curate, run_curate
from reasondistill.stages.problems import ProblemsConfig, run_problems
from reasondistill.stages.verify import VerifyConfig
from reasondistill.store import problems_by_id

GSM8K_TEST = SHARED_BENCHMARKS / "gsm8k" / "test.jsonl"


def graded(
    problem: Problem, sample_idx: int, completion: str, label: str = "correct", tokens: int | None = None
):
    return GradedTrace(
        problem_id=problem.id, task=problem.task, sample_idx=sample_idx, source="{}", completion=completion,
        reasoning=None, final=completion, prompt_tokens=5, completion_tokens=tokens or len(completion.split()),
        finish_reason="stop", label=label, extracted=None, grader="test",
    )  # fmt: skip


def add_graded(run: RunDir, name: str, traces: list[GradedTrace]) -> None:
    """A graded set recorded as the `verify` step that would have written it."""

    def body(_):
        write_records(run.graded(name), traces, GradedTrace)
        return {}

    run.step(
        f"verify:{name}",
        VerifyConfig(traces=name),
        {"content": fingerprint([t.model_dump() for t in traces])},
        body,
        outputs=[run.graded(name)],
    )


@pytest.fixture
def run(tmp_path) -> RunDir:
    run = RunDir(tmp_path / "run")
    config = ProblemsConfig(
        tasks=["arithmetic", "word_problems"], train=30, test=0, difficulty={"arithmetic": [2, 3]}
    )
    run_problems(config, run, overwrite=False)
    return run


def problems(run: RunDir, task: str | None = None) -> list[Problem]:
    return sorted((p for p in problems_by_id(run).values() if task in (None, p.task)), key=lambda p: p.id)


def curated(run: RunDir, **options) -> tuple[list, list[CurationDecision], dict]:
    cfg = CurateConfig(name="out", **options)
    run_curate(cfg, run, overwrite=True)
    records = read_records(run.curated("out"), PairExample if cfg.pairs else TrainingExample)
    stats = run.manifest()["steps"]["curate:out"]["stats"]
    return records, read_records(run.curation("out"), CurationDecision), stats


def test_every_input_trace_is_logged_once_and_the_kept_ones_are_the_output(run):
    traces = [
        graded(p, j, f"{p.solution} sample {j}", "correct" if j < 2 else "incorrect")
        for p in problems(run)
        for j in range(3)
    ]
    add_graded(run, "t", traces)
    records, decisions, stats = curated(
        run, traces="t", ops=[{"length": {"max_tokens": 60}}], max_per_problem=1
    )
    assert sorted((d.problem_id, d.sample_idx) for d in decisions) == sorted(
        (t.problem_id, t.sample_idx) for t in traces
    )
    kept = [(d.problem_id, d.sample_idx) for d in decisions if d.kept]
    assert kept == [(e.problem_id, e.sample_idx) for e in records]
    reasons = Counter((d.op, d.reason) for d in decisions if not d.kept)
    assert reasons[("keep", "label incorrect")] == len(problems(run))
    long = [t for t in traces if t.label == "correct" and t.completion_tokens > 60]
    assert reasons[("length", "over max_tokens")] == len(long) > 0
    assert all(t.completion_tokens <= 60 for t in traces if (t.problem_id, t.sample_idx) in kept)
    assert [s["op"] for s in stats["operators"]] == ["keep", "length", "max_per_problem"]
    assert stats["input"] == len(traces) and sum(stats["kept"].values()) == len(records)
    assert all(s["input"] - s["kept"] == sum(s["dropped"].values()) for s in stats["operators"])


def test_difficulty_from_pass_rate_drops_the_easy_problems_and_levels_them(run):
    ps = problems(run, "arithmetic")[:6]
    # problem i gets i correct samples out of 4 (problems 4 and 5: all correct)
    traces = [
        graded(p, j, f"s{j} of {p.id}", "correct" if j < min(i, 4) else "incorrect")
        for i, p in enumerate(ps)
        for j in range(4)
    ]
    add_graded(run, "t", traces)
    _, decisions, _ = curated(
        run, traces="t", keep=["correct", "incorrect"], ops=[{"difficulty": {"max_pass_rate": 0.75}}]
    )
    rate = {d.problem_id: d.pass_rate for d in decisions}
    assert [rate[p.id] for p in ps] == [0, 0.25, 0.5, 0.75, 1, 1]
    assert {d.problem_id for d in decisions if d.kept} == {p.id for p in ps[:4]}
    assert {d.reason for d in decisions if not d.kept} == {"pass rate above max_pass_rate"}
    level = {d.problem_id: d.difficulty for d in decisions}
    assert [level[p.id] for p in ps] == [3, 3, 2, 1, 1, 1]  # 3 bins, higher = harder


def test_difficulty_can_come_from_another_models_samples_or_the_native_level(run):
    ps = problems(run, "arithmetic")[:4]
    add_graded(run, "teacher", [graded(p, 0, f"t {p.id}") for p in ps])
    # the student solves the first two problems, not the last two, and never saw the fourth
    add_graded(
        run, "student", [graded(p, 0, "s", "correct" if i < 2 else "incorrect") for i, p in enumerate(ps[:3])]
    )
    _, decisions, _ = curated(
        run, traces="teacher", ops=[{"difficulty": {"pass_rate_from": "student", "max_pass_rate": 0.5}}]
    )
    why = {d.problem_id: d.reason for d in decisions}
    assert why == {
        ps[0].id: "pass rate above max_pass_rate", ps[1].id: "pass rate above max_pass_rate",
        ps[2].id: None, ps[3].id: "no samples in student to estimate the pass rate",
    }  # fmt: skip
    _, decisions, _ = curated(
        run, traces="teacher", ops=[{"difficulty": {"source": "level", "keep_levels": [3]}}]
    )
    assert {d.problem_id for d in decisions if d.kept} == {p.id for p in ps if p.difficulty == 3}
    assert {d.difficulty for d in decisions} == {p.difficulty for p in ps} == {2, 3}


def test_a_total_token_budget_is_respected_and_spread_over_problems(run):
    ps = problems(run)[:10]
    traces = [graded(p, j, "x", tokens=10 + 7 * j + i) for i, p in enumerate(ps) for j in range(3)]
    add_graded(run, "t", traces)
    for budget in (9, 150, 333, 10_000):
        _, decisions, _ = curated(run, traces="t", ops=[{"length": {"total_tokens": budget}}])
        kept = [d for d in decisions if d.kept]
        assert sum(d.completion_tokens for d in kept) <= budget
        if budget >= sum(t.completion_tokens for t in traces):
            assert len(kept) == len(traces)
        if budget == 150:  # ten first samples cost 145: every problem before any second sample
            assert {d.problem_id for d in kept} == {p.id for p in ps} and {d.sample_idx for d in kept} == {0}


def test_mix_takes_long_and_short_traces_at_the_asked_ratio(run):
    ps = problems(run)
    traces = [graded(p, j, f"{p.id} {j}", tokens=200 if j == 0 else 50) for p in ps for j in range(3)]
    add_graded(run, "t", traces)
    _, decisions, stats = curated(
        run, traces="t", ops=[{"mix": {"ratio": {"long": 1, "short": 4}, "long_tokens": 100}}]
    )
    kept = Counter("long" if d.completion_tokens > 100 else "short" for d in decisions if d.kept)
    # 60 long and 120 short traces: 1 : 4 allows 30 long and 120 short, as many as the scarcer group allows
    assert kept == {"long": 30, "short": 120}
    _, decisions, _ = curated(
        run, traces="t", ops=[{"mix": {"ratio": {"long": 1, "short": 4}, "long_tokens": 100, "total": 25}}]
    )
    assert Counter("long" if d.completion_tokens > 100 else "short" for d in decisions if d.kept) == {
        "long": 5,
        "short": 20,
    }
    with pytest.raises(UserError, match=r"needs 80 'long' examples; the pool has 60 \(at most 75 in all\)"):
        curated(
            run,
            traces="t",
            ops=[{"mix": {"ratio": {"long": 4, "short": 1}, "long_tokens": 100, "total": 100}}],
        )


def test_mix_of_two_teachers_by_graded_set(run):
    ps = problems(run)
    add_graded(run, "big", [graded(p, 0, f"big {p.id}") for p in ps])
    add_graded(run, "small", [graded(p, j, f"small {p.id} {j}") for p in ps for j in range(2)])
    records, decisions, _ = curated(
        run, traces=["big", "small"], ops=[{"mix": {"ratio": {"big": 1, "small": 4}, "total": 50}}]
    )
    assert Counter(d.origin for d in decisions if d.kept) == {"big": 10, "small": 40}
    assert len(records) == 50 and all(
        e.sample_idx is None for e in records
    )  # several sets: no single sample index
    with pytest.raises(UserError, match="'tiny', which is not one of the curated graded sets"):
        curated(run, traces=["big", "small"], ops=[{"mix": {"ratio": {"big": 1, "tiny": 4}}}])


def test_diverse_keeps_the_most_distinct_traces_of_each_problem(run):
    p = problems(run)[0]
    base = "tens: 4 + 7 + 1 = 12, carry 1, so far 23. ones: 3 + 9 = 12, carry 1, so far 2."
    other = "first add the ones digits then the tens digits and write the carry above the next column"
    texts = [base, base.replace("ones", "units"), other, base + " so the sum is 122."]
    add_graded(run, "t", [graded(p, j, t) for j, t in enumerate(texts)])
    for distance in ("edit", "shingles"):
        for k in (1, 2, 3):
            options = {"per_problem": k, "distance": distance}
            _, decisions, _ = curated(run, traces="t", ops=[{"diverse": options}])
            kept = {d.sample_idx for d in decisions if d.kept}
            assert len(kept) == k and (k == 1 or 2 in kept)  # the odd one out is always among them
    assert word_edit_distance(other, base) > word_edit_distance(texts[1], base)


@given(
    st.lists(st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=2), min_size=2, max_size=12),
    st.integers(1, 12),
)
def test_farthest_first_is_the_greedy_max_min_choice(points, k):
    k = min(k, len(points) - 1)  # asking for all of them returns them in index order
    distance = lambda i, j: sum((a - b) ** 2 for a, b in zip(points[i], points[j], strict=False)) ** 0.5  # noqa: E731
    chosen = farthest_first(len(points), k, distance, start=0)
    assert len(chosen) == k == len(set(chosen)) and chosen[0] == 0
    for n in range(1, len(chosen)):  # each pick was as far from the chosen ones as any other candidate
        gap = lambda i, n=n: min(distance(i, c) for c in chosen[:n])  # noqa: E731
        assert gap(chosen[n]) >= max(gap(i) for i in range(len(points)) if i not in chosen[:n]) - 1e-9


# A vocabulary of 20 words makes accidental near duplicates likely; planted ones add a word or two.
@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(0, 19), min_size=3, max_size=25), min_size=1, max_size=25), st.data())
def test_dedup_is_idempotent_and_leaves_no_pair_over_the_threshold(word_lists, data):
    words = [f"w{i}" for i in range(20)]
    texts = [" ".join(words[i] for i in ws) for ws in word_lists]
    planted = data.draw(st.lists(st.sampled_from(range(len(texts))), max_size=5))
    texts += [texts[i] + " w3" for i in planted] + [texts[i].upper() for i in planted]
    problem = Problem(id="p", task="t", messages=[Message(role="user", content="q")], answer="1")
    pool = [Candidate(graded(problem, j, t), "t", problem) for j, t in enumerate(texts)]
    op = Dedup(near=0.7, shingle=2)
    ctx = Context(run=None, everything=pool, seed=0)
    once, dropped = op.apply(pool, ctx)
    twice, dropped_again = op.apply(once, ctx)
    assert [c.trace.sample_idx for c in twice] == [c.trace.sample_idx for c in once] and not dropped_again
    assert len(once) + len(dropped) == len(pool)
    kept_before = {c.name: shingles(c.trace.completion, 2) for c in once}
    for drop in dropped:  # every drop names a kept trace that is really that similar (LSH only proposes)
        similar = (
            drop.detail.split(" with ")[-1]
            if drop.reason == "near duplicate"
            else drop.detail.split(" as ")[-1]
        )
        assert jaccard(shingles(drop.candidate.trace.completion, 2), kept_before[similar]) >= 0.7
    assert not [
        i for i in planted if texts[i].upper() in {c.trace.completion for c in once}
    ]  # case-only copies go


def test_dedup_of_problems_drops_all_traces_of_a_reworded_copy(run):
    ps = problems(run, "word_problems")[:3]
    copy = ps[0].model_copy(
        update={
            "id": "copy",
            "messages": [Message(role="user", content=ps[0].messages[0].content + " Explain.")],
        }
    )
    pool = [Candidate(graded(p, j, f"{p.id} {j}"), "t", p) for p in [*ps, copy] for j in range(2)]
    kept, dropped = Dedup(compare="prompt").apply(pool, Context(run=None, everything=pool, seed=0))
    assert {c.trace.problem_id for c in kept} == {p.id for p in ps}
    assert [(d.candidate.trace.problem_id, d.reason) for d in dropped] == [("copy", "near duplicate")] * 2
    assert f"with t:{ps[0].id}#0" in dropped[0].detail


@pytest.mark.skipif(not GSM8K_TEST.exists(), reason=f"{GSM8K_TEST} not present")
def test_decontamination_removes_a_planted_benchmark_question(run):
    question = json.loads(GSM8K_TEST.read_text().splitlines()[7])["question"]
    ps = problems(run, "word_problems")[:5]
    planted = ps[2].model_copy(
        update={"messages": [Message(role="user", content=f"Consider this. {question}")]}
    )
    pool = [*ps[:2], planted, *ps[3:]]
    write_records(run.problems("word_problems", "train"), pool, Problem)
    add_graded(run, "t", [graded(p, 0, f"{p.id}") for p in pool])
    decontaminate = {"benchmarks": ["gsm8k"], "data_file": [str(GSM8K_TEST)]}
    _, decisions, stats = curated(run, traces="t", ops=[{"decontaminate": decontaminate}])
    assert [(d.problem_id, d.reason) for d in decisions if not d.kept] == [
        (planted.id, "shares an n-gram with a benchmark")
    ]
    assert [d.detail.split(":")[0] for d in decisions if not d.kept] == ["gsm8k-0007"]
    assert "benchmark:gsm8k" in run.manifest()["steps"]["curate:out"]["inputs"]
    assert stats["operators"][-1] == {
        "op": "decontaminate",
        "input": 5,
        "kept": 4,
        "dropped": {"shares an n-gram with a benchmark": 1},
    }


@pytest.mark.parametrize("allocation", ["balanced", "proportional"])
@pytest.mark.parametrize("budget", [1, 7, 20, 1000])
def test_selection_respects_its_budget_and_balances_strata(run, budget, allocation):
    ps = problems(run)  # 30 arithmetic (2 and 3 digits) + 30 word problems (levels 2 and 3)
    add_graded(run, "t", [graded(p, j, f"{p.id} {j}") for p in ps for j in range(2)])
    _, decisions, _ = curated(
        run, traces="t", ops=[{"select": {"problems": budget, "allocation": allocation}}]
    )
    chosen = {d.problem_id for d in decisions if d.kept}
    assert len(chosen) == min(budget, len(ps))
    assert all(d.kept == (d.problem_id in chosen) for d in decisions)  # every trace of a chosen problem stays
    by_id = problems_by_id(run)
    strata = Counter((by_id[i].task, by_id[i].difficulty) for i in chosen)
    sizes = Counter((p.task, p.difficulty) for p in ps)
    if allocation == "balanced" and budget == 20:  # every stratum has more than its share: equal shares
        assert len(strata) == len(sizes) and max(strata.values()) - min(strata.values()) <= 1
    if allocation == "proportional" and budget == 20:
        assert all(abs(strata[k] - 20 * n / len(ps)) < 1 for k, n in sizes.items())


def test_selection_prefers_problems_far_apart(run):
    ps = problems(run, "word_problems")[:4]
    clones = [ps[0].model_copy(update={"id": f"clone{i}", "difficulty": ps[0].difficulty}) for i in range(6)]
    write_records(run.problems("word_problems", "train"), [*ps[:1], *clones, *ps[1:]], Problem)
    add_graded(run, "t", [graded(p, 0, "x") for p in [*ps[:1], *clones, *ps[1:]]])
    _, decisions, _ = curated(run, traces="t", ops=[{"select": {"problems": 4, "by": ["task"]}}])
    chosen = {d.problem_id for d in decisions if d.kept}
    assert len(chosen & {"clone0", "clone1", "clone2", "clone3", "clone4", "clone5", ps[0].id}) == 1


def test_pairs_use_the_traces_the_operators_kept_and_log_the_unpaired(run):
    ps = problems(run)[:3]
    traces = [
        graded(
            p,
            j,
            f"{p.id} answer {j} " + "long " * (50 if j == 1 else 0),
            "correct" if j % 2 == 0 else "incorrect",
        )
        for p in ps
        for j in range(4)
    ]
    add_graded(run, "t", traces)
    pairs, decisions, stats = curated(run, traces="t", pairs=True, ops=[{"length": {"max_tokens": 20}}])
    # sample 1 (incorrect) is too long: each problem pairs sample 0 with sample 3, sample 2 has no partner
    assert [(p.chosen, p.rejected) for p in pairs] == [(f"{p.id} answer 0 ", f"{p.id} answer 3 ") for p in ps]
    assert Counter((d.op, d.sample_idx) for d in decisions if not d.kept) == {
        ("length", 1): 3,
        ("pairs", 2): 3,
    }
    assert stats["operators"][-1]["pairs"] == 3


def test_operators_in_a_recipe_are_checked_before_anything_runs(tmp_path):
    recipe = tmp_path / "r.yaml"
    base = "run_dir: r\nsteps:\n  - curate: {name: c, traces: [a, b], ops: [%s]}\n"
    recipe.write_text(
        base % "{dedup: {near: 0.8}}, {difficulty: {pass_rate_from: s}}, {select: {problems: 5}}"
    )
    _, steps = load_recipe(recipe)
    assert [op.op for op in steps[0].config.ops] == ["dedup", "difficulty", "select"]
    assert steps[0].stage.requires(steps[0].config) == {
        "traces[0]": ("verify:a", "rewrite:a"), "traces[1]": ("verify:b", "rewrite:b"),
        "ops.difficulty.pass_rate_from": ("verify:s", "rewrite:s"),
    }  # fmt: skip
    recipe.write_text(base % "{dedup: {near: 1.5}}")
    with pytest.raises(
        UserError, match=r"steps\[0\]\.curate: ops\.0\.dedup\.near: .*less than or equal to 1"
    ):
        load_recipe(recipe)
    recipe.write_text(base % "{sort: {}}")
    with pytest.raises(UserError, match=r"ops\.0: Input tag 'sort' .* expected tags: 'difficulty', 'length'"):
        load_recipe(recipe)
    recipe.write_text(base % "{dedup: 3}")
    with pytest.raises(UserError, match=r"ops: .*dedup: expected a mapping of options, got 3"):
        load_recipe(recipe)


def test_the_cli_takes_operators_as_json(run, capsys):
    add_graded(run, "t", [graded(p, j, f"{p.id} {j}") for p in problems(run) for j in range(2)])
    main(
        [
            "curate",
            "--run-dir",
            str(run.root),
            "--name",
            "cli",
            "--traces",
            "t",
            "--ops",
            '[{"select": {"problems": 4}}]',
        ]
    )
    assert len({e.problem_id for e in read_records(run.curated("cli"), TrainingExample)}) == 4
    with pytest.raises(SystemExit):
        main(["curate", "--run-dir", str(run.root), "--name", "cli", "--traces", "t", "--ops", "select"])
    assert "--ops: expected a JSON list" in capsys.readouterr().err


def test_word_edit_distance_counts_words():
    assert word_edit_distance("a b c d", "a b c d") == 0
    assert word_edit_distance("a b c d", "a x c d") == 0.25
    assert word_edit_distance("A  b", "a b") == 0 and word_edit_distance("a", "b c") == 1


def test_curate_in_memory_matches_the_step(run):
    """`curate()` is what the step writes: usable from a notebook without a run step."""
    add_graded(run, "t", [graded(p, 0, p.id) for p in problems(run)[:5]])
    cfg = CurateConfig(
        name="x", traces="t", ops=[{"select": {"problems": 2}}], seed=random.Random(0).randrange(9)
    )
    records, decisions, stats = curate(cfg, run)
    assert len(records) == 2 == sum(d.kept for d in decisions) and stats["problems"] == 2


def test_near_duplicates_are_found_among_many_texts():
    rng = random.Random(0)
    vocabulary = [f"w{i}" for i in range(500)]
    texts = [" ".join(rng.choices(vocabulary, k=40)) for _ in range(300)]
    copies = []
    for i in range(0, 300, 10):  # 30 copies with one word of 40 replaced: Jaccard about 0.8
        words = texts[i].split()
        words[rng.randrange(40)] = "changed"
        copies.append(" ".join(words))
    problem = Problem(id="p", task="t", messages=[Message(role="user", content="q")], answer="1")
    pool = [Candidate(graded(problem, j, t), "t", problem) for j, t in enumerate(texts + copies)]
    kept, dropped = Dedup(near=0.7, shingle=3).apply(pool, Context(run=None, everything=pool, seed=0))
    assert sorted(d.candidate.trace.sample_idx for d in dropped) == list(range(300, 330))


def test_length_can_count_with_the_students_tokenizer(run, testbed):
    from transformers import AutoTokenizer

    ps = problems(run, "arithmetic")[:6]
    add_graded(run, "t", [graded(p, 0, p.solution, tokens=1) for p in ps])  # stored counts say 1 token
    tokenizer = AutoTokenizer.from_pretrained(testbed / "student")
    counts = sorted(len(tokenizer(p.solution, add_special_tokens=False)["input_ids"]) for p in ps)
    limit = counts[2]
    _, decisions, _ = curated(
        run, traces="t", ops=[{"length": {"max_tokens": limit, "tokenizer": "testbed:student"}}]
    )
    assert sum(d.kept for d in decisions) == sum(c <= limit for c in counts) < len(ps)
    _, decisions, _ = curated(run, traces="t", ops=[{"length": {"max_tokens": limit}}])
    assert all(d.kept for d in decisions)
