"""A tiny Llama and LoRA adapters trained to confident predictions, for bf16 agreement checks
(tests/gpu_path and gpu_check's engine section).

A bf16 engine is judged by teacher-forced top-1 agreement with an fp32 reference. On a
random-init model that measures coin tosses: its logits are near-ties everywhere
(transformers' own bf16 forward agrees with its fp32 forward on only 97-98 % of tokens), and
strong random adapters erase a trained model's margins the same way. Trained ones have the
margins real models have, so a flipped token means an arithmetic error.

The task: continue x -> 5x + shift (mod vocab; 5 is odd, so a bijection for a power-of-two
vocab and any odd one not divisible by 5) after a random prefix of 1-20 tokens, as a
serving workload's prompts are. The base model learns shift 3; each adapter its own shift.
Trained on map-following sequences alone, adapters kept near-ties after random prompts
(top-1 98.1-98.6 %); with the prefixes, >= 99 % of reference margins exceed 0.6.
"""

from __future__ import annotations

import dataclasses

import torch

from lorafold.server.lora.peft_format import LoRAAdapter, ModuleLoRA
from lorafold.server.models.loader import module_specs

SEQ_LEN = 48  # every position the checks' prompts and generations reach
BATCH = 16


def affine_batch(gen: torch.Generator, shift: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BATCH sequences of SEQ_LEN tokens (on the CPU): a random prefix of 1-20 tokens, then
    x -> 5x + shift mod vocab from its last token. Returns (ids, labels), the prefix's
    labels masked (-100): it is unpredictable."""
    ids = torch.randint(1, vocab, (BATCH, SEQ_LEN), generator=gen)
    in_map = torch.arange(SEQ_LEN) >= torch.randint(1, 21, (BATCH, 1), generator=gen)
    for t in range(1, SEQ_LEN):
        ids[:, t] = torch.where(in_map[:, t], (ids[:, t - 1] * 5 + shift) % vocab, ids[:, t])
    return ids, ids.masked_fill(~in_map, -100)


def fit(model: torch.nn.Module, params: list[torch.Tensor], shift: int, steps: int, lr: float) -> None:
    """AdamW on `params` for `steps` batches of the shift's task (data drawn on the CPU with a
    generator seeded by the shift, so runs repeat on any device)."""
    device, vocab = next(model.parameters()).device, model.config.vocab_size
    opt = torch.optim.AdamW(params, lr=lr)
    gen = torch.Generator().manual_seed(shift)
    for _ in range(steps):
        ids, labels = affine_batch(gen, shift, vocab)
        loss = model(ids.to(device), labels=labels.to(device)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def train_base(model: torch.nn.Module, steps: int = 300, lr: float = 3e-3) -> torch.nn.Module:
    """Train `model` (fp32, in place) on shift 3; returns it in eval mode, frozen."""
    model.train().requires_grad_(True)
    fit(model, list(model.parameters()), shift=3, steps=steps, lr=lr)
    return model.eval().requires_grad_(False)


def train_adapters(base: torch.nn.Module, ranks: tuple[int, ...], steps: int = 200, lr: float = 1e-2,
                   ) -> tuple[LoRAAdapter, ...]:
    """One LoRA per rank on every projection of `base` (frozen, fp32), adapter i trained on
    shift 40 + 30 i (all-projection adapters: q/v-only ones cannot learn the task, and their
    near-ties would be noise). Factors come back on the CPU, rounded to bf16 values
    (`bf16_exact`), scale 16 / r."""
    device = next(base.parameters()).device
    adapters = []
    for i, r in enumerate(ranks):
        g = torch.Generator().manual_seed(60 + i)
        factors = {path: ((torch.randn(r, spec.in_features, generator=g) / spec.in_features ** 0.5)
                          .to(device).requires_grad_(),
                          torch.zeros(spec.out_features, r, device=device, requires_grad=True))
                   for path, spec in module_specs(base).items()}
        scale = 16.0 / r
        hooks = [base.get_submodule(path).register_forward_hook(
                     lambda _m, inp, out, a=a, b=b: out + scale * (inp[0] @ a.T) @ b.T)
                 for path, (a, b) in factors.items()]
        try:
            fit(base, [t for ab in factors.values() for t in ab], shift=40 + 30 * i, steps=steps, lr=lr)
        finally:
            for h in hooks:
                h.remove()
        mods = {path: ModuleLoRA(lora_a=a.detach().cpu(), lora_b=b.detach().cpu(), scale=scale)
                for path, (a, b) in factors.items()}
        adapters.append(bf16_exact(LoRAAdapter(modules=mods, config={"r": r}, content_hash=f"{i:064d}", nbytes=0,
                                               source="trained")))
    return tuple(adapters)


def bf16_exact(adapter: LoRAAdapter) -> LoRAAdapter:
    """The adapter with factors rounded to bf16 values: an engine's bf16 pools hold them
    exactly (the folded scales 16/r are powers of two for power-of-two ranks), so an fp32
    merged reference and the engine serve the same adapter."""
    mods = {p: dataclasses.replace(m, lora_a=m.lora_a.bfloat16().float(), lora_b=m.lora_b.bfloat16().float())
            for p, m in adapter.modules.items()}
    return dataclasses.replace(adapter, modules=mods)


@torch.no_grad()
def teacher_forced_scores(scored: list[tuple[torch.nn.Module, list[int], list[int]]],
                          base_ref: torch.nn.Module) -> dict[str, float]:
    """Score an engine's generations teacher-forced: for each (reference model, prompt,
    generated tokens), the reference runs on the prompt and the engine's own continuation.
    `top1`: share of tokens that are the reference's top-1; `worst_gap`: the largest amount by
    which the reference's top-1 logit exceeds the chosen token's; `moved`: share of tokens
    where the reference's top-1 differs from `base_ref`'s (an engine that dropped the
    adapters would miss those); `margin_q01`: the 1st percentile of the reference's top-1
    minus top-2 logit (how confident the model is: bf16 noise below it cannot flip a token);
    `tokens`: how many were scored."""
    top1 = moved = total = 0
    worst_gap = 0.0
    margins = []
    for ref, prompt, generated in scored:
        device = next(ref.parameters()).device
        ids = torch.tensor([prompt + generated[:-1]], device=device)
        chosen = torch.tensor(generated, device=device)
        logits = ref(ids).logits[0, len(prompt) - 1:].float()
        base_top1 = base_ref(ids).logits[0, len(prompt) - 1:].argmax(-1)
        top1 += int((logits.argmax(-1) == chosen).sum())
        worst_gap = max(worst_gap, float((logits.max(-1).values - logits.gather(1, chosen[:, None])[:, 0]).max()))
        moved += int((logits.argmax(-1) != base_top1).sum())
        total += len(generated)
        top2 = logits.topk(2, -1).values
        margins.append((top2[:, 0] - top2[:, 1]).cpu())
    return {"top1": top1 / total, "worst_gap": worst_gap, "moved": moved / total,
            "margin_q01": float(torch.cat(margins).quantile(0.01)), "tokens": total}
