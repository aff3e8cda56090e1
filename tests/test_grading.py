import threading

from reasondistill.records import Problem, Trace
from reasondistill.verify.graders import ExtractingGrader, NumericGrader
from reasondistill.verify.grading import grade_trace, grade_traces


def trace(i: int, answer: str) -> Trace:
    return Trace(
        problem_id=f"p{i}", task="t", sample_idx=0, source="{}", completion=f"The answer is {answer}.",
        reasoning=None, final=f"The answer is {answer}.", prompt_tokens=1, completion_tokens=1,
        finish_reason="stop",
    )  # fmt: skip


def problem(i: int, answer: str) -> Problem:
    return Problem(id=f"p{i}", task="t", messages=[{"role": "user", "content": "?"}], answer=answer)


class ThreadRecordingGrader(NumericGrader):
    """Numeric grading that waits until `parties` threads grade at once (or times out)."""

    def __init__(self, parties: int):
        super().__init__()
        self.barrier, self.threads = threading.Barrier(parties, timeout=10), set()

    def judge(self, final, gold):
        self.threads.add(threading.current_thread().name)
        self.barrier.wait()  # breaks (BrokenBarrierError) if fewer threads than parties ever arrive
        return ExtractingGrader.judge(self, final, gold)


def test_many_traces_are_graded_in_order_from_several_threads_at_once():
    grader = ThreadRecordingGrader(parties=4)
    jobs = [(trace(i, str(i % 3)), problem(i, "1"), grader) for i in range(8)]
    graded = grade_traces(jobs, workers=4)
    assert [g.problem_id for g in graded] == [f"p{i}" for i in range(8)]
    assert [g.label for g in graded] == ["correct" if i % 3 == 1 else "incorrect" for i in range(8)]
    assert graded == [grade_trace(*job) for job in [(t, p, NumericGrader()) for t, p, _ in jobs]]
    assert len(grader.threads) == 4


def test_one_worker_grades_in_the_calling_thread():
    grader = ThreadRecordingGrader(parties=1)
    grade_traces([(trace(0, "1"), problem(0, "1"), grader)] * 3, workers=1)
    assert grader.threads == {threading.current_thread().name}
