"""What a server serves and how: `ServeConfig` (every option of `serve`, checked in one place), the generator batch a
server takes by default on each kind of device, and `load_models` (the avatars and the runners the config names).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .. import compose
from ..errors import UsageError
from .protocol import MAX_GAP_CHUNKS, MAX_MESSAGE_BYTES
from .scheduler import POLICIES, ModelEntry

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# --max-batch by default, per device type: on a CPU the generator is fastest one frame at a time, and a server batch
# only makes the first frames of a batch wait for the last (measured: docs/BENCHMARKS.md, "Server batch"); a GPU
# needs batches to fill it.
DEFAULT_MAX_BATCH = {"cpu": 1, "cuda": 8}


def default_max_batch(device) -> int:
    """The server's generator batch on `device` (a torch.device or its name) when --max-batch is not given."""
    import torch

    return DEFAULT_MAX_BATCH.get(torch.device(device).type, 8)


@dataclass
class ServeConfig:
    avatars: dict[str, str]                    # NAME -> avatar folder
    generators: dict[str | None, str]          # NAME -> G.pth; None -> the default for all other avatars
    audio_encoder: str
    backend: str = "auto"
    device: str = "auto"
    precision: str = "fp32"
    host: str = "127.0.0.1"
    port: int = 8084
    max_batch: int | None = None               # None: default_max_batch(the device)
    max_wait_ms: float = 10.0
    max_streams: int = 64
    max_queue: int = 50                        # frames in flight per stream before the overload policy applies
    max_delay_ms: float = 1000.0               # a frame not started this long after its last chunk arrived gets
                                               # the overload policy instead of the generator; 0 = no deadline
    policy: str = "reject"
    jpeg_quality: int = 95
    max_message: int = MAX_MESSAGE_BYTES
    max_gap: int = MAX_GAP_CHUNKS
    encode_threads: int = 2
    slow_client_s: float = 5.0                 # outgoing queue over its limit this long = client too slow (1008)
    stream_idle_s: float = 10.0                # a stream with no chunk this long is ended by the server; 0 = never
    http_idle_s: float = 15.0                  # an HTTP connection this long without a complete request is closed
    ws_idle_s: float = 120.0                   # a WebSocket with no stream nor message this long is closed; 0 = never
    blend: str = "none"                        # --blend: the mouths' box edge, none or feather[:PX] (compose.parse_blend)
    webrtc: bool = False                       # --webrtc: POST /offer and /webrtc.html (serve/webrtc.py)
    webrtc_size: str | None = None             # --webrtc-size WxH of the sent video (None: the avatar's)
    webrtc_wait_ms: float = 30.0               # --webrtc-wait-ms: a frame not made by then goes out late (template)
    webrtc_silence_db: float = -50.0           # --webrtc-silence-db: quieter incoming audio is not pushed (idle)
    options: dict = field(default_factory=dict)   # passed to backends.load (e.g. engines)

    def check(self) -> None:
        if not self.avatars:
            raise UsageError("serve needs at least one --avatar NAME=DIR (or --demo)")
        for name in self.avatars:
            if not NAME_RE.match(name):
                raise UsageError(f"--avatar {name!r}: a name is 1-64 letters, digits, '_', '.' or '-'")
        for name in self.generators:
            if name is not None and name not in self.avatars:
                raise UsageError(f"--generator {name}=...: no --avatar named {name!r}")
        missing = [n for n in self.avatars if n not in self.generators and None not in self.generators]
        if missing:
            raise UsageError(f"no generator for avatar(s) {', '.join(missing)}: give --generator NAME=G.pth or a bare "
                             "--generator G.pth for all")
        if self.policy not in POLICIES:
            raise UsageError(f"--policy must be one of {', '.join(POLICIES)}")
        compose.parse_blend(self.blend)
        for key, lo in (("max_batch", 1), ("max_streams", 1), ("max_queue", 1)):
            if getattr(self, key) is not None and getattr(self, key) < lo:
                raise UsageError(f"--{key.replace('_', '-')} must be at least {lo}")
        if self.max_wait_ms < 0:
            raise UsageError("--max-wait-ms must not be negative")
        if not self.max_delay_ms >= 0:
            raise UsageError("--max-delay-ms must not be negative (0: no deadline)")
        if not 1 <= self.jpeg_quality <= 100:
            raise UsageError("--jpeg-quality must be within 1..100")
        for key in ("stream_idle_s", "ws_idle_s"):
            if not 0 <= getattr(self, key) < float("inf"):
                raise UsageError(f"--{key.replace('_', '-')} must be a number of seconds >= 0 (0: never)")
        if not 0 < self.http_idle_s < float("inf"):
            raise UsageError("--http-idle-s must be a positive number of seconds")
        if self.webrtc:
            from .webrtc import check_options
            check_options(self)


def load_models(cfg: ServeConfig) -> tuple[dict[str, ModelEntry], object]:
    """Load every avatar and one runner per distinct generator checkpoint (all with the shared audio encoder)."""
    from .. import avatar as avatar_mod
    from .. import backends

    cfg.check()
    options = dict(cfg.options)
    if (cfg.max_batch or default_max_batch(backends.resolve_device(cfg.device))) > 1:
        options.setdefault("mem_pattern", False)   # batches of 1..max_batch: no pre-planned block per size (ORT)
    runners: dict[str, object] = {}
    entries = {}
    for name, folder in cfg.avatars.items():
        gen = str(cfg.generators.get(name, cfg.generators.get(None)))
        if gen not in runners:
            runners[gen] = backends.load(cfg.backend, gen, cfg.audio_encoder, cfg.device, cfg.precision, **options)
        entries[name] = ModelEntry(name=name, avatar=avatar_mod.load(folder), runner=runners[gen])
    return entries, next(iter(runners.values()))
