"""`edgeq.profile()`: what a bundle costs on this machine (measured) and on a device profile (estimated).

Each bundle is measured in a fresh interpreter, so its peak resident memory is
its own high-water mark (VmHWM, what the OS accounts for that process) and the numbers of several
bundles never mix. Timings are taken at the engine level, on synthetic prompt ids of exact length
and greedy argmax decoding, so they are the backend's and not the tokenizer's or the sampler's.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from . import registry
from .engine import usable_cores
from .errors import EdgeqError
from .fresh_process import call_in_fresh_process
from .model_shape import ModelShape
from .profile_report import BundleProfile, DeviceEstimate, ProfileResult, PromptEstimate, PromptProfile, Spread

log = logging.getLogger(__name__)
WARMUP_DECODE_STEPS = 8
PROBE_ARRAY_BYTES = 256 << 20       # far larger than any CPU cache, so the copy runs at DRAM speed
PROBE_MATMUL = 1024
BLAS_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")


def profile(bundles: str | Path | Sequence[str | Path], prompt_tokens: Sequence[int] = (64, 512), gen: int = 128,
            repeat: int = 5, threads: int | None = None, device: str | Path | None = None,
            progress: bool | None = None, draft: str | None = None, machine: dict | None = None) -> ProfileResult:
    """Measures load time, time to first token, prefill and decode tokens/s, peak memory and size of
    each bundle (an HF folder profiles the torch reference); with `device`, adds a labelled estimate.

    Prompt lengths that do not fit the model's context (with `gen` tokens after them) are skipped
    with a note. Every bundle is checked (checksums, device) before anything is measured. With `draft` ("lookup" or
    a draft bundle), speculative decoding is measured too (`edgeq.profile_speculation`).

    `machine` is this machine's bandwidth and GFLOPS at some thread count, as `measure_machine` returns them: for
    bundles profiled at those threads no probe process runs (three of them, each copying 512 MiB). A caller that
    measured them already saves their time, and the OS's accounting of the whole run (`/usr/bin/time`) then holds
    only the profiling itself.
    """
    from edgeq.devices import load_device

    paths = [Path(bundles)] if isinstance(bundles, (str, Path)) else [Path(b) for b in bundles]
    prompt_tokens = [prompt_tokens] if isinstance(prompt_tokens, int) else prompt_tokens
    prompts = _check_args(paths, prompt_tokens, gen, repeat, threads)
    target = load_device(device) if device else None
    local: dict[int, dict] = {machine["threads"]: machine} if _check_machine(machine) else {}
    infos = [describe(p) for p in paths]
    names = [p.name for p in paths]
    names = names if len(set(names)) == len(names) else [str(p) for p in paths]
    results = []
    for path, name, info in zip(paths, names, infos):
        log.info("profiling %s in a fresh process", path)
        raw = call_in_fresh_process(_measure, str(path), prompts, gen, repeat, threads, progress, draft, doing=f"profiling {path}")
        results.append(_assemble(name, path, info, raw, prompts, gen))
        results[-1].speculation = raw.get("speculation")
    for b in results:
        if b.threads not in local:
            local[b.threads] = measure_machine(b.threads)
        b.roofline = roofline(b, local[b.threads])
        if target:
            b.estimate = estimate(b, target, local[b.threads])
            if b.speculation:
                from .profile_speculation import device_speedup

                b.speculation["device"] = device_speedup(b.speculation, b.weight_bytes, b.params, target.bandwidth_gbps, target.cpu_gflops)
    return ProfileResult(results, prompts, gen, repeat, _machine(), target.id if target else None)


def _check_args(paths, prompt_tokens, gen, repeat, threads) -> list[int]:
    if not paths:
        raise EdgeqError("no bundle given; pass one or more bundle folders made by `edgeq export`")
    prompts = sorted({int(p) for p in prompt_tokens})
    if not prompts or prompts[0] < 1:
        raise EdgeqError(f"prompt lengths must be positive token counts, got {list(prompt_tokens)}; e.g. 64,512")
    for label, value in (("gen", gen), ("repeat", repeat), ("threads", threads)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise EdgeqError(f"{label} must be a positive integer, got {value!r}")
    return prompts


def _check_machine(machine: dict | None) -> bool:
    if machine is None:
        return False
    fields = ("threads", "bandwidth_gbps", "gflops")
    if not isinstance(machine, dict) or not all(isinstance(machine.get(f), (int, float)) and machine[f] > 0 for f in fields):
        raise EdgeqError(f"machine must hold positive {', '.join(fields)} (what edgeq.profiling.measure_machine returns), "
                         f"got {machine!r}")
    return True


def describe(path: Path) -> dict:
    """Size, parameters and KV cache cost of a bundle (checksums verified) or of an HF folder."""
    from .bundle import MANIFEST, SIDE_FILES, read_manifest

    if not (path / MANIFEST).is_file() and (path / "config.json").is_file():
        return _describe_hf(path)
    m = read_manifest(path)
    spec = registry.formats.get(m["format"])
    size = sum(f["bytes"] for name, f in m["files"].items() if name not in SIDE_FILES and name not in spec.debug_files)
    tensors = m.get("tensors") or {}
    weight_bytes = sum(t.get("bytes", 0) for t in tensors.values()) or size
    params = sum(int(np.prod(t["shape"])) for t in tensors.values()) or int(weight_bytes * 8 / m.get("bits_per_weight", 16))
    config_path = Path((m.get("source") or {}).get("path", "")) / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    element = spec.kv_bytes_per_element((m.get("kv_cache") or {}).get("type"))
    notes = []
    if adapters := m.get("adapters"):
        notes.append(f"{len(adapters)} LoRA adapters kept apart ({sum(a['bytes'] for a in adapters) / 2**20:.2f} MiB), all loaded: "
                     "timings are the base's")
    return {"format": m["format"], "runtime": m["runtime"], "precision": m.get("precision", "?"), "size_bytes": size,
            "weight_bytes": weight_bytes, "params": params, "kl": (m.get("quality") or {}).get("kl"),
            "kv_bytes_per_token": kv_bytes_per_token(tensors, config, element), "notes": notes}


def _describe_hf(path: Path) -> dict:
    from .intake import open_model

    source = open_model(path)
    params = sum(int(np.prod(shape)) for shape in source.shapes().values())
    size = sum(f.stat().st_size for f in {info.file for info in source.index.values()})
    return {"format": "hf", "runtime": "torch", "precision": "float32", "size_bytes": size, "weight_bytes": params * 4,
            "params": params, "kl": 0.0, "kv_bytes_per_token": kv_bytes_per_token({}, source.config, 4),
            "notes": ["torch reference (KL 0 by definition)"]}


def kv_bytes_per_token(tensors: dict, config: dict, element: float) -> int | None:
    """K and V bytes one token adds to the cache, from the key projections' shapes or the model config."""
    rows = [t["shape"][0] for name, t in tensors.items() if re.search(r"(^|\.)(attn_k|k_proj)\.weight$", name)]
    if rows:
        return round(2 * sum(rows) * element)
    if "num_hidden_layers" in config:
        return ModelShape.from_config(config).kv_bytes_per_token(element)
    return None


