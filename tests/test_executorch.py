"""The ExecuTorch format's own behaviour beyond the shared checker (tests/test_backends.py): its pins, what the
written program says about itself, its quantized precisions, and refusals."""
from __future__ import annotations

from importlib import metadata
import re

import numpy as np
import pytest

from edgeq.converters.executorch import spec as et_spec
from edgeq.errors import EdgeqError


def test_the_installed_versions_are_the_pinned_ones():
    et_spec.check_installed()  # the test environment installs edgeq[executorch]
    assert {name: metadata.version(name).split("+")[0] for name in et_spec.PINS} == et_spec.PINS


def test_a_torch_executorch_mismatch_is_one_line_naming_both_and_the_extra(monkeypatch):
    real = metadata.version
    monkeypatch.setattr(et_spec.metadata, "version", lambda name: "2.11.0" if name == "torch" else real(name))
    with pytest.raises(EdgeqError) as refused:
        et_spec.EXECUTORCH.converter()
    message = str(refused.value)
    assert "\n" not in message
    assert "torch 2.11.0" in message and "executorch 1.5.1" in message and "torch==2.13.0" in message
    assert "edgeq[executorch]" in message


def test_a_missing_executorch_names_the_extra(monkeypatch):
    real = metadata.version

    def version(name):
        if name == "executorch":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(et_spec.metadata, "version", version)
    with pytest.raises(EdgeqError, match=r"needs executorch.*pip install 'edgeq\[executorch\]'"):
        et_spec.check_installed()


def test_weight_only_precisions_are_refused_with_the_reason():
    with pytest.raises(EdgeqError, match="weight-only.*XNNPACK"):
        et_spec.EXECUTORCH.normalize("4w")


@pytest.fixture(scope="module")
def bundles(tiny_llama, tmp_path_factory):
    """8da4w by GPTQ (the default) and by nearest rounding, and 8da8w, of the tiny Llama."""
    import edgeq

    root = tmp_path_factory.mktemp("executorch")
    made = {}

    def get(name):
        if name not in made:
            precision, rounding, types = {"gptq": ("8da4w", None, None), "nearest": ("8da4w", "nearest", None),
                                          "8da8w": ("8da8w", None, None),
                                          "overrides": ("8da4w-g64", "nearest", {"model.layers.0.mlp.down_proj.weight": "fp32",
                                                                                 "lm_head.weight": "8da4w"})}[name]
            made[name] = edgeq.export(tiny_llama, format="executorch", precision=precision, rounding=rounding, tensor_types=types,
                                      calibration_tokens=2048, output=root / name, eval_tokens=0, progress=False)
        return made[name]
    return get


def test_8da4w_reads_back_int4_groups_and_an_int8_head_with_attention_in_executorch_kernels(bundles):
    import edgeq

    manifest = edgeq.inspect(bundles("gptq"))
    linears = {n: t for n, t in manifest["tensors"].items() if n != "lm_head.weight"}
    assert len(linears) == 2 * 7 and not manifest["mismatches"]
    for name, info in linears.items():
        rows, cols = info["shape"]
        assert info["type"] == "qbint4-g32" and info["bytes"] == rows * cols // 2 + rows * cols // 32 * 2, name
    assert manifest["tensors"]["lm_head.weight"]["type"] == "qcint8"
    assert manifest["rounding"] == "gptq"
    outside = manifest["executorch"]["delegation"]["outside_xnnpack"]
    assert outside["custom_sdpa"] == 2 and outside["update_cache"] == 4  # k and v of each layer
    assert not {"linear", "mm", "addmm", "bmm"} & set(outside)  # every linear runs in XNNPACK
    assert manifest["executorch"]["metadata"]["get_max_context_len"] == manifest["executorch"]["context"]


def test_overrides_are_what_the_file_holds(bundles):
    import edgeq

    tensors = edgeq.inspect(bundles("overrides"))["tensors"]
    assert tensors["model.layers.0.mlp.down_proj.weight"]["type"] == "fp32"
    assert tensors["lm_head.weight"]["type"] == "qbint4-g32"
    assert tensors["model.layers.1.mlp.down_proj.weight"]["type"] == "qbint4-g64"


