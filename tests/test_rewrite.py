"""`rewrite` (DAP): prompt, reading the teacher's sections and tier, re-grading, drops, resumption."""

import json
import shutil
import textwrap

import pytest
from pydantic import ValidationError

from reasondistill.curate import teacher_jobs as rewrite_module
from reasondistill.curate.rewrite import (
    DAP_SYSTEM_PROMPT,
    dap_messages,
    framework_headings,
    judged_tier,
    parse_dap,
)
from reasondistill.errors import UserError
from reasondistill.generate.base import Completion, Usage, notify_each
from reasondistill.recipe import check_references, load_recipe
from reasondistill.records import GradedTrace, Trace, read_records
from reasondistill.rundir import RunDir
from reasondistill.stages import generate as generate_module
from reasondistill.stages.generate import GenerateConfig, run_generate
from reasondistill.stages.problems import ProblemsConfig, run_problems
from reasondistill.stages.rewrite import RewriteConfig, dropped_file, run_rewrite
from reasondistill.stages.verify import VerifyConfig, run_verify
from reasondistill.store import problems_by_id, trace_shards
from reasondistill.tasks import get_task
from reasondistill.verify.reasoning import split_reasoning


class Interrupted(Exception):
    """Stands in for a kill in the middle of a job."""


class ScriptedGenerator:
    """A Generator whose reply to each prompt is `script(messages)`: a text or a Completion."""

    backend = "scripted"
    concurrent_calls = False

    def __init__(self, script, fail_after: int | None = None):
        self.script, self.fail_after = script, fail_after
        self.usage = Usage()
        self.prompts: list = []

    def describe(self) -> dict:
        return {"backend": self.backend}

    def generate(self, prompts, sampling, progress=None, seeds=None, on_result=None):
        assert sampling.n == 1
        replies = []
        for messages in prompts:
            if self.fail_after is not None and len(self.prompts) >= self.fail_after:
                raise Interrupted
            self.prompts.append(messages)
            reply = self.script(messages)
            if isinstance(reply, str):
                reply = Completion(reply, [], "stop", 10, len(reply.split()))
            self.usage.requests += 1
            self.usage.prompt_tokens += reply.prompt_tokens
            self.usage.completion_tokens += reply.completion_tokens
            replies.append([reply])
        if progress:
            progress(len(prompts))
        notify_each(replies, on_result)
        return replies

    def close(self) -> None:
        pass


def use_generator(monkeypatch, module, generator) -> None:
    monkeypatch.setattr(module, "open_generator", lambda *args, **kwargs: generator)


def problem_of(messages, problems):
    """The problem whose question a prompt holds (the DAP user message quotes it)."""
    user = messages[-1].content
    (match,) = [p for p in problems if p.messages[0].content in user]
    return match


PROBLEMS = 6


@pytest.fixture
def run(tmp_path, monkeypatch) -> RunDir:
    """Six arithmetic problems, two gold traces each (one of them wrong), verified: graded/gold."""
    run = RunDir(tmp_path / "run")
    run_problems(ProblemsConfig(tasks=["arithmetic"], train=PROBLEMS, test=0, seed=3), run, False)
    problems = sorted(problems_by_id(run).values(), key=lambda p: p.id)
    last = problems[-1]

    calls = iter(range(100))

    def gold_but_one_wrong(messages):  # the second sample of the last problem answers wrong
        problem, call = problem_of(messages, problems), next(calls)
        if problem.id == last.id and call % 2 == 1:
            return problem.solution.replace(f"The answer is {problem.answer}.", "The answer is 1.")
        return problem.solution

    use_generator(monkeypatch, generate_module, ScriptedGenerator(gold_but_one_wrong))
    run_generate(
        GenerateConfig(model="gold", backend="openai", name="gold", n=2, temperature=0.8, shard_size=4),
        run,
        False,
    )
    run_verify(VerifyConfig(traces="gold"), run, False)
    return run


def ordered(run: RunDir):
    return sorted(problems_by_id(run).values(), key=lambda p: p.id)


