"""Rotations fused into the weights (QuaRot / SpinQuant's R1 and R2): the same function, other weights to round.

A decoder's residual stream carries a few outlier channels, and every linear that reads or writes it has
columns (or rows) scaled to match: a 4-bit grid spends its levels on them. Rotating the stream by an orthogonal
Q (R1) spreads each outlier over every channel, and the model computes the same function if

- every RMSNorm's gain is folded into the linears that read it (RMSNorm(xQ) = RMSNorm(x)Q only with a gain of
  ones: the mean square of xQ is that of x, a per-channel gain does not commute with Q);
- the embedding's rows become E·Q, the inputs of q/k/v and gate/up (and of the head) W·diag(g)·Q, the outputs
  of o_proj and down_proj Qᵀ·W;
- and, per attention head, v_proj's rows and o_proj's columns take a second rotation R2 (head_dim wide): the
  attention's weighted sum of values commutes with it.

No runtime op is added: the result is an ordinary checkpoint of the same family, which every converter writes
as it writes any other (`rotated_source`). A tied head stays tied when the final norm's gain is one value (a
scalar commutes with Q); otherwise the head is E·diag(g)·Q ≠ E·Q and gets a tensor of its own, which the
manifest records with its bytes. That head is also (E·Q)·M with M = Qᵀ·diag(g)·Q, hidden × hidden: the rotated folder
keeps M beside the checkpoint (`head_mix`), so a format that can multiply by it before the head (ONNX) still stores
one table, where GGUF cannot. q/k/v biases (Qwen2) are on outputs R1 does not touch; v's follows R2.
Families whose norms sit after a sublayer (Gemma 2/3's post-attention and post-feedforward norms) scale the
sublayer's output per channel after the rotation would have to act, so no weight can carry it: refused by name.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..errors import EdgeqError
from ..progress import bar
from .hadamard import random_rotation

log = logging.getLogger(__name__)
ROTATE_CHOICES = ("off", "on", "auto")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".safetensors.index.json", ".bin.index.json")
_CHUNK = 16384  # rows of an embedding or head rotated at a time (float64 work space)
HEAD_MIX_FILE = "edgeq_head_mix.npy"  # not .safetensors: a folder's safetensors files are its checkpoint
HEAD_MIX_TENSOR = "lm_head.mix.weight"  # the mix as a format writes it beside the one table


def check_rotatable(source, kept_adapters: bool = False) -> None:
    """One line naming what cannot be rotated and keep its function: a family with post-sublayer norms, a
    model whose adapters are kept apart from the base."""
    arch = source.arch
    if arch.sandwich_norms:
        raise EdgeqError(f"--rotate cannot rotate {source.architecture}: its post-attention and post-feedforward norms "
                         "scale each channel after the sublayer, which no weight can carry through a rotation of the "
                         "residual stream; export it with --rotate off")
    if kept_adapters:
        raise EdgeqError("--rotate with --keep-adapters: a kept LoRA adapter reads and writes the unrotated residual "
                         "stream, so it would not fit the rotated base; merge the adapter (--adapter DIR) or use --rotate off")


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _right(weight, q: np.ndarray, gain=None):
    """W·diag(g)·Q in float64, chunked over rows (an embedding's 150k rows would otherwise need gigabytes)."""
    import torch

    qt = torch.from_numpy(q)
    g = None if gain is None else gain.double()
    out = torch.empty(weight.shape, dtype=torch.float32)
    for start in range(0, weight.shape[0], _CHUNK):
        block = weight[start:start + _CHUNK].double()
        out[start:start + _CHUNK] = ((block * g if g is not None else block) @ qt).float()
    return out


def _per_head_rows(weight, r2: np.ndarray, head_dim: int):
    """R2ᵀ applied to each head's rows (v_proj's outputs; its bias when 1-D)."""
    import torch

    r = torch.from_numpy(r2)
    heads = weight.double().reshape(-1, head_dim, *weight.shape[1:])
    rotated = torch.einsum("ji,hj...->hi...", r, heads)
    return rotated.reshape(weight.shape).float()


def _per_head_columns(weight, r2: np.ndarray, head_dim: int):
    """Each head's columns of o_proj times R2."""
    import torch

    heads = weight.double().reshape(weight.shape[0], -1, head_dim)
    return torch.einsum("ohj,ji->ohi", heads, torch.from_numpy(r2)).reshape(weight.shape).float()


def _fold_norm(tensors: dict, norm: str, offset: float):
    """The norm's effective gain (offset + w), the norm set to compute a gain of ones."""
    gain = tensors[norm].double() + offset
    tensors[norm] = (tensors[norm] * 0 + (1.0 - offset)).to(tensors[norm].dtype)
    return gain


def _rotate_layer(tensors: dict, p: str, config: dict, arch, r1: np.ndarray, r2: np.ndarray) -> None:
    """One block: norms folded into q/k/v and gate/up, R1 on their inputs and on o/down's outputs, R2 on v/o."""
    import torch

    q_t, offset, head_dim = torch.from_numpy(r1), arch.norm_offset, _head_dim(config)
    gain = _fold_norm(tensors, p + "input_layernorm.weight", offset)
    for name in arch.tensor_names["attention"]:
        tensors[p + name + ".weight"] = _right(tensors[p + name + ".weight"], r1, gain)
    qkv = p + ("self_attn.qkv_proj" if arch.fused_qkv else "self_attn.v_proj")
    rows = tensors[qkv + ".weight"]
    v_start = rows.shape[0] - config.get("num_key_value_heads", config["num_attention_heads"]) * head_dim
    for part in (qkv + ".weight", qkv + ".bias"):
        if part in tensors:  # v's rows (the last of a fused qkv) and its bias follow R2
            t = tensors[part].clone()
            t[v_start:] = _per_head_rows(t[v_start:], r2, head_dim)
            tensors[part] = t
    o = p + "self_attn.o_proj.weight"
    tensors[o] = (q_t.T @ _per_head_columns(tensors[o], r2, head_dim).double()).float()
    gain = _fold_norm(tensors, p + "post_attention_layernorm.weight", offset)
    for name in arch.tensor_names["mlp"]:
        tensors[p + name + ".weight"] = _right(tensors[p + name + ".weight"], r1, gain)
    down = p + "mlp.down_proj.weight"
    tensors[down] = (q_t.T @ tensors[down].double()).float()


def _rotate_ends(tensors: dict, r1: np.ndarray, arch) -> tuple[str, np.ndarray | None]:
    """The embedding, the final norm and the head (HF names) rotated in place. Returns what became of a tie, and the
    head's mix M (lm_head = embedding · M) when a tie could not stay (`tensors` then gains `lm_head.weight`), else None."""
    import torch

    final = tensors["model.norm.weight"].double() + arch.norm_offset
    tied = "lm_head.weight" not in tensors
    mix = None
    if tied and bool(torch.all(final == final[0])):
        how = "kept: the final norm's gain is one value, which commutes with the rotation"
    else:
        head = tensors["model.embed_tokens.weight"] if tied else tensors["lm_head.weight"]
        tensors["lm_head.weight"] = _right(head, r1, _fold_norm(tensors, "model.norm.weight", arch.norm_offset))
        how = ("untied: the final norm's per-channel gain folds into the head but not into the embedding, so the head "
               "is a tensor of its own (or the embedding times a hidden × hidden mix, where the format can multiply by "
               "one)") if tied else "not tied in the source"
        if tied:
            mix = (r1.T @ (final.numpy()[:, None] * r1)).astype(np.float32)  # final: the gain, offset included
    tensors["model.embed_tokens.weight"] = _right(tensors["model.embed_tokens.weight"], r1)
    return how, mix


def _cache_folder(source, seed: int) -> Path:
    import hashlib

    from ..default_model import cache_dir

    key = hashlib.sha256(json.dumps([source.fingerprint(), seed, 4]).encode()).hexdigest()[:16]
    return cache_dir() / "rotated" / key / source.name  # the folder's name is the model's: a bundle is named after it


def _write(source, folder: Path, seed: int, progress: bool | None) -> None:
    """The rotated checkpoint: safetensors written a layer at a time (so memory holds one layer and the embedding, not
    the model twice over), the config (its tie), the source's tokenizer and template. Float32, except where the source
    is a large 16-bit checkpoint: then its 16-bit type, so the float model every later step holds stays 16-bit
    (`stored_16bit`; float32 would double an export's memory, 6 GB more at 1.5B), at that type's rounding of the
    rotated weights."""
    from safetensors.torch import save_file

    from ..float_model import stored_16bit

    config, arch = source.config, source.arch
    dtype = stored_16bit(source)
    rng = np.random.default_rng(seed)
    hidden, head_dim, layers = config["hidden_size"], _head_dim(config), config["num_hidden_layers"]
    r1, r1_how = random_rotation(hidden, rng)
    r2, r2_how = random_rotation(head_dim, rng)
    names, weight_map, total = list(source.shapes()), {}, 0

    def save(tensors: dict, file: str) -> None:
        nonlocal total
        tensors = {n: (t.to(dtype) if dtype is not None else t).contiguous() for n, t in tensors.items()}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.numel() * t.element_size() for t in tensors.values())

    with bar(layers, "rotating", "layer", progress) as pbar:
        for i in range(layers):
            prefix = f"model.layers.{i}."
            tensors = {n: source.tensor(n).float() for n in names if n.startswith(prefix)}
            _rotate_layer(tensors, prefix, config, arch, r1, r2)
            save(tensors, f"model-layer-{i:05d}.safetensors")
            pbar.update(1)
    rest = {n: source.tensor(n).float() for n in names if not n.startswith("model.layers.")}
    tied_head, mix = _rotate_ends(rest, r1, arch)
    save(rest, "model-rest.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1) + "\n")
    facts = {"r1": f"{r1_how}, {hidden} wide", "r2": f"{r2_how}, per head ({head_dim} wide) on v_proj/o_proj",
             "seed": seed, "norms_folded": True, "tied_head": tied_head, "tied": "lm_head.weight" not in rest,
             "stored_as": str(dtype or "torch.float32").removeprefix("torch.")}
    if mix is not None:
        np.save(folder / HEAD_MIX_FILE, mix)
        facts["head_mix"] = HEAD_MIX_FILE
    config = {**config, "tie_word_embeddings": facts["tied"], "torch_dtype": facts["stored_as"]}
    config.pop("dtype", None)
    for item in source.path.iterdir():
        if item.is_file() and not item.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(item, folder / item.name)
    if source.tokenizer_folder != source.path:
        for item in source.tokenizer_folder.iterdir():
            if item.is_file() and (item.name.startswith(("tokenizer", "special_tokens", "chat_template")) or item.suffix == ".jinja"):
                shutil.copy2(item, folder / item.name)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "edgeq_rotation.json").write_text(json.dumps(facts, indent=2) + "\n")