def test_gptq_beats_nearest_and_8da8w_beats_both_on_held_out_text(bundles, tiny_llama):
    import edgeq
    from edgeq.intake import open_model
    from edgeq.quality import DEFAULT_TEXT, QualityAccumulator
    from edgeq.quant.calibration import calibration_windows
    from edgeq.runtimes.torch import TorchEngine

    source = open_model(tiny_llama)
    held_out = calibration_windows(source.chat_tokenizer(), DEFAULT_TEXT, 1024, 128)[-2:]
    reference = TorchEngine(source)
    kl = {}
    for name in ("gptq", "nearest", "8da8w"):
        acc = QualityAccumulator()
        with edgeq.load(bundles(name), threads=1) as lm:
            for window in held_out:
                acc.add(reference.score(window), lm.engine.score(window), window)
        kl[name] = acc.result(ctx=128).kl
    # measured 0.0034 < 0.33 < 0.38 here: 4 bits cost a random tiny model much (Core ML int4 measures 0.30 on it); a
    # broken program (a wrong scale sign, a cache misread) lands at KL of several nats
    assert kl["8da8w"] < kl["gptq"] < kl["nearest"] < 0.5, kl


def test_the_engine_runs_executorchs_threadpool_at_the_threads_asked(bundles):
    import edgeq
    from executorch.extension.pybindings import portable_lib

    for threads in (1, 2):  # the pool starts at every core (2 here): torch.set_num_threads does not reach it
        with edgeq.load(bundles("nearest"), threads=threads) as lm:
            assert portable_lib._threadpool_get_thread_count() == threads
            assert 0 < len(lm.generate_ids(lm.tokenizer.encode("Hello"), max_new_tokens=2)) <= 2


def test_a_program_that_is_not_the_manifests_is_refused_before_it_runs(bundles, tmp_path):
    import json
    import shutil

    import edgeq

    copy = tmp_path / "copy"
    shutil.copytree(bundles("nearest"), copy)
    manifest = json.loads((copy / "edgeq.json").read_text())
    manifest["executorch"]["metadata"]["get_draft_model"] = True  # a method the program does not have
    (copy / "edgeq.json").write_text(json.dumps(manifest))
    with pytest.raises(EdgeqError, match="not this bundle's program"):
        edgeq.load(copy, verify=False)


def test_the_planners_bytes_are_the_files(bundles):
    """The precision space prices each linear at what the written .pte holds for it (read back from XNNPACK's graph)."""
    import edgeq

    space = et_spec.EXECUTORCH.space()
    tensors = edgeq.inspect(bundles("gptq"))["tensors"]
    precision = {"qbint4-g32": "8da4w", "qcint8": "8da8w"}
    for name, info in tensors.items():
        assert space.nbytes(precision[info["type"]], tuple(info["shape"])) == info["bytes"], name
    assert "8da4w-g128" not in space.candidates((64, 96)) and "8da4w" in space.candidates((64, 96))


def test_keep_adapters_is_refused_with_the_reason(tiny_llama, tmp_path):
    import edgeq
    from conftest import build_lora

    lora = build_lora(tmp_path / "lora", tiny_llama)
    with pytest.raises(EdgeqError, match="executorch format cannot keep adapters.*XNNPACK's packed blobs"):
        edgeq.export(tiny_llama, format="executorch", adapters={"a": lora}, keep_adapters=True, output=tmp_path / "b",
                     eval_tokens=0, progress=False)


def build_ascii_tokenizer(folder):
    """A byte-level BPE whose every piece decodes to whole ASCII (trained on ASCII text only, no 256-byte alphabet):
    ExecuTorch's LLM runner hands its Python callback each token as text, which breaks on a partial UTF-8 byte."""
    import json

    from conftest import CHATML, CORPUS, SPECIALS
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([line for line in CORPUS if line.isascii()],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "chat_template": CHATML, "model_max_length": 256,
    }))


@pytest.fixture(scope="module")
def ascii_bundle(tmp_path_factory):
    """A tiny Llama whose tokenizer has only whole-ASCII pieces, at the default 8da4w (nearest: GPTQ is not what is tested)."""
    import edgeq
    from conftest import build_model

    root = tmp_path_factory.mktemp("executorch-runner")
    model = build_model(root / "ascii-llama", tokenizer=build_ascii_tokenizer)
    return edgeq.export(model, format="executorch", rounding="nearest", output=root / "bundle", eval_tokens=0, progress=False)


