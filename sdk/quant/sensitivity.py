"""Per-tensor sensitivity: what quantizing one tensor costs the model's output, at each precision.

Measuring KL for every tensor at every precision is too slow on a small machine, so:
  proxy(t, p)  = Σ_columns importance · Σ_rows (W − Q_p(W))²   (activation-weighted error; rows sampled)
  measured(t)  = KL(reference ‖ model with only t quantized to its smallest precision)   (a sample of tensors)
  ΔKL(t, p)    ≈ c_t · proxy(t, p), with c_t = measured / proxy for measured tensors and the median
               of the same kind of tensor (q_proj, down_proj, …) for the others.
How well the proxy ranks tensors is checked on the measured sample (leave-one-out) and reported.
Results are cached per model + text + format, so planning for another device is instant.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import copy
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .. import registry
from ..checkpoint import layer_index
from ..metrics import kl_rows
from ..progress import bar
from .calibration import WINDOW, calibration_windows
from .gptq_pricing import FIT_TOKENS, JUDGE_TOKENS, LAYERS as GAIN_LAYERS, by_kind, measure_gains
from .importance import compute_importance

log = logging.getLogger(__name__)
CACHE_VERSION = 11  # bump when a precision space changes its bytes or round trip, or what is measured changes
SAMPLE_ROWS = 128


@dataclass
class Sensitivity:
    format: str
    tensors: dict          # hf name → {"shape", "kind", "options": {precision: {"bytes", "proxy", "dkl"}}, "measured"}
    #                        (and "shares": [hf names stored as this tensor, planned with it]; `stored_once`)
    fixed_bytes: int       # tensors that are never quantized (norms, biases)
    correlation: float | None
    measured: int
    key: str
    importance: dict = field(default_factory=dict, repr=False)  # hf name → mean squared input; stored beside, as .npz
    gptq_gains: dict = field(default_factory=dict)  # kind → precision → what GPTQ leaves of nearest's error (`gptq_pricing`)
    priced_for: str = "nearest"  # the rounding the options' ΔKL are priced for ("gptq": `gptq_pricing.priced_for_gptq`)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "importance"}


def stored_once(sensitivity: Sensitivity, pairs: dict[str, str]) -> Sensitivity:
    """The sensitivity as a format sees it that stores each follower of `pairs` (follower → leader) as its leader: one
    tensor, one type, one set of bytes (ONNX's table, which a rotated tied head reads through a mix). The follower's
    ΔKL joins its leader's at every precision both have, at the leader's bytes alone, and the leader lists it under
    `shares`, so a plan names both alike. The cached sensitivity is left as it was."""
    pairs = {follower: leader for follower, leader in pairs.items() if follower in sensitivity.tensors and leader in sensitivity.tensors}
    if not pairs:
        return sensitivity
    tensors = copy.deepcopy(sensitivity.tensors)
    for follower, leader in pairs.items():
        gone, kept = tensors.pop(follower), tensors[leader]
        kept["options"] = {p: {**o, **{k: o[k] + gone["options"][p][k] for k in ("proxy", "dkl", "nearest_dkl") if k in o}}
                           for p, o in kept["options"].items() if p in gone["options"]}
        kept["shares"] = [*kept.get("shares", []), follower]
    return replace(sensitivity, tensors=tensors)


def tensor_kind(name: str) -> str:
    """"model.layers.7.mlp.down_proj.weight" → "mlp.down_proj"."""
    return re.sub(r"^model\.layers\.\d+\.", "", name).removesuffix(".weight")


def _cache_file(source, fmt: str, text: Path, settings: list) -> tuple[Path, str]:
    from ..default_model import cache_dir

    digest = hashlib.sha256(json.dumps([CACHE_VERSION, source.fingerprint(), fmt, settings]).encode())
    digest.update(text.read_bytes())
    key = digest.hexdigest()[:24]
    return cache_dir() / "sensitivity" / f"{key}.json", key


def _proxy(weight: np.ndarray, quantized: np.ndarray, column_weight: np.ndarray | None, scale: float) -> float:
    err = (weight - quantized) ** 2
    return float((err * column_weight).sum() * scale) if column_weight is not None else float(err.sum() * scale)


def _options(space, name, weight, candidates, importance, token_freq, tied_output_importance, rng) -> dict:
    """bytes and proxy error of each of `candidates` (smallest first) for one tensor."""
    shape = tuple(weight.shape)
    options = {}
    is_embedding = name.endswith("embed_tokens.weight")
    if is_embedding:
        used = np.flatnonzero(token_freq)
        rows, row_weight = used, token_freq[used][:, None]
    else:
        rows = rng.choice(shape[0], size=min(SAMPLE_ROWS, shape[0]), replace=False)
        row_weight = None
    sample = weight[rows]
    out_rows = rng.choice(shape[0], size=min(SAMPLE_ROWS, shape[0]), replace=False) if tied_output_importance is not None else None
    for p in candidates:
        imatrix = None if is_embedding else importance
        q = space.round_trip(sample, p, imatrix)
        err = (sample - q) ** 2
        if is_embedding:
            proxy = float((err * row_weight).sum())
            if out_rows is not None:  # tied: the same matrix is also the output projection
                qo = space.round_trip(weight[out_rows], p, None)
                proxy += _proxy(weight[out_rows], qo, tied_output_importance, shape[0] / len(out_rows))
        else:
            proxy = _proxy(sample, q, importance, shape[0] / len(rows))
        options[p] = {"bytes": space.nbytes(p, shape), "proxy": proxy}
    return options


TIED_HEAD = "lm_head.weight"
TOKENS, MEASURE_TOKENS = 4096, 256  # calibration tokens for the importance matrix; of them, the sequence KL is measured on


def measured_sequence(windows: list[list[int]], measure_tokens: int = MEASURE_TOKENS) -> list[int]:
    """The ids sensitivity KL is measured on: the first calibration windows back to back (chats are short)."""
    return [t for w in windows for t in w][:measure_tokens]


def measure_sensitivity(source, fmt: str, text: Path, *, tokens: int = TOKENS, measure_tokens: int = MEASURE_TOKENS,
                        sample: int | None = None, progress: bool | None = None) -> Sensitivity:
    """Sensitivity of every quantizable tensor of `source` for format `fmt`, from calibration `text`.

    `sample` tensors get a measured KL (default 64, or 32 past a billion weights, where one
    forward pass costs seconds on a small CPU); the rest are predicted from their proxy.
    """
    if sample is None:
        weights = sum(math.prod(shape) for shape in source.shapes().values())
        sample = 64 if weights < 1e9 else 32
    from ..float_model import load_float_model

    text = Path(text)
    cache_path, key = _cache_file(source, fmt, text, [tokens, measure_tokens, sample])
    arrays_path = cache_path.with_suffix(".npz")
    if cache_path.is_file() and arrays_path.is_file():
        with np.load(arrays_path) as arrays:
            return Sensitivity(**json.loads(cache_path.read_text()), importance=dict(arrays))
    space = registry.formats.get(fmt).space()
    tokenizer = source.chat_tokenizer()
    model = load_float_model(source)
    windows = calibration_windows(tokenizer, text, tokens, WINDOW)
    importance = compute_importance(model, windows, progress)
    token_freq = np.bincount(np.concatenate(windows), minlength=source.vocab_size).astype(np.float64)
    token_freq /= token_freq.sum()
    tied = bool(source.config.get("tie_word_embeddings"))
    apart = tied and bool(space.tied_head_types)
    rng = np.random.default_rng(0)

    tensors, fixed = {}, 0
    names = [*source.shapes(), *([TIED_HEAD] if apart else [])]
    with bar(len(names), "sensitivity: proxies", "tensor", progress) as pbar:
        for name in names:
            param = model.get_parameter(name)
            if param.ndim != 2:
                fixed += param.numel() * space.float_bytes
            else:
                weight = param.detach().float().numpy()
                tied_imp = importance.get(TIED_HEAD) if tied and not apart and name.endswith("embed_tokens.weight") else None
                candidates = space.tied_head_types if name == TIED_HEAD and apart else space.candidates(weight.shape)
                options = _options(space, name, weight, candidates, importance.get(name), token_freq, tied_imp, rng)
                tensors[name] = {"shape": list(param.shape), "kind": tensor_kind(name), "options": options, "measured": None}
            pbar.update(1)

    sequence = measured_sequence(windows, measure_tokens)
    with head_apart(model, space):
        measured = _measure_sample(model, tensors, space, importance, sequence, sample, progress)
    correlation = _calibrate(tensors)
    gain_windows = calibration_windows(tokenizer, text, FIT_TOKENS + JUDGE_TOKENS, WINDOW)
    gains = measure_gains(model, _gain_targets(model, tensors), space, gain_windows, importance, progress)
    gains = by_kind(gains, {name: info["kind"] for name, info in tensors.items()})
    result = Sensitivity(fmt, tensors, fixed, correlation, measured, key, importance, gains)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_path.with_name(cache_path.stem + ".tmp.npz")
    np.savez(tmp, **importance)
    tmp.replace(arrays_path)
    tmp = cache_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result.to_dict()))
    tmp.replace(cache_path)
    return result


def _gain_targets(model, tensors: dict) -> dict[str, list[str]]:
    """The tensors GPTQ's gain is measured on (name → its precisions): every weight of a few layers spread over depth,
    and a head of its own (a tied head is the lookup table, which no export rounds by GPTQ)."""
    layers = set(_spread(list(range(len(model.model.layers))))[:GAIN_LAYERS])
    own_head = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    return {name: list(info["options"]) for name, info in tensors.items()
            if layer_index(name) in layers or (name == TIED_HEAD and own_head)}


def _measurement_order(tensors: dict) -> list[str]:
    """Embeddings first, then kinds round-robin, each kind spread over depth, so a partial sample covers all."""
    by_kind: dict[str, list[str]] = {}
    for name, info in tensors.items():
        by_kind.setdefault(info["kind"], []).append(name)
    lists = sorted((_spread(names) for names in by_kind.values()), key=lambda names: (len(names) > 1, names[0]))
    order = []
    for i in range(max(map(len, lists))):
        order += [names[i] for names in lists if i < len(names)]
    return order


def _spread(names: list[str]) -> list[str]:
    """Layers in the order 0, n/2, n/4, 3n/4, … (van der Corput), so any prefix samples every depth."""
    picked: list[int] = []
    k = 0
    while len(picked) < len(names):
        x, fraction, step = k, 0.0, 0.5
        while x:
            fraction += step * (x & 1)
            x >>= 1
            step /= 2
        i = int(fraction * len(names))
        if i not in picked:
            picked.append(i)
        k += 1
    return [names[i] for i in picked]


def _measure_sample(model, tensors, space, importance, window, sample, progress) -> int:
    """KL of the model with each sampled tensor rounded alone. The layers before a tensor's own compute what they did
    in the reference pass, so they are replayed from it (`Replay`): a measurement costs the layers from its tensor's
    on, half the model on average, through the model's own forward (its norm, head and any logit scaling)."""
    import torch

    from .stand_in import Replay, layers_replaced

    ids = torch.tensor([window])
    layers = model.model.layers
    outputs = []
    handles = [layer.register_forward_hook(lambda module, args, output: outputs.append(output)) for layer in layers]
    try:
        with torch.inference_mode():
            ref = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0].float(), -1)
    finally:
        for handle in handles:
            handle.remove()
    done = 0
    order = _measurement_order(tensors)[:sample]
    with bar(len(order), "sensitivity: measured KL", "tensor", progress) as pbar, torch.inference_mode():
        for name in order:
            info = tensors[name]
            smallest = next(iter(info["options"]))
            param = model.get_parameter(name)
            saved = param.data
            weight = saved.float().numpy()
            param.data = torch.from_numpy(space.round_trip(weight, smallest, None if "embed" in name else importance.get(name)))
            first = _first_changed_layer(model, name)
            try:
                with layers_replaced(model, [*map(Replay, layers[:first], outputs[:first]), *layers[first:]]):
                    out = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0].float(), -1)
            finally:
                param.data = saved
            info["measured"] = max(float(kl_rows(ref, out).mean()), 1e-9)
            done += 1
            pbar.update(1)
    return done


