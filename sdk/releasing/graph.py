"""The work of a release as a small graph: sensitivity per (model, calibration, format) first, then
every cell (model × device): plan, convert, measure, gate.

A cell is identified by a content hash of everything that shapes its bundle: the model's and adapter's
files, the calibration and eval texts, the parsed device profile, the cell's options and edgeq's
version. A cell whose hash matches the record of a previous run (a bundle that passed, or a measured
miss) is not rebuilt, so a second run of an unchanged release does no conversion at all, and editing one
device's profile rebuilds that device's cells only.

Tasks are plain data (JSON-ready specs) and `run_task` is the one function a worker runs, so the same
graph runs in local processes or as Ray tasks.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from .. import registry
from ..bundle import CARD, MANIFEST, land
from ..errors import EdgeqError
from .file import STATE, DeviceEntry, ModelEntry, Release

log = logging.getLogger(__name__)
# Expected peak resident bytes per weight of the model: a sensitivity task holds the float32 model (4 B/weight)
# plus quantized copies and activations; a cell's export peak is its format spec's `export_bytes_per_weight`.
# Deliberately high: too high only runs fewer tasks at once, too low can run out of memory.
SENSITIVITY_BYTES_PER_WEIGHT = 8
PROCESS_BYTES = 1 << 30     # a worker with the interpreter, torch and a runtime imported


@dataclass
class Task:
    id: str
    kind: str                # "sensitivity" | "cell"
    spec: dict               # the JSON-ready arguments of its work function
    needs: tuple[str, ...]   # ids of the tasks that must finish first
    memory: int              # expected peak bytes
    cpus: int


@dataclass
class Cell:
    model: str
    device: str
    key: str | None = None
    inputs: dict | None = None
    task: str | None = None          # id of the task building it; None when reused or failed before running
    changed: list[str] = field(default_factory=list)  # inputs that differ from the previous run's record
    result: dict | None = None

    @property
    def id(self) -> str:
        return f"{self.model}/{self.device}"


class FileHashes:
    """sha256 of input files, remembered by (size, mtime) so that re-running a release of 3B models does
    not re-read gigabytes of unchanged weights (as make and ccache trust timestamps)."""

    def __init__(self, path: Path):
        self.path = path
        self.memo = json.loads(path.read_text()) if path.is_file() else {}

    def file(self, path: Path) -> str:
        stat = path.stat()
        entry = self.memo.get(str(path.resolve()))
        if entry and entry[:2] == [stat.st_size, stat.st_mtime_ns]:
            return entry[2]
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
        self.memo[str(path.resolve())] = [stat.st_size, stat.st_mtime_ns, digest.hexdigest()]
        return digest.hexdigest()

    def folder(self, folder: Path) -> str:
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(folder).parts))
        digest = hashlib.sha256()
        for p in files:
            digest.update(f"{p.relative_to(folder).as_posix()}\0{self.file(p)}\n".encode())
        return digest.hexdigest()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.memo))
        tmp.replace(self.path)


def bundle_dir(output: Path, cell: Cell) -> Path:
    return output / cell.model / cell.device


def record_path(output: Path, cell: Cell) -> Path:
    return output / STATE / "cells" / cell.model / f"{cell.device}.json"


def _device_ref(device: DeviceEntry) -> str:
    return str(device.profile) if device.profile else device.name


def _cell_format(device: DeviceEntry, profile) -> str:
    """The device's format, else the first one its profile runs that this edgeq can export (as `export` chooses)."""
    if device.format:
        return registry.formats.get(device.format).name  # fails with the list of known formats
    available = set(registry.formats.names())
    fmt = next((f for f in profile.formats if f in available), None)
    if fmt is None:
        raise EdgeqError(f"device {device.name} runs {', '.join(profile.formats)}, none of which this edgeq can export; set format")
    return fmt


def _weights(model: ModelEntry) -> int:
    from ..intake import open_model

    return sum(math.prod(shape) for shape in open_model(model.path, adapter=model.adapter).shapes().values())


class Graph:
    """The cells of a release and the tasks still to run for them."""

    def __init__(self, release: Release):
        self.release = release
        self.output = release.output.resolve()
        self.cells: list[Cell] = []
        self.tasks: list[Task] = []
        self.log: list[dict] = []     # one entry per task run: when, where, with what resources

    def cell(self, task_id: str) -> Cell:
        return next(c for c in self.cells if c.task == task_id)

    def finish(self, task: Task, result: dict) -> None:
        """Takes a task's result: a cell's is recorded on disk as soon as it arrives, so an interrupted
        release resumes from the cells that finished."""
        task_log = {k: result.get(k) for k in ("started", "finished", "pid", "host", "error")}
        self.log.append({"task": task.id, "kind": task.kind, "memory": task.memory, "cpus": task.cpus, **task_log})
        if task.kind != "cell":
            return
        cell = self.cell(task.id)
        cell.result = {k: v for k, v in result.items() if k not in ("pid", "host")}
        if "error" in result:
            cell.result["status"] = "error"
        self.record(cell)

    def record(self, cell: Cell) -> None:
        path = record_path(self.output, cell)
        if cell.result["status"] == "error":  # errors are retried by the next run; no stale bundle stays behind
            path.unlink(missing_ok=True)
            shutil.rmtree(bundle_dir(self.output, cell), ignore_errors=True)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": cell.key, "inputs": cell.inputs, "result": cell.result}, indent=1))
        tmp.replace(path)