def _measure(path: str, prompts: list[int], gen: int, repeat: int, threads: int | None, progress: bool | None,
             draft: str | None = None) -> dict:
    """Runs in the fresh process: a cold load (the runtime imported on the way, as an app starts), `repeat`
    timed warm loads, then a warm-up pass and `repeat` measured passes over the prompt lengths."""
    from .loading import load
    from .progress import bar

    logging.basicConfig(level=logging.WARNING)
    baseline = rss("VmRSS")
    model, loads = None, []
    for _ in range(repeat + 1):
        if model is not None:
            model.engine.close()
            model = None
            gc.collect()
        start = time.perf_counter()
        model = load(path, threads=threads, n_ctx=prompts[-1] + gen, verify=False)  # checksums verified by the parent
        loads.append(time.perf_counter() - start)
    engine = model.engine
    fits = [p for p in prompts if p + gen <= engine.n_ctx]
    ids = np.random.default_rng(0).integers(0, engine.n_vocab, prompts[-1]).tolist()
    runs: dict[int, list] = {p: [] for p in fits}
    with bar(len(fits) * (repeat + 1), f"profile {Path(path).name}", "run", progress) as progress_bar:
        for rep in range(repeat + 1):  # pass 0 warms caches and allocations and is not counted
            for p in fits:
                timing = _run_once(engine, ids[:p], gen if rep else min(gen, WARMUP_DECODE_STEPS))
                if rep:
                    runs[p].append(timing)
                progress_bar.update()
    base_peak, adapters = rss("VmHWM"), list(getattr(engine, "adapters", ()))
    for name in adapters:  # each kept adapter runs once, so the peak covers them all loaded and used
        engine.set_adapter(name)
        _run_once(engine, ids[:fits[0]] if fits else ids[:1], min(gen, WARMUP_DECODE_STEPS))
    used_threads = getattr(engine, "threads", None) or threads or usable_cores()
    n_ctx = engine.n_ctx
    engine.close()
    out = {"threads": used_threads, "n_ctx": n_ctx, "first_load_s": loads[0], "load_s": loads[1:], "runs": runs,
           "peak_rss": rss("VmHWM"), "baseline_rss": baseline, "adapters_run": len(adapters),
           "base_peak_rss": base_peak if adapters else None}
    if draft is not None:  # after the peak is read: the drafter's memory is not the bundle's
        from .profile_speculation import measure

        out["speculation"] = measure(path, draft, threads, gen, repeat, max(n_ctx, 1024))
    return out


