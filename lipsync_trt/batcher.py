"""Many streams -> one model call per batch: a worker thread runs the audio encoder and the generator over the
work of every stream at once (max batch, max wait), composes each frame (full frame or mouth crop) and hands it
back to its stream. Knows nothing of sockets: the WebSocket server and `LipSync.stream` are both its clients.

Back-pressure: a stream with `max_queue` frames in flight gets its new frames refused, and a frame that waited
longer than `max_delay` since the audio that made it ready arrived is refused instead of generated, so the wait
stays bounded in time however many streams share the device. A refused frame is reported as REJECTED or SKIPPED
(`policy`): the client says no frame, or repeats its last one.

The client is `stream.Core` (one per live stream of every kind: `LipSync.stream`, `LipSync.live`, each server
stream): `runner` (its generator), `templates` (a `compose.TemplateCrops` on the runner's device), `mouths` (bool: the
box-sized crop instead of the full frame), `feather` (the box edge blend in pixels, `compose.parse_blend`),
`cancelled` (bool: drop its work), `wants(frame)` (bool: a queued frame still wanted),
`on_features(first, feats, n_windows, t_arrived)` (encoder results, in the worker: the client decides which frames
they make ready and `render`s them) and `on_result(Result)`.
"""
from __future__ import annotations

import atexit
import collections
import enum
import logging
import math
import threading
import time
import weakref
from dataclasses import dataclass

import torch

from . import compose
from . import recipe as R
from .errors import StreamError
from .pipeline import ENCODER_BATCH   # mel windows per audio-encoder call, as the offline path

POLICIES = ("reject", "skip")


class Kind(enum.Enum):
    """What the batcher answers about a frame: made, refused (by the `policy`: REJECTED says no frame, SKIPPED
    repeat the last one), its batch's generator failed (ERROR: the stream goes on), or the stream's work failed
    (FAILED: nothing more follows)."""

    FRAME = "frame"
    REJECTED = "rejected"
    SKIPPED = "skipped"
    ERROR = "error"
    FAILED = "failed"


@dataclass(frozen=True)
class Result:
    """The batcher's answer about frame `frame` of a client (-1 with FAILED): with FRAME its `image` (uint8 tensor on
    the device: the full frame, or the mouth crop of `box`) and `t_ready` (when it was queued); else `reason`."""

    kind: Kind
    frame: int
    image: torch.Tensor | None = None
    box: tuple | None = None
    t_ready: float | None = None
    reason: str = ""


@dataclass
class _Job:
    client: object
    frame: int
    template: int
    audio: torch.Tensor
    t_ready: float       # when it was queued for the generator: the batching clock
    t_arrived: float     # when the audio that made it ready arrived: the deadline's clock


log = logging.getLogger(__name__)   # failures are also answered to the streams concerned

