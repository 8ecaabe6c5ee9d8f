"""`edgeq.release()`: runs a release's graph in local worker processes or as Ray tasks, then reports.

Locally, a task starts when its inputs are done and it fits both the cores (`run.workers`) and the
memory budget (`run.memory_gib`): each task declares its expected peak memory, estimated from the
model's size (plus what a worker holds with its libraries imported; a finished task's tensors go back
to the system). Workers are kept between tasks, so torch and transformers are imported once per worker,
not once per task. A worker that dies (out of memory) breaks the pool: the tasks it took down run again
in a new one, as Ray re-runs a lost task. Workers are spawned, so a script that calls `edgeq.release()`
needs Python's usual `if __name__ == "__main__":` guard.

On a Ray cluster the same tasks become Ray tasks: Ray schedules them by their CPU and memory requests,
passes a task's inputs as object references (Ray starts a cell only once its sensitivity task is done),
and re-runs a task whose worker was lost. Sensitivity is shared through edgeq's cache folder and bundles
are written to the output folder: on more than one machine both must be on a shared filesystem.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..errors import EdgeqError
from ..progress import bar

if TYPE_CHECKING:  # the release modules (and pydantic) load on the first release, not with `import edgeq`
    from .graph import Task
    from .report import ReleaseResult

log = logging.getLogger(__name__)
ATTEMPTS = 3  # a task whose worker is lost (killed, out of memory) runs again, up to this many times in all
Done = Callable[["Task", dict], None]


def release(release_file: str | Path, *, ray: str | None = None, progress: bool | None = None) -> ReleaseResult:
    """Builds every cell (model × device) of a release file and writes report.json and report.html beside the bundles.

    Cells whose inputs have not changed since the last run are reused, not rebuilt. A cell that fails
    or misses its quality target is reported and leaves no bundle; the other cells go on. With `ray`
    (a Ray address, or "auto" for the cluster this machine belongs to) the tasks run on Ray; when Ray
    is already initialised in this process, that instance is used. Check `result.ok`.
    """
    from .file import load_release, local_workers, memory_budget
    from .graph import build_graph
    from .report import build_report, write_report

    started = time.time()
    spec = load_release(release_file)
    graph = build_graph(spec)
    settings = {"threads": spec.run.cpus_per_task, "cache": str(spec.cache) if spec.cache else os.environ.get("EDGEQ_CACHE")}
    executor = RayExecutor(ray) if ray else LocalExecutor(local_workers(spec), memory_budget(spec))
    if graph.tasks:
        with bar(len(graph.tasks), "release", "task", progress) as pbar:
            def done(task: Task, result: dict) -> None:
                graph.finish(task, result)
                log.info("%s: %s", task.id, result.get("error") or result.get("status", "done"))
                pbar.update(1)

            executor.run(graph.tasks, settings, done)
    return write_report(build_report(graph, executor.describe(), started), graph.output)


class LocalExecutor:
    """Worker processes on this machine, as many at once as fit the cores and the memory budget."""

    def __init__(self, workers: int, memory: int):
        self.workers, self.memory = workers, memory

    def describe(self) -> dict:
        return {"kind": "local", "workers": self.workers, "memory_budget_bytes": self.memory}

    def _can_start(self, task: Task, running: dict, results: dict) -> bool:
        """Inputs done, a worker free, and its memory fits beside the running tasks' (a task larger than the
        whole budget runs alone rather than never)."""
        if not all(need in results for need in task.needs) or len(running) >= self.workers:
            return False
        return not running or sum(t.memory for t in running.values()) + task.memory <= self.memory

    def _pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))

    def run(self, tasks: list[Task], settings: dict, done: Done) -> None:
        from .graph import run_task

        waiting, running, results = list(tasks), {}, {}
        attempts = {task.id: 0 for task in tasks}
        pool = self._pool()
        try:
            while waiting or running:
                for task in list(waiting):
                    if self._can_start(task, running, results):
                        waiting.remove(task)
                        attempts[task.id] += 1
                        upstream = [results[need] for need in task.needs]
                        running[pool.submit(run_task, task.kind, task.spec, {**settings, "task": task.id}, *upstream)] = task
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                lost = [running.pop(future) for future in finished if isinstance(future.exception(), BrokenProcessPool)]
                for future in finished:
                    if future in running:
                        task = running.pop(future)
                        results[task.id] = future.result()
                        done(task, results[task.id])
                if lost:  # a dead worker breaks the whole pool: the tasks it took down run again in a new one
                    lost += list(running.values())
                    running.clear()
                    pool.shutdown(cancel_futures=True)
                    pool = self._pool()
                    for task in lost:
                        if attempts[task.id] < ATTEMPTS:
                            log.warning("%s: a worker process died; running it again", task.id)
                            waiting.insert(0, task)
                        else:
                            results[task.id] = {"task": task.id, "error": f"a worker process died {ATTEMPTS} times while this task ran "
                                                                          "(out of memory, or a crash in a native library); lower run.workers or run.memory_gib"}
                            done(task, results[task.id])
        finally:
            pool.shutdown(cancel_futures=True)


class RayExecutor:
    """The graph as Ray tasks with CPU and memory requests; dependencies passed as object references."""

    def __init__(self, address: str):
        try:
            import ray
        except ImportError:
            raise EdgeqError("--ray needs Ray, which is not installed; install it with: pip install 'edgeq[ray]'") from None
        self.ray, self.address = ray, address
        self.connected_here = False
        self.info = {"kind": "ray", "address": address}

    def _connect(self) -> None:
        if not self.ray.is_initialized():
            self._check_reachable()
            try:
                self.ray.init(address=self.address, logging_level=logging.WARNING)
            except ConnectionError as exc:
                raise EdgeqError(f"cannot reach a Ray cluster at {self.address!r} ({exc}); start one with `ray start --head` "
                                 "or pass its address") from exc
            self.connected_here = True

    def _check_reachable(self) -> None:
        """A HOST:PORT that does not answer fails here in seconds; ray.init would retry it for minutes."""
        host, _, port = self.address.removeprefix("ray://").rpartition(":")
        if not host or not port.isdigit():
            return  # "auto", or a form Ray resolves itself
        try:
            socket.create_connection((host, int(port)), timeout=10).close()
        except OSError as exc:
            raise EdgeqError(f"cannot reach a Ray cluster at {self.address!r} ({exc.strerror or exc}); "
                             "check the address, or start one with `ray start --head`") from None

    def describe(self) -> dict:
        return self.info

    def run(self, tasks: list[Task], settings: dict, done: Done) -> None:
        from .graph import run_task

        ray = self.ray
        self._connect()
        try:
            nodes = [n for n in ray.nodes() if n["Alive"]]
            self.info.update(nodes=len(nodes), cpus=sum(n["Resources"].get("CPU", 0) for n in nodes))
            largest = max((n["Resources"].get("memory", 0) for n in nodes), default=0)
            remote = ray.remote(run_task)
            refs, pending = {}, {}
            for task in tasks:  # in topological order, so every input's reference exists
                memory = min(task.memory, int(largest)) if largest else task.memory  # above every node: never scheduled
                ref = remote.options(name=task.id, num_cpus=task.cpus, memory=memory, max_retries=ATTEMPTS - 1,
                                     retry_exceptions=False).remote(task.kind, task.spec, {**settings, "task": task.id},
                                                                    *[refs[need] for need in task.needs])
                refs[task.id] = ref
                pending[ref] = task
            while pending:
                finished, _ = ray.wait(list(pending), num_returns=1)
                for ref in finished:
                    task = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        result = {"task": task.id, "error": f"Ray lost this task after {ATTEMPTS} attempts: {str(exc).splitlines()[0]}"}
                    done(task, result)
        finally:
            if self.connected_here:
                ray.shutdown()