def _run_once(engine, prompt: list[int], steps: int) -> tuple[float, float]:
    """(time to first token, time of `steps` greedy decode steps after it)."""
    engine.reset()
    start = time.perf_counter()
    token = int(np.argmax(engine.forward(prompt)))
    first = time.perf_counter()
    for _ in range(steps):
        token = int(np.argmax(engine.forward([token])))
    return first - start, time.perf_counter() - first


def _assemble(name: str, path: Path, info: dict, raw: dict, prompts: list[int], gen: int) -> BundleProfile:
    rows = []
    for p in prompts:
        timings = raw["runs"].get(p)
        if timings is None:
            rows.append(PromptProfile(p, skipped=f"needs {p} + {gen} tokens of context; the model runs {raw['n_ctx']}"))
            continue
        ttft = [t for t, _ in timings]
        rows.append(PromptProfile(p, Spread.of(ttft), Spread.of([p / t for t in ttft]), Spread.of([gen / d for _, d in timings])))
    fields = {k: v for k, v in info.items() if k != "notes"}
    return BundleProfile(name=name, path=str(path), **fields, threads=raw["threads"], n_ctx=raw["n_ctx"], gen=gen,
                         first_load_s=raw["first_load_s"], load_s=Spread.of(raw["load_s"]), peak_rss_bytes=raw["peak_rss"],
                         baseline_rss_bytes=raw["baseline_rss"], base_peak_rss_bytes=raw["base_peak_rss"],
                         adapters_run=raw["adapters_run"], prompts=rows, notes=list(info["notes"]))


