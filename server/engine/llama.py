"""A lean Llama-family decoder for serving, built on a loaded transformers model's weights.

Why not run the transformers model itself: serving needs a flat batch of tokens from many
sequences (prefill chunks and decode tokens together) over a paged KV cache, and q/k/v and
gate/up fused so each group's base matmul and LoRA shrink/expand run once. Norms, rotary
embedding, embeddings and the LM head are the transformers modules themselves (exact same
numerics); only the projections are regrouped.

Adapter module paths stay those of the transformers model (`model.layers.3.self_attn.k_proj`)
and map to (fused layer, slice), so PEFT adapters load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from lorafold.kernels.meta import LoRABatchMeta
from lorafold.kernels.ops import choose_backend
from lorafold.server.engine.attention import AttentionMetadata, paged_attention
from lorafold.server.lora.layers import MultiLoRALinear
from lorafold.server.lora.slots import AdapterSlots, Target
from lorafold.server.models.packed_linear import PackedLinear, can_prepack


def _fuse(linears: list[nn.Linear]) -> nn.Linear:
    """One linear whose output is the concatenation of `linears`' outputs."""
    first = linears[0]
    bias = first.bias is not None
    fused = nn.Linear(first.in_features, sum(l.out_features for l in linears), bias=bias,
                      device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([l.weight for l in linears]))
        if bias:
            fused.bias.copy_(torch.cat([l.bias for l in linears]))
    return fused.requires_grad_(False)


class LeanDecoderLayer(nn.Module):
    def __init__(self, hf_layer: nn.Module, config, num_slots: int, rows: int,
                 pool_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.scale = self.head_dim**-0.5
        q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
        self.q_size, self.kv_size = q.out_features, k.out_features
        self.qkv = MultiLoRALinear(_fuse([q, k, v]), [q.out_features, k.out_features, v.out_features], num_slots, rows,
                                   pool_dtype)
        self.o_proj = MultiLoRALinear(attn.o_proj, [attn.o_proj.out_features], num_slots, rows, pool_dtype)
        self.gate_up = MultiLoRALinear(
            _fuse([mlp.gate_proj, mlp.up_proj]), [mlp.gate_proj.out_features, mlp.up_proj.out_features], num_slots, rows,
            pool_dtype,
        )
        self.down_proj = MultiLoRALinear(mlp.down_proj, [mlp.down_proj.out_features], num_slots, rows, pool_dtype)
        self.act = mlp.act_fn
        self.input_layernorm = hf_layer.input_layernorm
        self.post_attention_layernorm = hf_layer.post_attention_layernorm

    def targets(self, prefix: str) -> dict[str, Target]:
        return {
            f"{prefix}.self_attn.q_proj": Target(self.qkv, 0),
            f"{prefix}.self_attn.k_proj": Target(self.qkv, 1),
            f"{prefix}.self_attn.v_proj": Target(self.qkv, 2),
            f"{prefix}.self_attn.o_proj": Target(self.o_proj, 0),
            f"{prefix}.mlp.gate_proj": Target(self.gate_up, 0),
            f"{prefix}.mlp.up_proj": Target(self.gate_up, 1),
            f"{prefix}.mlp.down_proj": Target(self.down_proj, 0),
        }

    def forward(
        self,
        h: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv: tuple[torch.Tensor, torch.Tensor],
        attn_meta: AttentionMetadata,
        lora_meta: LoRABatchMeta | None,
    ) -> torch.Tensor:
        n = h.shape[0]
        x = self.input_layernorm(h)
        q, k, v = self.qkv(x, lora_meta).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        q, k = _rotate(q, k, *cos_sin)
        attn = paged_attention(q, k, v, kv[0], kv[1], attn_meta, self.scale)
        h = h + self.o_proj(attn.reshape(n, -1), lora_meta)
        x = self.post_attention_layernorm(h)
        gate, up = self.gate_up(x, lora_meta).chunk(2, dim=-1)
        return h + self.down_proj(self.act(gate).mul_(up), lora_meta)


def _rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding in transformers' rotate-half convention. cos/sin: [N, D]."""
    cos, sin = cos[:, None, :], sin[:, None, :]

    def rot(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


class LeanLlama(nn.Module):
    """Flat-batch decoder over a paged KV cache, with multi-LoRA fused projections."""

    def __init__(self, hf_model: nn.Module, *, num_slots: int, rows: int, prepack: bool = True,
                 lora_backend: str = "auto", lora_dtype: torch.dtype | None = None) -> None:
        """prepack: keep oneDNN-packed copies of the base weights for inference (fp32 CPU
        only; one more copy of the weights in memory; see `server.models.packed_linear`).
        lora_backend: the LoRA ops' implementation, resolved once here for the model's device
        and dtype (`kernels.ops.choose_backend`).
        lora_dtype: the adapter pools' dtype (None: the model's; see EngineConfig.lora_dtype)."""
        super().__init__()
        config = hf_model.config
        inner = hf_model.model
        self.config = config
        self.embed_tokens = inner.embed_tokens
        self.rotary_emb = inner.rotary_emb
        self.norm = inner.norm
        self.lm_head = hf_model.lm_head
        self.layers = nn.ModuleList(LeanDecoderLayer(l, config, num_slots, rows, lora_dtype) for l in inner.layers)
        targets: dict[str, Target] = {}
        for i, layer in enumerate(self.layers):
            targets.update(layer.targets(f"model.layers.{i}"))
        weight = self.lm_head.weight
        backend = choose_backend(lora_backend, weight.device, weight.dtype, lora_dtype)
        self.slots = AdapterSlots(targets, num_slots=num_slots, rows=rows, backend=backend)
        if prepack and can_prepack(self.lm_head.weight):
            for layer in self.layers:
                for proj in (layer.qkv, layer.o_proj, layer.gate_up, layer.down_proj):
                    proj.prepack_base()
            self.lm_head = PackedLinear(self.lm_head)

    @property
    def num_kv_heads(self) -> int:
        return self.layers[0].num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.layers[0].head_dim

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        attn_meta: AttentionMetadata,
        lora_meta: LoRABatchMeta | None = None,
        logits_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: [N]. Returns logits [len(logits_rows) or N, vocab].

        lora_meta: each token's adapter slot (`AdapterSlots.meta`); None: the base alone.
        """
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(h[None], positions[None])
        cos_sin = (cos[0], sin[0])
        for layer, kv in zip(self.layers, kv_caches):
            h = layer(h, cos_sin, kv, attn_meta, lora_meta)
        if logits_rows is not None:
            h = h.index_select(0, logits_rows)  # only the rows that sample: skip the LM head elsewhere
        return self.lm_head(self.norm(h))
