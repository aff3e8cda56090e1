import pytest
from click.testing import CliRunner

from reasondistill.cli import cli, main
from reasondistill.stages import all_stages


def test_every_stage_is_a_command_whose_options_are_its_config_keys():
    runner = CliRunner()
    top = runner.invoke(cli, ["--help"])
    for name in (
        "problems",
        "generate",
        "score",
        "verify",
        "curate",
        "decontaminate",
        "train",
        "eval",
        "report",
        "run",
        "demo",
        "testbed",
        "benchmarks",
    ):
        assert name in top.output
    for stage in all_stages().values():
        help_text = runner.invoke(cli, [stage.name, "--help"]).output
        for field in stage.config.model_fields:
            assert f"--{field.replace('_', '-')}" in help_text, (stage.name, field)
    assert "[default: 0.8]" in runner.invoke(cli, ["generate", "--help"], terminal_width=200).output


def test_bad_option_values_are_one_line_errors_naming_the_option(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--run-dir", str(tmp_path), "--model", "testbed:teacher", "--top-p", "1.5"])
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr().err.strip()
        == "error: reasondistill generate: --top-p: Input should be less than or equal to 1 (got 1.5)"
    )

    with pytest.raises(SystemExit):
        main(["problems", "--run-dir", str(tmp_path), "--difficulty", "{arithmetic: [2]}"])
    assert capsys.readouterr().err.strip().startswith("error: --difficulty: expected a JSON object")

    with pytest.raises(SystemExit):
        main(["verify", "--run-dir", str(tmp_path), "--traces", "teacher"])
    assert "step 'generate:teacher' has not run; run the `generate` stage first" in capsys.readouterr().err


def test_a_stage_runs_from_the_command_line(tmp_path):
    main(
        [
            "problems",
            "--run-dir",
            str(tmp_path),
            "--tasks",
            "logic",
            "--train",
            "3",
            "--test",
            "2",
            "--difficulty",
            '{"logic": [4]}',
        ]
    )
    assert (tmp_path / "problems" / "logic" / "test.parquet").exists()
    from reasondistill.records import Problem, read_records

    assert [
        p.difficulty for p in read_records(tmp_path / "problems" / "logic" / "train.parquet", Problem)
    ] == [4, 4, 4]


def test_grader_and_benchmark_options_are_checked_before_anything_runs(tmp_path, capsys):
    def error(*options: str) -> str:
        with pytest.raises(SystemExit):
            main(["eval", "--run-dir", str(tmp_path), "--model", "testbed:student", *options])
        return capsys.readouterr().err.strip()

    assert "--benchmarks: Value error, unknown benchmark 'gsm9k'; known: gsm8k, math500" in error(
        "--benchmarks", "gsm9k"
    )
    assert "with several benchmarks, write NAME=PATH" in error(
        "--benchmarks", "gsm8k,math500", "--data-file", "test.jsonl"
    )
    assert "data file 'aime24=x.jsonl': aime24 is not among the benchmarks" in error(
        "--benchmarks", "gsm8k", "--data-file", "aime24=x.jsonl"
    )
    assert "unknown grader 'math-verify:html'; graders are: numeric, math-verify:latex" in error(
        "--graders", '{"gsm8k": "math-verify:html"}'
    )
    # a name may be one of the run's problem sets: checked against the run, still before anything runs
    assert "graders: unknown task 'gsm9k'; known: arithmetic" in error("--graders", '{"gsm9k": "numeric"}')
    assert not (tmp_path / "eval").exists()


def test_the_benchmarks_command_lists_each_benchmark_with_its_grader(monkeypatch):
    from reasondistill import cli as cli_module

    monkeypatch.setattr(cli_module.console, "width", 250)  # rich's console, not click's terminal
    output = CliRunner().invoke(cli, ["benchmarks"], terminal_width=250).output
    assert "openai/gsm8k (test)" in output and "numeric@2+" in output
    assert "clutrr" in output and "exact@1+" in output and "math-verify@2+" in output
    assert (
        "suite logiglue: logicreasoning/logi_glue" in output
        and "parts of logiglue: logiglue-in-domain, logiglue-leave-out" in output
    )
    assert "logiglue-babi-task-16" in output and "babi_task_16 (test)" in output


def test_nested_options_are_json_objects_on_the_command_line(tmp_path, capsys):
    from reasondistill.cli import _parse_option
    from reasondistill.stages.train import TrainConfig

    field = TrainConfig.model_fields["on_policy"]
    options = {"name": "s", "init": "testbed:student", "data": "problems", "objective": "reverse_kl_pg"}
    options["on_policy"] = _parse_option('{"fraction": 1, "samples_per_prompt": 2}', field)
    config = TrainConfig.model_validate({**options, "teacher": "testbed:teacher"})
    assert (config.on_policy.fraction, config.on_policy.samples_per_prompt) == (1, 2)
    with pytest.raises(SystemExit):
        main(["train", "--run-dir", str(tmp_path), "--name", "s", "--init", "x", "--data", "d", "--on-policy", "x"])  # fmt: skip
    assert capsys.readouterr().err.strip().startswith("error: --on-policy: expected a JSON object")


def test_the_objectives_command_shows_each_objectives_options_and_refuses_an_unknown_one(capsys):
    result = CliRunner().invoke(cli, ["objectives", "jsd", "dpo"])
    assert result.exit_code == 0, result.output
    jsd, dpo = result.output.split("\n\n")
    assert jsd.startswith("jsd: ") and "needs: a teacher" in jsd
    assert "beta" in jsd and "float in [0, 1] = 0.5" in jsd
    assert dpo.startswith("dpo: ") and "beta" in dpo and "jsd" not in dpo
    everything = CliRunner().invoke(cli, ["objectives"]).output
    assert all(
        f"\n{name}: " in f"\n{everything}" for name in ("sft", "forward_kl", "taid", "grpo", "curio_sft")
    )
    with pytest.raises(SystemExit) as exit:
        main(["objectives", "forward-kl"])
    assert exit.value.code == 2
    assert "unknown objective 'forward-kl'; known: forward_kl" in capsys.readouterr().err
