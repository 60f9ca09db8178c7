"""PiSSA and LoRA-GA (spec §9): residual base, and the rank-2r export against the original W0."""

from __future__ import annotations

import pytest
import torch

from lorafold.training.adapters.lora import inject_lora, lora_pairs
from lorafold.training.init.lora_ga import init_lora_ga, lora_ga_factors
from lorafold.training.init.pissa import init_pissa, pissa_factors
from lorafold.training.init.residual import export_against_original
from tests.training.helpers import one_thread_fixture, tiny_llama_cfg

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


_one_thread = one_thread_fixture(scope="module")


def tiny_llama() -> torch.nn.Module:
    return tiny_llama_cfg(hidden_size=64, intermediate_size=128, vocab_size=128, max_position_embeddings=64)


IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(7))


def lm_loss(model, ids):
    return model(ids, labels=ids).loss


def test_pissa_factors_are_top_r_part() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(30, 20, generator=gen, dtype=torch.float64)
    b, a = pissa_factors(w, r=4, scale=2.0, method="full")
    u, s, vh = torch.linalg.svd(w)
    torch.testing.assert_close(2.0 * b @ a, (u[:, :4] * s[:4]) @ vh[:4], atol=1e-10, rtol=0)
    torch.testing.assert_close(b.T @ b, a @ a.T, atol=1e-10, rtol=0)  # balanced by construction


def test_lora_ga_factors_use_the_second_r_singular_vectors() -> None:
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(40, 24, generator=gen)
    b, a = lora_ga_factors(g, r=3, niter=8)
    u, _, vh = torch.linalg.svd(g)
    stable = 40**0.25 / 4.0
    # same subspaces as the exact SVD (signs are arbitrary)
    torch.testing.assert_close((b / stable).T @ u[:, 3:6] @ (u[:, 3:6].T @ (b / stable)), torch.eye(3), atol=1e-3, rtol=0)
    torch.testing.assert_close((a / stable) @ vh[:3].T @ (vh[:3] @ (a / stable).T), torch.eye(3), atol=1e-3, rtol=0)


@pytest.mark.parametrize("method", ["pissa", "lora_ga"])
def test_init_keeps_output_and_export_matches_peft_on_original_base(tmp_path, method: str) -> None:
    model = tiny_llama()
    original = tiny_llama()
    inject_lora(model, r=4, alpha=8, rank_pattern={"model.layers.1.mlp.down_proj": 2})
    with torch.no_grad():
        before = model(IDS).logits
    if method == "pissa":
        initial = init_pissa(model, method="full")
    else:
        initial = init_lora_ga(model, [IDS, IDS.flip(1)], lm_loss)
    assert all(p.B.abs().sum() > 0 and p.A.abs().sum() > 0 for p in lora_pairs(model))
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, before, atol=1e-4, rtol=0)  # W_res + sBA = W0
    # train a little so the export is not the trivial ΔW = 0
    opt = torch.optim.AdamW([t for p in lora_pairs(model) for t in (p.A, p.B)], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        lm_loss(model, IDS).backward()
        opt.step()
    folder = export_against_original(model, initial, tmp_path / method)
    loaded = peft.PeftModel.from_pretrained(original, folder).eval()
    with torch.no_grad():
        ours = model(IDS).logits
        assert (ours - before).abs().max() > 1e-3
        torch.testing.assert_close(loaded(IDS).logits, ours, atol=1e-4, rtol=0)
