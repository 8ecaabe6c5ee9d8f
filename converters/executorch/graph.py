"""edgeq's torch decoder (`edgeq.decoder`) as the program ExecuTorch runs: one `forward(tokens, input_pos)` method.

The decoder's weights and block computations are used as they are; what changes for ExecuTorch is where the keys and
values live and how attention reads them. Each layer gets a cache of its own, (1, context, kv_heads, head_dim) float32,
written by ExecuTorch's `llama::update_cache` and read by its `llama::custom_sdpa` (its optimized CPU kernels, the ones
Meta's Llama export uses; XNNPACK has no stateful attention). A full-attention layer runs the kernel causally from the
start position, so decode reads only the filled slots; a sliding-window layer passes its window as an additive mask.

`tokens` is (1, T) with T dynamic (1 .. `max_chunk`), so a prompt is prefilled in chunks, not a token at a time, and
`input_pos` is (1,) holding the position of the first token: the signature ExecuTorch's own LLM runner calls
(`enable_dynamic_shape`, `use_kv_cache`). The logits of every position come back, (1, T, vocab): the runner samples
from the last row, edgeq's engine scores with all of them.
"""
from __future__ import annotations

import torch
from torch import nn

from edgeq.decoder import MASKED, Decoder, rotate

from .program import load_kernels


class ExportedDecoder(nn.Module):
    """`forward(tokens (1, T) long, input_pos (1,) long) -> logits (1, T, vocab)` over static per-layer caches.

    The token lookup (`embed`) and the head (`head`, a linear of its own even when the checkpoint ties it to the
    embedding, so each can be stored at its own precision) are modules the converter may replace."""

    def __init__(self, decoder: Decoder):
        super().__init__()
        load_kernels()
        self.decoder, spec = decoder, decoder.spec
        self.spec = spec
        self.embed = decoder.model.embed_tokens
        if spec.tied:
            self.head = nn.Linear(spec.hidden, spec.vocab, bias=False)
            self.head.weight = decoder.model.embed_tokens.weight
        else:
            self.head = decoder.lm_head
        shape = (1, spec.context, spec.kv_heads, spec.head_dim)
        for i in range(spec.layers):
            self.register_buffer(f"k_cache_{i}", torch.zeros(shape))
            self.register_buffer(f"v_cache_{i}", torch.zeros(shape))

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        spec, decoder = self.spec, self.decoder
        seq = tokens.shape[1]
        start = input_pos[0].item()
        torch._check_is_size(start)
        torch._check(start + seq <= spec.context)
        positions = torch.arange(seq) + input_pos[0]
        ropes = [(getattr(decoder, f"rope_cos{k or ''}")[positions], getattr(decoder, f"rope_sin{k or ''}")[positions])
                 for k in range(len(spec.tables))]
        masks = {w: self._window_mask(positions, start + seq, w) for w in {spec.window(i) for i in range(spec.layers)} if w is not None}
        x = self.embed(tokens)
        if spec.embed_scale != 1.0:
            x = x * spec.embed_scale
        for i, layer in enumerate(decoder.model.layers):
            table = spec.rope_table(i)
            rope = ropes[table] if table >= 0 else None
            attn = self._attention(layer.self_attn, layer.input_layernorm(x), rope, masks.get(spec.window(i)), start, i)
            if not layer.sandwich:
                x = x + attn
                x = x + layer.mlp(layer.post_attention_layernorm(x))
            else:
                x = x + layer.post_attention_layernorm(attn)
                x = x + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(x)))
        x = decoder.model.norm(x)
        logits = self.head(x)
        if spec.final_softcap:
            logits = torch.tanh(logits / spec.final_softcap) * spec.final_softcap
        return logits

    @staticmethod
    def _window_mask(positions: torch.Tensor, filled, window: int) -> torch.Tensor:
        """(T, start + T) additive mask of a sliding-window layer (the kernel reads the slots filled so far, and takes a
        mask of exactly that width): slot j is seen from position p iff p - window < j <= p."""
        slots, rows = torch.arange(filled).view(1, -1), positions.view(-1, 1)
        visible = (slots <= rows) & (slots > rows - window)
        return (visible.float() - 1.0) * MASKED

    def _attention(self, attn, x, rope, mask, start, index: int):
        s = self.spec
        q, k, v = attn.projections(x)
        q = q.view(1, -1, s.heads, s.head_dim)
        k = k.view(1, -1, s.kv_heads, s.head_dim)
        v = v.view(1, -1, s.kv_heads, s.head_dim)
        if s.qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        if rope is not None:  # None: a NoPE layer
            cos, sin = (t.unsqueeze(1) for t in rope)  # (T, 1, dims): broadcast over heads in (1, T, heads, dims)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        k_cache, v_cache = getattr(self, f"k_cache_{index}"), getattr(self, f"v_cache_{index}")
        torch.ops.llama.update_cache(k, k_cache, start)
        torch.ops.llama.update_cache(v, v_cache, start)
        if mask is None:
            out = torch.ops.llama.custom_sdpa(q, k_cache, v_cache, start, None, 0, True, s.scale or None)
        else:
            out = self._windowed(q, k_cache, v_cache, mask)
        return attn.o_proj(out.reshape(1, -1, s.heads * s.head_dim))

    def _windowed(self, q, k_cache, v_cache, mask):
        """Attention of a sliding-window layer over the slots filled so far, with its window as an additive mask. Not
        the custom kernel: given a mask, it reads every slot of the cache, including ones never written (whose contents
        the runtime does not define, and a NaN there would survive the mask)."""
        s, filled = self.spec, mask.shape[1]
        group, t = s.heads // s.kv_heads, q.shape[1]
        keys = k_cache[0, :filled].transpose(0, 1)  # (kv_heads, filled, head_dim)
        values = v_cache[0, :filled].transpose(0, 1)
        rows = q[0].view(t, s.kv_heads, group, s.head_dim).permute(1, 2, 0, 3).reshape(s.kv_heads, group * t, s.head_dim)
        scores = torch.matmul(rows * (s.scale or s.head_dim ** -0.5), keys.transpose(1, 2)).view(s.kv_heads, group, t, filled)
        probs = torch.softmax(scores + mask, dim=-1).view(s.kv_heads, group * t, filled)
        out = torch.matmul(probs, values).view(s.kv_heads, group, t, s.head_dim)
        return out.permute(2, 0, 1, 3).reshape(1, t, s.heads, s.head_dim)