def test_executorchs_own_llm_runner_answers_with_edgeqs_greedy_tokens(ascii_bundle):
    """The bundle as an Android or iOS app would use it: ExecuTorch's TextLLMRunner (its C++ runner, through its Python
    binding) reads the program's metadata methods and the bundle's tokenizer.json, prefills in chunks and decodes greedily.
    Its token pieces map back to ids one to one (the tokenizer's pieces are distinct), so ids are compared, not text."""
    from tokenizers import Tokenizer

    import edgeq
    from edgeq.converters.executorch.program import load_kernels

    load_kernels()
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    tokenizer = Tokenizer.from_file(str(ascii_bundle / "tokenizer.json"))
    piece_ids = {}
    for i in range(tokenizer.get_vocab_size()):
        piece_ids.setdefault(tokenizer.decode([i], skip_special_tokens=False), []).append(i)
    assert all(len(ids) == 1 and piece.isascii() for piece, ids in piece_ids.items())
    runner = TextLLMRunner(str(ascii_bundle / "model.pte"), str(ascii_bundle / "tokenizer.json"))
    with edgeq.load(ascii_bundle, threads=1) as lm:
        # the second prompt is longer than one call's 64 tokens: both prefill it in chunks
        for prompt in ("The quick brown fox", " ".join(["Large language models run on phones at the edge."] * 8)):
            pieces, stats = [], []
            runner.reset()
            runner.generate(prompt, GenerationConfig(echo=False, max_new_tokens=24, temperature=0.0), pieces.append, stats.append)
            prompt_ids = lm.tokenizer.encode(prompt, add_special_tokens=False)
            assert stats[0].num_prompt_tokens == len(prompt_ids)
            ours = lm.generate_ids(prompt_ids, 24)
            theirs = [piece_ids[piece][0] for piece in pieces]
            assert len(ours) >= 8 and theirs[:len(ours)] == ours, (prompt[:20], theirs, ours)


def record_etdump(bundle, path, prompt: int = 8, steps: int = 4):
    """An ETDump as an app writes one: ExecuTorch's runtime with event tracing on, a prefill and a few decode steps."""
    import torch

    from edgeq.converters.executorch.program import load_kernels

    load_kernels()
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(bundle / "model.pte", enable_etdump=True)
    forward = program.load_method("forward")
    forward.execute([torch.arange(3, 3 + prompt).view(1, -1), torch.tensor([0])])
    for step in range(steps):
        forward.execute([torch.tensor([[7 + step]]), torch.tensor([prompt + step])])
    program.write_etdump_result_to_file(str(path), str(path.with_suffix(".debug")))
    return path


def test_profile_reads_an_etdump_per_layer_and_operator_beside_the_devices_roofline(ascii_bundle, tmp_path):
    from click.testing import CliRunner

    import edgeq
    from edgeq.cli import main
    from edgeq.profile_trace import profile_trace

    trace = record_etdump(ascii_bundle, tmp_path / "run.etdp")
    assert (ascii_bundle / "etrecord.bin").stat().st_size < (ascii_bundle / "model.pte").stat().st_size  # graphs, no weights
    result = profile_trace(ascii_bundle, trace, device="pixel-8")
    assert result.calls == 5 and result.call_ms["max"] > result.call_ms["median"] > 0  # the 8-token prefill is the slowest
    layers = {row["layer"]: row for row in result.layers}
    assert {"embedding", "layer 0", "layer 1", "head"} <= set(layers)
    assert abs(sum(row["share"] for row in result.layers) - 1) < 0.01
    assert all(layers[f"layer {i}"]["share"] > 0.2 and layers[f"layer {i}"]["roofline_ms"] > 0 for i in range(2))
    shapes = edgeq.inspect(ascii_bundle)["tensors"]
    layer_bytes = sum(t["bytes"] for n, t in shapes.items() if n.startswith("model.layers.0."))
    assert layers["layer 0"]["roofline_ms"] >= layer_bytes / (result.roofline["bandwidth_gbps"] * 1e9) * 1000 * 0.999
    operators = {(row["operator"], row["backend"]): row["per_call"] for row in result.operators}
    # XNNPACK names a kernel by the activations' type its CPU runs (QD8 or, with AVX-VNNI, QDU8) and the weights' layout
    gemms = {re.sub(r"QDU?8", "QD8", op): n for (op, backend), n in operators.items() if backend == "XNNPACK"}
    assert gemms.get("Fully Connected (NC, QD8, F32, QB4W) GEMM") == 2 * 7, operators  # every 4-bit linear
    assert gemms["Fully Connected (NC, QD8, F32, QC8W) GEMM"] == 1      # the 8-bit head
    assert operators[("llama::custom_sdpa", "ExecuTorch kernels")] == 2
    shown = CliRunner().invoke(main, ["profile", str(ascii_bundle), "--etdump", str(trace), "--device", "pixel-8"])
    assert shown.exit_code == 0 and "roofline on pixel-8" in shown.output and "layer 1" in shown.output, shown.output