SIMPLE = "**Thought:**\n**Analysis:** two numbers.\n**Approach:** add.\n**Summary:** {a}.\n\n**Solution:**\nThe answer is {a}."
MODERATE = (
    "**Thought:**\n**Analysis:** add {q}.\n**Initial Approach:** add the columns.\n**Reflection:** carries.\n"
    "**Improvement:** keep the carries.\n**Summary:** {a}.\n\n**Solution:**\nAdding with carries gives {a}. "
    "The answer is {a}."
)
COMPLEX = (
    "<think>The hidden thinking of a reasoning teacher, left out.</think>\n"
    "## Thought\n**Analysis:** a sum.\n**Problem Decomposition:** ones, tens, hundreds.\n"
    "**Sub-problem Processing:**\n- Sub-problem 1: ones. Initial approach: add. Reflection: carry. Improved solution: ok.\n"
    "- Sub-problem 2: tens, the same with the carry.\n**Integration:** join the digits.\n"
    "**Overall Reflection:** all carries used.\n**Final Optimization:** none.\n**Summary:** the sum is {a}.\n"
    "## Solution\nColumn by column the sum of {q} is {a}, counting every carry once and writing the digits "
    "from the ones upwards. The answer is {a}."
)


def dap_script(problems):
    """Per problem (in id order): simple, moderate (one cut off), complex, a changed answer, no
    answer, no sections."""
    seen: dict[str, int] = {}

    def reply(messages):
        problem = problem_of(messages, problems)
        index = [p.id for p in problems].index(problem.id)
        seen[problem.id] = seen.get(problem.id, 0) + 1
        a, q = problem.answer, problem.messages[0].content
        if index == 0:
            return SIMPLE.format(a=a)
        if index == 1:
            if seen[problem.id] == 2:  # the second sample reaches the token limit
                return Completion(MODERATE.format(a=a, q=q)[:100], [], "length", 10, 30)
            return MODERATE.format(a=a, q=q)
        if index == 2:
            return COMPLEX.format(a=a, q=q)
        if index == 3:  # the rewrite changes the answer
            return SIMPLE.format(a=int(a) + 1)
        if index == 4:
            return SIMPLE.format(a=a).replace(f"The answer is {a}.", "I am not sure.")
        return f"The answer is {a}."  # no Thought / Solution sections

    return reply


def rewrite_config(**options) -> RewriteConfig:
    return RewriteConfig(
        **{"model": "dap-teacher", "backend": "openai", "traces": "gold", "name": "dap", **options}
    )


def test_the_dap_prompt_holds_the_problem_the_gold_answer_and_the_answer_format(run):
    problem = ordered(run)[0]
    trace = read_records(run.graded("gold"), GradedTrace)[0]
    system, user = dap_messages(problem, trace)
    assert system.role == "system" and system.content == DAP_SYSTEM_PROMPT
    for heading in (
        "Analysis",
        "Initial Approach",
        "Problem Decomposition",
        "Final Optimization",
        "**Solution:**",
    ):
        assert heading in system.content
    assert user.content.startswith('Return your final response as "The answer is X."')
    assert (
        f"{problem.messages[0].content}\nBelow is the correct answer to the above question:\n{problem.answer}\n"
        in (user.content)
    )
    assert user.content.endswith("based on the question and answer.") and trace.reasoning not in user.content

    (_, with_trace) = dap_messages(problem, trace, include_trace=True)
    assert trace.reasoning in with_trace.content
    (custom,) = dap_messages(problem, trace, system_prompt="", template="Q: {question} A: {answer}")
    assert custom.role == "user" and custom.content == f"Q: {problem.messages[0].content} A: {problem.answer}"
    with pytest.raises(ValidationError, match="unknown field"):
        rewrite_config(template="{question} {gold}")
    with pytest.raises(ValidationError, match="own name"):
        rewrite_config(name="gold")


