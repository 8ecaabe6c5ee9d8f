"""LoRA adapters kept apart from one base (`--keep-adapters`) and switched per request, per engine.

GGUF (llama.cpp LoRA files), ONNX (onnxruntime adapter files), Core ML (function pairs of one multifunction
package) and torch (PEFT as is): the float base with an adapter switched on equals the merged export of that
adapter, switching back gives the base's output exactly, switching back and forth equals fresh loads, and the bundle
and the memory grow by the adapters only. Then the adapters that break other converters (tied head, rsLoRA with
patterns, DoRA, modules_to_save, QLoRA) and bad input, each refused in one line naming the adapter with nothing left
behind.

Core ML predicts only on Apple platforms: off a Mac its bundles run here as `coreml-torch` (the package's weights and
each adapter function's LoRA factors read back into edgeq's torch decoder, float32 compute), so these checks cover
what the package stores, not Core ML's float16 arithmetic; the package's own structure, functions and weight
sharing are checked on any OS.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import edgeq
from edgeq.cli import main
from edgeq.errors import EdgeqError

from conftest import build_lora, build_model

FORMATS = {"gguf": "F16", "onnx": "fp32", "coreml": "fp16", "torch": None}
BACKEND = {"coreml": None if sys.platform == "darwin" else "coreml-torch"}  # Core ML predicts on Apple platforms only
PROMPT = "The quick brown fox jumps over"


def write_lora(folder: Path, base: Path, ranks: dict[str, int], seed: int = 3, **config) -> Path:
    """A hand-written PEFT adapter: `ranks` maps module leaves (q_proj, lm_head, ...) to their rank."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    cfg = json.loads((base / "config.json").read_text())
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    hidden, kv = cfg["hidden_size"], cfg["num_key_value_heads"] * head_dim
    shapes = {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden),
              "gate_proj": (cfg["intermediate_size"], hidden), "up_proj": (cfg["intermediate_size"], hidden),
              "down_proj": (hidden, cfg["intermediate_size"]), "lm_head": (cfg["vocab_size"], hidden)}
    tensors = {}
    for leaf, rank in ranks.items():
        rows, cols = shapes[leaf]
        layers = [""] if leaf == "lm_head" else [f"model.layers.{i}.{'mlp' if 'proj' in leaf and leaf[0] in 'gud' else 'self_attn'}."
                                                 for i in range(cfg["num_hidden_layers"])]
        for prefix in layers:
            key = f"base_model.model.{prefix}{leaf}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, cols) * 0.3
            tensors[f"{key}.lora_B.weight"] = torch.randn(rows, rank) * 0.3
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    first = next(iter(ranks.values()))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": first, "lora_alpha": 2 * first, "target_modules": list(ranks), "task_type": "CAUSAL_LM",
        "rank_pattern": {leaf: rank for leaf, rank in ranks.items() if rank != first},
        "base_model_name_or_path": str(base), "fan_in_fan_out": False, "bias": "none", **config}))
    return folder


def kl(reference: np.ndarray, candidate: np.ndarray) -> float:
    ref = torch.log_softmax(torch.from_numpy(reference).double(), -1)
    cand = torch.log_softmax(torch.from_numpy(candidate).double(), -1)
    return float((ref.exp() * (ref - cand)).sum(-1).mean())


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("loras")
    return {"a": build_lora(root / "a", tiny_llama, seed=1),
            "b": write_lora(root / "b", tiny_llama, {"k_proj": 4, "o_proj": 4, "up_proj": 4}, use_rslora=True)}


def _loaded(fmt, root, base, adapters=None, adapter=None):
    if fmt == "torch":
        return edgeq.load(base, adapters=adapters, adapter=adapter, threads=1)
    name = "kept" if adapters else f"merged-{Path(adapter).name}" if adapter else "plain"
    if not (root / name).exists():
        edgeq.export(base, adapters=adapters, keep_adapters=bool(adapters), adapter=adapter, format=fmt, precision=FORMATS[fmt],
                     output=root / name, eval_tokens=0)
    return edgeq.load(root / name, threads=1, backend=BACKEND.get(fmt))


