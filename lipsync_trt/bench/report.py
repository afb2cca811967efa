"""The report of a run: the table on stdout, the comparison with an earlier JSON, the JSON itself and its
completeness check."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

SCHEMA = 1
METRICS = {   # name -> (unit, higher is better)
    "e2e_memory_fps": ("frames/s", True),
    "e2e_mp4_fps": ("frames/s", True),
    "generator_fps": ("frames/s", True),
    "audio_ms_per_s": ("ms per s of audio", False),
    "prepare_ms": ("ms/frame", False),
    "paste_ms": ("ms/frame", False),
}


def jsonable(obj: object) -> object:
    """obj with every key a str and every value JSON can hold (anything else as str)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def write_json(report: dict, path: str | Path) -> None:
    """The report as indented JSON, written whole or not at all (a .part file renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = Path(str(path) + ".part")
    part.write_text(json.dumps(jsonable(report), indent=1))
    os.replace(part, path)

def _fmt(summary: dict | None, digits: int = 2) -> str:
    if not summary or not summary.get("n"):
        return "-"
    med = summary["median"]
    half = (summary["max"] - summary["min"]) / 2
    prec = digits if med < 100 else 0
    return f"{med:.{prec}f}±{half:.{prec}f}" if summary["n"] > 1 else f"{med:.{prec}f}"


def _x(v: float | None) -> str:
    return f"{v:.2f}x" if v else "-"


def _pct(v: float | None) -> str:
    return f"{100 * v:.0f}%" if v is not None else "-"


def table(report: dict) -> str:
    """The results as a fixed-width table, then the notes under it (rounds, FLOPs, machine, targets, skips)."""
    cols = ["config", "e2e mem f/s", "x base", "e2e mp4 f/s", "x base", "gen f/s", "x base", "ovh mem", "ovh mp4",
            "audio ms/s", "prep ms/f", "paste ms/f", "load s", "1st call s", "peak RSS MB", "% peak"]
    rows = []
    for key, res in report["results"].items():
        s, sp, ov = res["summary"], res["speedup_vs_baseline"], res["pipeline_overhead"]
        mark = " *" if any(t["config"] == key for t in report["targets"]) else ""
        rows.append([key + mark, _fmt(s.get("e2e_memory_fps")), _x(sp.get("e2e_memory_fps")),
                     _fmt(s.get("e2e_mp4_fps")), _x(sp.get("e2e_mp4_fps")), _fmt(s.get("generator_fps")),
                     _x(sp.get("generator_fps")), _pct(ov.get("e2e_memory")), _pct(ov.get("e2e_mp4")),
                     _fmt(s.get("audio_ms_per_s"), 1), _fmt(s.get("prepare_ms"), 1), _fmt(s.get("paste_ms"), 1),
                     f"{res['load_s']:.2f}" if res.get("load_s") is not None else "-",
                     f"{res['first_call_s']:.2f}" if res.get("first_call_s") is not None else "-",
                     f"{s['peak_rss_mb']['max']:.0f}" if s.get("peak_rss_mb", {}).get("n") else "-",
                     _pct(res.get("fraction_of_peak"))])
    widths = [max(len(str(r[i])) for r in rows + [cols]) for i in range(len(cols))]
    line = lambda r: "  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
    out = [line(cols), line(["-" * w for w in widths])] + [line(r) for r in rows]
    m, f, inp = report["machine"], report["flops"], report["inputs"]
    out.append("")
    out.append(f"median ± half-range over {report['config']['repeat']} interleaved rounds; {inp['frames']} frames of "
               f"{Path(inp['avatar']).name} ({inp['width']}x{inp['height']}); x base = speedup over the baseline "
               f"on the same device; ovh = 1 - end-to-end f/s / generator-only f/s; * = default backend and batch")
    out.append(f"FLOPs: generator {f['generator_per_frame'] / 1e9:.2f} GFLOP/frame, audio encoder "
               f"{f['audio_encoder_per_window'] / 1e9:.3f} GFLOP/window; peak (matmul, this run): " +
               ", ".join(f"{d} {p}: {v:.0f} GFLOP/s" for d, ps in report["peak_gflops"].items() for p, v in ps.items()))
    load = (f"; load average {m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end"
            if m.get("loadavg_start") and m.get("loadavg_end") else "")
    out.append(f"machine: {m['cpu_model']}, {m['usable_cpus']} CPUs"
               + (f", {', '.join(g['name'] for g in m['gpus'])}" if m["gpus"] else "") + load)
    for t in report["targets"]:
        if not t["measured"]:
            out.append(f"target ({t['device']}): default {t['config']} not measured (add its batch size)")
            continue
        out.append(f"target ({t['device']}): default {t['config']} end to end {_x(t['e2e_memory_speedup'])} the "
                   f"baseline (need >= 3x: {'met' if t['speedup_met'] else 'NOT met'}), MP4 "
                   f"{_x(t['e2e_mp4_speedup'])}; pipeline overhead {_pct(t['overhead_memory'])} to memory "
                   f"(need < 15%: {'met' if t['overhead_met'] else 'NOT met'}), {_pct(t['overhead_mp4'])} to MP4")
    for s in report["skipped"]:
        what = "/".join(str(s[k]) for k in ("backend", "device", "precision", "batch") if k in s)
        out.append(f"skipped {what}: {s['reason']}")
    return "\n".join(out)


def compare(report: dict, old: dict) -> tuple[str, list]:
    """The change of every median against an earlier report of the same schema (+ is better): text and rows."""
    rows, out = [], []
    for key, res in report["results"].items():
        prev = old.get("results", {}).get(key)
        if not prev:
            continue
        for m, (unit, higher) in METRICS.items():
            a = prev.get("summary", {}).get(m, {}).get("median")
            b = res["summary"].get(m, {}).get("median")
            if a and b:
                change = (b / a - 1) if higher else (a / b - 1)
                rows.append({"config": key, "metric": m, "old": a, "new": b, "improvement": change})
    if not rows:
        return "compare: no configuration in common with the earlier run", rows
    w = max(len(r["config"]) for r in rows)
    out.append(f"change against {old.get('created', '?')} ({old.get('machine', {}).get('cpu_model', '?')}); "
               "+ is better")
    for r in rows:
        out.append(f"{r['config'].ljust(w)}  {r['metric']:<15} {r['old']:10.2f} -> {r['new']:10.2f}  "
                   f"{100 * r['improvement']:+6.1f}%")
    return "\n".join(out), rows


def check_report(report: dict) -> list[str]:
    """What is missing or not positive in a report (used by the tests; empty when complete)."""
    problems = []
    for k in ("machine", "flops", "peak_gflops", "results", "targets", "inputs", "config", "defaults"):
        if k not in report:
            problems.append(f"missing {k}")
    for key, res in report.get("results", {}).items():
        for m in METRICS:
            vals = res.get("samples", {}).get(m)
            if not vals:
                problems.append(f"{key}: no samples of {m}")
            elif not all(isinstance(v, (int, float)) and v > 0 and math.isfinite(v) for v in vals):
                problems.append(f"{key}: non-positive {m}: {vals}")
        for k in ("load_s", "first_call_s"):
            if not (isinstance(res.get(k), (int, float)) and res[k] > 0):
                problems.append(f"{key}: {k} missing or not positive")
        if not res.get("summary", {}).get("peak_rss_mb", {}).get("n"):
            problems.append(f"{key}: no peak RSS")
    return problems
