"""Write a function-preserving, off-grid copy of a Llama-family Hugging Face checkpoint.

The default model's weights were dequantized from a Q4_1 GGUF, so every block of 32 weights
sits exactly on a 4-bit grid and requantizing them looks unrealistically good. This script
(1) folds each RMSNorm gain into the linears that read its output and sets the gains to 1,
(2) unties lm_head from embed_tokens, and (3) rotates the residual stream by a seeded random
orthogonal Q: embed_tokens <- E Q, readers (q/k/v/gate/up_proj, lm_head) <- W Q, writers
(o_proj, down_proj) <- Q^T W. RMSNorm with unit gains commutes with Q, so the logits are
unchanged up to float rounding while no weight is on the grid any more.

A random rotation spreads every outlier channel over all of them, which is most of what a rotation wins a
quantizer (QuaRot, SpinQuant): judged on a rotated copy, rounding looks better than on the real model and a
rotation has nothing left to win. `--permute` writes the transform below for Llama and Qwen2/3 too (their biases
follow their rows), which keeps the outliers where the quality benches must see them.

Gemma 3 (`gemma3_text`) always takes it: its norms after attention and after the MLP write
into the residual stream with a per-channel gain (1 + w), which no general rotation commutes with, and
its head is tied to the 262k-row embedding, which the copy keeps tied (the tie is most of the 270M
model's bytes, and what a plan does with it is part of what is measured). Every transform is a signed
permutation, so the copy has the same weights, rearranged, and computes exactly the same function:
the residual stream gets a seeded random signed permutation P (RMSNorm and a per-channel gain commute
with it once the gain is permuted too): embed_tokens <- E P (the head stays tied), readers
(q/k/v/gate/up_proj) <- W P, writers (o_proj, down_proj) <- P^T W, every norm gain permuted; v_proj's
rows and o_proj's columns are permuted per KV head, and the MLP's hidden units (gate and up rows, down
columns) by one more permutation. Every matrix's columns, the direction llama.cpp's blocks run, are
permuted, so each block of 32 now holds weights from many source blocks with different scales: off every
grid (requantizing q_proj to Q5_0, its source grid, gives 4.3% relative error instead of 0). Folding
Gemma's gains into the readers, as for Llama, is function-preserving too but makes a model far harder to
quantize (gains up to 15 x their median spread inside a block: llama.cpp's own Q8_0 of such a copy had
KL 1.06); a rotation of v/o or a scaling of the MLP units would change how hard it is to quantize as
well (with both: Q8_0 KL 0.0047, vs 0.0040 with permutations alone, on 3 windows of wikitext).

Math in float64, one tensor at a time; float32 safetensors out.

    cd bench && python -m lib.offgrid SRC DST [--seed 0] [--overwrite]
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

READERS = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
           "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}
WRITERS = ("self_attn.o_proj", "mlp.down_proj")
# Tensors that never touch the residual basis (per-head norms, reader biases): copied as they are.
UNTOUCHED = re.compile(r"model\.layers\.\d+\.(self_attn\.(q_norm|k_norm)\.weight|"
                       r"self_attn\.[qkv]_proj\.bias|mlp\.(gate|up)_proj\.bias|self_attn\.rotary_emb\.inv_freq)$")
SAMPLE = "The capital of France is Paris. Edge devices run small language models: 1, 2, 3, go!"


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """Haar-random orthogonal n x n matrix (float64) from the QR of a seeded Gaussian."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # sign fix makes the distribution uniform


def _load(src: Path) -> dict[str, torch.Tensor]:
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"no *.safetensors in {src}: pass a Hugging Face checkpoint folder")
    sd = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            sd.update({k: h.get_tensor(k) for k in h.keys()})
    return sd