@pytest.fixture(scope="module", params=list(FORMATS))
def engines(request, tmp_path_factory, tiny_llama, loras):
    """(kept model with adapters a and b, merged a, merged b, plain base, a fresh-load function) for one engine."""
    fmt, root = request.param, tmp_path_factory.mktemp(request.param)
    kept = _loaded(fmt, root, tiny_llama, adapters=loras)
    merged = {name: _loaded(fmt, root, tiny_llama, adapter=path) for name, path in loras.items()}
    plain = _loaded(fmt, root, tiny_llama)
    yield fmt, kept, merged, plain, lambda: _loaded(fmt, root, tiny_llama, adapters=loras)
    for model in (kept, plain, *merged.values()):
        model.close()


def test_switched_adapter_equals_merged_export_and_base_comes_back_exactly(engines):
    fmt, kept, merged, plain, _ = engines
    ids = kept.tokenizer.encode(PROMPT * 4)
    assert kept.adapters == ("a", "b")
    kept.engine.set_adapter(None)
    base_logits = kept.engine.score(ids).copy()
    np.testing.assert_array_equal(base_logits, plain.engine.score(ids))  # the LoRA inputs add exact zeros
    for name in ("a", "b"):
        kept.engine.set_adapter(name)
        switched, reference = kept.engine.score(ids).copy(), merged[name].engine.score(ids)
        assert kl(reference, switched) < 1e-3, (fmt, name)
        assert kl(base_logits, switched) > 1e-2  # the adapter does change the model
        assert kept.generate_ids(ids[:8], 12, adapter=name) == merged[name].generate_ids(ids[:8], 12)
        kept.engine.set_adapter(None)
        np.testing.assert_array_equal(kept.engine.score(ids), base_logits)


def test_alternating_requests_equal_fresh_loads(engines):
    fmt, kept, _, _, fresh = engines
    expected = {}
    for name in (None, "a", "b"):
        model = fresh()
        expected[name] = model.generate(PROMPT, max_new_tokens=6, adapter=name)
        model.close()
    assert len(set(expected.values())) == 3
    order = [None, "a", "b", "a", None, "b", "b", None, None, "a"] * 2  # 20 requests, same prompt: the cache must not leak
    for name in order:
        assert kept.generate(PROMPT, max_new_tokens=6, adapter=name) == expected[name], (fmt, name)


def test_unknown_adapter_is_one_line(engines):
    _, kept, _, plain, _ = engines
    with pytest.raises(EdgeqError, match="adapter 'c' is not in this model; it has 'a', 'b'"):
        kept.generate(PROMPT, adapter="c")
    with pytest.raises(EdgeqError, match="it has none"):
        plain.generate(PROMPT, adapter="a")


def test_manifest_lists_adapters_checksummed(tmp_path, engines, loras):
    fmt, kept, *_ = engines
    if fmt == "torch":
        pytest.skip("a torch model is the HF folder itself")
    manifest = edgeq.inspect(kept.path)
    entries = {e["name"]: e for e in manifest["adapters"]}
    assert entries["a"]["rank"] == 2 and entries["a"]["scaling"] == [2.0] and entries["a"]["targets"] == ["down_proj", "q_proj", "v_proj"]
    assert entries["b"]["rslora"] and entries["b"]["scaling"] == [pytest.approx(8 / 4 ** 0.5)]
    for entry in entries.values():
        assert len(entry["sha256"]) == 64
        if fmt == "coreml":  # the adapter is two functions of the package: its factors and their program text
            assert entry["functions"] == {"prefill": f"prefill_{entry['name']}", "decode": f"decode_{entry['name']}"}
            assert entry["file"] in manifest["files"] and entry["bytes"] == entry["weight_bytes"] + entry["program_bytes"]
        else:
            assert manifest["files"][entry["file"]]["bytes"] == entry["bytes"]
    import shutil

    copy = shutil.copytree(kept.path, tmp_path / "copy")
    target = copy / entries["b"]["file"]
    data = bytearray(target.read_bytes())
    data[-1] ^= 1
    target.write_bytes(bytes(data))
    with pytest.raises(EdgeqError, match=f"bundle file {entries['b']['file']} does not match its checksum"):
        edgeq.load(copy)