@pytest.mark.parametrize(
    ("text", "tier"),
    [
        ("**Analysis:** a\n**Approach:** b\n**Summary:** c", "simple"),
        ("Analysis: a\nInitial Approach: b\nReflection: c\nImprovement: d\nSummary: e", "moderate"),
        ("### Analysis\na\n### Problem Decomposition\nb\n- Sub-problem 1: c\n### Integration\nd", "complex"),
        ("1. **Analysis**: a\n2. **Approach**: b", "simple"),
        ("We add the ones and then the tens. The approach: columns.", None),
    ],
)
def test_the_judged_tier_comes_from_the_framework_headings(text, tier):
    assert judged_tier(framework_headings(text)) == tier


def test_a_reply_is_read_as_thought_and_solution_without_the_teachers_own_thinking():
    reply = parse_dap(COMPLEX.format(a=7, q="3 + 4"))
    assert reply.structured and reply.tier == "complex" and reply.teacher_thinking_dropped
    split = split_reasoning(reply.completion())
    assert split.closed and split.final.endswith("The answer is 7.")
    assert "hidden thinking" not in reply.completion() and split.reasoning.startswith("**Analysis:** a sum.")
    tags = parse_dap(
        "<|begin_of_thought|>Analysis: x\nApproach: y<|end_of_thought|><|begin_of_solution|>The answer is 2.<|end_of_solution|>"
    )
    assert (tags.thought, tags.solution, tags.tier) == (
        "Analysis: x\nApproach: y",
        "The answer is 2.",
        "simple",
    )
    inside = parse_dap(
        "<think>**Thought:**\nAnalysis: x\nApproach: y</think>\n**Solution:** The answer is 2."
    )
    assert (inside.thought, inside.solution, inside.teacher_thinking_dropped) == (
        "Analysis: x\nApproach: y",
        "The answer is 2.",
        False,
    )
    assert not parse_dap("<think>steps</think>\nThe answer is 2.").structured


def test_rewrites_are_graded_again_and_a_dap_rewrite_that_changes_the_answer_is_dropped(run, monkeypatch):
    problems = ordered(run)
    generator = ScriptedGenerator(dap_script(problems))
    use_generator(monkeypatch, rewrite_module, generator)
    run_rewrite(rewrite_config(shard_size=3), run, False)

    originals = {(g.problem_id, g.sample_idx): g for g in read_records(run.graded("gold"), GradedTrace)}
    assert sum(g.label == "correct" for g in originals.values()) == 2 * PROBLEMS - 1
    assert len(generator.prompts) == 2 * PROBLEMS - 1  # only the correct traces are rewritten

    ids = [p.id for p in problems]
    kept = read_records(run.graded("dap"), GradedTrace)
    assert sorted((g.problem_id, g.sample_idx) for g in kept) == [
        (ids[0], 0), (ids[0], 1), (ids[1], 0), (ids[2], 0), (ids[2], 1)
    ]  # fmt: skip
    grader = get_task("arithmetic").grader
    by_id = problems_by_id(run)
    for g in kept:
        assert g.label == "correct" and g.grader == grader.id
        assert grader.grade(g.completion, by_id[g.problem_id]).label == "correct"  # what eval would say
        assert g.completion.startswith("<think>\n") and g.reasoning.startswith("**Analysis:**")
        assert (
            g.final.endswith(f"The answer is {by_id[g.problem_id].answer}.") and "hidden" not in g.completion
        )
        source = json.loads(g.source)
        assert (
            source["rewriter"]["model"] == "dap-teacher"
            and source["rewriter"]["sampling"]["temperature"] == 0
        )
        assert source["original"]["traces"] == "gold" and source["original"]["source"]["model"] == "gold"
        expected_tier = {ids[0]: "simple", ids[1]: "moderate", ids[2]: "complex"}[g.problem_id]
        assert source["dap"]["tier"] == expected_tier

    stats = run.manifest()["steps"]["rewrite:dap"]["stats"]
    assert stats["selected"] == 2 * PROBLEMS - 1 and stats["kept"] == 5 and stats["input"] == 2 * PROBLEMS
    assert stats["dropped"] == {"failed": 0, "cut": 1, "unstructured": 1, "unparseable": 2, "incorrect": 2}
    assert stats["kept"] + sum(stats["dropped"].values()) == stats["selected"]
    assert stats["tiers"] == {"simple": 6, "moderate": 2, "complex": 2, "none": 1}
    length = stats["length"]
    assert length["unit"] == "words" and length["rewrites"] == 5
    simple, complex_ = length["by_tier"]["simple"], length["by_tier"]["complex"]
    assert simple["after_mean"] < simple["before_mean"] and complex_["after_mean"] > complex_["before_mean"]
    assert stats["usage"]["requests"] == 2 * PROBLEMS - 1
    assert run.manifest()["teacher_usage"]["requests"] == 2 * PROBLEMS * 2 - 1  # generate + rewrite

    listed = json.loads(dropped_file(run, "dap").read_text())
    assert listed["dropped"] == stats["dropped"]
    rows = {(r["problem_id"], r["sample_idx"]): (r["reason"], r["extracted"]) for r in listed["rows"]}
    wrong = str(int(by_id[ids[3]].answer) + 1)
    assert rows == {
        (ids[1], 1): ("cut", None),
        (ids[3], 0): ("incorrect", wrong),
        (ids[3], 1): ("incorrect", wrong),
        (ids[4], 0): ("unparseable", None),
        (ids[4], 1): ("unparseable", None),
        (ids[5], 0): ("unstructured", by_id[ids[5]].answer),
    }

    # Rerunning the finished step asks the teacher nothing.
    again = ScriptedGenerator(dap_script(problems))
    use_generator(monkeypatch, rewrite_module, again)
    run_rewrite(rewrite_config(shard_size=3), run, False)
    assert again.prompts == []


