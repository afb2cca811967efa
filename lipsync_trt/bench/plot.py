"""The PNG plot of a run: per device, frames/s end to end (memory, MP4) and generator only, bars per backend
and batch size with min..max whiskers, the baseline as a line."""
from __future__ import annotations

from pathlib import Path


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("e2e_memory_fps", "end to end, frames in memory"), ("e2e_mp4_fps", "end to end, to MP4"),
              ("generator_fps", "generator only")]
    devices = sorted({r["config"]["device"] for r in report["results"].values()})
    fig, axes = plt.subplots(len(devices), len(panels), figsize=(5.2 * len(panels), 4.2 * len(devices)),
                             squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, dev in enumerate(devices):
        res = [r for r in report["results"].values() if r["config"]["device"] == dev]
        base = next((r for r in res if r["config"]["backend"] == "baseline"), None)
        groups = sorted({(r["config"]["backend"], r["config"]["precision"]) for r in res
                         if r["config"]["backend"] != "baseline"})
        batches = sorted({r["config"]["batch"] for r in res if r["config"]["backend"] != "baseline"})
        width = 0.8 / max(1, len(batches))
        for col, (metric, title) in enumerate(panels):
            ax = axes[row][col]
            for bi, b in enumerate(batches):
                xs, ys, lo, hi = [], [], [], []
                for gi, (be, pr) in enumerate(groups):
                    r = next((r for r in res if r["config"]["backend"] == be and r["config"]["precision"] == pr
                              and r["config"]["batch"] == b), None)
                    s = r["summary"].get(metric, {}) if r else {}
                    if s.get("n"):
                        xs.append(gi - 0.4 + width * (bi + 0.5))
                        ys.append(s["median"])
                        lo.append(s["median"] - s["min"])
                        hi.append(s["max"] - s["median"])
                if xs:
                    ax.bar(xs, ys, width * 0.9, yerr=[lo, hi], capsize=3, label=f"batch {b}",
                           color=colors[bi % len(colors)])
                    for x, y in zip(xs, ys):
                        ax.annotate(f"{y:.1f}", (x, y), ha="center", va="bottom", fontsize=7,
                                    xytext=(0, 2), textcoords="offset points")
            bs = base["summary"].get(metric, {}) if base else {}
            if bs.get("n"):
                ax.axhline(bs["median"], color="crimson", linestyle="--", linewidth=1.2,
                           label=f"baseline {bs['median']:.2f}")
            ax.set_xticks(range(len(groups)))
            ax.set_xticklabels([f"{be}\n{pr}" for be, pr in groups])
            ax.set_title(f"{title} ({dev})", fontsize=10)
            ax.set_ylabel("frames/s")
            ax.grid(axis="y", alpha=0.3)
            ax.legend(fontsize=7)
    m = report["machine"]
    fig.suptitle(f"lipsync_trt bench: {m['cpu_model']} ({m['usable_cpus']} CPUs)"
                 + (f", {m['gpus'][0]['name']}" if m["gpus"] else "")
                 + f"; {report['inputs']['frames']} frames of {Path(report['inputs']['avatar']).name}; "
                 f"median, bars min..max", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
