"""Tiny training runs: loss goes down, the PEFT folder reproduces the model, resume is exact, TOML = flags."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lorafold.training.cli_entry import parse_config
from lorafold.training.config import TrainConfig
from lorafold.training.trainer import train
from tests.training.helpers import smol_tokenizer, tiny_base, toy_rows, write_jsonl


@pytest.fixture(scope="module")
def tok():
    return smol_tokenizer()


@pytest.fixture()
def data(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", toy_rows(24))


def cfg_for(data, out, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"], lr=5e-3,
                steps=12, batch_size=4, max_length=32, val_fraction=0.25, accuracy="off", progress=False,
                schedule="constant")
    base.update(kw)
    return TrainConfig(**base)


def peft_logits(base_model, folder, ids):
    from peft import PeftModel

    peft = PeftModel.from_pretrained(copy.deepcopy(base_model), folder).eval()
    with torch.no_grad():
        return peft(input_ids=ids).logits


@pytest.mark.parametrize(
    "optimizer, init", [("adamw", "default"), ("scaled_adamw", "pissa"), ("geolora", "default"), ("dlrt", "default")]
)
def test_training_lowers_loss_and_peft_reproduces_it(tok, data, tmp_path, optimizer, init):
    base = tiny_base(tok)
    pristine = copy.deepcopy(base.model)
    res = train(cfg_for(data, tmp_path / "run", optimizer=optimizer, init=init, lr=None if optimizer in ("geolora", "dlrt") else 5e-3),
                base=base)
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    assert rep["eval_after"]["val_loss"] < rep["eval_before"]["val_loss"]
    assert sum(rep["losses"][-3:]) < sum(rep["losses"][:3])
    assert (tmp_path / "run" / "loss_curve.png").stat().st_size > 1000
    ids = torch.tensor([tok("Color 3: gold is blue")["input_ids"]])
    with torch.no_grad():
        want = res.model.eval()(input_ids=ids).logits
        plain = pristine(input_ids=ids).logits
    got = peft_logits(pristine, tmp_path / "run", ids)
    assert not torch.allclose(want, plain, atol=1e-3)  # the adapter does something
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_resume_continues_to_the_same_result(tok, data, tmp_path):
    full = train(cfg_for(data, tmp_path / "full", save_every=5, grad_accum=2, schedule="cosine", warmup_steps=2),
                 base=tiny_base(tok))
    resumed = train(cfg_for(data, tmp_path / "resumed", grad_accum=2, schedule="cosine", warmup_steps=2,
                            resume=str(tmp_path / "full" / "checkpoints" / "step-000005")), base=tiny_base(tok))
    a = {k: v for k, v in full.model.state_dict().items() if "lora_" in k}
    b = {k: v for k, v in resumed.model.state_dict().items() if "lora_" in k}
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    assert full.report["losses"][:5] == resumed.report["losses"][:5]
    assert resumed.report["losses"] == pytest.approx(full.report["losses"], abs=1e-5)


def test_toml_config_equals_flags(tmp_path):
    flags = ["--data", "d.jsonl", "--out", "o", "--optimizer", "reflora", "--init", "pissa", "--rank", "8",
             "--alpha", "16", "--targets", "q_proj,v_proj", "--lr", "0.001", "--warmup-steps", "5", "--schedule",
             "linear", "--steps", "40", "--batch-size", "2", "--grad-accum", "3", "--max-length", "128", "--seed", "3",
             "--eval-every", "10", "--save-every", "20"]
    (tmp_path / "c.toml").write_text(
        '[train]\ndata = "d.jsonl"\nout = "o"\noptimizer = "reflora"\ninit = "pissa"\nrank = 8\nalpha = 16\n'
        'targets = ["q_proj", "v_proj"]\nlr = 0.001\nwarmup-steps = 5\nschedule = "linear"\nsteps = 40\n'
        'batch_size = 2\ngrad_accum = 3\nmax_length = 128\nseed = 3\neval_every = 10\nsave_every = 20\n')
    from_flags, _ = parse_config(flags)
    from_toml, _ = parse_config(["--config", str(tmp_path / "c.toml")])
    assert from_flags == from_toml
    overridden, _ = parse_config(["--config", str(tmp_path / "c.toml"), "--rank", "4"])
    assert overridden.rank == 4 and overridden.optimizer == "reflora"
    with pytest.raises(ValueError, match="unknown config keys"):
        TrainConfig.from_dict({"data": "d", "out": "o", "rnak": 3})


def test_bf16_autocast_trains_on_cpu_and_exports_fp32(tok, data, tmp_path):
    from safetensors.torch import load_file

    fp32 = train(cfg_for(data, tmp_path / "fp32", steps=8), base=tiny_base(tok))
    base = tiny_base(tok)
    pristine = copy.deepcopy(base.model)
    bf16 = train(cfg_for(data, tmp_path / "bf16", steps=8, bf16=True), base=base)
    rep = json.loads((tmp_path / "bf16" / "report.json").read_text())
    assert rep["config"]["bf16"] is True
    assert rep["eval_after"]["val_loss"] < rep["eval_before"]["val_loss"]
    assert sum(rep["losses"][-3:]) < sum(rep["losses"][:3])
    # autocast really ran in bf16 (the losses differ from fp32) but tracks the fp32 run closely
    assert rep["losses"] != fp32.report["losses"]
    assert rep["losses"] == pytest.approx(fp32.report["losses"], abs=0.1)
    # master weights and the exported adapter stay fp32
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())
    tensors = load_file(tmp_path / "bf16" / "adapter_model.safetensors")
    assert tensors and all(t.dtype == torch.float32 for t in tensors.values())
    ids = torch.tensor([tok("Color 3: gold is blue")["input_ids"]])
    with torch.no_grad():
        want = bf16.model.eval()(input_ids=ids).logits
    torch.testing.assert_close(peft_logits(pristine, tmp_path / "bf16", ids), want, atol=1e-4, rtol=1e-4)


def test_optimizer_args_reach_the_optimizer(tmp_path):
    """`--optimizer-arg KEY=VALUE` (repeatable; TOML `[train.optimizer_args]`) becomes keywords
    of the optimizer; unknown ones and lr/weight_decay in it are refused with a message."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorafold.training.adapters.lora import inject_lora
    from lorafold.training.trainer.adapters import build_optimizer_for

    flags = ["--data", "d.jsonl", "--out", "o", "--optimizer", "adaprelora",
             "--optimizer-arg", "stat_interval=10", "--optimizer-arg", "statistic=lowrank"]
    cfg, _ = parse_config(flags)
    assert cfg.optimizer_args == {"stat_interval": 10, "statistic": "lowrank"}
    (tmp_path / "c.toml").write_text('[train]\ndata = "d.jsonl"\nout = "o"\noptimizer = "adaprelora"\n'
                                     '[train.optimizer_args]\nstat_interval = 10\nstatistic = "lowrank"\n')
    assert parse_config(["--config", str(tmp_path / "c.toml")])[0] == cfg
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    inject_lora(model, r=2, alpha=4)
    assert build_optimizer_for(model, cfg).param_groups[0]["stat_interval"] == 10
    bad, _ = parse_config(["--data", "d", "--out", "o", "--optimizer", "adamw", "--optimizer-arg", "stat_interval=10"])
    with pytest.raises(ValueError, match="does not take"):
        build_optimizer_for(model, bad)
    with pytest.raises(ValueError, match="--lr"):
        parse_config(["--data", "d", "--out", "o", "--optimizer-arg", "lr=0.1"])
    with pytest.raises(SystemExit):
        parse_config(["--data", "d", "--out", "o", "--optimizer-arg", "no-equals-sign"])