def test_without_require_structure_a_plain_reply_is_graded_as_written(run, monkeypatch):
    problems = ordered(run)
    use_generator(monkeypatch, rewrite_module, ScriptedGenerator(dap_script(problems)))
    run_rewrite(rewrite_config(require_structure=False, select=["correct", "incorrect"]), run, False)
    stats = run.manifest()["steps"]["rewrite:dap"]["stats"]
    assert stats["selected"] == 2 * PROBLEMS and stats["dropped"]["unstructured"] == 0
    plain = [g for g in read_records(run.graded("dap"), GradedTrace) if g.problem_id == problems[5].id]
    assert [(g.sample_idx, g.completion, g.reasoning) for g in plain] == [
        (0, f"The answer is {problems[5].answer}.", None),
        (1, f"The answer is {problems[5].answer}.", None),  # the wrong original, rewritten right
    ]


def test_a_killed_rewrite_resumes_with_no_row_lost_or_written_twice(run, tmp_path, monkeypatch):
    problems = ordered(run)
    fresh = RunDir(tmp_path / "fresh")
    shutil.copytree(run.root, fresh.root)
    cfg = rewrite_config(shard_size=2)
    use_generator(monkeypatch, rewrite_module, ScriptedGenerator(dap_script(problems), fail_after=5))
    with pytest.raises(Interrupted):
        run_rewrite(cfg, run, False)
    index = json.loads((run.traces("dap") / "index.json").read_text())
    assert index["finished"] == [0, 1] and "rewrite:dap" not in run.manifest()["steps"]

    resumed = ScriptedGenerator(dap_script(problems))
    use_generator(monkeypatch, rewrite_module, resumed)
    run_rewrite(cfg, run, False)
    assert len(resumed.prompts) == 2 * PROBLEMS - 1 - 4  # the two finished shards are not asked again

    use_generator(monkeypatch, rewrite_module, ScriptedGenerator(dap_script(problems)))
    run_rewrite(cfg, fresh, False)  # the same job, never interrupted
    resumed_rows = [g.model_dump() for g in read_records(run.graded("dap"), GradedTrace)]
    assert resumed_rows == [g.model_dump() for g in read_records(fresh.graded("dap"), GradedTrace)]
    assert len({(r["problem_id"], r["sample_idx"]) for r in resumed_rows}) == len(resumed_rows) == 5
    assert json.loads(dropped_file(run, "dap").read_text()) == json.loads(
        dropped_file(fresh, "dap").read_text()
    )