def rss(key: str) -> int:
    """VmHWM (peak) or VmRSS (now) of this process in bytes; where /proc is missing, the peak from getrusage."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def _machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cpus": usable_cores(), "python": platform.python_version()}


def measure_machine(threads: int, probes: int = 3) -> dict:
    """This machine's memory bandwidth (large array copy) and float32 matmul GFLOPS with `threads`
    threads: the median of `probes` fresh processes whose BLAS is limited to that many threads (their
    arrays count towards no bundle's peak memory). One process alone varies by ±10% on a shared
    machine, as memory placement changes from process to process."""
    env = {**os.environ, **{var: str(threads) for var in BLAS_THREAD_VARS}}
    runs = [call_in_fresh_process(probe, threads, doing="measuring this machine's bandwidth", env=env) for _ in range(probes)]
    return {"threads": threads, **{key: float(np.median([run[key] for run in runs])) for key in ("bandwidth_gbps", "gflops")}}


def probe(threads: int, reps: int = 20) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    n = PROBE_ARRAY_BYTES // 8
    src, dst = np.ones(n), np.ones(n)
    bounds = np.linspace(0, n, threads + 1).astype(int)

    def copy(i):  # numpy releases the GIL while copying, so the threads run in parallel
        np.copyto(dst[bounds[i]:bounds[i + 1]], src[bounds[i]:bounds[i + 1]])

    with ThreadPoolExecutor(threads) as pool:
        copy_s = _typical(lambda: list(pool.map(copy, range(threads))), reps)
    a = np.random.default_rng(0).standard_normal((PROBE_MATMUL, PROBE_MATMUL), dtype=np.float32)
    matmul_s = _typical(lambda: a @ a, reps)
    return {"threads": threads, "bandwidth_gbps": 2 * PROBE_ARRAY_BYTES / copy_s / 1e9,  # read + write
            "gflops": 2 * PROBE_MATMUL ** 3 / matmul_s / 1e9}


def _typical(fn, reps: int) -> float:
    """Median time of `reps` calls after one warm-up: a shared machine's bandwidth drifts between
    runs, and the median is what a bundle's own timed runs (also medians) met."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def decode_bytes_per_token(weight_bytes: int, kv_bytes_per_token: int | None, context: float) -> float:
    """Bytes one decoded token reads: every weight once, and the KV cache of `context` tokens (the typical
    context over a reply: its prompt plus half its length)."""
    return weight_bytes + (kv_bytes_per_token or 0) * context


def device_roofline(bundle: Path, device, prompt_tokens: int, gen: int) -> dict:
    """Decode and TTFT of `bundle` on `device` at the profile's full bandwidth and compute, without running it
    (what a release reports per cell): decode cannot beat bandwidth ÷ bytes per token, and the first token
    needs 2 × params × prompt FLOPs at the profile's peak GFLOPS."""
    from dataclasses import asdict

    info = describe(bundle)
    kv = info["kv_bytes_per_token"] or 0
    bytes_per_token = decode_bytes_per_token(info["weight_bytes"], kv, prompt_tokens + gen / 2)
    flops = 2.0 * info["params"] * prompt_tokens
    ttft = flops / (device.cpu_gflops * 1e9)
    estimate = PromptEstimate(prompt_tokens, ttft, prompt_tokens / ttft, device.bandwidth_gbps * 1e9 / bytes_per_token,
                              int(bytes_per_token), flops, bandwidth_efficiency=1.0, compute_efficiency=1.0)
    resident = info["weight_bytes"] + kv * device.context_length
    return {"method": "roofline", "profile": device.id, "bandwidth_gbps": device.bandwidth_gbps, "cpu_gflops": device.cpu_gflops,
            **asdict(estimate), "resident_bytes": int(resident), "budget_bytes": device.budget_bytes,
            "fits_budget": resident <= device.budget_bytes}


def roofline(bundle: BundleProfile, local: dict) -> dict | None:
    """How close decode runs to what memory bandwidth allows: each decoded token reads every weight and the KV
    cache so far, so bandwidth ÷ bytes per token is the most tokens/s this machine can give."""
    row = next((p for p in bundle.prompts if p.decode_tokens_per_s), None)
    if row is None:
        return None
    bytes_per_token = decode_bytes_per_token(bundle.weight_bytes, bundle.kv_bytes_per_token, row.prompt_tokens + bundle.gen / 2)
    bound = local["bandwidth_gbps"] * 1e9 / bytes_per_token
    return {"bandwidth_gbps": round(local["bandwidth_gbps"], 2), "bytes_per_token": int(bytes_per_token),
            "bound_tokens_per_s": round(bound, 2), "fraction": round(row.decode_tokens_per_s.median / bound, 3)}


def estimate(bundle: BundleProfile, device, local: dict) -> DeviceEstimate:
    """Decode is bandwidth-bound (bytes read per token ÷ bandwidth), prefill compute-bound
    (2·params·tokens ÷ GFLOPS). Each prompt length is calibrated by the efficiency this backend
    reached here against this machine's own measured bandwidth and GFLOPS, assumed to carry over."""
    rows = []
    for row in bundle.prompts:
        p = row.prompt_tokens
        if row.skipped or p + bundle.gen > device.context_length:
            why = row.skipped or f"needs {p} + {bundle.gen} tokens of context; {device.id} runs {device.context_length}"
            rows.append(PromptEstimate(p, skipped=why))
            continue
        bytes_per_token = decode_bytes_per_token(bundle.weight_bytes, bundle.kv_bytes_per_token, p + bundle.gen / 2)
        flops = 2.0 * bundle.params * p
        bw_eff = bytes_per_token * row.decode_tokens_per_s.median / (local["bandwidth_gbps"] * 1e9)
        compute_eff = flops * row.prefill_tokens_per_s.median / p / (local["gflops"] * 1e9)
        ttft = flops / (compute_eff * device.cpu_gflops * 1e9)
        rows.append(PromptEstimate(p, ttft, p / ttft, bw_eff * device.bandwidth_gbps * 1e9 / bytes_per_token,
                                   int(bytes_per_token), flops, bw_eff, compute_eff))
    notes = ["estimate, not measured: this machine's numbers scaled by the device profile's bandwidth and GFLOPS",
             "the device's numbers are nominal peaks while this machine's are measured, so the estimate leans optimistic"]
    if bundle.format not in device.formats and bundle.format != "hf":
        notes.append(f"{device.id} does not list format {bundle.format}; estimated as if it ran it")
    if bundle.kv_bytes_per_token is None:
        notes.append("KV cache size unknown (no key projection shapes or config); counted as 0 bytes")
    return DeviceEstimate(device.id, device.bandwidth_gbps, device.cpu_gflops, local["bandwidth_gbps"], local["gflops"],
                          rows, device.budget_bytes, bundle.peak_rss_bytes <= device.budget_bytes, notes)
