"""LogiGLUE (Luo et al., 2023; method card §23): 24 logical-reasoning datasets in one row format, as a
suite of benchmarks (`--benchmarks logiglue`, or `logiglue-in-domain` / `logiglue-leave-out`).

Source: the Hub dataset `logicreasoning/logi_glue`, one configuration per dataset. The 10 in-domain
datasets (LogiT5's multi-task fine-tuning set) have a `train` and a `test` split (for adv, alpha_nli,
logicNLI and folio the `test` file is the original dev set); the 14 leave-out datasets have `test`
only. Rows hold `context`, `question`, `choices` (a list; empty or `[""]` for free-form answers) and
`answer_text`, the gold answer as a string. `answer_choice` is not read (it is 1-based in alpha_nli,
0-based elsewhere) and neither is `id_` (not unique in half the in-domain sets): problems are
numbered by row. What was confirmed and what was inferred (the formats and reasoning types of the
leave-out sets) is in the README's deviations table.

Each dataset is posed in its task format and graded by that format's grader:
- multiple choice: the options lettered A, B, …; the letter of the gold option (`choice` grader);
- NLI and fact verification: the row's label options listed (entailment / neutral / contradiction;
  True / False …); the label, compared as a string ignoring case (`exact`), so any label vocabulary
  the data uses is graded as written;
- free-form: the answer string (`exact`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from ..verify.graders import ChoiceGrader, ExactStringGrader
from .benchmarks import CHOICE_INSTRUCTION, Benchmark, Item, Row, choice_question

Format = Literal["multiple-choice", "nli", "fact-verification", "free-form"]
Reasoning = Literal["deductive", "abductive", "inductive", "mixed"]
HUB_ID = "logicreasoning/logi_glue"
LETTERS = "ABCDEFGH"
LABEL_INSTRUCTION = (
    "Please reason step by step, and put your final answer (the label, as written above) within \\boxed{}."
)
FREE_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class Dataset:
    config: str  # the Hub configuration
    description: str
    format: Format
    reasoning: Reasoning
    in_domain: bool  # in LogiT5's fine-tuning set (train and test splits); else leave-out (test only)

    @property
    def name(self) -> str:
        """The benchmark's name: `logiglue-` and the configuration, lower case, `_` as `-`."""
        return "logiglue-" + self.config.lower().replace("_", "-")


DATASETS = (
    # in-domain: formats and reasoning types as the paper's fine-tuning set assigns them
    Dataset("logiQA", "LogiQA, 4-option logical reading comprehension", "multiple-choice", "mixed", True),
    Dataset("cluttr", "CLUTRR kinship relations", "free-form", "inductive", True),
    Dataset("abduction_animal", "AbductionRules, animal domain", "free-form", "abductive", True),
    Dataset("adv", "adversarial ARCT, 2 warrants", "multiple-choice", "abductive", True),
    Dataset("alpha_nli", "αNLI, the more plausible of 2 explanations", "multiple-choice", "abductive", True),
    Dataset("logicNLI", "LogicNLI, 4 labels", "nli", "deductive", True),
    Dataset("folio", "FOLIO first-order logic", "nli", "deductive", True),
    Dataset("proofwriter", "ProofWriter", "fact-verification", "deductive", True),
    Dataset("rulebert", "RuleBERT soft rules", "fact-verification", "deductive", True),
    Dataset("anli", "Adversarial NLI, rounds 1-3", "nli", "deductive", True),
    # leave-out: test only; formats and reasoning types inferred from the original datasets
    Dataset("abduction_person", "AbductionRules, person domain", "free-form", "abductive", False),
    Dataset("babi_task_15", "bAbI task 15, basic deduction", "free-form", "deductive", False),
    Dataset("babi_task_16", "bAbI task 16, basic induction", "free-form", "inductive", False),
    Dataset("bigbench-logical-Args", "BIG-bench logical_args", "multiple-choice", "deductive", False),
    Dataset("bigbench_deduction", "BIG-bench logical_deduction", "multiple-choice", "deductive", False),
    Dataset("birdelectricity", "Birds-Electricity (ProofWriter's OOD rule bases)", "fact-verification", "deductive", False),
    Dataset("cluttr_systematic", "CLUTRR systematic generalisation", "free-form", "inductive", False),
    Dataset("logiQA_2.0", "LogiQA 2.0", "multiple-choice", "mixed", False),
    Dataset("natlang", "NatLang (RuleTaker, paraphrased rules)", "fact-verification", "deductive", False),
    Dataset("prontoqa", "ProntoQA fictional ontologies", "fact-verification", "deductive", False),
    Dataset("reclor", "ReClor logical reading comprehension", "multiple-choice", "mixed", False),
    Dataset("Rulebert-Union-Rules", "RuleBERT union rules", "fact-verification", "deductive", False),
    Dataset("wanli", "WaNLI, 3-way NLI", "nli", "deductive", False),
    Dataset("winologic", "WinoLogic", "multiple-choice", "mixed", False),
)  # fmt: skip