def test_a_recipe_can_rewrite_then_curate_and_chunk_the_rewrites(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        textwrap.dedent(
            f"""
            run_dir: {tmp_path / "run"}
            steps:
              - problems: {{tasks: [arithmetic], train: 4, test: 0}}
              - generate: {{model: "testbed:teacher", name: teacher, n: 1}}
              - verify: {{traces: teacher}}
              - rewrite: {{traces: teacher, model: "testbed:teacher"}}
              - curate: {{name: lite, traces: teacher-dap}}
              - chunk: {{name: stt, traces: teacher-dap}}
              - train: {{name: student, init: "testbed:student", data: stt}}
            """
        )
    )
    _, steps = load_recipe(recipe)
    assert steps[3].stage.produces(steps[3].config) == ["rewrite:teacher-dap"]
    check_references(steps, RunDir(tmp_path / "run"))

    recipe.write_text(
        recipe.read_text().replace(
            "curate: {name: lite, traces: teacher-dap}", "curate: {name: lite, traces: dap}"
        )
    )
    _, steps = load_recipe(recipe)
    with pytest.raises(UserError, match="a `verify` step named 'dap' or a `rewrite` step named 'dap'"):
        check_references(steps, RunDir(tmp_path / "run"))


@pytest.mark.slow
def test_the_testbed_teacher_rewrites_through_the_hf_backend_and_every_rewrite_is_graded(testbed, tmp_path):
    """The testbed teacher cannot follow a DAP prompt; whatever it writes is graded and counted."""
    run = RunDir(tmp_path / "run")
    problems = ProblemsConfig(
        tasks=["arithmetic"], train=3, test=0, seed=0, difficulty={"arithmetic": [2, 3]}
    )
    run_problems(problems, run, False)
    run_generate(
        GenerateConfig(model="testbed:teacher", name="teacher", n=1, temperature=0, max_new_tokens=120),
        run,
        False,
    )
    run_verify(VerifyConfig(traces="teacher"), run, False)
    correct = [g for g in read_records(run.graded("teacher"), GradedTrace) if g.label == "correct"]
    assert len(correct) == 3  # it adds numbers of up to 3 digits without fail

    for name, structure in (("dap", True), ("plain", False)):
        cfg = RewriteConfig(
            model="testbed:teacher",
            traces="teacher",
            name=name,
            max_new_tokens=48,
            require_structure=structure,
        )
        run_rewrite(cfg, run, False)
        stats = run.manifest()["steps"][f"rewrite:{name}"]["stats"]
        kept = read_records(run.graded(name), GradedTrace)
        listed = json.loads(dropped_file(run, name).read_text())["rows"]
        assert stats["selected"] == len(correct) == stats["kept"] + sum(stats["dropped"].values())
        assert len(kept) == stats["kept"] and len(listed) == sum(stats["dropped"].values())
        assert all(g.label == "correct" for g in kept) and stats["dropped"]["failed"] == 0
        assert {(g.problem_id, g.sample_idx) for g in kept} | {
            (r["problem_id"], r["sample_idx"]) for r in listed
        } == {(g.problem_id, g.sample_idx) for g in correct}
        assert stats["length"]["unit"] == "tokens" and stats["usage"]["requests"] == len(correct)
        raw = [t for shard in trace_shards(run.traces(name)) for t in read_records(shard, Trace)]
        assert len(raw) == len(correct) and all(t.completion_tokens <= 48 for t in raw)

    # Asked the bare question (no system prompt, template "{question}"), the greedy teacher writes its
    # original traces again, token for token: every one is kept, under the original's keys and length.
    bare = RewriteConfig(model="testbed:teacher", traces="teacher", name="bare", system_prompt="", template="{question}",
                         max_new_tokens=120, require_structure=False)  # fmt: skip
    run_rewrite(bare, run, False)
    stats = run.manifest()["steps"]["rewrite:bare"]["stats"]
    kept = read_records(run.graded("bare"), GradedTrace)
    assert [(g.problem_id, g.sample_idx, g.completion) for g in kept] == [
        (g.problem_id, g.sample_idx, g.completion) for g in correct
    ]
    assert stats["kept"] == len(correct) and stats["length"]["before_mean"] == stats["length"]["after_mean"]
    assert stats["tiers"] == {"none": len(correct)}