@contextmanager
def head_apart(model, space):
    """The model as `space`'s format computes it: a format that stores a tied checkpoint's head apart from its table
    (ExecuTorch: a lookup table and a linear layer, each at its own precision) rounds the two alone, so for the
    duration the head gets a parameter of its own over the same values. Other models and formats are left as they are."""
    import torch

    head, table = model.get_output_embeddings(), model.get_input_embeddings()
    if not space.tied_head_types or head is None or head.weight is not table.weight:
        yield
        return
    shared = head.weight
    head.weight = torch.nn.Parameter(shared.data, requires_grad=False)
    try:
        yield
    finally:
        head.weight = shared


def simulate(model, choice: dict[str, str], space, importance: dict, window: list[int]) -> float:
    """KL over `window` of the model with every tensor of `choice` (HF name → precision) rounded at once by the
    format's round trip, against the model as it is: what summing per-tensor ΔKL cannot see (interactions within a
    block, q/k and gate/up, the head with the embedding, tensors the proxy misjudges) shows in it. Layer by layer,
    one layer's rounded copies in memory; the model's weights are left as they were."""
    import torch

    from .stand_in import Rounded, layers_replaced

    def rounded(name: str, data):
        if name not in choice:
            return data
        return torch.from_numpy(space.round_trip(data.float().numpy(), choice[name], None if "embed" in name else importance.get(name)))

    ids = torch.tensor([window])
    with torch.inference_mode(), head_apart(model, space):
        params = {n: model.get_parameter(n) for n in choice if layer_index(n) < 0}  # the embedding and a head of its own
        saved = {n: p.data for n, p in params.items()}
        ref = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0].float(), -1)
        try:
            for n, p in params.items():
                p.data = rounded(n, p.data)
            layers = [Rounded(layer, f"model.layers.{i}.", rounded) for i, layer in enumerate(model.model.layers)]
            with layers_replaced(model, layers):
                out = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0].float(), -1)
        finally:
            for n, p in params.items():
                p.data = saved[n]
    return float(kl_rows(ref, out).mean())