def make_offgrid_copy(src: Path, dst: Path, seed: int = 0, overwrite: bool = False, permute: bool = False) -> Path:
    src, dst = Path(src), Path(dst)
    if dst.exists() and not (overwrite and (dst / "config.json").is_file()):
        raise SystemExit(f"{dst} exists: pass --overwrite (it must be a checkpoint folder) or another dst")
    config = json.loads((src / "config.json").read_text())
    if config.get("model_type") not in ("llama", "mistral", "qwen2", "qwen3", "gemma3_text"):
        raise SystemExit(f"model_type {config.get('model_type')!r} is neither a Llama-family model with plain RMSNorm "
                         f"nor gemma3_text")
    if permute or config.get("model_type") == "gemma3_text":
        return _write(src, dst, config, _permuted(config, _load(src), seed))
    sd = _load(src)
    n_layers, d = config["num_hidden_layers"], config["hidden_size"]
    out: dict[str, torch.Tensor] = {}

    def put(name: str, t: torch.Tensor) -> None:
        out[name] = t.to(torch.float32).contiguous()

    def take(name: str, *default):
        """A source tensor in float64, dropped from `sd`: one tensor at a time is widened, not the whole model."""
        t = sd.pop(name, *default)
        return None if t is None else t.to(torch.float64)

    # (1)+(2): fold gains, untie.
    embed = take("model.embed_tokens.weight")
    lm_head = take("lm_head.weight", None)
    lm_head = (embed.clone() if lm_head is None else lm_head) * take("model.norm.weight")[None, :]
    q = random_orthogonal(d, seed)
    # (3): rotate the residual stream.
    put("model.embed_tokens.weight", embed @ q)
    put("lm_head.weight", lm_head @ q)
    put("model.norm.weight", torch.ones(d, dtype=torch.float64))
    for i in range(n_layers):
        p = f"model.layers.{i}."
        for norm, readers in READERS.items():
            gain = take(p + norm + ".weight")
            put(p + norm + ".weight", torch.ones_like(gain))
            for r in readers:
                put(p + r + ".weight", (take(p + r + ".weight") * gain[None, :]) @ q)
        for w in WRITERS:
            put(p + w + ".weight", q.T @ take(p + w + ".weight"))
            if p + w + ".bias" in sd:
                put(p + w + ".bias", q.T @ take(p + w + ".bias"))
    for k in [k for k in sd if UNTOUCHED.match(k)]:
        put(k, take(k))
    if sd:
        raise SystemExit(f"unexpected tensors, not sure how they see the residual stream: {sorted(sd)[:5]}")
    config["tie_word_embeddings"] = False
    return _write(src, dst, config, out)


