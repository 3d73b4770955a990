"""Where trials run: in this process, in worker processes on this machine, or as Ray tasks.

All three take jobs ({"point", "key", "recipe"}) and give back (job, record) pairs as trials
finish. A worker that dies takes its trial with it: that trial comes back as WorkerDied, and
the search decides whether to retry it.
"""
from __future__ import annotations

import concurrent.futures as cf
import importlib.util
import multiprocessing
import socket
from pathlib import Path
from typing import Any, Callable, Optional

from optcc.errors import RecipeError
from optcc.search import trial


class WorkerDied(Exception):
    """The process running a trial exited before the trial finished."""


class InProcess:
    """workers=1 on this machine: no extra process, the model already loaded is reused."""

    def __init__(self, make: Callable[[], trial.Evaluator]) -> None:
        self.evaluator = make()
        self.done: list[tuple[dict, Any]] = []
        self.capacity = 1

    def submit(self, job: dict) -> None:
        self.done.append((job, self.evaluator.run(job)))

    def wait(self) -> list[tuple[dict, Any]]:
        out, self.done = self.done, []
        return out

    def close(self) -> None:
        pass


class Pool:
    """N worker processes (spawned: a fresh interpreter each), each with its own prepared model."""

    def __init__(self, workers: int, initargs: tuple) -> None:
        self.workers, self.initargs = workers, initargs
        self.capacity = workers
        self.generation = 0
        self.running: dict[cf.Future, tuple[dict, int]] = {}
        self._start()

    def _start(self) -> None:
        self.pool = cf.ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                           initializer=trial.init_worker, initargs=self.initargs)

    def submit(self, job: dict) -> None:
        self.running[self.pool.submit(trial.run_job, job)] = (job, self.generation)

    def wait(self) -> list[tuple[dict, Any]]:
        done, _ = cf.wait(list(self.running), return_when=cf.FIRST_COMPLETED)
        out = []
        for fut in done:
            job, gen = self.running.pop(fut)
            try:
                out.append((job, fut.result()))
            except cf.process.BrokenProcessPool:
                out.append((job, WorkerDied("a worker process died during the trial")))
                if gen == self.generation:  # the first future of a broken pool replaces it
                    self.pool.shutdown(wait=False, cancel_futures=True)
                    self.generation += 1
                    self._start()
            except Exception as e:  # the worker's initializer failed (bad model): not retried
                out.append((job, e))
        return out

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _ray_job(initargs: tuple, job: dict) -> dict:
    """A Ray task: the worker process keeps its Evaluator between tasks of the same search. An
    artifact is returned with the record, so the coordinator can re-time the front on any node."""
    trial.init_worker(*initargs)
    record = trial.run_job(job)
    if record.get("artifact"):
        folder = Path(record["artifact"]).parent
        record["files"] = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    return record


class RayCluster:
    """Trials as Ray tasks on an existing cluster; each node's timing lock is its own machine's."""

    def __init__(self, address: str, workers: int, initargs: tuple, cache_dir: Path) -> None:
        import ray

        self.ray, self.cache_dir = ray, cache_dir
        if not ray.is_initialized():
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        self.capacity = workers
        self.initargs = initargs
        self.remote = ray.remote(num_cpus=1, max_retries=0)(_ray_job)
        self.running: dict[Any, dict] = {}

    def submit(self, job: dict) -> None:
        self.running[self.remote.remote(self.initargs, job)] = job

    def wait(self) -> list[tuple[dict, Any]]:
        ready, _ = self.ray.wait(list(self.running), num_returns=1)
        out = []
        for ref in ready:
            job = self.running.pop(ref)
            try:
                record = self.ray.get(ref)
            except (self.ray.exceptions.WorkerCrashedError, self.ray.exceptions.NodeDiedError,
                    self.ray.exceptions.LocalRayletDiedError) as e:
                out.append((job, WorkerDied(f"the Ray worker died during the trial ({type(e).__name__})")))
                continue
            except self.ray.exceptions.RayTaskError as e:
                out.append((job, e.as_instanceof_cause()))
                continue
            files = record.pop("files", None)
            if files:  # the artifact, into this machine's cache at the same key
                folder = self.cache_dir / "artifacts" / record["key"]
                folder.mkdir(parents=True, exist_ok=True)
                for name, data in files.items():
                    (folder / name).write_bytes(data)
                record["artifact"] = str(folder / Path(record["artifact"]).name)
            out.append((job, record))
        return out

    def close(self) -> None:
        self.ray.shutdown()


def check_ray_address(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast, in one line, when nothing answers at a host:port Ray address."""
    if importlib.util.find_spec("ray") is None:
        raise RecipeError("tune on Ray needs the ray package", 'pip install "optcc[ray]"')
    if address in ("auto", "local") or address.startswith("ray://"):
        target = address[len("ray://"):] if address.startswith("ray://") else None
    else:
        target = address
    if target is None:
        return
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise RecipeError(f"--ray {address}: not a Ray address", "give host:port of the cluster's head, e.g. 10.0.0.5:6379")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise RecipeError(f"--ray {address}: no Ray cluster answers there ({e.strerror or e})",
                          "start one with `ray start --head` and pass the address it prints") from None


def make(executor: str, workers: int, ray_address: Optional[str], initargs: tuple, cache_dir: Path,
         in_process: Callable[[], trial.Evaluator]):
    if executor == "ray":
        return RayCluster(ray_address or "auto", workers, initargs, cache_dir)
    if workers == 1:
        return InProcess(in_process)
    return Pool(workers, initargs)