def _choices(row: Row) -> list[str]:
    """The row's non-empty options: a list, or a JSON list written as a string (older copies)."""
    value = row.get("choices", kind=(list, str), required=False) or []
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else []
        except json.JSONDecodeError:
            raise row.fail("choices", "a list of options (or a JSON list)") from None
        if not isinstance(value, list):
            raise row.fail("choices", "a list of options")
    return [str(option).strip() for option in value if str(option).strip()]


def _reader(dataset: Dataset) -> Callable[[Row, int], Item]:
    def read(row: Row, index: int) -> Item:
        context = (row.get("context", required=False) or "").strip()
        question = row.get("question").strip()
        gold = str(row.get("answer_text", kind=(str, int, float, bool))).strip()
        if not gold:
            raise row.fail("answer_text", "a non-empty answer")
        choices = _choices(row)
        meta = {"dataset": dataset.config, "reasoning": dataset.reasoning, "format": dataset.format}
        if dataset.format == "multiple-choice":
            if not 2 <= len(choices) <= len(LETTERS) or gold not in choices:
                raise row.fail("answer_text", f"one of the row's 2-{len(LETTERS)} choices {choices!r:.80}")
            text = choice_question(context, question, choices, LETTERS)
            return Item(
                f"{index:05d}", text, LETTERS[choices.index(gold)], meta={**meta, "answer_text": gold}
            )
        text = f"{context}\n\n{question}" if context else question
        if dataset.format != "free-form" and len(choices) >= 2:
            if gold.lower() not in {c.lower() for c in choices}:
                raise row.fail("answer_text", f"one of the row's labels {choices!r:.80}")
            text += "\n\nAnswer with one of: " + ", ".join(choices) + "."
        return Item(f"{index:05d}", text, gold, meta=meta)

    return read


def _benchmark(dataset: Dataset) -> Benchmark:
    multiple_choice = dataset.format == "multiple-choice"
    split = "in-domain" if dataset.in_domain else "leave-out"
    return Benchmark(
        dataset.name,
        f"LogiGLUE {dataset.description} ({dataset.format}, {dataset.reasoning}, {split})",
        HUB_ID,
        "test",
        "jsonl",
        _reader(dataset),
        ChoiceGrader(LETTERS) if multiple_choice else ExactStringGrader(),
        instruction=CHOICE_INSTRUCTION
        if multiple_choice
        else (FREE_INSTRUCTION if dataset.format == "free-form" else LABEL_INSTRUCTION),
        hub_config=dataset.config,
        train_split="train" if dataset.in_domain else None,
        tags={"suite": "logiglue", "reasoning": dataset.reasoning, "domain": split, "format": dataset.format},
    )


LOGIGLUE: dict[str, Benchmark] = {d.name: _benchmark(d) for d in DATASETS}
SUITES: dict[str, tuple[str, ...]] = {
    "logiglue": tuple(LOGIGLUE),
    "logiglue-in-domain": tuple(d.name for d in DATASETS if d.in_domain),
    "logiglue-leave-out": tuple(d.name for d in DATASETS if not d.in_domain),
}