def _permuted(config: dict, sd: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The signed-permutation transform of the module docstring (Gemma 3, and Llama/Qwen2/Qwen3 with --permute):
    every norm gain permuted with the stream, biases following their rows (v's per KV head, gate/up's with the MLP
    units, the writers' with the stream), q/k rows and their biases and per-head norms left as they are (RoPE pairs
    them); a tied head stays tied, an untied one is permuted like every reader."""
    n_layers, d = config["num_hidden_layers"], config["hidden_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim, ff = config.get("head_dim") or d // heads, config["intermediate_size"]
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(d, generator=g)
    signs = torch.randint(0, 2, (d,), generator=g).to(torch.float64) * 2 - 1
    # h' = h P with P[perm[j], j] = signs[j]: W P is W[:, perm] * signs, P^T W is W[perm] * signs[:, None]
    out: dict[str, torch.Tensor] = {}

    def put(name: str, t: torch.Tensor) -> None:
        out[name] = t.to(torch.float32).contiguous()

    def take(name: str) -> torch.Tensor:
        return sd.pop(name).to(torch.float64)

    def keep(name: str) -> None:
        if name in sd:
            put(name, take(name))

    put("model.embed_tokens.weight", take("model.embed_tokens.weight")[:, perm] * signs)  # E P, without a vocab x d product
    if config.get("tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)  # tied: the same matrix
    else:
        put("lm_head.weight", take("lm_head.weight")[:, perm] * signs)
    put("model.norm.weight", take("model.norm.weight")[perm])
    for i in range(n_layers):
        pre = f"model.layers.{i}."
        for r in ("self_attn.q_proj", "self_attn.k_proj"):
            put(pre + r + ".weight", take(pre + r + ".weight")[:, perm] * signs)  # W P
            keep(pre + r + ".bias")
        for norm in [k for k in sd if k.startswith(pre) and k.endswith("layernorm.weight")]:
            put(norm, take(norm)[perm])
        for norm in ("self_attn.q_norm", "self_attn.k_norm"):
            keep(pre + norm + ".weight")
        # v_proj rows and o_proj columns: one random permutation per KV head, shared by the query heads reading it
        v, o = take(pre + "self_attn.v_proj.weight"), take(pre + "self_attn.o_proj.weight")
        order = [torch.randperm(head_dim, generator=g) for _ in range(kv_heads)]
        rows = torch.cat([k * head_dim + order[k] for k in range(kv_heads)])
        o = torch.cat([o[:, h * head_dim:(h + 1) * head_dim][:, order[h // (heads // kv_heads)]] for h in range(heads)], dim=1)
        put(pre + "self_attn.v_proj.weight", v[rows][:, perm] * signs)
        if pre + "self_attn.v_proj.bias" in sd:
            put(pre + "self_attn.v_proj.bias", take(pre + "self_attn.v_proj.bias")[rows])
        put(pre + "self_attn.o_proj.weight", o[perm] * signs[:, None])  # P^T W
        # MLP hidden units: one random permutation of gate's and up's rows and down's columns
        units = torch.randperm(ff, generator=g)
        for r in ("mlp.gate_proj", "mlp.up_proj"):
            put(pre + r + ".weight", take(pre + r + ".weight")[units][:, perm] * signs)
            if pre + r + ".bias" in sd:
                put(pre + r + ".bias", take(pre + r + ".bias")[units])
        put(pre + "mlp.down_proj.weight", take(pre + "mlp.down_proj.weight")[:, units][perm] * signs[:, None])
        for w in WRITERS:
            if pre + w + ".bias" in sd:
                put(pre + w + ".bias", take(pre + w + ".bias")[perm] * signs)
    for k in [k for k in sd if k.endswith("rotary_emb.inv_freq")]:
        keep(k)
    if sd:
        raise SystemExit(f"unexpected tensors, not sure how they see the residual stream: {sorted(sd)[:5]}")
    return out


def _write(src: Path, dst: Path, config: dict, out: dict[str, torch.Tensor]) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        save_file(out, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for f in src.iterdir():
            if f.is_file() and not f.name.endswith(".safetensors") and f.name not in (
                    "config.json", "model.safetensors.index.json"):
                shutil.copy2(f, tmp / f.name)
        config.pop("torch_dtype", None)
        config["dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for path in (tmp, *tmp.iterdir()):  # mkdtemp and save_file create owner-only modes
            path.chmod(0o755 if path.is_dir() else 0o644)
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def max_logit_diff(a: Path, b: Path, text: str = SAMPLE, dtype=torch.float32) -> tuple[float, float]:
    """(max |logits_a - logits_b|, max |logits_a|) on `text`, tokenized with a's tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    ids = AutoTokenizer.from_pretrained(a)(text, return_tensors="pt").input_ids
    logits = []
    for path in (a, b):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        with torch.no_grad():
            logits.append(model(ids).logits)
    return (logits[0] - logits[1]).abs().max().item(), logits[0].abs().max().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="Llama-family HF checkpoint folder")
    ap.add_argument("dst", type=Path, help="folder to create")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random rotation")
    ap.add_argument("--overwrite", action="store_true", help="replace dst if it is a checkpoint folder")
    ap.add_argument("--permute", action="store_true",
                    help="Llama, Qwen2/3: signed permutations instead of folding the gains and rotating (keeps the outlier "
                         "channels, the gains and a tied head); always so for Gemma 3")
    args = ap.parse_args()
    t0 = time.perf_counter()
    make_offgrid_copy(args.src, args.dst, seed=args.seed, overwrite=args.overwrite, permute=args.permute)
    print(f"wrote {args.dst} in {time.perf_counter() - t0:.1f} s")
    diff, scale = max_logit_diff(args.src, args.dst)
    print(f"max abs logit diff vs {args.src}: {diff:.3g} (largest logit {scale:.3g})")


if __name__ == "__main__":
    main()
