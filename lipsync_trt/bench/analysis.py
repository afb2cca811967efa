"""Derived figures of a run: summaries, ratios to the baseline (median and per round), pipeline overhead,
fraction of the matmul peak, and the targets."""
from __future__ import annotations

import statistics

from .measure import summarize
from .report import METRICS


def analyse(report: dict) -> None:
    """Add summaries, ratios to the baseline, pipeline overhead, % of peak and the issue's targets."""
    flops = report["flops"]
    peaks = report["peak_gflops"]
    base = {}
    for key, res in report["results"].items():
        res["summary"] = {m: summarize(v) for m, v in res["samples"].items()}
        mems = res.get("memory", [])
        res["summary"]["peak_rss_mb"] = summarize([m["peak_rss_mb"] for m in mems if "peak_rss_mb" in m])
        res["summary"]["rss_growth_mb"] = summarize([m["rss_growth_mb"] for m in mems if "rss_growth_mb" in m])
        cuda = [m["cuda_peak_mb"] for m in mems if "cuda_peak_mb" in m]
        if cuda:
            res["summary"]["cuda_peak_mb"] = summarize(cuda)
        if res["config"]["backend"] == "baseline":
            base[res["config"]["device"]] = res
    for key, res in report["results"].items():
        cfg, s = res["config"], res["summary"]
        b = base.get(cfg["device"])
        ratios, paired = {}, {}
        if b is not None:
            for m, (_, higher) in METRICS.items():
                mine, theirs = s.get(m, {}).get("median"), b["summary"].get(m, {}).get("median")
                if mine and theirs:
                    ratios[m] = mine / theirs if higher else theirs / mine
                a, c = res["samples"].get(m, []), b["samples"].get(m, [])
                if a and c and len(a) == len(c):   # same round = same noise: ratio per round, then median
                    paired[m] = statistics.median((x / y if higher else y / x) for x, y in zip(a, c))
        res["speedup_vs_baseline"] = ratios          # > 1: better than the baseline (fps up, ms down)
        res["speedup_vs_baseline_paired"] = paired
        g = s.get("generator_fps", {}).get("median")
        over = {}
        for m in ("e2e_memory_fps", "e2e_mp4_fps"):
            e = s.get(m, {}).get("median")
            if g and e:
                over[m.removesuffix("_fps")] = 1.0 - e / g
        res["pipeline_overhead"] = over              # 1 - end-to-end fps / generator-only fps (same config)
        dev_type = cfg["device"].split(":")[0]
        peak = peaks.get(cfg["device"], {}).get(cfg["precision"] if dev_type == "cuda" else "fp32")
        if g and peak:
            res["generator_gflops"] = g * flops["generator_per_frame"] / 1e9
            res["fraction_of_peak"] = res["generator_gflops"] / peak
    report["targets"] = targets(report)


def targets(report: dict) -> list[dict]:
    """The acceptance targets on each device: the default backend at its default batch >= 3x the baseline end
    to end; pipeline overhead (to memory) < 15%, MP4 reported."""
    out = []
    for dev, d in report["defaults"].items():
        key = f"{d['backend']}/{dev}/fp32/b{d['batch']}"
        res = report["results"].get(key)
        row = {"device": dev, "config": key, "measured": res is not None}
        if res is not None:
            sp = res["speedup_vs_baseline"].get("e2e_memory_fps")
            ov = res["pipeline_overhead"]
            row.update({"e2e_memory_speedup": sp, "e2e_mp4_speedup": res["speedup_vs_baseline"].get("e2e_mp4_fps"),
                        "speedup_target": 3.0, "speedup_met": sp is not None and sp >= 3.0,
                        "overhead_memory": ov.get("e2e_memory"), "overhead_mp4": ov.get("e2e_mp4"),
                        "overhead_target": 0.15,
                        "overhead_met": ov.get("e2e_memory") is not None and ov["e2e_memory"] < 0.15})
        out.append(row)
    return out
