"""`chunk`: chunkers that re-join exactly, the rule and teacher labellers, and the Skip-Thinking (STT) set."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_rewrite import ScriptedGenerator, problem_of, use_generator

from reasondistill.curate import teacher_jobs as rewrite_module
from reasondistill.curate.chunking import average_chunks, boundary_chunks, count_words, skip_thinking
from reasondistill.curate.label_prompt import label_messages, parse_labels
from reasondistill.curate.labelling import RuleLabeller
from reasondistill.errors import UserError
from reasondistill.records import GradedTrace, TrainingExample, read_records
from reasondistill.rundir import RunDir
from reasondistill.stages import generate as generate_module
from reasondistill.stages.chunk import ChunkConfig, ChunkedTrace, run_chunk
from reasondistill.stages.generate import GenerateConfig, run_generate
from reasondistill.stages.problems import ProblemsConfig, run_problems
from reasondistill.stages.verify import VerifyConfig, run_verify
from reasondistill.store import problems_by_id, training_data
from reasondistill.tasks import get_task
from reasondistill.verify.reasoning import format_completion, split_reasoning

# --- chunking --------------------------------------------------------------------------------------

PIECES = [
    "a",
    "b",
    "word",
    "1",
    "5 + 3 = 8",
    " ",
    "  ",
    "\t",
    "\n",
    "\n\n",
    ".",
    "?",
    "!",
    ". ",
    ".\n\n",
    '." ',
    "\u00a0",
    "é",
]
texts = st.one_of(st.text(max_size=200), st.lists(st.sampled_from(PIECES), max_size=80).map("".join))


@settings(max_examples=300, deadline=None)
@given(text=texts, max_words=st.integers(1, 12), min_words=st.integers(1, 6), pieces=st.integers(1, 9))
def test_chunks_rejoin_to_the_text_exactly(text, max_words, min_words, pieces):
    boundary = boundary_chunks(text, max_words, min_words)
    assert "".join(boundary) == text
    assert all(chunk for chunk in boundary) and all(count_words(c) <= max_words for c in boundary)
    average = average_chunks(text, pieces)
    assert "".join(average) == text and all(chunk for chunk in average)
    words = count_words(text)
    if words:
        sizes = [count_words(c) for c in average]
        assert len(average) == min(pieces, words) and max(sizes) - min(sizes) <= 1 and 0 not in sizes


def test_boundary_chunks_cut_at_the_strongest_boundary_the_text_has():
    paragraphs = "Okay, so we add.\nThe ones first.\n\n5 + 8 = 13, carry 1.\n\nSo 983."
    assert boundary_chunks(paragraphs) == [
        "Okay, so we add.\nThe ones first.\n\n",
        "5 + 8 = 13, carry 1.\n\n",
        "So 983.",
    ]
    lines = "ones: 5 + 8 = 13.\ntens: 9 + 8 + 1 = 18.\nSo 983."
    assert boundary_chunks(lines) == ["ones: 5 + 8 = 13.\n", "tens: 9 + 8 + 1 = 18.\n", "So 983."]
    assert boundary_chunks("One. Two three. Four!") == ["One. ", "Two three. ", "Four!"]
    assert boundary_chunks("One. Two three. Four five!", min_words=2) == ["One. Two three. ", "Four five!"]
    assert boundary_chunks("One. Two three. Four!", min_words=2) == [
        "One. Two three. Four!"
    ]  # a short tail joins
    long_paragraph = "a b c d e. f g h i j.\nk l m n o p q r s t u v.\n\nw x."
    assert boundary_chunks(long_paragraph, max_words=5) == [
        "a b c d e. ", "f g h i j.\n", "k l m n o ", "p q r s t ", "u v.\n\n", "w x."
    ]  # fmt: skip
    assert average_chunks("a b c d e f g", 3) == ["a b c ", "d e ", "f g"]


# --- labelling ---------------------------------------------------------------------------------------

QUESTION = "What is 295 + 688?"
# An R1-style trace of the question, chunk by chunk, with the label and rule each should get.
R1_TRACE = [
    ("Okay, so I need to find the sum of 295 and 688.\n\n", "non-reasoning", "meta"),
    ("First, I need to understand the problem.\n\n", "non-reasoning", "meta"),
    (
        "Let me start with the ones digit: 5 + 8 = 13, so I write 3 and carry 1.\n\n",
        "reasoning",
        "computation",
    ),
    ("Then the tens: 9 + 8 + 1 = 18, write 8 and carry 1.\n\n", "reasoning", "computation"),
    ("Wait, let me double-check that.\n\n", "non-reasoning", "meta"),
    ("Hmm.\n\n", "non-reasoning", "meta"),
    ("The question asks for 295 + 688.\n\n", "non-reasoning", "meta"),
    ("The ones digit and the tens digit each carry 1.\n\n", "non-reasoning", "summary"),
    ("Hundreds: 2 + 6 + 1 = 9, so the sum is 983.\n\n", "reasoning", "computation"),
    ("In summary, the sum of 295 and 688 is 983.", "non-reasoning", "meta"),
]
LOGIC_QUESTION = (
    "Facts: Charlie is nice. Charlie is furry.\nRules: Someone is blue if they are quiet. Someone is quiet if "
    "they are nice.\nIs it true that Charlie is blue? Answer True, False or Unknown."
)
LOGIC_TRACE = [
    ("Charlie is blue if Charlie is quiet.\n", "reasoning", "inference"),
    ("Charlie is nice: a fact.\n", "reasoning", "default"),
    ("Charlie is furry.\n", "non-reasoning", "restatement"),
    ("Therefore Charlie is quiet, so Charlie is blue.", "reasoning", "inference"),
]


@pytest.mark.parametrize(("question", "trace"), [(QUESTION, R1_TRACE), (LOGIC_QUESTION, LOGIC_TRACE)])
def test_the_rules_label_real_reasoning(question, trace):
    chunks = [chunk for chunk, _, _ in trace]
    labels, rules = RuleLabeller().label(chunks, question)
    assert list(zip(chunks, labels, rules, strict=True)) == trace


def test_word_problem_sentences_quoted_alone_restate_the_problem():
    question = "Jack has 14 apples. Carla has 5 pencils. Jack doubles the apples. How many apples does Jack have now?"
    chunks = [
        "Jack has 14 apples. ",
        "Start with 14.\n",
        "Carla has 5 pencils. ",
        "Jack doubles the apples. 14 * 2 = 28.\n",
    ]
    assert RuleLabeller().label(chunks, question) == (
        ["non-reasoning", "reasoning", "non-reasoning", "reasoning"],
        ["restatement", "default", "restatement", "computation"],
    )


def test_stt_keeps_the_first_and_last_chunk_and_drops_the_non_reasoning_between():
    chunks = ["a ", "b ", "c ", "d ", "e"]
    labels = ["non-reasoning", "non-reasoning", "reasoning", "non-reasoning", "non-reasoning"]
    assert skip_thinking(chunks, labels) == (["a ", "c ", "e"], [1, 3])
    assert skip_thinking(["a"], ["non-reasoning"]) == (["a"], [])


def test_a_teachers_labels_are_read_one_per_chunk_or_not_at_all():
    assert parse_labels("1: reasoning\n2: non-reasoning\n3: Reasoning", 3) == [
        "reasoning",
        "non-reasoning",
        "reasoning",
    ]
    assert parse_labels("<think>chunk 2 is filler</think>\n[1] reasoning\n[2] **non-reasoning**", 2) == [
        "reasoning",
        "non-reasoning",
    ]
    assert parse_labels("1: reasoning", 2) is None  # chunk 2 unlabelled
    assert parse_labels("1: reasoning\n1: non-reasoning\n2: reasoning", 2) is None  # two labels
    assert parse_labels("1: reasoning\n2: reasoning\n3: reasoning", 2) is None  # no chunk 3
    assert parse_labels("<think>1: reasoning\n2: reasoning", 2) is None  # cut off while thinking
    system, user = label_messages("What is 1 + 1?", ["One ", "two."])
    assert "non-reasoning" in system.content and user.content.endswith("[1] One\n[2] two.")


# --- the stage ------------------------------------------------------------------------------------


@pytest.fixture
def run(tmp_path, monkeypatch) -> RunDir:
    """Gold traces of word problems (they quote each sentence, distractors included), verified."""
    run = RunDir(tmp_path / "run")
    run_problems(ProblemsConfig(tasks=["word_problems"], train=8, test=0, seed=1), run, False)
    problems = list(problems_by_id(run).values())
    use_generator(monkeypatch, generate_module, ScriptedGenerator(lambda m: problem_of(m, problems).solution))
    run_generate(GenerateConfig(model="gold", backend="openai", name="gold", n=1), run, False)
    run_verify(VerifyConfig(traces="gold"), run, False)
    return run


def test_the_stt_set_is_shorter_and_every_answer_still_grades_correct(run):
    run_chunk(ChunkConfig(name="stt", traces="gold", max_words=5), run, False)
    graded = read_records(run.graded("gold"), GradedTrace)
    records = read_records(run.chunks("stt"), ChunkedTrace)
    assert [(r.problem_id, r.sample_idx) for r in records] == [(g.problem_id, g.sample_idx) for g in graded]
    for record, trace in zip(records, graded, strict=True):
        assert "".join(record.chunks) == trace.reasoning and record.labeller == "rules"
        assert len(record.labels) == len(record.rules) == len(record.chunks) > 1

    problems = problems_by_id(run)
    grader = get_task("word_problems").grader
    examples = read_records(run.curated("stt"), TrainingExample)
    assert len(examples) == len(graded)
    for example, record, trace in zip(examples, records, graded, strict=True):
        assert grader.grade(example.completion, problems[example.problem_id]).label == "correct"
        split = split_reasoning(example.completion)
        assert split.final == trace.final and example.messages == problems[trace.problem_id].messages
        assert split.reasoning.startswith(record.chunks[0].strip()) and split.reasoning.endswith(
            record.chunks[-1].strip()
        )
        kept, removed = skip_thinking(record.chunks, record.labels)
        assert example.completion == (
            format_completion("".join(kept).strip(), trace.final) if removed else trace.completion
        )

    steps = run.manifest()["steps"]
    stats, stt = steps["chunk:stt"]["stats"], steps["curate:stt"]["stats"]
    labels = [label for r in records for label in r.labels]
    assert stats["chunks"] == len(labels) and stats["non_reasoning"] == labels.count("non-reasoning") > 0
    assert (
        stats["chunks_per_trace"] == round(len(labels) / len(records), 2)
        and stats["rules"]["restatement"] > 0
    )
    removed = stt["skip_thinking"]
    assert removed["traces_shortened"] > 0 and removed["unit"] == "words"
    assert removed["removed"] == sum(
        count_words(t.reasoning) - count_words(split_reasoning(e.completion).reasoning)
        for t, e in zip(graded, examples, strict=True)
    )
    assert stt["kept"] == {"word_problems": len(graded)} and stt["input"] == len(graded)
    path, fingerprint = training_data("stt", run)  # what `train` reads
    assert path == run.curated("stt") and fingerprint == steps["curate:stt"]["fingerprint"]

    run_chunk(ChunkConfig(name="stt", traces="gold", max_words=5), run, False)  # finished: skipped
    with pytest.raises(UserError, match="max_words"):
        run_chunk(ChunkConfig(name="stt", traces="gold", max_words=6), run, False)


def test_chunks_of_a_file_of_training_examples(run, tmp_path):
    graded = read_records(run.graded("gold"), GradedTrace)
    path = tmp_path / "examples.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {
                    "problem_id": g.problem_id,
                    "task": g.task,
                    "messages": [{"role": "user", "content": "q"}],
                    "completion": g.completion,
                }
            )
            + "\n"
            for g in graded
        )  # fmt: skip
        + json.dumps({"problem_id": "x", "task": "t", "messages": [], "completion": "The answer is 1."})
    )
    run_chunk(ChunkConfig(name="file", data=str(path), chunking="average", chunks=3), run, False)
    records = read_records(run.chunks("file"), ChunkedTrace)
    assert [len(r.chunks) for r in records] == [3] * len(graded) + [0]  # no reasoning block: nothing to cut
    assert records[-1].sample_idx is None
    examples = read_records(run.curated("file"), TrainingExample)
    assert examples[-1].completion == "The answer is 1."


def test_a_teacher_labels_the_chunks_and_an_unreadable_reply_falls_back_to_the_rules(run, monkeypatch):
    problems = list(problems_by_id(run).values())
    first = sorted(p.id for p in problems)[0]

    def labeller(messages):
        count = messages[-1].content.count("\n[")
        if f"{problems_by_id(run)[first].messages[0].content}\n" in messages[-1].content:
            return "I think they are all fine."
        return "\n".join(f"{i}: {'reasoning' if i % 2 else 'non-reasoning'}" for i in range(1, count + 1))

    teacher = ScriptedGenerator(labeller)
    use_generator(monkeypatch, rewrite_module, teacher)
    cfg = ChunkConfig(
        name="taught", traces="gold", max_words=5, labeller="teacher", model="judge", backend="openai"
    )
    run_chunk(cfg, run, False)
    assert len(teacher.prompts) == 8 and "non-reasoning" in teacher.prompts[0][0].content
    records = {r.problem_id: r for r in read_records(run.chunks("taught"), ChunkedTrace)}
    assert (
        records[first].labeller == "rules (teacher reply unparseable)"
        and "teacher" not in records[first].rules
    )
    for problem_id, record in records.items():
        if problem_id != first:
            assert record.labeller == "teacher"
            assert record.labels == [
                "reasoning" if i % 2 == 0 else "non-reasoning" for i in range(len(record.chunks))
            ]
    stats = run.manifest()["steps"]["chunk:taught"]["stats"]
    assert stats["teacher_unparseable"] == 1 and stats["usage"]["requests"] == 8
    assert (run.root / "chunks" / "taught.labels" / "index.json").exists()

    use_generator(monkeypatch, rewrite_module, ScriptedGenerator(labeller))
    with pytest.raises(UserError, match=f"could not be read, e.g. {first}"):
        run_chunk(cfg.model_copy(update={"name": "strict", "fallback": "fail"}), run, False)


def test_the_config_needs_one_input_and_a_teacher_model():
    with pytest.raises(ValueError, match="either traces"):
        ChunkConfig(name="x")
    with pytest.raises(ValueError, match="either traces"):
        ChunkConfig(name="x", traces="a", data="b")
    with pytest.raises(ValueError, match="needs a model"):
        ChunkConfig(name="x", traces="a", labeller="teacher")