def rotated_source(source, seed: int = 0, progress: bool | None = None):
    """`source` rotated (adapter merged first), as a source every converter reads: an HF folder built once and
    cached by the source's hashes and the seed. Returns (the source, the facts for the manifest)."""
    from ..intake import open_model

    check_rotatable(source)
    folder = _cache_folder(source, seed)
    if not (folder / "edgeq_rotation.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".rotating-", dir=folder.parent))
        try:
            log.info("rotating %s into %s (once)", source.name, folder)
            _write(source, tmp, seed, progress)
            tmp.rename(folder)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (folder / "edgeq_rotation.json").is_file():
                raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    rotated = open_model(folder)
    rotated.origin = {**source.origin, "rotated_from": {"path": str(source.path),
                                                        **({"adapter": str(source.adapter.path)} if source.adapter else {})}}
    facts = json.loads((folder / "edgeq_rotation.json").read_text())
    return rotated, facts


def head_mix(source) -> np.ndarray | None:
    """M of a rotated checkpoint whose head is its embedding times M (float32, hidden × hidden), or None. Read only from
    a folder this module wrote (its facts name the file) and checked against the weights themselves: on rows of the
    embedding, E·M must give the head's rows, or the file is ignored with a warning."""
    import torch

    facts = source.path / "edgeq_rotation.json"
    if source.adapter is not None or "lm_head.weight" not in source.shapes() or not facts.is_file():
        return None
    try:
        named = json.loads(facts.read_text()).get("head_mix")
        mix = torch.from_numpy(np.load(source.path / HEAD_MIX_FILE, allow_pickle=False)).double() if named == HEAD_MIX_FILE else None
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s's head mix (%s): the head is written as a tensor of its own", source.name, exc)
        return None
    hidden = source.config["hidden_size"]
    if mix is None or tuple(mix.shape) != (hidden, hidden):
        return None
    rows = torch.linspace(0, source.shapes()["lm_head.weight"][0] - 1, 64).long()
    embed, head = source.tensor("model.embed_tokens.weight")[rows].double(), source.tensor("lm_head.weight")[rows].double()
    if float((embed @ mix - head).norm() / head.norm()) > 1e-4:
        log.warning("ignoring %s's head mix: the embedding times it is not the head", source.name)
        return None
    return mix.float().numpy()
