"""The configurations of an offline run: which backends (with their variants), devices, precisions and batch
sizes are measured, from the command line and what is available here."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

QUICK_BATCHES = [1]
DEFAULT_BATCHES = {"cpu": [1, 4], "cuda": [1, 8, 32, 128]}
DEFAULT_PRECISIONS = {"cpu": ["fp32"], "cuda": ["fp32", "fp16"]}
VARIANTS = "torch:MODE (torch.compile(mode=MODE)), onnxruntime:spin (spinning intra-op threads)"


@dataclass
class Config:
    """One measured configuration; `backend` "baseline" is the reference structure (bench.baseline)."""
    backend: str
    device: str
    precision: str
    batch: int

    @property
    def key(self) -> str:
        return f"{self.backend}/{self.device}/{self.precision}/b{self.batch}"

    @property
    def is_baseline(self) -> bool:
        return self.backend == "baseline"


def csv(text: str | None) -> list[str]:
    """The items of a comma list option (none for None or blanks)."""
    return [p.strip() for p in (text or "").split(",") if p.strip()]


def backend_names(option: str | None, avail: dict) -> list[str]:
    """The --backends list checked against the known backends and variants; default every usable backend."""
    if not option:
        return [n for n, a in avail.items() if a.usable]
    names = csv(option)
    for n in names:
        if n.split(":")[0] not in avail or (":" in n and not n.startswith("torch:") and n != "onnxruntime:spin"):
            raise SystemExit(f"bench: unknown backend {n!r}; expected some of: {', '.join(avail)}, or {VARIANTS}")
    return names


def runner_options(backend: str, engines: str | None) -> tuple[str, dict]:
    """(backends.load name, its keyword options) for a --backends entry such as torch:reduce-overhead."""
    opts: dict = {"engines": engines} if engines else {}
    name, _, mode = backend.partition(":")
    if mode == "spin":
        opts["spinning"] = True
    elif mode:
        opts["compile"] = mode
    return name, opts


def devices(option: str | None) -> list[torch.device]:
    """The --devices list resolved (auto = cuda when present, else cpu), each once."""
    from .. import backends

    out: list[torch.device] = []
    for d in csv(option) or ["auto"]:
        dev = backends.resolve_device(d)
        if str(dev) not in [str(x) for x in out]:
            out.append(dev)
    return out


def configurations(args: argparse.Namespace, names: list[str], avail: dict, devs: list[torch.device]
                   ) -> tuple[list[Config], list[dict]]:
    """(configurations to measure, the baseline first on each device; backends skipped as unusable, with why)."""
    configs, skipped = [], []
    for dev in devs:
        batches = ([int(b) for b in csv(args.batch_sizes)] if args.batch_sizes else
                   (QUICK_BATCHES if args.quick else DEFAULT_BATCHES.get(dev.type, [1, 4])))
        precs = csv(args.precisions) or DEFAULT_PRECISIONS.get(dev.type, ["fp32"])
        configs.append(Config("baseline", str(dev), "fp32", 1))
        for name in names:
            a = avail[name.split(":")[0]]
            if not a.usable:
                skipped.append({"backend": name, "device": str(dev), "reason": a.reason})
                continue
            configs += [Config(name, str(dev), prec, b) for prec in precs for b in batches]
    return configs, skipped