_RUNNING: "weakref.WeakSet[Batcher]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    """Stop the workers still running at interpreter exit, before the runtimes they call are torn down."""
    for b in list(_RUNNING):
        b.stop()


class Batcher:
    """The model worker shared by streams. `encode` takes encoder windows (the encoder runs batched here too),
    `render` frames whose feature windows are known; both return at once, results come through `on_result`."""

    def __init__(self, encoder=None, max_batch: int = 8, max_wait: float = 0.010, max_queue: int | None = None,
                 policy: str = "reject", max_delay: float | None = None):
        if policy not in POLICIES:
            raise ValueError(f"policy {policy!r}: expected one of {POLICIES}")
        if not math.isfinite(max_wait):
            raise ValueError(f"max_wait {max_wait!r}: expected a finite number of seconds")
        self.encoder, self.max_batch, self.max_wait = encoder, max(1, max_batch), max(0.0, max_wait)
        self.max_queue = None if max_queue is None else max(1, max_queue)
        self.max_delay = max_delay if max_delay and max_delay > 0 else None   # seconds; None: no deadline
        self.policy = policy
        self._cond = threading.Condition()
        self._enc: collections.deque = collections.deque()
        self._gen: collections.deque = collections.deque()
        self._inflight: dict[int, int] = {}        # id(client) -> frames queued and not yet answered
        self._stop = False
        self._died: str | None = None                # why the worker thread ended by an error (it takes no more work)
        self._clients: weakref.WeakValueDictionary = weakref.WeakValueDictionary()   # id -> every client given work
        self._thread: threading.Thread | None = None
        self.stats = collections.Counter()
        self.batch_sizes = collections.Counter()   # generator calls by batch size (the server's /metrics)

    # -- any thread
    def start(self) -> "Batcher":
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lipsync-batcher", daemon=True)
                self._thread.start()
                _RUNNING.add(self)
        return self

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def __enter__(self) -> "Batcher":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def alive(self) -> bool:
        """Whether the worker runs (or will, at the first work) and has not been stopped (nor died)."""
        return not self._stop and self._died is None and (self._thread is None or self._thread.is_alive())

    def encode(self, client, first: int, windows: torch.Tensor, n_windows: int | None = None,
               t_arrived: float | None = None) -> None:
        """New encoder windows of a client (in order), and N when its audio has ended."""
        self._check_alive()
        self.start()
        with self._cond:
            self._check_alive()
            self._clients[id(client)] = client
            self._enc.append((client, first, windows, n_windows, t_arrived or time.perf_counter()))
            self._cond.notify_all()

    def render(self, client, jobs: list[tuple[int, int, torch.Tensor]], t_arrived: float | None = None) -> None:
        """Ready frames [(frame, template, feature window)] of a client, to generate and compose."""
        self._check_alive()
        self.start()
        now = time.perf_counter()
        admitted = [j for j in (self._admit(client, i, t, a, now, t_arrived or now) for i, t, a in jobs) if j]
        with self._cond:
            self._check_alive()
            self._clients[id(client)] = client
            self._gen.extend(admitted)
            self._cond.notify_all()

    def _check_alive(self) -> None:
        if self._died is not None:
            raise StreamError(f"the model worker died ({self._died}): it takes no more work")
        if self._stop:
            raise StreamError("the batcher was stopped: it takes no more work")

    def queued(self) -> int:
        """Frames waiting for the generator."""
        with self._cond:
            return len(self._gen)

    # -- the worker
    def _run(self) -> None:
        """The worker loop; if it ends by any error (one that escaped the per-batch handlers, a BaseException from a
        runtime, an OverflowError in a wait), every client it had work from is answered FAILED, so no stream waits
        for answers that never come, and later work is refused (`alive` turns False)."""
        try:
            self._loop()
        except BaseException as exc:   # (the thread ends here either way: answer, log, and let it end)
            self._die(f"{type(exc).__name__}: {str(exc).strip()[:200]}")
            log.error("batcher: the worker died", exc_info=True)

    def _die(self, reason: str) -> None:
        with self._cond:
            self._died = reason
            self._enc.clear()
            self._gen.clear()
            self._inflight.clear()
            clients = list(self._clients.values())
            self._clients.clear()
            self._cond.notify_all()
        for client in clients:
            try:
                self._fail(client, f"the model worker died: {reason}")
            except Exception:
                log.exception("batcher: a client failed on its FAILED answer")

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._enc and not self._gen:
                    self._cond.wait()
                if self._stop:
                    return
                enc = list(self._enc)
                self._enc.clear()
            # encode first: the frames it makes ready can join this batch, and no encoding runs between the
            # deadline check below and the generator
            try:
                if enc:
                    self._encode(enc)
            except Exception:   # never let the worker die; the affected clients were told FAILED
                log.exception("batcher: encoding failed")
            with self._cond:
                late = self._take_late()
                batch = self._take_batch() if self._gen else None
                if not late and batch is None:
                    if self._gen and not self._enc and not self._stop:   # wait until the oldest is max_wait old
                        wait = self._gen[0].t_ready + self.max_wait - time.perf_counter()
                        if wait > 0:
                            self._cond.wait(min(wait, 1.0))   # (re-checked each second: never a huge timeout)
                    continue
            try:
                for j in late:
                    self._refuse(j.client, j.frame, f"frame {j.frame} waited {1000 * (time.perf_counter() - j.t_arrived):.0f}"
                                 f" ms for the generator, over the {1000 * self.max_delay:.0f} ms limit", late=True)
                if batch:
                    self._generate(batch)
            except Exception:
                log.exception("batcher: generating failed")

    def _take_late(self) -> list[_Job]:
        """Under the lock: the queued frames older than max_delay (from their audio's arrival), taken out. The queue
        is in arrival order (batches leave it in order), so they are a prefix of it."""
        late: list[_Job] = []
        if self.max_delay is None:
            return late
        limit = time.perf_counter() - self.max_delay
        while self._gen and self._gen[0].t_arrived < limit:
            late.append(self._gen.popleft())
        return late

    def _take_batch(self) -> list[_Job] | None:
        """Under the lock: up to max_batch frames for the oldest frame's generator, once that many wait or the oldest
        has waited max_wait."""
        head = self._gen[0]
        runner = head.client.runner
        same = [j for j in self._gen if j.client.runner is runner]
        if len(same) < self.max_batch and time.perf_counter() - head.t_ready < self.max_wait:
            return None
        take = same[:self.max_batch]
        chosen = set(map(id, take))
        self._gen = collections.deque(j for j in self._gen if id(j) not in chosen)
        return take

    def _encode(self, work: list) -> None:
        """Encoder windows of many clients in batches (per encoder: `encoder`, else each client's runner); each
        client gets its features (`on_features`), and queues the frames they make ready (`render`)."""
        live = [w for w in work if not w[0].cancelled]
        groups: dict = {}
        for k, w in enumerate(live):
            groups.setdefault(id(self.encoder or w[0].runner), []).append(k)
        feats: list = [None] * len(live)
        for ks in groups.values():
            enc = self.encoder or live[ks[0]][0].runner
            try:
                wins = [live[k][2] for k in ks]
                allw = torch.cat(wins)
                out = torch.cat([enc.encode_audio(allw[i:i + ENCODER_BATCH]).float().cpu()
                                 for i in range(0, len(allw), ENCODER_BATCH)]) if len(allw) else \
                    torch.zeros(0, R.FEATURE_DIM)
            except Exception as exc:
                for k in ks:
                    self._fail(live[k][0], f"audio encoder failed: {exc}")
                log.exception("batcher: audio encoder failed")
                continue
            pos = 0
            for k in ks:
                feats[k] = out[pos:pos + len(live[k][2])]
                pos += len(live[k][2])
        for (client, first, w, n, t_arrived), f in zip(live, feats):
            if f is None:
                continue
            try:                                     # the client decides the frames they make ready and renders them
                client.on_features(first, f, n, t_arrived)
            except Exception as exc:
                log.exception("batcher: a client failed on its features")
                self._fail(client, f"stream state: {exc}")

    def _admit(self, client, i: int, template: int, audio: torch.Tensor, now: float, t_arrived: float) -> _Job | None:
        key = id(client)
        with self._cond:
            full = self.max_queue is not None and self._inflight.get(key, 0) >= self.max_queue
            if not full:
                self._inflight[key] = self._inflight.get(key, 0) + 1
        if not full:
            return _Job(client, i, template, audio, now, t_arrived)
        self._refuse(client, i, f"{self.max_queue} frames of this stream are already queued", counted=False)
        return None

    def _done(self, client) -> None:
        key = id(client)
        with self._cond:
            left = self._inflight.get(key, 0) - 1
            if left > 0:
                self._inflight[key] = left
            else:
                self._inflight.pop(key, None)

    def _refuse(self, client, i: int, reason: str, counted: bool = True, late: bool = False) -> None:
        """Answer frame i without generating it, per the policy."""
        if counted:
            self._done(client)
        if late:
            self.stats["late"] += 1
        if client.cancelled:
            return
        if self.policy == "skip":
            self.stats["reused"] += 1
            client.on_result(Result(Kind.SKIPPED, i, reason=reason))
        else:
            self.stats["overloaded"] += 1
            client.on_result(Result(Kind.REJECTED, i, reason=reason))

    def _generate(self, batch: list[_Job]) -> None:
        keep = []
        for j in batch:   # a cancelled client's frames, and frames their client no longer wants, are not made
            if j.client.cancelled or not j.client.wants(j.frame):
                self._done(j.client)
                self.stats["dropped"] += 1
            else:
                keep.append(j)
        batch = keep
        if not batch:
            return
        runner = batch[0].client.runner
        try:
            got = [j.client.templates.get([j.template]) for j in batch]
            crops = torch.cat([c for c, _ in got]).to(runner.device)
            boxes = [b[0] for _, b in got]
            audio = torch.stack([j.audio for j in batch]).to(runner.device, runner.dtype)
            pred = runner.generate(compose.generator_inputs(crops, runner.dtype), audio)
            images = self._compose(batch, crops, pred, boxes)
        except Exception as exc:   # these frames are answered ERROR; their streams go on
            for j in batch:
                self._done(j.client)
                if not j.client.cancelled:
                    j.client.on_result(Result(Kind.ERROR, j.frame, reason=f"generator failed: {exc}"))
            raise
        self.stats["batches"] += 1
        self.batch_sizes[len(batch)] += 1
        self.stats["frames"] += len(batch)
        for j, box, img in zip(batch, boxes, images):
            self._done(j.client)
            j.client.on_result(Result(Kind.FRAME, j.frame, image=img, box=box, t_ready=j.t_ready))

    @staticmethod
    def _compose(batch: list[_Job], crops: torch.Tensor, pred: torch.Tensor, boxes: list) -> list[torch.Tensor]:
        """Each job's image: the mouth crop (compose.mouths) or the full frame with it pasted (compose.paste), its
        box edge feathered over the client's `feather` pixels (0: the reference's hard paste)."""
        out: list = [None] * len(batch)
        groups: dict = {}
        for k, j in enumerate(batch):
            groups.setdefault((bool(j.client.mouths), int(getattr(j.client, "feather", 0))), []).append(k)
        for (mouths, feather), ks in groups.items():
            sel = torch.tensor(ks, device=crops.device)
            bx = [boxes[k] for k in ks]
            if mouths:
                templates = [batch[k].client.templates.region(batch[k].template) for k in ks] if feather else None
                imgs = compose.mouths(crops[sel], pred[sel.to(pred.device)], bx, feather=feather, templates=templates)
            else:
                frames = [batch[k].client.templates.frame(batch[k].template).clone() for k in ks]
                imgs = compose.paste(frames, crops[sel], pred[sel.to(pred.device)], bx, feather=feather)
            for k, img in zip(ks, imgs):
                out[k] = img
        return out

    def _fail(self, client, reason: str) -> None:
        if not client.cancelled:
            client.on_result(Result(Kind.FAILED, -1, reason=reason))
