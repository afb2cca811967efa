"""Run many `generate` jobs: here, one after another, or on Ray actors (one per GPU, or `workers` on CPUs) that
each keep a group's models loaded. Ray restarts a worker that dies (OOM, node lost) and retries its job."""
from __future__ import annotations

import json
import os
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import OutputError, UsageError
from . import require_ray
from .jobs import Job
from .outputs import is_complete
from .render import DONE, FAILED, SKIPPED, JobResult, Renderer

Event = Callable[[str, Job, object], None]   # ("start", job, worker info) or ("result", job, JobResult)

MAX_RESTARTS = 3        # times Ray restarts a dead worker actor
MAX_TASK_RETRIES = 3    # times Ray retries the job a worker died in (on the restarted actor)


@dataclass
class BatchReport:
    """Per-job results in JOBS order, the wall time, and where it ran; `summary()` is the --summary JSON."""

    jobs: list[Job]
    results: dict[int, JobResult]
    seconds: float
    mode: str
    workers: int
    address: str | None = None
    plan: dict = field(default_factory=dict)

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results.values())

    @property
    def frames(self) -> int:
        """Frames rendered by this run (skipped jobs not counted)."""
        return sum(r.frames for r in self.results.values() if r.status == DONE)

    @property
    def exit_code(self) -> int:
        """0 when every job succeeded (or was already complete), 1 when some failed."""
        return 1 if self.count(FAILED) else 0

    def summary(self) -> dict:
        def fields(job: Job) -> dict:   # the job as given; its frame selection as "frames_selected"
            d = {k: v for k, v in job.to_dict().items() if v is not None}
            if "frames" in d:
                d["frames_selected"] = d.pop("frames")
            return d

        per_job = [{**fields(job), **self.results[job.line].to_dict()} for job in self.jobs]
        s = self.seconds
        return {"mode": self.mode, "ray_address": self.address, "workers": self.workers, "plan": self.plan,
                "jobs": per_job,
                "totals": {"jobs": len(self.jobs), "done": self.count(DONE), "skipped": self.count(SKIPPED),
                           "failed": self.count(FAILED), "frames": self.frames, "seconds": round(s, 3),
                           "frames_per_s": round(self.frames / s, 3) if s > 0 else None,
                           "jobs_per_s": round(self.count(DONE) / s, 4) if s > 0 else None}}

    def line(self) -> str:
        fps = self.frames / self.seconds if self.seconds > 0 else 0.0
        return (f"batch: {self.count(DONE)} done, {self.count(SKIPPED)} skipped (already complete), "
                f"{self.count(FAILED)} failed; {self.frames} frames in {self.seconds:.1f} s ({fps:.2f} frames/s), "
                f"{self.mode}, {self.workers} worker(s)")