def test_onnx_adapter_files_run_through_onnxruntime_run_options(engines):
    """The adapter file is onnxruntime's own: a plain session run with it active gives what edgeq's binding gives."""
    fmt, kept, *_ = engines
    if fmt != "onnx":
        pytest.skip("onnxruntime adapter files")
    import onnxruntime as ort

    manifest = edgeq.inspect(kept.path)
    session = ort.InferenceSession(str(kept.path / manifest["model_file"]), providers=["CPUExecutionProvider"])
    ids = kept.tokenizer.encode(PROMPT)
    feeds = {"input_ids": np.array([ids], dtype=np.int64), "attention_mask": np.ones((1, len(ids)), dtype=np.int64),
             "logits_to_keep": np.array(0, dtype=np.int64)}
    for i in range(int(session.get_modelmeta().custom_metadata_map["edgeq.num_layers"])):
        for part in ("key", "value"):
            shape = session.get_inputs()[2 + 2 * i].shape
            feeds[f"past_key_values.{i}.{part}"] = np.zeros((1, shape[1], 0, shape[3]), dtype=np.float32)
    adapter = ort.LoraAdapter()
    adapter.Load(str(kept.path / manifest["adapters"][0]["file"]))
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    logits = session.run(["logits"], feeds, options)[0][0]
    kept.engine.set_adapter("a")
    np.testing.assert_allclose(kept.engine.score(ids), logits, atol=1e-4)


# ---- size and memory: the base once, plus the adapters ---------------------------------------------------------

@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A model large enough that a second copy of its base would show in the process's memory (26 MB in F16)."""
    root = tmp_path_factory.mktemp("wide")
    base = build_model(root / "base", hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=4)
    return base, {"a": build_lora(root / "a", base, rank=8, seed=1), "b": build_lora(root / "b", base, rank=8, seed=2)}


_PEAK = """
import sys, edgeq
model = edgeq.load(sys.argv[1], threads=1)
for name in sys.argv[2:] or [None]:
    model.generate("The quick brown fox", max_new_tokens=4, adapter=name)
print([line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")][0])
"""


