"""Shared fixtures: the real default base model and tiny random Llama models built on the fly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SMOL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="session")
def smollm2():
    """The packaged SmolLM2-135M-Instruct (fetched and cached by deploy/setup.sh)."""
    from lorafold.server.models.loader import load_base_model

    return load_base_model()


@pytest.fixture(params=["compiled", "torch"])
def cpu_path(request, monkeypatch) -> str:
    """Run a test on both CPU paths: the compiled kernels (`lorafold.kernels.cpu_ops`) and the
    pure-torch fallback that serves wherever they cannot be built (or for non-fp32 models)."""
    from lorafold.kernels import cpu_ops

    if request.param == "torch":
        # as on a machine without a compiler: the LoRA backend resolves to the reference and
        # attention (`cpu_ops.usable`) to its torch path
        monkeypatch.setattr(cpu_ops, "available", lambda: False)
    else:
        require_cpu_kernels()
    return request.param


def require_cpu_kernels() -> None:
    """Fail (not skip) where the compiled CPU kernels did not build: CI must test them."""
    from lorafold.kernels import cpu_ext

    if not cpu_ext.available():
        pytest.fail("the compiled CPU kernels did not build (deploy/setup.sh sets up gcc and ninja); see the log")


def build_tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        vocab_size=256, hidden_size=72, intermediate_size=136, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, head_dim=12, max_position_embeddings=256, tie_word_embeddings=False,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


@pytest.fixture()
def tiny_llama():
    return build_tiny_llama()


def make_peft_adapter(model, folder: Path, *, r: int, alpha: float = 16.0, seed: int = 0, targets=SMOL_TARGETS,
                      strength: float = 0.3, **extra) -> Path:
    """Have PEFT itself create and save a random (non-zero B) LoRA adapter for `model`."""
    from peft import LoraConfig, get_peft_model
    import copy

    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False, **extra)
    peft_model = get_peft_model(copy.deepcopy(model), cfg)
    # PEFT's random init gives B ~ kaiming too; shrink it so logits stay in a sane range.
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(strength)
    peft_model.save_pretrained(folder)
    return folder


def merged_model(base, adapter, pool_dtype: torch.dtype | None = None):
    """A copy of `base` with W0 + s·B·A merged into every adapted linear (the reference).

    pool_dtype: merge the factors as adapter pools of that dtype hold them (`lora_dtype`):
    A and s·B, each rounded to it once."""
    import copy

    model = copy.deepcopy(base)
    with torch.no_grad():
        for path, m in adapter.modules.items():
            lin = model.get_submodule(path)
            if pool_dtype is None:
                lin.weight += m.scale * (m.lora_b.double() @ m.lora_a.double()).to(lin.weight.dtype)
            else:
                sb, a = (m.scale * m.lora_b).to(pool_dtype), m.lora_a.to(pool_dtype)
                lin.weight += (sb.double() @ a.double()).to(lin.weight.dtype)
    return model


def random_adapter(specs, r: int, seed: int, *, std: float = 0.02, targets=None):
    """A LoRAAdapter with random factors for every module in `specs` (or those whose name ends in `targets`)."""
    from lorafold.server.lora.peft_format import LoRAAdapter, ModuleLoRA

    g = torch.Generator().manual_seed(seed)
    mods = {}
    for path, spec in specs.items():
        if targets is not None and path.rsplit(".", 1)[-1] not in targets:
            continue
        a = torch.randn(r, spec.in_features, generator=g) * std
        b = torch.randn(spec.out_features, r, generator=g) * std
        mods[path] = ModuleLoRA(lora_a=a, lora_b=b, scale=16.0 / r)
    return LoRAAdapter(modules=mods, config={"r": r}, content_hash=f"{seed:064d}", nbytes=0, source="random")


def lean_prefill_inputs(lean, ids: torch.Tensor, block: int = 4) -> tuple:
    """(token ids, positions, KV caches, attention metadata) for `lean` (a LeanLlama, the
    serving decoder) to prefill the B sequences of `ids` [B, L] in one flat batch, each in
    its own fresh blocks."""
    from lorafold.server.engine.attention import build_attention_metadata

    num_seqs, length = ids.shape
    per_seq = -(-length // block)
    shape = (num_seqs * per_seq * block, lean.num_kv_heads, lean.head_dim)
    dtype = lean.lm_head.weight.dtype
    caches = [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in lean.layers]
    tables = [list(range(b * per_seq, (b + 1) * per_seq)) for b in range(num_seqs)]
    seqs = [(b * length, length, length, tables[b]) for b in range(num_seqs)]
    slots = [tables[b][p // block] * block + p % block for b in range(num_seqs) for p in range(length)]
    attn = build_attention_metadata(slots, seqs, block, ids.device, dtype=dtype)
    return ids.reshape(-1), torch.arange(length).repeat(num_seqs), caches, attn


def lean_logits(lean, ids: torch.Tensor, row_slots: list[int]) -> torch.Tensor:
    """Logits [B, L, vocab] of `lean` prefilling the B sequences of `ids` [B, L] in one flat
    batch, row b on adapter slot row_slots[b] (-1: base)."""
    num_seqs, length = ids.shape
    token_slots = [s for s in row_slots for _ in range(length)]
    lora = lean.slots.meta(token_slots) if any(s >= 0 for s in row_slots) else None
    with torch.no_grad():
        return lean(*lean_prefill_inputs(lean, ids), lora).view(num_seqs, length, -1)