def test_profile_refuses_a_file_that_is_not_an_etdump_in_one_line(ascii_bundle, tmp_path):
    from edgeq.profile_trace import profile_trace

    junk = tmp_path / "junk.etdp"
    junk.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(EdgeqError, match="junk.etdp is not an ETDump") as refused:
        profile_trace(ascii_bundle, junk)
    assert "\n" not in str(refused.value)


def test_what_a_plan_does_not_price_is_in_the_file_overhead(tmp_path):
    """--size leaves the plan what file_overhead does not claim: RoPE tables over the static cache and the serialized
    program, or a plan lands over --size and is made again. A tied checkpoint's head, which the program stores apart
    from the table, is the plan's to price (at the bytes the file holds); norms and biases are its fixed bytes."""
    from conftest import build_model

    from edgeq.converters.executorch.convert import ExecuTorchConverter
    from edgeq.intake import open_model

    source = open_model(build_model(tmp_path / "tied", tie_word_embeddings=True))
    shapes = source.shapes()
    assert "lm_head.weight" not in shapes
    stage = tmp_path / "stage"
    stage.mkdir()
    fields = ExecuTorchConverter().convert(source, stage, precision="8da4w", rounding="nearest", context=256)
    space = et_spec.EXECUTORCH.space()
    priced = sum(space.nbytes("8da4w", dims) if name == "model.embed_tokens.weight" else fields["tensors"][name]["bytes"]
                 for name, dims in shapes.items() if len(dims) == 2)
    head = space.nbytes("8da8w", tuple(shapes["model.embed_tokens.weight"]))
    assert fields["tensors"]["lm_head.weight"]["bytes"] == head
    priced += head + 4 * sum(int(np.prod(dims)) for dims in shapes.values() if len(dims) == 1)
    beside = sum((stage / name).stat().st_size for name in ("model.pte", et_spec.ETRECORD_FILE)) - priced
    estimate = et_spec.EXECUTORCH.file_overhead(source, len(shapes), 256)
    assert 0.85 < estimate / beside < 1.25


def test_a_tied_head_is_planned_and_measured_apart_from_its_table(tmp_path):
    """ExecuTorch stores a tied checkpoint's head apart from the embedding table, so its sensitivity lists the head as a
    tensor of its own (at the types `tied_head_types` allows), and rounding the table is measured on the lookup alone:
    the head keeps the float values."""
    import torch
    from conftest import build_model

    from edgeq.float_model import load_float_model
    from edgeq.intake import open_model
    from edgeq.metrics import kl_rows
    from edgeq.quant.calibration import CALIBRATION_TEXT
    from edgeq.quant.sensitivity import measure_sensitivity, simulate

    source = open_model(build_model(tmp_path / "tied", tie_word_embeddings=True, seed=3))
    sensitivity = measure_sensitivity(source, "executorch", CALIBRATION_TEXT, progress=False)
    table, head = sensitivity.tensors["model.embed_tokens.weight"], sensitivity.tensors["lm_head.weight"]
    assert head["shape"] == table["shape"] and head["kind"] == "lm_head"
    assert head["measured"] is not None and table["measured"] is not None
    assert list(head["options"]) == ["8da8w", "fp32"]  # GPTQ cannot round a tied head: it keeps 8 bits or more

    space = et_spec.EXECUTORCH.space()
    model = load_float_model(source)
    window = list(range(3, 40))
    ids = torch.tensor([window])
    with torch.inference_mode():
        ref = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        table_only = simulate(model, {"model.embed_tokens.weight": "8da4w"}, space, sensitivity.importance, window)
        embed = model.get_input_embeddings()
        saved = embed.weight.data
        model.lm_head.weight = torch.nn.Parameter(saved.clone(), requires_grad=False)
        embed.weight.data = torch.from_numpy(space.round_trip(saved.numpy(), "8da4w", None))
        lookup_rounded = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        both = torch.log_softmax(torch.nn.functional.linear(model.model(input_ids=ids).last_hidden_state[0], embed.weight).float(), -1)
    assert table_only == pytest.approx(float(kl_rows(ref, lookup_rounded).mean()), rel=1e-4)
    assert float(kl_rows(ref, both).mean()) != pytest.approx(table_only, rel=1e-2)  # the table and the head rounded
    reloaded = load_float_model(source)
    assert reloaded.lm_head.weight is reloaded.get_input_embeddings().weight