def build_graph(release: Release) -> Graph:
    """Every cell of the release: reused when its record matches, failed when its device cannot be read,
    else a task (after the sensitivity task of its model, calibration and format when it is planned)."""
    graph = Graph(release)
    (graph.output / STATE).mkdir(parents=True, exist_ok=True)
    hashes = FileHashes(graph.output / STATE / "file-hashes.json")
    for model in release.models:
        calibration, eval_data = model.calibration or release.calibration, model.eval_data or release.eval_data
        base = {"edgeq": _version(), "model": hashes.folder(model.path),
                "adapter": hashes.folder(model.adapter) if model.adapter else None,
                "base": hashes.folder(model.base) if model.base else None,
                "calibration": hashes.file(calibration) if calibration else None,
                "eval_data": hashes.file(eval_data) if eval_data else None}
        weights = 0
        for device in release.devices:
            cell = Cell(model.name, device.name)
            graph.cells.append(cell)
            try:
                spec = _key_cell(graph, cell, model, device, base)
                if spec is None:
                    continue
                weights = weights or _weights(model)
                needs = (_sensitivity_task(graph, model, spec["format"], spec["calibration"], weights).id,) if spec["precision"] is None else ()
                memory = PROCESS_BYTES + registry.formats.get(spec["format"]).export_bytes_per_weight * weights
                graph.tasks.append(Task(cell.task, "cell", spec, needs, memory, release.run.cpus_per_task))
            except EdgeqError as exc:
                cell.task, cell.result = None, {"status": "error", "error": str(exc)}
                graph.record(cell)
    hashes.save()
    return graph


def _version() -> str:
    from .. import __version__

    return __version__


def _key_cell(graph: Graph, cell: Cell, model: ModelEntry, device: DeviceEntry, base: dict) -> dict | None:
    """Keys the cell; returns the spec of the task that builds it, or None when the previous run's result still holds."""
    from edgeq.devices import load_device

    release = graph.release
    profile = load_device(_device_ref(device))
    fmt = _cell_format(device, profile)
    calibration, eval_data = model.calibration or release.calibration, model.eval_data or release.eval_data
    options = {"format": fmt, "precision": device.precision, "size": device.size, "eval_tokens": release.eval_tokens,
               "eval_ctx": release.eval_ctx, "eval_data_tokens": release.eval_data_tokens, "targets": release.targets_for(model, device)}
    cell.inputs = {**base, "device": profile.to_dict(), "options": options}
    cell.key = hashlib.sha256(json.dumps(cell.inputs, sort_keys=True).encode()).hexdigest()[:24]
    path = record_path(graph.output, cell)
    previous = json.loads(path.read_text()) if path.is_file() else None
    if previous and previous["key"] == cell.key:
        status = previous["result"]["status"]
        if status == "miss" or (bundle_dir(graph.output, cell) / MANIFEST).is_file():
            cell.result = {**previous["result"], "reused": True}
            return None
    if previous:
        cell.changed = sorted(k for k in cell.inputs if previous["inputs"].get(k) != cell.inputs[k])
    cell.task = f"cell:{cell.id}"
    return {"model_name": model.name, "device_name": device.name, "model": str(model.path),
            "adapter": str(model.adapter) if model.adapter else None, "base": str(model.base) if model.base else None,
            "device": _device_ref(device), "calibration": str(calibration) if calibration else None,
            "eval_data": str(eval_data) if eval_data else None, "output": str(graph.output), **options}


def _sensitivity_task(graph: Graph, model: ModelEntry, fmt: str, calibration: str | None, weights: int) -> Task:
    """One per (model, calibration, format), shared by every planned cell of that model and format."""
    task_id = f"sensitivity:{model.name}:{fmt}:{Path(calibration).name if calibration else 'built-in'}"
    for task in graph.tasks:
        if task.id == task_id:
            return task
    spec = {"model": str(model.path), "adapter": str(model.adapter) if model.adapter else None, "format": fmt, "calibration": calibration}
    task = Task(task_id, "sensitivity", spec, (), PROCESS_BYTES + SENSITIVITY_BYTES_PER_WEIGHT * weights, graph.release.run.cpus_per_task)
    graph.tasks.insert(0, task)  # before every cell: a topological order for any executor
    return task


# ---- what a worker runs ---------------------------------------------------------------------------


