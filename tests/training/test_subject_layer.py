"""Subject-conditioned layer: mixed batches equal each subject's merged weights; gradients
equal a dense per-row reference; absent subjects keep parameters and optimizer state."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lorafold.training.optim.registry import build_optimizer
from lorafold.training.subject.layer import SubjectLoRALinear, inject_subject_lora, subject_batch, subject_pairs
from tests.training.helpers import one_thread_fixture

SUBJECTS = ["a", "b", "c", "d"]


_one_thread = one_thread_fixture()


def _layer(seed: int = 0, dtype: torch.dtype = torch.float64, train_base: bool = False) -> SubjectLoRALinear:
    torch.manual_seed(seed)
    layer = SubjectLoRALinear(nn.Linear(11, 7, dtype=dtype), SUBJECTS, r=3, alpha=6.0, train_base=train_base)
    with torch.no_grad():  # B = 0 at init: give every subject a distinct non-zero update
        for ad in layer.adapters.values():
            ad.lora_B.normal_()
    return layer


SUBJ = torch.tensor([2, -1, 0, 2, 3, 0, -1, 2])  # subject "b" (1) absent; two base-only rows


def test_mixed_batch_equals_merged_weights_row_by_row() -> None:
    layer = _layer()
    x = torch.randn(len(SUBJ), 5, 11, dtype=torch.float64)  # 5 rows per sample (tokens)
    with subject_batch(SUBJ, len(SUBJECTS)):
        out = layer(x)
    for i, s in enumerate(SUBJ.tolist()):
        w = layer.base.weight if s < 0 else layer.merged_weight(SUBJECTS[s])
        torch.testing.assert_close(out[i], x[i] @ w.T + layer.base.bias, rtol=1e-5, atol=1e-5)
    outs = {s: layer(x[:1]) for s in ["base"]}  # no routing: the base model
    torch.testing.assert_close(outs["base"], layer.base(x[:1]))
    # the subjects really differ (the test can fail)
    assert not torch.allclose(layer.merged_weight("a"), layer.merged_weight("c"))


@pytest.mark.parametrize("train_base", [False, True])
def test_gradients_equal_dense_per_row_reference(train_base: bool) -> None:
    layer = _layer(train_base=train_base)
    ref = copy.deepcopy(layer)
    x = torch.randn(len(SUBJ), 3, 11, dtype=torch.float64)
    probe = torch.randn(len(SUBJ), 3, 7, dtype=torch.float64)
    with subject_batch(SUBJ, len(SUBJECTS)):
        (layer(x) * probe).sum().backward()
    rows = [x[i] @ (ref.base.weight if s < 0 else ref.merged_weight(SUBJECTS[s])).T + ref.base.bias
            for i, s in enumerate(SUBJ.tolist())]
    (torch.stack(rows) * probe).sum().backward()
    for (name, got), (_, want) in zip(layer.named_parameters(), ref.named_parameters()):
        if not got.requires_grad:
            continue
        if "adapters.b." in name:  # absent subject: not in the graph at all
            assert got.grad is None, name
            continue
        assert got.grad is not None, name
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-6)
    assert (layer.base.weight.grad is not None) == train_base


def _model() -> nn.Module:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))
    inject_subject_lora(model, SUBJECTS, targets=["0", "2"], r=2, alpha=4)
    return model


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, subj: torch.Tensor, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(len(subj), 6, generator=g), torch.randn(len(subj), 4, generator=g)
    opt.zero_grad(set_to_none=True)
    with subject_batch(subj, len(SUBJECTS)):
        nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def _snapshot(opt: torch.optim.Optimizer, params: list[nn.Parameter]) -> list:
    out = []
    for p in params:
        st = {k: (v.clone() if torch.is_tensor(v) else copy.deepcopy(v)) for k, v in opt.state.get(p, {}).items()}
        out.append((p.detach().clone(), st))
    return out


def _assert_identical(before: list, after: list) -> None:
    for (p0, s0), (p1, s1) in zip(before, after):
        assert torch.equal(p0, p1)
        assert s0.keys() == s1.keys()
        for k in s0:
            v0, v1 = s0[k], s1[k]
            assert torch.equal(v0, v1) if torch.is_tensor(v0) else v0 == v1, k


@pytest.mark.parametrize("name", ["adamw", "loraplus", "scaled_gd", "scaled_adamw", "reflora", "reflora_s", "lora_pro",
                                  "lora_pro_sgd", "adaprelora", "lora_rite"])
def test_absent_subject_keeps_params_and_optimizer_state(name: str) -> None:
    model = _model()
    kw = {"weight_decay": 0.1} if name in ("adamw", "loraplus", "scaled_adamw", "lora_pro") else {}
    opt = build_optimizer(name, model, lr=1e-2, **kw)
    assert len(subject_pairs(model)) == 2 * len(SUBJECTS)
    _train_step(model, opt, torch.tensor([0, 1, 2, 3, 0, 1]), seed=0)  # every subject gets state
    _train_step(model, opt, torch.tensor([0, 1, 2, 3, 2, 3]), seed=1)  # non-zero B everywhere
    absent = [t for p in subject_pairs(model, ["b"]) for t in (p.A, p.B)]
    present = [t for p in subject_pairs(model, ["a"]) for t in (p.A, p.B)]
    before, before_present = _snapshot(opt, absent), _snapshot(opt, present)
    for step in range(3):
        _train_step(model, opt, torch.tensor([0, 2, 3, -1, 0, 3]), seed=10 + step)
    _assert_identical(before, _snapshot(opt, absent))
    assert not torch.equal(before_present[0][0], present[0].detach())  # present subjects did move