def write_summary(report: BatchReport, path: str | os.PathLike) -> None:
    """The summary JSON, written atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.part")
    try:
        tmp.write_text(json.dumps(report.summary(), indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write the summary ({exc.strerror})") from None


def _skip_complete(jobs: list[Job], overwrite: bool, on_event: Event | None) -> tuple[list[Job], dict[int, JobResult]]:
    """Jobs still to run, and a 'skipped' result for each whose outputs are already complete (unless overwrite)."""
    todo, results = [], {}
    for job in jobs:
        if not overwrite and is_complete(job):
            results[job.line] = JobResult(line=job.line, status=SKIPPED, outputs=job.outputs)
            if on_event:
                on_event("result", job, results[job.line])
        else:
            todo.append(job)
    return todo, results


def _by_group(jobs: list[Job]) -> "OrderedDict[tuple, deque[Job]]":
    groups: OrderedDict[tuple, deque[Job]] = OrderedDict()
    for job in jobs:
        groups.setdefault(job.group, deque()).append(job)
    return groups


def run_local(jobs: list[Job], overwrite: bool = False, on_event: Event | None = None, **renderer) -> BatchReport:
    """Every job here, one after another, grouped so each avatar + checkpoints is loaded once."""
    t0 = time.perf_counter()
    todo, results = _skip_complete(jobs, overwrite, on_event)
    worker = Renderer(**renderer)
    for group in _by_group(todo).values():
        for job in group:
            if on_event:
                on_event("start", job, worker.info())
            results[job.line] = worker.render(job)
            if on_event:
                on_event("result", job, results[job.line])
    return BatchReport(jobs, results, time.perf_counter() - t0, mode="local", workers=1)


# ------------------------------------------------------------------------------------------------ Ray

def _check_reachable(address: str, error: type, timeout: float = 5.0) -> None:
    """Fail fast on a cluster address nothing answers at (Ray itself keeps retrying for minutes)."""
    import socket

    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise error(f"--ray {address}: expected local, auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise error(f"--ray {address}: nothing answers at {host}:{port} ({exc.strerror or exc})") from None


def connect(ray, address: str) -> bool:
    """Join Ray: 'local' starts an instance on this machine, 'auto' joins the cluster this node belongs to,
    anything else is a cluster address (host:6379 or ray://host:10001). True when this call started it."""
    from . import RayUnavailable

    if address not in ("local", "auto"):
        _check_reachable(address, RayUnavailable)
    if ray.is_initialized():
        return False
    try:
        if address == "local":
            ray.init(address="local", include_dashboard=False)
        else:
            ray.init(address=address)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise RayUnavailable(f"--ray {address}: cannot start or reach Ray ({str(exc).strip().splitlines()[0]})") from None
    return True


def plan_workers(ray, workers: int | None, gpus_per_worker: float | None, cpus_per_worker: float | None,
                 jobs: int) -> dict:
    """How many worker actors and what each reserves: one per GPU (gpus_per_worker each) on a GPU cluster, else
    `workers` (default 1) sharing the CPUs; never more workers than jobs, never more than the cluster holds."""
    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 0)), float(total.get("GPU", 0))
    node_cpus = max([float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")] or [cpus])
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if gpus >= 1 else 0.0
    if gpus_per_worker < 0 or (workers is not None and workers < 1):
        raise UsageError("--workers must be at least 1 and --gpus-per-worker at least 0")
    if workers is None:
        workers = int(gpus // gpus_per_worker) if gpus_per_worker > 0 else 1
        if workers < 1:
            raise UsageError(f"--gpus-per-worker {gpus_per_worker:g}: the Ray cluster has {gpus:g} GPU(s)")
    workers = max(1, min(workers, jobs))
    if cpus_per_worker is None:
        cpus_per_worker = 1.0 if gpus_per_worker > 0 else max(1.0, min(node_cpus, float(int(cpus // workers))))
    if workers * gpus_per_worker > gpus + 1e-9:
        raise UsageError(f"{workers} workers x {gpus_per_worker:g} GPU need {workers * gpus_per_worker:g} GPUs; "
                         f"the Ray cluster has {gpus:g}")
    if workers * cpus_per_worker > cpus + 1e-9 or cpus_per_worker > node_cpus:
        raise UsageError(f"{workers} workers x {cpus_per_worker:g} CPUs do not fit the Ray cluster ({cpus:g} CPUs, "
                         f"at most {node_cpus:g} on one node); lower --workers or --cpus-per-worker")
    return {"workers": workers, "cpus_per_worker": cpus_per_worker, "gpus_per_worker": gpus_per_worker,
            "cluster_cpus": cpus, "cluster_gpus": gpus}


def run_ray(jobs: list[Job], address: str = "local", workers: int | None = None,
            gpus_per_worker: float | None = None, cpus_per_worker: float | None = None, overwrite: bool = False,
            on_event: Event | None = None, max_restarts: int = MAX_RESTARTS,
            max_task_retries: int = MAX_TASK_RETRIES, **renderer) -> BatchReport:
    """The jobs on Ray worker actors (`Renderer`), each loading a group's models once and rendering its jobs."""
    ray = require_ray("batch --ray")
    t0 = time.perf_counter()
    todo, results = _skip_complete(jobs, overwrite, on_event)
    started = connect(ray, address) if todo else False
    plan: dict = {}
    actors: list = []
    try:
        if todo:
            plan = plan_workers(ray, workers, gpus_per_worker, cpus_per_worker, len(todo))
            cpu_threads = int(plan["cpus_per_worker"]) if plan["gpus_per_worker"] == 0 else None
            actor_class = ray.remote(Renderer).options(
                num_cpus=plan["cpus_per_worker"], num_gpus=plan["gpus_per_worker"], max_restarts=max_restarts,
                max_task_retries=max_task_retries)
            actors = [actor_class.remote(**{"threads": cpu_threads, **renderer}) for _ in range(plan["workers"])]
            results.update(_Dispatch(ray, actors, todo, on_event).run())
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()
    return BatchReport(jobs, results, time.perf_counter() - t0, mode="ray", workers=plan.get("workers", 0),
                       address=address, plan=plan)


class _Dispatch:
    """Hands jobs to idle worker actors: a worker keeps to its group while it has jobs, else takes the group with
    the most jobs left; a group's models are loaded by one worker first (a build runs once), then by any."""

    def __init__(self, ray, actors: list, jobs: list[Job], on_event: Event | None):
        self.ray, self.actors, self.on_event = ray, dict(enumerate(actors)), on_event
        self.pending = _by_group(jobs)
        self.ready: set[tuple] = set()
        self.preparing: set[tuple] = set()
        self.running: dict = {}                       # ObjectRef -> (kind, worker index, job or group)
        self.last: dict[int, tuple] = {}
        self.info: dict[int, dict] = {}
        self.results: dict[int, JobResult] = {}

    def _next(self, w: int) -> tuple[str, object] | None:
        mine = self.last.get(w)
        if mine in self.ready and self.pending.get(mine):
            return "render", mine
        ready = [g for g in self.ready if self.pending.get(g)]
        if ready:
            return "render", max(ready, key=lambda g: len(self.pending[g]))
        fresh = [g for g, q in self.pending.items() if q and g not in self.ready and g not in self.preparing]
        return ("prepare", fresh[0]) if fresh else None

    def _submit(self, w: int) -> bool:
        choice = self._next(w)
        if choice is None:
            return False
        kind, group = choice
        actor = self.actors[w]
        if kind == "prepare":
            self.preparing.add(group)
            self.running[actor.prepare.remote(group)] = ("prepare", w, group)
        else:
            job = self.pending[group].popleft()
            self.last[w] = group
            if self.on_event:
                self.on_event("start", job, self.info.get(w, {}))
            self.running[actor.render.remote(job)] = ("render", w, job)
        return True

    def _fail(self, job: Job, error: str, worker: str | None = None) -> None:
        self.results[job.line] = JobResult(line=job.line, status=FAILED, error=error, worker=worker,
                                           outputs=job.outputs)
        if self.on_event:
            self.on_event("result", job, self.results[job.line])

    def _finish(self, ref, kind: str, w: int, payload) -> None:
        ray = self.ray
        try:
            value = ray.get(ref)
        except ray.exceptions.RayActorError as exc:   # died more often than Ray would restart/retry it
            self.actors.pop(w, None)
            reason = f"worker died (Ray restarts and retries exhausted): {str(exc).strip().splitlines()[0][:200]}"
            if kind == "render":
                self._fail(payload, reason)
            elif kind == "prepare":
                self.preparing.discard(payload)
            return
        except ray.exceptions.RayError as exc:
            value = exc
        if kind == "info":
            self.info[w] = value if isinstance(value, dict) else {}
        elif kind == "prepare":
            self.preparing.discard(payload)
            if value is None:
                self.ready.add(payload)
            else:   # the group's avatar or checkpoints are unusable: every job of it fails with that error
                while self.pending[payload]:
                    self._fail(self.pending[payload].popleft(), str(value), worker=self._name(w))
        elif isinstance(value, JobResult):
            self.results[payload.line] = value
            pid, _, host = (value.worker or "").partition("@")
            if pid.isdigit():   # a restarted worker is a new process
                self.info[w] = {"pid": int(pid), "host": host}
            if self.on_event:
                self.on_event("result", payload, value)
        else:
            self._fail(payload, f"{type(value).__name__}: {value}")

    def _name(self, w: int) -> str | None:
        info = self.info.get(w)
        return f"{info['pid']}@{info['host']}" if info else None

    def run(self) -> dict[int, JobResult]:
        for w, actor in self.actors.items():
            self.running[actor.info.remote()] = ("info", w, None)
        idle: set[int] = set()
        while self.running or (idle and any(self.pending.values())):
            for w in sorted(idle):
                if w in self.actors and self._submit(w):
                    idle.discard(w)
            if not self.running:
                break
            done, _ = self.ray.wait(list(self.running), num_returns=1, timeout=1.0)
            for ref in done:
                kind, w, payload = self.running.pop(ref)
                self._finish(ref, kind, w, payload)
                if w in self.actors:
                    idle.add(w)
        for queue in self.pending.values():
            while queue:
                self._fail(queue.popleft(), "not run: no Ray worker left (every worker died)")
        return self.results