def _peak_kib(bundle: Path, *adapters: str) -> int:
    out = subprocess.run([sys.executable, "-c", _PEAK, str(bundle), *adapters], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def _tree(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("fmt,precision", [("gguf", "F16"), ("onnx", "fp16")])
def test_bundle_size_and_peak_memory_grow_by_the_adapters_only(tmp_path, wide, fmt, precision):
    base, adapters = wide
    plain = edgeq.export(base, format=fmt, precision=precision, output=tmp_path / "plain", eval_tokens=0)
    kept = edgeq.export(base, adapters=adapters, keep_adapters=True, format=fmt, precision=precision, output=tmp_path / "kept",
                        eval_tokens=0)
    adapter_bytes = sum(e["bytes"] for e in edgeq.inspect(kept)["adapters"])
    assert adapter_bytes < 0.05 * _tree(plain)
    assert _tree(kept) <= 1.01 * (_tree(plain) + adapter_bytes)
    base_peak, kept_peak = _peak_kib(plain), _peak_kib(kept, "a", "b")
    assert kept_peak * 1024 <= base_peak * 1024 * 1.05 + 2 * adapter_bytes, (base_peak, kept_peak, adapter_bytes)


def test_profile_reports_peak_memory_before_and_after_the_adapters_run(tmp_path, wide):
    from edgeq.profile_report import table

    base, adapters = wide
    kept = edgeq.export(base, adapters=adapters, keep_adapters=True, format="gguf", precision="F16", output=tmp_path / "kept",
                        eval_tokens=0)
    result = edgeq.profile([kept], prompt_tokens=(8,), gen=2, repeat=1, threads=1)
    profile = result.bundles[0]
    assert profile.adapters_run == 2
    assert profile.baseline_rss_bytes < profile.base_peak_rss_bytes <= profile.peak_rss_bytes
    assert "after each of its 2 adapters ran" in table(result)


# ---- the adapters that break other converters ------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["gguf", "onnx", "coreml"])
def test_lora_on_a_tied_head_unties_the_head_only_when_needed(tmp_path, fmt):
    base = build_model(tmp_path / "tied", tie_word_embeddings=True)
    head = write_lora(tmp_path / "head", base, {"lm_head": 4, "q_proj": 2})
    backend = BACKEND.get(fmt)
    plain = edgeq.load(edgeq.export(base, format=fmt, precision=FORMATS[fmt], output=tmp_path / "plain", eval_tokens=0), backend=backend)
    kept_path = edgeq.export(base, adapters={"head": head}, keep_adapters=True, format=fmt, precision=FORMATS[fmt],
                             output=tmp_path / "kept", eval_tokens=0)
    merged = edgeq.load(edgeq.export(base, adapter=head, format=fmt, precision=FORMATS[fmt], output=tmp_path / "merged", eval_tokens=0),
                        backend=backend)
    assert "untied_head" in edgeq.inspect(kept_path) and "untied_head" not in plain.manifest
    kept = edgeq.load(kept_path, backend=backend)
    ids = kept.tokenizer.encode(PROMPT * 3)
    np.testing.assert_allclose(kept.engine.score(ids), plain.engine.score(ids), atol=1e-4)  # the untied head is the same head
    kept.engine.set_adapter("head")
    assert kl(merged.engine.score(ids), kept.engine.score(ids)) < 1e-3
    peft_reference = edgeq.load(base, adapters={"head": head})  # PEFT adapts the tied head alone too
    peft_reference.engine.set_adapter("head")
    assert kl(peft_reference.engine.score(ids), merged.engine.score(ids)) < 1e-3


def test_rslora_with_rank_and_alpha_patterns_matches_peft(tmp_path, tiny_llama):
    adapter = write_lora(tmp_path / "rs", tiny_llama, {"q_proj": 4, "down_proj": 4}, use_rslora=True,
                         alpha_pattern={"down_proj": 3.0})
    peft = edgeq.load(tiny_llama, adapters={"rs": adapter})  # PEFT's own scaling
    peft.engine.set_adapter("rs")
    kept = edgeq.load(edgeq.export(tiny_llama, adapters={"rs": adapter}, keep_adapters=True, format="gguf", precision="F16",
                                   output=tmp_path / "kept", eval_tokens=0))
    kept.engine.set_adapter("rs")
    ids = kept.tokenizer.encode(PROMPT * 3)
    assert kl(peft.engine.score(ids), kept.engine.score(ids)) < 1e-3
    entry = edgeq.inspect(kept.path)["adapters"][0]
    assert entry["scaling"] == [pytest.approx(3 / 2), pytest.approx(8 / 2)]  # alpha/√r: 3/√4 for down_proj, 8/√4 for q_proj
    assert entry["gguf_alpha"] == pytest.approx(16.0)  # llama.cpp's alpha/r then gives q_proj's 4; down_proj's ratio is folded


def _dora(tmp_path, base: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(5)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                                                 use_dora=True))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_magnitude" in name:
                param.add_(torch.randn_like(param) * 0.3)
    model.save_pretrained(tmp_path / "dora")
    return tmp_path / "dora"


def test_dora_merges_as_peft_does_and_is_refused_apart(tmp_path, tiny_llama):
    dora = _dora(tmp_path, tiny_llama)
    ours, theirs = edgeq.load(tiny_llama, adapter=dora), edgeq.load(tiny_llama, adapters={"d": dora})
    theirs.engine.set_adapter("d")
    ids = ours.tokenizer.encode(PROMPT * 3)
    assert kl(theirs.engine.score(ids), ours.engine.score(ids)) < 1e-5
    with pytest.raises(EdgeqError, match=r"^adapter 'd' is DoRA: .* export it merged instead"):
        edgeq.export(tiny_llama, adapters={"d": dora}, keep_adapters=True, format="gguf", precision="F16", output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_modules_to_save_is_refused_apart_with_the_merged_way_out(tmp_path, tiny_llama):
    saved = build_lora(tmp_path / "saved", tiny_llama, modules_to_save=["lm_head"])
    with pytest.raises(EdgeqError, match=r"^adapter 'saved' replaces lm_head.weight whole .* export it merged instead \(--adapter "):
        edgeq.export(tiny_llama, adapters={"saved": saved}, keep_adapters=True, format="onnx", precision="fp32", output=tmp_path / "out")
    assert edgeq.export(tiny_llama, adapter=saved, format="gguf", precision="F16", output=tmp_path / "merged", eval_tokens=0).is_dir()


def _coreml_blobs(package: Path) -> dict[str, dict[str, int]]:
    """Per function of a Core ML package: const op name → the offset in weight.bin it reads."""
    import coremltools as ct

    spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
    out = {}
    for name, function in spec.mlProgram.functions.items():
        ops = function.block_specializations[function.opset].operations
        values = {op.outputs[0].name: op.attributes["val"] for op in ops if op.type == "const"}
        out[name] = {op: v.blobFileValue.offset for op, v in values.items() if v.WhichOneof("value") == "blobFileValue"}
    return out


def _weight_file(bundle: Path) -> int:
    return (bundle / "model.mlpackage" / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").stat().st_size


@pytest.mark.parametrize("engines", ["coreml"], indirect=True)
def test_core_ml_adapters_are_functions_over_one_copy_of_the_base(engines, loras):
    """What Linux can check of the package itself: the base's functions keep their names, each adapter adds a pair
    whose only weights of its own are its LoRA factors (the base's are the same bytes of weight.bin), the bundle is the
    base-only bundle plus what the manifest says each adapter adds (issue #16's bar: + 1%), and the factors read back
    are the adapter's, scaling folded in, in float16."""
    _, kept, _, plain, _ = engines
    from edgeq.adapter_set import open_adapters
    from edgeq.converters.coreml.adapters import factors, read_lora
    from edgeq.intake import open_model

    blobs = _coreml_blobs(kept.path / "model.mlpackage")
    assert set(blobs) == {"prefill", "decode", "prefill_a", "decode_a", "prefill_b", "decode_b"}
    base = set(blobs["decode"].values())
    assert len(base) > 10 and set(blobs["prefill"].values()) == base
    for name in ("a", "b"):
        own = {op: offset for op, offset in blobs[f"decode_{name}"].items() if offset not in base}
        assert own and all("_lora_" in op for op in own), own  # every base weight is shared, not stored again
        assert {o for o in blobs[f"prefill_{name}"].values() if o not in base} == set(own.values())
    entries = edgeq.inspect(kept.path)["adapters"]
    assert _weight_file(kept.path) - _weight_file(plain.path) <= sum(e["weight_bytes"] for e in entries) + 64
    assert _tree(kept.path) <= 1.01 * (_tree(plain.path) + sum(e["bytes"] for e in entries))
    functions = {e["name"]: e["functions"]["decode"] for e in entries}
    for adapter in open_adapters(open_model(kept.manifest["source"]["path"]), loras, "coreml"):
        expected = factors(adapter)
        read = read_lora(kept.path / "model.mlpackage", {adapter.name: functions[adapter.name]}, list(expected))[adapter.name]
        assert set(read) == set(expected)
        for module, pair in expected.items():
            for got, want in zip(read[module], pair):
                np.testing.assert_array_equal(got, want.half().float().numpy())


@pytest.mark.parametrize("engines", ["coreml"], indirect=True)
def test_core_ml_engine_switches_function_pairs(engines, monkeypatch):
    """The macOS engine's switching, with Core ML's models stood in for (Linux cannot load them): every pair the
    manifest names is loaded once, an adapter runs its own functions, and a switch starts a fresh state."""
    _, kept, *_ = engines
    import coremltools as ct

    from edgeq.runtimes.coreml import CoreMLEngine

    class Function:
        loaded: list[str] = []

        def __init__(self, path, function_name):
            self.name = function_name
            Function.loaded.append(function_name)

        def make_state(self):
            return object()

        def predict(self, feeds, state):
            calls.append((self.name, state))
            return {"logits": np.zeros((1, feeds["input_ids"].shape[1], kept.engine.n_vocab), dtype=np.float16)}

    calls = []
    monkeypatch.setattr(ct.models, "MLModel", Function)
    engine = CoreMLEngine(kept.path / "model.mlpackage", kept.manifest)
    assert sorted(Function.loaded) == ["decode", "decode_a", "decode_b", "prefill", "prefill_a", "prefill_b"]
    assert engine.adapters == ("a", "b") and engine.adapter is None
    ids = list(range(3, 68))  # a prefill chunk of 64, then one token through decode
    for name, suffix in (("b", "_b"), (None, ""), ("a", "_a")):
        engine.set_adapter(name)
        state = engine._state
        engine.forward(ids)
        engine.forward([5])
        assert [c[0] for c in calls[-3:]] == [f"prefill{suffix}", f"decode{suffix}", f"decode{suffix}"]
        assert {id(c[1]) for c in calls[-3:]} == {id(state)}
    assert len(Function.loaded) == 6  # switching loads nothing


def test_core_ml_function_names_are_identifiers():
    from types import SimpleNamespace

    from edgeq.converters.coreml.adapters import check_names, function_name

    assert function_name("decode", "sum.v2-b") == "decode_sum_v2_b"  # MIL names: letters, digits, '_'
    with pytest.raises(EdgeqError, match=r"^adapters 'a-b' and 'a_b' would both be Core ML function 'decode_a_b'"):
        check_names([SimpleNamespace(name="a-b"), SimpleNamespace(name="a_b")])


def test_core_ml_compressed_base_is_stored_once(tmp_path, tiny_llama, loras):
    """int4 base weights compress to the same constants in the adapter's functions as in the base's, so the package
    stores them once; the adapter's factors stay float16."""
    bundle = edgeq.export(tiny_llama, adapters={"b": loras["b"]}, keep_adapters=True, format="coreml", precision="int4",
                          output=tmp_path / "kept", eval_tokens=0)
    blobs = _coreml_blobs(bundle / "model.mlpackage")
    base = set(blobs["decode"].values())
    own = {op for op, offset in blobs["decode_b"].items() if offset not in base}
    assert own and all("_lora_" in op for op in own), own
    entry = edgeq.inspect(bundle)["adapters"][0]
    assert entry["dtype"] == "fp16" and len(own) == 2 * entry["tensors"]
    tensors = edgeq.inspect(bundle)["tensors"]
    assert {t["type"] for name, t in tensors.items() if name.endswith("proj.weight")} == {"int4"}
    # 64-byte blob headers and padding weigh on a tiny int4 model (its scales and zero points are blobs too); a second
    # copy of the base would add 100%
    assert _weight_file(bundle) - entry["weight_bytes"] < 1.5 * sum(t["bytes"] for t in tensors.values())


# ---- bad input: one line naming the adapter, nothing left behind -----------------------------------------------

def _bad_inputs(tmp_path, base, loras):
    other = build_model(tmp_path / "other", hidden_size=32, intermediate_size=64)
    qlora = build_lora(tmp_path / "qlora", other)
    config = json.loads((qlora / "adapter_config.json").read_text())
    (qlora / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/tiny-llama-bnb-4bit"}))
    elsewhere = build_lora(tmp_path / "elsewhere", base, seed=4)
    config = json.loads((elsewhere / "adapter_config.json").read_text())
    (elsewhere / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/another-model"}))
    deep = write_lora(tmp_path / "deep", base, {"q_proj": 2})
    from safetensors.torch import load_file, save_file

    tensors = load_file(deep / "adapter_model.safetensors")
    tensors = {k.replace("layers.1.", "layers.7."): v for k, v in tensors.items()}
    save_file(tensors, str(deep / "adapter_model.safetensors"))
    ranks = write_lora(tmp_path / "ranks", base, {"q_proj": 2})
    tensors = load_file(ranks / "adapter_model.safetensors")
    tensors = {k: (torch.zeros(v.shape[0], 3) if "lora_B" in k else v) for k, v in tensors.items()}
    save_file(tensors, str(ranks / "adapter_model.safetensors"))
    bare = build_lora(tmp_path / "bare", base)
    (bare / "adapter_config.json").unlink()
    return [
        ({"x": build_lora(tmp_path / "x", other)}, r"^adapter 'x': adapter shapes for .* do not fit the base weight"),
        ({"q": qlora}, r"^adapter 'q': .* in full precision \(the float checkpoint it was quantized from"),
        ({"a": loras["a"], "e": elsewhere}, r"^adapter 'e' was trained on 'org/another-model', adapter 'a' on .*separate bundles"),
        (["a=" + str(loras["a"]), "a=" + str(loras["b"])], r"^two adapters are named 'a'"),
        ({"deep": deep}, r"^adapter 'deep': adapter targets model.layers.7.self_attn.q_proj.weight, which the base model does not have"),
        ({"r": ranks}, r"^adapter 'r': adapter shapes for .* do not fit"),
        ({"bare": bare}, r"^adapter 'bare': .* is not a PEFT adapter folder \(no adapter_config.json\)"),
        ({"bad name": loras["a"]}, r"^adapter name 'bad name' is not usable"),
    ]


def test_bad_adapters_fail_in_one_line_naming_the_adapter_and_leave_nothing(tmp_path, tiny_llama, loras):
    out = tmp_path / "out"
    for adapters, message in _bad_inputs(tmp_path / "inputs", tiny_llama, loras):
        with pytest.raises(EdgeqError, match=message) as caught:
            edgeq.export(tiny_llama, adapters=adapters, keep_adapters=True, format="gguf", precision="F16", output=out, eval_tokens=0)
        assert "\n" not in str(caught.value)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]  # no bundle, no staging folder


def test_several_adapters_need_keep_adapters(tmp_path, tiny_llama, loras):
    with pytest.raises(EdgeqError, match="2 adapters given: a bundle merges one; pass --keep-adapters"):
        edgeq.export(tiny_llama, adapters=loras, format="gguf", precision="F16", output=tmp_path / "out")
    with pytest.raises(EdgeqError, match="--keep-adapters needs the adapters to keep"):
        edgeq.export(tiny_llama, keep_adapters=True, format="gguf", precision="F16", output=tmp_path / "out")


# ---- measured both ways, CLI, server ---------------------------------------------------------------------------

def test_each_adapter_is_measured_separate_and_merged(tmp_path, tiny_llama, loras):
    data = tmp_path / "a.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Count to {n}"},
                                                     {"role": "assistant", "content": " ".join(map(str, range(n)))}]}) + "\n"
                            for n in range(3, 6)))
    bundle = edgeq.export(tiny_llama, adapters=loras, keep_adapters=True, adapter_data={"a": data}, compare_merged=True,
                          format="gguf", precision="Q8_0", output=tmp_path / "kept", eval_tokens=32, eval_ctx=32)
    entries = {e["name"]: e for e in edgeq.inspect(bundle)["adapters"]}
    for entry in entries.values():
        for key in ("quality", "merged_quality"):
            assert 0 <= entry[key]["kl"] < 0.05 and 0 <= entry[key]["agreement"]["exact_match"] <= 1
    assert entries["a"]["quality"]["data"]["kind"] == "chat" and entries["a"]["quality"]["flips"] is not None
    assert entries["b"]["quality"]["text"] == "built-in sample"
    measured = edgeq.evaluate(bundle, adapter="b", tokens=32, ctx=32)
    assert measured.kl == pytest.approx(entries["b"]["quality"]["kl"], rel=1e-3)


