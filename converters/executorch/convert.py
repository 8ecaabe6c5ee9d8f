"""HF checkpoint → ExecuTorch `.pte` lowered to XNNPACK, with a static KV cache of the bundle's context.

edgeq's torch decoder (`edgeq.decoder`, every family of `edgeq.architectures`) is wrapped as ExecuTorch's program
(`graph.ExportedDecoder`), its linear weights replaced by edgeq's codes in torchao's layout (`quant`), exported by
`torch.export` (strict, under no_grad: what lowers), lowered with XNNPACK's partitioner and serialized. What XNNPACK
does not take stays in ExecuTorch's own kernels: the attention and cache update in its optimized custom ops, the
embedding lookup in its quantized kernels, small glue (RoPE table lookups, masks) in portable kernels; the manifest
lists what is outside the delegate and its share of the flops (`report.delegation`).
"""
from __future__ import annotations

import io
import logging
import time
import warnings
import zipfile
from pathlib import Path

import torch

from edgeq.decoder import DecoderSpec, build_decoder
from edgeq.errors import EdgeqError
from edgeq.formats import warn_mismatches
from edgeq.progress import bar

from . import quant, report
from .graph import ExportedDecoder
from .program import METHOD, runner_metadata
from .spec import ETRECORD_FILE, EXECUTORCH, LINEARS
from edgeq.quant.effort import BY_GPTQ

log = logging.getLogger(__name__)
MODEL_FILE = "model.pte"
MAX_CHUNK = 64          # tokens one call may prefill: the activations (and logits) are planned for this many
DEFAULT_CONTEXT = 2048  # cache slots when the export names no context (capped by the model's trained context)
EMBEDDING = "model.embed_tokens.weight"
HEAD = "lm_head.weight"


def precision_plan(spec: DecoderSpec, shapes: dict, precision: str, overrides: dict | None) -> dict[str, str]:
    """HF weight name → precision for the embedding, every linear and the head (tied: the head has the name `lm_head.weight`
    here too, stored apart from the embedding). At 4 bits the head keeps 8 (8da8w), as llama.cpp's Q4 types keep their
    output at 6-8 bits; GPTQ rounds it at 4 only when asked by an override."""
    matrices = [n for n, s in shapes.items() if len(s) == 2]
    plan = dict.fromkeys(matrices, precision)
    if spec.tied:
        plan[HEAD] = precision
    if precision != "fp32" and LINEARS[precision].bits == 4:
        plan[HEAD] = "8da8w"
    plan.update(EXECUTORCH.check_overrides(overrides, [*matrices, *([HEAD] if spec.tied else [])], {**shapes, HEAD: shapes[EMBEDDING]}))
    return plan


def quantize(model: ExportedDecoder, plan: dict[str, str], codes: dict, importance: dict | None, progress) -> dict[str, str]:
    """Puts each planned weight's codes in place (GPTQ's from `codes`, else the importance-weighted nearest); returns the
    weights kept at fp32 because their width does not fit the precision's groups, with the reason."""
    modules = {f"{name}.weight": m for name, m in model.decoder.named_modules() if isinstance(m, torch.nn.Linear)}
    modules[HEAD] = model.head
    kept = {}
    with bar(len(plan), "ExecuTorch quantize", "tensor", progress) as pbar, torch.no_grad():
        for name, precision in plan.items():
            pbar.update(1)
            if precision == "fp32":
                continue
            linear = LINEARS[precision]
            weight = model.embed.weight if name == EMBEDDING else modules[name].weight
            if linear.group and weight.shape[1] % linear.group:
                kept[name] = f"{weight.shape[1]} inputs are not a multiple of the group of {linear.group}"
                continue
            imp = None if importance is None else importance.get(name)
            if name == EMBEDDING:
                model.embed = quant.embedding_module(weight, precision, None)
                continue
            found = codes.get(name)
            q, scales = found if found is not None else quant.nearest_codes(weight, linear, imp)
            modules[name].weight = torch.nn.Parameter(quant.torchao_weight(q, scales, linear), requires_grad=False)
    return kept