def _first_changed_layer(model, name: str) -> int:
    """The first decoder layer whose output rounding `name` changes: a layer's own tensors change it, a head of its own
    none (all replayed), the embedding (and a head that is its table) the first."""
    if layer_index(name) >= 0:
        return layer_index(name)
    if name.startswith("lm_head") and model.get_parameter(name) is not model.get_input_embeddings().weight:
        return len(model.model.layers)
    return 0


def _factor(known: list[tuple[int, float]], layer: int, fallback: float) -> float:
    """c at `layer` from measured (layer, c) of the same kind: log-linear between the nearest two."""
    if not known:
        return fallback
    below = [k for k in known if k[0] <= layer]
    above = [k for k in known if k[0] >= layer]
    if not below or not above:
        return (below or above)[-1 if below else 0][1]
    (l0, c0), (l1, c1) = below[-1], above[0]
    if l0 == l1:
        return c0
    t = (layer - l0) / (l1 - l0)
    return float(np.exp((1 - t) * np.log(c0) + t * np.log(c1)))


def _calibrate(tensors: dict) -> float | None:
    """Sets ΔKL for every option; returns the leave-one-out rank correlation of the prediction on measured tensors."""
    def base(info):
        return max(next(iter(info["options"].values()))["proxy"], 1e-30)

    known: dict[str, list[tuple[int, float]]] = {}
    for name, info in tensors.items():
        if info["measured"] is not None:
            known.setdefault(info["kind"], []).append((layer_index(name), info["measured"] / base(info)))
    for points in known.values():
        points.sort()
    overall = float(np.median([c for points in known.values() for _, c in points])) if known else 1.0
    predicted, actual = [], []
    for name, info in tensors.items():
        points = known.get(info["kind"], [])
        layer = layer_index(name)
        if info["measured"] is not None:
            c = info["measured"] / base(info)
            others = [p for p in points if p[0] != layer]
            predicted.append(_factor(others, layer, overall) * base(info))
            actual.append(info["measured"])
        else:
            c = _factor(points, layer, overall)
        for option in info["options"].values():
            option["dkl"] = c * option["proxy"]
    if len(actual) < 3:
        return None
    return spearman(predicted, actual)


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation (measured KLs are continuous, so ties need no averaging)."""
    ranks = [np.argsort(np.argsort(x)).astype(float) for x in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])