def run_task(kind: str, spec: dict, settings: dict, *upstream: dict) -> dict:
    """One task, in a worker (a local process or a Ray task). The task's own failure is returned as
    {"error": ...}, never raised, so it fails alone; only a lost worker surfaces to the executor."""
    started = time.time()
    failed = next((u for u in upstream if "error" in u), None)
    if failed is not None:
        result = {"error": f"not run: {failed['task']} failed: {failed['error']}"}
    else:
        _configure(settings)
        try:
            result = WORK[kind](spec)
        except EdgeqError as exc:
            result = {"error": str(exc)}
        except Exception as exc:  # a bug: kept with its traceback in the report, the other cells go on
            result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    import socket

    return {**result, "task": settings["task"], "started": started, "finished": time.time(), "pid": os.getpid(), "host": socket.gethostname()}


def _configure(settings: dict) -> None:
    """Threads and cache for this task: every worker uses the same thread count, so results (and GGUF
    files) do not depend on where a task ran; the cache holds the sensitivity the cells share."""
    if settings.get("cache"):
        os.environ["EDGEQ_CACHE"] = settings["cache"]
    threads = str(settings["threads"])
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = threads
    import torch

    torch.set_num_threads(settings["threads"])
    logging.basicConfig(level=logging.WARNING)


def _measure_sensitivity(spec: dict) -> dict:
    """Warms edgeq's sensitivity cache: planning is the public way to measure it, and the budget does not
    matter (the cache is per model, calibration text and format; every device's plan then takes seconds)."""
    import edgeq

    plan = edgeq.plan(spec["model"], adapter=spec["adapter"], format=spec["format"], calibration=spec["calibration"],
                      bits_per_weight=8, progress=False)
    return {"sensitivity": plan.sensitivity}


def _build_cell(spec: dict) -> dict:
    """Exports the cell into a staging folder and moves it into OUTPUT/<model>/<device> only if it meets its
    targets. The targets go to `edgeq.export` (which then plans the smallest bundle predicted to meet them,
    and measures whether it does) with misses allowed, so a miss is measured and reported, then not kept."""
    import edgeq
    from edgeq.devices import load_device

    from ..export_options import ExportOptions
    from ..exporting import run as run_export
    from .report import roofline

    output = Path(spec["output"])
    if not output.is_dir():
        raise EdgeqError(f"output folder {output} is not visible on this worker; on a cluster, put it on a shared filesystem")
    final = output / spec["model_name"] / spec["device_name"]
    stage = output / STATE / "stage" / f"{spec['model_name']}--{spec['device_name']}"
    shutil.rmtree(stage, ignore_errors=True)  # left by an interrupted run
    stage.parent.mkdir(parents=True, exist_ok=True)
    run_export(ExportOptions(spec["model"], adapter=spec["adapter"], base=spec["base"], device=spec["device"], format=spec["format"],
                             precision=spec["precision"], size=spec["size"], calibration=spec["calibration"], output=stage,
                             eval_tokens=spec["eval_tokens"], eval_ctx=spec["eval_ctx"], eval_data=spec["eval_data"],
                             eval_data_tokens=spec["eval_data_tokens"], **spec["targets"], allow_quality_miss=True, progress=False))
    try:
        manifest = edgeq.inspect(stage)
        result = _cell_result(manifest, stage, spec, roofline(stage, load_device(spec["device"])))
        if result["status"] == "pass":
            _move_into_place(stage, final)
        else:
            shutil.rmtree(final, ignore_errors=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return result


def _cell_result(manifest: dict, bundle: Path, spec: dict, estimate: dict) -> dict:
    """What the report shows of a cell; the verdict is the export's own check of its targets."""
    checked = manifest.get("targets") or {}
    passed = checked.get("met", True)
    return {"status": "pass" if passed else "miss", "bundle": f"{spec['model_name']}/{spec['device_name']}" if passed else None,
            "format": manifest["format"], "precision": manifest.get("precision"), "planned": manifest.get("plan") is not None,
            "bits_per_weight": manifest.get("bits_per_weight"),
            "size_bytes": sum(f["bytes"] for f in manifest["files"].values())  # + the manifest and the card it describes
                          + sum((bundle / name).stat().st_size for name in (MANIFEST, CARD) if (bundle / name).is_file()),
            "quality": manifest.get("quality"), "finetune_quality": manifest.get("finetune_quality"),
            "target": spec["targets"], "misses": checked.get("misses", []), "plan_check": manifest.get("plan_check"),
            "estimate": estimate}


def _move_into_place(stage: Path, final: Path) -> None:
    """Lands the measured bundle the way `edgeq export` lands one: an old bundle is swapped out in one step."""

    final.parent.mkdir(parents=True, exist_ok=True)
    land(stage, final)


WORK = {"sensitivity": _measure_sensitivity, "cell": _build_cell}
