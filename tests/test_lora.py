"""LoRA on the student: only adapters train, the adapter folder is a model reference like any other,
merged weights equal base + adapter, and bad target modules are refused before weights load."""

import json

import pytest
import torch
from safetensors.torch import load_file

from reasondistill.errors import UserError
from reasondistill.models import load_causal_lm
from reasondistill.records import TrainingExample
from reasondistill.tasks import get_task
from reasondistill.train.hyperparameters import Hyperparameters
from reasondistill.train.lora import LoraOptions
from reasondistill.train.trainer import Teachers, train_model

HP = Hyperparameters(
    epochs=1, batch_size=4, learning_rate=1e-2, max_length=384, trainer_args={"disable_tqdm": True}
)


@pytest.fixture(scope="module")
def init(tmp_path_factory, tokenizer_dir):
    from reasondistill.testbed.models import ModelShape, save_initial_model

    folder = tmp_path_factory.mktemp("lora") / "init"
    shape = ModelShape(hidden_size=32, num_hidden_layers=2, intermediate_size=64)
    return save_initial_model(shape, tokenizer_dir, folder, seed=0) or folder


def examples():
    return [
        TrainingExample(problem_id=p.id, task=p.task, messages=p.messages, completion=p.solution)
        for p in get_task("arithmetic").sample("train", 16, seed=0, difficulties=[2])
    ]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


def test_only_the_adapters_train_and_the_adapter_folder_loads_as_a_model(init, tmp_path):
    from peft import PeftModel

    lora = LoraOptions(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    stats = train_model(init, examples(), tmp_path / "adapter", Hyperparameters(**{**HP.model_dump(), "objective": "forward_kl"}),
                        teachers=Teachers(model=init), lora=lora)  # fmt: skip
    folder = tmp_path / "adapter"
    assert not (folder / "config.json").exists() and (folder / "adapter_model.safetensors").is_file()
    adapter = load_file(folder / "adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter)
    assert {name.split(".")[-3] for name in adapter} == {"q_proj", "v_proj"}
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        init.resolve()
    )
    assert stats["lora"]["trainable_parameters"] == sum(t.numel() for t in adapter.values())
    # the base weights inside the trained model are the init's, bit for bit; the adapters moved
    base = load_causal_lm(init)
    trained = PeftModel.from_pretrained(load_causal_lm(init), str(folder))
    for name, weight in trained.get_base_model().named_parameters():
        if "lora_" not in name:
            original = base.get_parameter(name.replace(".base_layer", ""))
            assert torch.equal(weight, original), name
    assert any(t.abs().max() > 0 for name, t in adapter.items() if "lora_B" in name)
    # the folder is a model reference: base + adapter, merged, with its tokenizer
    ids = list(range(3, 20))
    merged = load_causal_lm(folder)
    assert torch.allclose(logits(merged, ids), logits(trained, ids), atol=1e-5)
    assert not torch.allclose(logits(merged, ids), logits(base, ids), atol=1e-4)
    from reasondistill.generate.base import SamplingParams
    from reasondistill.generate.hf import HFGenerator

    (completion,) = HFGenerator(folder).generate(
        [examples()[0].messages], SamplingParams(temperature=0, max_new_tokens=8)
    )[0]
    assert completion.token_ids


def test_merged_weights_equal_base_plus_adapter_and_train_on(init, tmp_path):
    lora = LoraOptions(r=4, alpha=8, dropout=0.0)
    train_model(init, examples(), tmp_path / "adapter", HP, lora=lora)
    train_model(init, examples(), tmp_path / "merged", HP, lora=lora.model_copy(update={"merge": True}))
    assert (tmp_path / "merged" / "config.json").is_file() and not (
        tmp_path / "merged" / "adapter_config.json"
    ).exists()
    ids = list(range(3, 20))
    merged, adapted = load_causal_lm(tmp_path / "merged"), load_causal_lm(tmp_path / "adapter")
    assert torch.allclose(logits(merged, ids), logits(adapted, ids), atol=1e-5)
    # an adapter folder is a later step's init (merged in, then trained again)
    stats = train_model(tmp_path / "adapter", examples()[:8], tmp_path / "again", HP)
    assert stats["steps"] == 2 and (tmp_path / "again" / "config.json").is_file()


@pytest.mark.parametrize(
    "targets, message",
    [(["q_proj", "qkv"], "the model has no module 'qkv'; its linear layers are named down_proj, gate_proj"),
     (["lm_head"], "'lm_head' is the output head or the embeddings")],
)  # fmt: skip
def test_target_modules_the_model_lacks_are_refused_before_weights_load(init, tmp_path, targets, message):
    with pytest.raises(UserError, match=message):
        train_model(init, examples(), tmp_path / "out", HP, lora=LoraOptions(target_modules=targets))
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a machine without CUDA")
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"quantize": "4bit"}, "lora.quantize \\(QLoRA\\) needs a CUDA GPU; this machine has none"),
        ({"quantize": "4bit", "merge": True}, "adapters cannot be merged into 4-bit weights"),
    ],
)
def test_qlora_is_refused_where_it_cannot_run_before_weights_load(init, tmp_path, options, message):
    with pytest.raises(UserError, match=message):
        train_model(init, examples(), tmp_path / "out", HP, lora=LoraOptions(**options))
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.work").exists()


def test_the_train_stage_trains_an_adapter_that_later_steps_use_by_name(init, tmp_path):
    from helpers import SHARED_BENCHMARKS

    from reasondistill.cli import main
    from reasondistill.records import write_records
    from reasondistill.rundir import RunDir

    data = tmp_path / "data.parquet"
    write_records(data, examples(), TrainingExample)
    run = RunDir(tmp_path / "run")
    main(["train", "--run-dir", str(run.root), "--name", "lora", "--init", str(init), "--data", str(data),
          "--epochs", "1", "--batch-size", "8", "--max-length", "384", "--lora", '{"r": 4, "target_modules": ["q_proj"]}'])  # fmt: skip
    assert (run.checkpoint("lora") / "adapter_config.json").is_file()
    assert run.manifest()["steps"]["train:lora"]["stats"]["lora"]["r"] == 4
    main(["eval", "--run-dir", str(run.root), "--models", "lora", "--benchmarks", "gsm8k", "--data-file",
          str(SHARED_BENCHMARKS / "gsm8k" / "test.jsonl"), "--limit", "2", "--n", "0", "--max-new-tokens", "8"])  # fmt: skip
    assert json.loads((run.eval_dir("lora") / "gsm8k.json").read_text())["greedy"]["problems"] == 2