def call_order(model: ExportedDecoder) -> list[str]:
    """HF names of the linear weights in the order the program calls them (modules register in call order); the head last."""
    return [f"{name}.weight" for name, m in model.decoder.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"] + [HEAD]


def gptq_codes(calibration, plan: dict[str, str], tied: bool, progress, learned: bool = False) -> dict:
    """GPTQ of every quantized linear of the plan on the calibration text; the float model is let go after. Rounded by
    nearest instead: the embedding (a lookup: no inputs), a tied head (the float model's head is the embedding's tensor),
    and a per-channel weight taller than GPTQ's row chunk (its one scale per row is fixed up front, and GPTQ hands a grid
    one chunk of rows at a time)."""
    from edgeq.quant.gptq import ROW_CHUNK, quantize_model

    model = calibration.model
    grids = {}
    for name, precision in plan.items():
        if precision == "fp32" or name == EMBEDDING or (name == HEAD and tied):
            continue
        weight = model.get_parameter(name).detach().float()
        if not LINEARS[precision].group and weight.shape[0] > ROW_CHUNK:
            continue
        grid = quant.gptq_grid(weight, precision, None)
        if grid is not None:
            grids[name] = grid
    try:
        return dict(quantize_model(model, calibration.windows, grids, progress, gains=calibration.gptq_gains, learned=learned)) if grids else {}
    finally:
        calibration.release()


def lower(model: ExportedDecoder, metadata: dict):
    """torch.export (strict, the token axis dynamic up to `MAX_CHUNK`), XNNPACK's partitioner, ExecuTorch's program."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    tokens = torch.export.Dim("tokens", min=1, max=MAX_CHUNK)
    example = (torch.zeros(1, 2, dtype=torch.long), torch.tensor([0]))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.export's and ExecuTorch's deprecation chatter, one per op
        exported = torch.export.export(model, example, dynamic_shapes=({1: tokens}, None), strict=True)
        edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()], constant_methods=metadata,
                                           compile_config=EdgeCompileConfig(_check_ir_validity=False), generate_etrecord=True)
        return edge, edge.to_executorch()


def save_etrecord(etrecord, path: Path) -> None:
    """The program's ETRecord: its edge graph and debug-handle maps, which ExecuTorch's Inspector joins to an ETDump
    recorded on a device, so `edgeq profile --etdump` can name each event's layer. Saved without weights (each stored
    tensor becomes one zero broadcast to its shape and dtype; the ATen graph is dropped, the Inspector reads the edge
    graph) and deflated: a few hundred KiB for a 135M model instead of twice its size."""
    etrecord.exported_program = None
    programs = etrecord.edge_dialect_program
    for program in programs.values() if isinstance(programs, dict) else [programs]:
        for table in (program.state_dict, program.constants):
            for key, value in list(table.items()):
                if isinstance(value, torch.Tensor):
                    empty = torch.zeros((), dtype=value.dtype).expand(value.shape)
                    table[key] = torch.nn.Parameter(empty, requires_grad=False) if isinstance(value, torch.nn.Parameter) else empty
    raw = io.BytesIO()
    etrecord.save(raw)
    with zipfile.ZipFile(raw) as stored, zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as deflated:
        for entry in stored.infolist():
            deflated.writestr(entry.filename, stored.read(entry.filename))


class ExecuTorchConverter:
    """`edgeq export --format executorch`: one `.pte` (XNNPACK), `forward(tokens, input_pos)` over a static cache."""

    spec = EXECUTORCH

    def convert(self, source, stage: Path, *, precision: str, overrides: dict | None = None, calibration=None,
                progress: bool | None = None, rounding: str | None = None, context: int | None = None) -> dict:
        """`rounding` "gptq" (the default; needs `calibration`) rounds every quantized linear by GPTQ on its text,
        "nearest" each group alone (weighted by the calibration's importance matrix when it has one). `context` is the
        static cache's length (the device's context; capped by the model's trained context)."""
        precision = self.spec.normalize(precision)
        rounding = rounding or self.spec.roundings[0]
        if rounding not in self.spec.roundings:
            raise EdgeqError(f"rounding {rounding!r} is not one of {', '.join(self.spec.roundings)}")
        trained = source.config.get("max_position_embeddings") or DEFAULT_CONTEXT
        context = min(context or DEFAULT_CONTEXT, trained)
        spec = DecoderSpec.from_source(source, context)
        shapes = {n: tuple(s) for n, s in source.shapes().items() if not n.endswith("rotary_emb.inv_freq")}
        plan = precision_plan(spec, shapes, precision, overrides)
        quantized = any(p != "fp32" for p in plan.values())
        gptq = quantized and rounding in BY_GPTQ and calibration is not None
        started = time.perf_counter()
        codes = gptq_codes(calibration, plan, spec.tied, progress, rounding == "learned") if gptq else {}
        importance = calibration.importance(progress) if quantized and not gptq and calibration is not None else None
        model = ExportedDecoder(build_decoder(spec, source.tensor, dtype=torch.float32, progress=progress)).eval()
        kept = quantize(model, plan, codes, importance, progress)
        tokenizer = source.chat_tokenizer()
        bos = tokenizer.token_id(tokenizer.spec.bos_token) if tokenizer.spec.add_bos_token else None
        metadata = runner_metadata(spec, MAX_CHUNK, bos, tokenizer.spec.stop_token_ids)
        with bar(1, "ExecuTorch export + lower", "program", progress) as pbar:
            try:
                edge, program = lower(model, metadata)
            except EdgeqError:
                raise
            except Exception as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                raise EdgeqError(f"ExecuTorch could not export {source.architecture} ({first}); rerun with --debug and report it") from exc
            (stage / MODEL_FILE).write_bytes(program.buffer)
            save_etrecord(program.get_etrecord(), stage / ETRECORD_FILE)
            pbar.update(1)
        fields = report.read_back(stage / MODEL_FILE, edge, plan, kept, shapes, spec, call_order(model))
        warn_mismatches(log, fields["mismatches"])
        fields["executorch"].update({
            "context": context, "max_chunk": MAX_CHUNK, "method": METHOD, "etrecord": ETRECORD_FILE, "metadata": metadata, "decoder": spec.to_dict(),
            "export_seconds": round(time.perf_counter() - started, 1),
        })
        rounded = rounding if gptq else "nearest+importance" if importance else "nearest"
        return {"model_file": MODEL_FILE, "precision": precision, **fields, "rounding": rounded if quantized else None}