def test_cli_export_run_inspect(tmp_path, tiny_llama, loras):
    runner = CliRunner()
    out = tmp_path / "kept"
    result = runner.invoke(main, ["export", str(tiny_llama), "--adapter", f"a={loras['a']}", "--adapter", f"b={loras['b']}",
                                  "--keep-adapters", "--format", "gguf", "--precision", "F16", "--eval-tokens", "0", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "adapter a: adapters/a.gguf" in result.output and "(rsLoRA)" in result.output
    result = runner.invoke(main, ["run", str(out), PROMPT, "--raw", "--adapter", "b", "--max-new-tokens", "6"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == edgeq.load(out).generate(PROMPT, max_new_tokens=6, adapter="b").strip()
    result = runner.invoke(main, ["run", str(out), PROMPT, "--adapter", "zzz"])
    assert result.exit_code == 1 and "adapter 'zzz' is not in this model" in result.output
    result = runner.invoke(main, ["export", str(tiny_llama), "--adapter", str(loras["a"]), "--format", "gguf", "--precision", "F16",
                                  "--eval-tokens", "0", "-o", str(tmp_path / "merged")])  # a bare folder still merges
    assert result.exit_code == 0, result.output
    assert edgeq.inspect(tmp_path / "merged")["source"]["adapter"]["path"] == str(loras["a"])
    profiled = edgeq.profile(out, prompt_tokens=[8], gen=4, repeat=1).bundles[0]  # every adapter runs in the profiled process
    assert any("2 LoRA adapters kept apart" in note for note in profiled.notes) and profiled.peak_rss_bytes > 0


def test_served_as_bundle_colon_adapter(tmp_path, tiny_llama, loras):
    import http.client
    from urllib.parse import urlparse

    bundle = edgeq.export(tiny_llama, adapters=loras, keep_adapters=True, format="gguf", precision="F16", output=tmp_path / "kept",
                          eval_tokens=0)
    model = edgeq.load(bundle, threads=1)
    expected = {name: edgeq.load(bundle).complete(PROMPT, max_new_tokens=6, adapter=name).text for name in (None, "a", "b")}
    with edgeq.serve([model], port=0, block=False, log_level="warning") as server:
        url = urlparse(server.url)

        def post(path, body):
            conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
            conn.request("POST" if body else "GET", path, body=json.dumps(body) if body else None, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, json.loads(response.read())

        status, listed = post("/v1/models", None)
        assert [m["id"] for m in listed["data"]] == ["kept", "kept:a", "kept:b"]
        for name, model_name in ((None, "kept"), ("a", "kept:a"), ("b", "kept:b"), ("a", "kept:a")):
            status, body = post("/v1/completions", {"model": model_name, "prompt": PROMPT, "max_tokens": 6, "temperature": 0.0})
            assert status == 200 and body["choices"][0]["text"] == expected[name], (model_name, body)
        status, body = post("/v1/completions", {"model": "kept:zzz", "prompt": PROMPT})
        assert status == 404 and "has no adapter 'zzz'" in body["error"]["message"]
    model.close()
