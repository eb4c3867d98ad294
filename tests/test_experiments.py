"""The experiment testbed: config files (presets, experiments with a base, relaunching a run dir), variant and
Muon runs that resume exactly, and the comparison report."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import sample

from gpt_tinystories import checkpoint, cli
from gpt_tinystories.config import PRESETS, TrainConfig, load_config_file
from gpt_tinystories.errors import UserError
from gpt_tinystories.trainer import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("preset", list(PRESETS))
def test_each_preset_file_trains_exactly_what_the_preset_name_does(preset):
    from_file = TrainConfig.from_dict(load_config_file(CONFIGS / "presets" / f"{preset}.toml")).resolved()
    by_name = TrainConfig(preset=preset).resolved()
    assert from_file.model_config(4096) == by_name.model_config(4096)
    for name in ("lr", "tokens_per_step", "warmup_steps", "max_epochs", "optimizer", "schedule", "tokenizer"):
        assert getattr(from_file, name) == getattr(by_name, name), name


def test_experiments_are_their_baseline_plus_the_lines_that_differ():
    baseline = load_config_file(CONFIGS / "experiments" / "baseline.toml")
    assert load_config_file(CONFIGS / "experiments" / "rope.toml") == baseline | {"position": "rope"}
    llama = TrainConfig.from_dict(load_config_file(CONFIGS / "experiments" / "llama.toml")).resolved()
    model = llama.model_config(4096)
    assert (model.position, model.norm, model.activation, model.bias) == ("rope", "rmsnorm", "swiglu", False)
    for path in (CONFIGS / "experiments").glob("*.toml"):
        TrainConfig.from_dict(load_config_file(path), source=str(path)).resolved()  # every one is valid


def test_config_file_bases_must_be_files_and_must_not_loop(tmp_path):
    (tmp_path / "a.toml").write_text('base = "b.toml"\nlr = 1.0\n')
    (tmp_path / "b.toml").write_text('base = "a.toml"\n')
    with pytest.raises(UserError, match="include each other in a loop"):
        load_config_file(tmp_path / "a.toml")
    (tmp_path / "c.toml").write_text("base = 3\n")
    with pytest.raises(UserError, match="base must be the path of another config file"):
        load_config_file(tmp_path / "c.toml")
    (tmp_path / "d.toml").write_text('base = "missing.toml"\n')
    with pytest.raises(UserError, match="config file not found: .*missing.toml"):
        load_config_file(tmp_path / "d.toml")


def tiny(tokenizer_file, **overrides):
    values = dict(preset="1M", data=str(sample("validation-first1000.txt")), tokenizer=tokenizer_file,
                  d_model=32, n_layer=2, n_head=4, context_length=64, batch_size=4, tokens_per_step=256,
                  warmup_steps=2, lr=3e-3, max_steps=8, eval_every=4, eval_batches=2, log_every=1,
                  sample_tokens=4, precision="fp32", keep_last=5)  # fmt: skip
    return TrainConfig(**values | overrides)


LLAMA_MUON_WSD = dict(position="rope", norm="rmsnorm", activation="swiglu", bias=False, n_kv_head=2,
                      optimizer="muon", schedule="wsd", dropout=0.1)  # fmt: skip


def losses(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]


def weights(run_dir, step=8):
    from safetensors.torch import load_file

    return load_file(Path(run_dir) / "checkpoints" / f"step-{step:06d}" / "model.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, bpe):
    if not hasattr(torch.optim, "Muon"):
        pytest.skip("this torch has no torch.optim.Muon")
    root = tmp_path_factory.mktemp("experiments")
    tokenizer_file = str(bpe.save(root / "tok"))
    train(tiny(tokenizer_file), root / "baseline", progress=False)
    train(tiny(tokenizer_file, **LLAMA_MUON_WSD), root / "variant", progress=False)
    return root


def test_a_run_dir_relaunches_with_the_same_settings(runs, capsys):
    assert cli.main(["train", "--config", str(runs / "variant"), "--out", str(runs / "relaunched")]) == 0
    saved = json.loads((runs / "variant" / "config.json").read_text())
    assert json.loads((runs / "relaunched" / "config.json").read_text()) == saved
    assert losses(runs / "relaunched") == losses(runs / "variant")


def test_a_variant_run_with_muon_resumes_bit_for_bit(runs):
    shutil.copytree(runs / "variant", runs / "resumed")
    shutil.rmtree(runs / "resumed" / "checkpoints" / "step-000008")
    assert checkpoint.latest(runs / "resumed").name == "step-000004"
    train(TrainConfig.from_dict(load_config_file(runs / "variant")), runs / "resumed", resume=True, progress=False)
    assert losses(runs / "resumed") == losses(runs / "variant")
    for name, tensor in weights(runs / "variant").items():
        assert torch.equal(weights(runs / "resumed")[name], tensor), name


def test_compare_reports_final_figures_config_differences_and_plots(runs, capsys):
    out = runs / "comparison"
    assert cli.main(["compare", str(runs / "baseline"), str(runs / "variant"), "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    for name in ("baseline", "variant"):
        evals = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
        final = [r for r in evals if r["kind"] == "eval"][-1]
        row = next(line for line in report.splitlines() if line.startswith(f"| `{name}` |"))
        assert f"{final['val_bpb']:.4f}" in row and f"{final['val_nats_per_gpt2_token']:.4f}" in row
        assert f"| {final['tokens']:,} |" in row and " MB |" in row
    assert "| **optimizer** | `'adamw'` | `'muon'` |" in report
    assert "| **model:position** | `'learned'` | `'rope'` |" in report
    assert "**lr**" not in report  # shared settings are not listed
    for png in ("val_loss_tokens.png", "val_loss_time.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "args, message",
    [
        (["compare", "{root}/baseline"], "compare needs at least two run dirs"),
        (["compare", "{root}/baseline", "{root}"], "is not a run dir (no config.json and metrics.jsonl)"),
    ],
)
def test_compare_refuses_what_it_cannot_compare(runs, capsys, args, message):
    assert cli.main([a.format(root=runs) for a in args]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
