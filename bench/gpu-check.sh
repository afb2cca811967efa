#!/usr/bin/env bash
# bench/gpu-check.sh: the whole GPU path checked and measured in one call (issue #17).
#
#   bash bench/gpu-check.sh            on a GPU machine (the device tool's `run`; see bench/README.md "GPU check")
#   bash bench/gpu-check.sh --dry-run  the same steps on a CPU with tiny sizes, what needs CUDA skipped with a
#                                      line saying so (tests/test_gpu_check.py runs it in CI)
#
# Steps, each under its own `timeout`, its output kept (stdout and $OUT/gpu-check.log) whether it passes or not:
#   setup    the carried wheels (.whl/, from bench/gpu-fetch.sh) into /tmp/site, the package from this tree
#   info     `python -m lipsync_trt info`, nvidia-smi
#   pytest   `pytest -m gpu` over the test files that carry the gpu marker (JUnit XML: $OUT/pytest.xml)
#   bench    `python -m lipsync_trt.bench`: torch eager, fp32/fp16/bf16, batch 1/8/32/128, sanders ($OUT/bench.json)
#   e2e      WAV -> composited frames left on the GPU, whole clip, torch fp16/bf16, with stage shares
#   compile  the bench again with torch:reduce-overhead (CUDA graphs), one run per precision: the first
#            precision before the server, the others at the end as time allows
#   serve    `python -m lipsync_trt.bench serve`: K concurrent real-time streams, several client processes
#   compare  CUDA fp32/fp16/bf16 frames vs CPU torch fp32 frames with `python -m lipsync_trt compare`
# then one summary table (stdout, $OUT/summary.json). At most 8 files under $OUT (the device tool's limit).
# The whole run stays inside GPU_CHECK_BUDGET seconds (default 560; each step's limit shrinks to what is left).
# Exit status: 0 when no step failed, timed out or was left out for lack of time; 1 otherwise; 2 for a bad option.
#
# Environment: OUT (results folder; default a new /tmp folder), PYTHON (default python3), GPU_CHECK_BUDGET,
# GPU_CHECK_FRAMES (bench frames, default 256), GPU_CHECK_STREAMS (serve K list, default 16,64,128,160,224),
# GPU_CHECK_COMPILE_PRECISIONS (default fp16,bf16,fp32), GPU_CHECK_ONLY (a comma list of the step groups to
# run: pytest, bench, e2e, compile, serve, compare; default all; setup and info always run, e.g. a second call
# on the still-warm machine with GPU_CHECK_ONLY=compile GPU_CHECK_BUDGET=200 for what the first had no time for).
# Data: .gpu-data/datasets/sanders (bench/gpu-fetch.sh), else $LIPSYNC_SHARED/datasets/sanders (default
# ../shared); the dry run uses the synthetic demo avatar unless GPU_CHECK_DATA=sanders.
set -u
cd "$(dirname "$0")/.." || exit 2
REPO=$PWD

DRY=0
for arg in "$@"; do
    case $arg in
        --dry-run) DRY=1 ;;
        -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu-check: unknown option $arg (expected --dry-run or --help)" >&2; exit 2 ;;
    esac
done

PY=${PYTHON:-python3}
if [ -z "${OUT:-}" ]; then OUT=$(mktemp -d /tmp/gpu-check-out.XXXXXX); fi
mkdir -p "$OUT" || { echo "gpu-check: cannot create OUT=$OUT" >&2; exit 2; }
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d /tmp/gpu-check-work.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
LOG=$OUT/gpu-check.log
STEPS=$WORK/steps.tsv
: > "$LOG"
: > "$STEPS"
export PYTHONUNBUFFERED=1
# budget in seconds, and the seconds each step leaves for the steps after it (R_*). The dry run's budget is
# generous: it only stops a hang (on a 2-core VM under load average ~13 from other work the dry run took 280 s
# of wall time and 90 s of CPU time).
if [ "$DRY" = 1 ]; then
    MODE=dry-run; BUDGET=${GPU_CHECK_BUDGET:-600}
    R_SETUP=400 R_INFO=380 R_PYTEST=350 R_BENCH=200 R_E2E=150 R_C1=0 R_SERVE=100 R_FRAMES=40 R_COMPARE=10
else
    MODE=gpu; BUDGET=${GPU_CHECK_BUDGET:-560}
    R_SETUP=440 R_INFO=420 R_PYTEST=350 R_BENCH=260 R_E2E=230 R_C1=150 R_SERVE=70 R_FRAMES=20 R_COMPARE=10
fi
START=$(date +%s)
DEADLINE=$((START + BUDGET))

say() { echo "$*" | tee -a "$LOG"; }
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >> "$STEPS"; }
skip() { say "== $1: skipped: $2"; record "$1" skipped "" 0 "$2"; }
# want GROUP: whether GPU_CHECK_ONLY (a comma list of pytest, bench, e2e, compile, serve, compare; empty = all)
# selects this group of steps; a group left out is recorded as skipped
want() {
    [ -z "${GPU_CHECK_ONLY:-}" ] && return 0
    case ",$GPU_CHECK_ONLY," in *",$1,"*) return 0 ;; esac
    skip "$1" "not selected (GPU_CHECK_ONLY=$GPU_CHECK_ONLY)"
    return 1
}

# step NAME CAP RESERVE CMD...: CMD under `timeout`, limited to CAP seconds and to the budget left after
# RESERVE seconds kept for the steps after it; output to stdout and the log; the outcome into $STEPS.
step() {
    local name=$1 cap=$2 reserve=$3
    shift 3
    local left lim t0 rc secs status
    left=$((DEADLINE - $(date +%s) - reserve))
    lim=$cap
    [ "$left" -lt "$lim" ] && lim=$left
    if [ "$lim" -lt 10 ]; then
        say "== $name: not run: no time left in the ${BUDGET} s budget"
        record "$name" no-time "" 0 "no time left in the ${BUDGET} s budget"
        return 1
    fi
    say "== $name (limit ${lim} s): $*"
    t0=$(date +%s.%N)
    timeout -k 15 "$lim" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    case $rc in
        0) status=ok ;;
        124|137) status=timeout ;;
        *) status=failed ;;
    esac
    record "$name" "$status" "$rc" "$secs" "$([ "$status" = timeout ] && echo "killed at the ${lim} s limit")"
    say "== $name: $status (exit $rc, $secs s)"
    return "$rc"
}

say "gpu-check ($MODE) in $REPO, results in $OUT, budget $BUDGET s, started $(date -u +%FT%TZ)"

# ---------------------------------------------------------------------------------------------- setup
if [ "$DRY" = 0 ]; then
    if compgen -G ".whl/*.whl" > /dev/null; then
        step setup/wheels 120 "$R_SETUP" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target /tmp/site .whl/*.whl \
            && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        skip setup/wheels "no .whl/ here: run bench/gpu-fetch.sh where pip reaches PyPI and carry .whl"
    fi
    # editable install: lipsync_trt.kernels lives in kernels/ (setup.py package_dir), which a bare PYTHONPATH=.
    # cannot map; if the image's site-packages refuses it, a plain install into /tmp/pkg, imported instead of
    # the tree (PYTHONSAFEPATH keeps the current folder off sys.path)
    if ! step setup/package 120 "$R_SETUP" "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .; then
        step setup/package-target 120 "$R_SETUP" "$PY" -m pip install -q --no-index --no-deps --no-build-isolation \
            --target /tmp/pkg . \
            && export PYTHONPATH=/tmp/pkg${PYTHONPATH:+:$PYTHONPATH} PYTHONSAFEPATH=1 \
            && sed -i 's|^setup/package\tfailed\t|setup/package\tfell-back\t|' "$STEPS"   # the fallback did it
    fi
else
    skip setup/wheels "dry run: the packages of this environment"
fi
step setup/imports 60 "$R_SETUP" "$PY" -c "
import lipsync_trt, lipsync_trt.kernels, av, soundfile, soxr, aiohttp, torch
print('lipsync_trt from', lipsync_trt.__file__, '| av', av.__version__, '| soundfile', soundfile.__version__,
      '| soxr', soxr.__version__, '| torch', torch.__version__, '| cuda', torch.cuda.is_available())"

# the data: sanders (carried in .gpu-data, or ../shared here); the demo avatar in the dry run
SHARED=""
for d in .gpu-data "${LIPSYNC_SHARED:-../shared}"; do
    if [ -d "$d/datasets/sanders/full_body_img" ]; then SHARED=$(cd "$d" && pwd); break; fi
done
[ -n "$SHARED" ] && export LIPSYNC_SHARED=$SHARED   # tests/conftest.py reads it
DATA=${GPU_CHECK_DATA:-$([ "$DRY" = 1 ] && echo demo || echo sanders)}   # GPU_CHECK_DATA=sanders: a dry run on sanders
if [ "$DATA" = sanders ] && [ -z "$SHARED" ]; then
    say "WARNING: no sanders data (.gpu-data/datasets/sanders: run bench/gpu-fetch.sh, carry .gpu-data); the synthetic demo avatar instead"
    DATA=demo
fi
# seeded demo weights (speed does not depend on weight values; the compare runs need the same weights on both sides)
step setup/inputs 120 "$R_SETUP" "$PY" -c "
import sys
from pathlib import Path
from lipsync_trt.demo import demo_checkpoints, make_demo
work, data, shared = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
if data == 'demo':
    d = make_demo(work / 'demo')
    avatar, audio, gen, enc = d['avatar'], d['audio'], d['generator'], d['audio_encoder']
else:
    avatar = Path(shared) / 'datasets' / 'sanders'
    audio = avatar / 'talk_hb.wav'
    gen, enc = demo_checkpoints(work / 'weights')
(work / 'inputs.txt').write_text(''.join(f'{p}\n' for p in (avatar, audio, gen, enc)))
print('inputs:', data, avatar, audio, gen, enc)" "$WORK" "$DATA" "$SHARED"
AVATAR= AUDIO= GEN= ENC=
if [ -s "$WORK/inputs.txt" ]; then
    { read -r AVATAR; read -r AUDIO; read -r GEN; read -r ENC; } < "$WORK/inputs.txt"
fi

# ---------------------------------------------------------------------------------------------- 1. info, pytest -m gpu
{ command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; } \
    > "$WORK/gpu.txt" 2>&1 || echo "none (no nvidia-smi)" > "$WORK/gpu.txt"
say "GPU: $(cat "$WORK/gpu.txt")"
step info 60 "$R_INFO" "$PY" -m lipsync_trt info
GPU_TESTS=$(grep -lE 'pytest\.mark\.gpu\b' tests/test_*.py | tr '\n' ' ')
if ! want pytest; then
    :
elif [ -n "$GPU_TESTS" ]; then
    # shellcheck disable=SC2086
    step pytest-gpu 150 "$R_PYTEST" "$PY" -m pytest -m gpu -q -p no:cacheprovider --junitxml="$OUT/pytest.xml" $GPU_TESTS
else
    skip pytest-gpu "no test file carries the gpu marker"
fi

# ---------------------------------------------------------------------------------------------- 2. bench (eager)
if ! want bench; then
    :
elif [ -z "$AVATAR" ]; then
    skip bench "no inputs (setup/inputs failed)"
elif [ "$DRY" = 1 ]; then
    step bench 240 "$R_BENCH" "$PY" -m lipsync_trt.bench --avatar "$AVATAR" --audio "$AUDIO" --generator "$GEN" \
        --audio-encoder "$ENC" --quick --devices cpu --backends torch --precisions fp32 --batch-sizes 1 --repeat 1 \
        --json "$OUT/bench.json" --plot none --no-progress
else
    step bench 210 "$R_BENCH" "$PY" -m lipsync_trt.bench --avatar "$AVATAR" --audio "$AUDIO" --generator "$GEN" \
        --audio-encoder "$ENC" --devices cuda --backends torch --precisions fp32,fp16,bf16 --batch-sizes 1,8,32,128 --frames "${GPU_CHECK_FRAMES:-256}" \
        --repeat 2 --warmup 1 --json "$OUT/bench.json" --plot none --no-progress
fi

# ---------------------------------------------------------------------------------------------- 2a. e2e on the device
# audio -> composited frames left on the device (the issue's 2,500 frames/s target; the bench's e2e figures copy
# every frame to host numpy and decode cold templates): WAV load + mel + encoder + iter_frames over the whole
# clip, each config loaded once, one untimed pass, then timed passes; stage seconds from iter_frames' timings
cat > "$WORK/e2e_device.py" <<'PYEOF'
import json, sys, time
import torch
from lipsync_trt import audio as A, avatar as AV, backends, pipeline

avatar_dir, wav, gen, enc, device, precs, batches, nframes, repeat, out = sys.argv[1:11]
dev = torch.device(device)
av = AV.load(avatar_dir)
rows = []
for prec in precs.split(","):
    try:
        runner = backends.load("torch", gen, enc, device=dev, precision=prec)
    except Exception as exc:
        rows.append({"precision": prec, "error": f"{type(exc).__name__}: {exc}"})
        continue
    for b in map(int, batches.split(",")):
        row = {"config": f"torch/{device}/{prec}/b{b}", "precision": prec, "batch": b, "fps": [], "stages": []}
        for r in range(int(repeat) + 1):   # pass 0 is the warm-up
            st = {}
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            feats = pipeline.encode_features(runner, A.load_16k(wav))
            t_audio = time.perf_counter() - t0
            n = feats.num_frames if int(nframes) <= 0 else min(int(nframes), feats.num_frames)
            count, last = 0, None
            for _, frame in pipeline.iter_frames(runner, av, feats, list(range(n)), 0, b, st):
                count, last = count + 1, frame
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            secs = time.perf_counter() - t0
            assert last is not None and last.device.type == dev.type, "frames did not stay on the device"
            if r:
                row["fps"].append(count / secs)
                row["stages"].append({"seconds": secs, "frames": count, "audio": t_audio, **st})
        row["frames"] = count
        row["fps_median"] = sorted(row["fps"])[len(row["fps"]) // 2]
        rows.append(row)
        print(f"e2e on {device}: {row['config']}: {count} frames, "
              + ", ".join(f"{v:.1f}" for v in row["fps"]) + " frames/s; stages (s): "
              + ", ".join(f"{k} {v:.2f}" for k, v in row["stages"][-1].items() if k != "frames"), flush=True)
    del runner
json.dump({"device": device, "avatar": avatar_dir, "audio": wav, "results": rows}, open(out, "w"), indent=1)
sys.exit(1 if any("error" in r for r in rows) else 0)
PYEOF
if ! want e2e; then
    :
elif [ -z "$AVATAR" ]; then
    skip e2e-device "no inputs (setup/inputs failed)"
elif [ "$DRY" = 1 ]; then
    step e2e-device 120 "$R_E2E" "$PY" "$WORK/e2e_device.py" "$AVATAR" "$AUDIO" "$GEN" "$ENC" cpu fp32 1 2 1 \
        "$WORK/e2e-device.json"
else
    step e2e-device 120 "$R_E2E" "$PY" "$WORK/e2e_device.py" "$AVATAR" "$AUDIO" "$GEN" "$ENC" cuda fp16,bf16 32,128 0 2 \
        "$WORK/e2e-device.json"
fi

# ---------------------------------------------------------------------------------------------- 2b. bench (compiled)
# torch:reduce-overhead (CUDA graphs per batch size), one bench run per precision so that a slow compile costs
# only its own figures: the first precision here (before the server, which needs its time too), the rest last
CPRECS=${GPU_CHECK_COMPILE_PRECISIONS:-fp16,bf16,fp32}
FIRST_CPREC=${CPRECS%%,*}
compiled() {   # compiled PRECISION CAP RESERVE
    step "bench-compile/$1" "$2" "$3" "$PY" -m lipsync_trt.bench --avatar "$AVATAR" --audio "$AUDIO" \
        --generator "$GEN" --audio-encoder "$ENC" --devices cuda --backends torch:reduce-overhead --precisions "$1" \
        --batch-sizes 1,8,32,128 --frames 128 --repeat 2 --warmup 1 --json "$WORK/bench-compile-$1.json" \
        --plot none --no-progress
}
if [ "$DRY" = 1 ]; then
    skip bench-compile "torch:reduce-overhead records CUDA graphs: needs CUDA (dry run on a CPU)"
elif [ -z "$AVATAR" ]; then
    skip bench-compile "no inputs (setup/inputs failed)"
elif want compile; then
    compiled "$FIRST_CPREC" 150 "$R_C1"
fi

# ---------------------------------------------------------------------------------------------- 3. serve under load
if ! want serve; then
    :
elif [ -z "$AVATAR" ]; then
    skip serve "no inputs (setup/inputs failed)"
elif [ "$DRY" = 1 ]; then
    step serve 150 "$R_SERVE" "$PY" -m lipsync_trt.bench serve --avatar "$AVATAR" --audio "$AUDIO" --name demo \
        --generator "$GEN" --audio-encoder "$ENC" --backend torch --device cpu --max-batch 2 --streams 2 --duration 1 \
        --client-procs 2 --warmup 0 --json "$OUT/serve.json"
else
    step serve 150 "$R_SERVE" "$PY" -m lipsync_trt.bench serve --avatar "$AVATAR" --audio "$AUDIO" --name sanders \
        --generator "$GEN" --audio-encoder "$ENC" --backend torch --device cuda --precision fp16 --max-batch 64 \
        --streams "${GPU_CHECK_STREAMS:-16,64,128,160,224}" --duration 8 --client-procs 6 --warmup 2 \
        --json "$OUT/serve.json"
fi

# ---------------------------------------------------------------------------------------------- 4. compare
# frames of the same clip from the CPU torch fp32 path (the reference) and from each GPU path, then compare
if [ "$DRY" = 1 ]; then FRAMES=0-1; CANDIDATES="cpu/fp32/b2"; else FRAMES=0-63; CANDIDATES="cuda/fp32 cuda/fp16 cuda/bf16"; fi
if "$PY" -m lipsync_trt compare --help > /dev/null 2>&1; then HAVE_COMPARE=1; else HAVE_COMPARE=0; fi
echo "$HAVE_COMPARE $FRAMES" > "$WORK/compare.txt"
mkdir -p "$WORK/frames"
frames() {   # frames NAME DEVICE PRECISION [BATCH]  (no BATCH: generate's default for the device)
    step "frames/$1" 90 "$R_FRAMES" "$PY" -m lipsync_trt generate --avatar "$AVATAR" --audio "$AUDIO" --generator "$GEN" \
        --audio-encoder "$ENC" --frames "$FRAMES" --frames-dir "$WORK/frames/${1//\//-}" --backend torch \
        --device "$2" --precision "$3" ${4:+--batch-size "$4"} --quiet
}
if ! want compare; then
    :
elif [ -z "$AVATAR" ]; then
    skip compare "no inputs (setup/inputs failed)"
elif frames cpu/fp32 cpu fp32 1; then
    for cand in $CANDIDATES; do
        IFS=/ read -r dev prec batch <<< "$cand"
        frames "$cand" "$dev" "$prec" "${batch#b}" || continue
        if [ "$HAVE_COMPARE" = 1 ]; then
            step "compare/$cand" 60 "$R_COMPARE" "$PY" -m lipsync_trt compare "$WORK/frames/cpu-fp32" "$WORK/frames/${cand//\//-}" \
                --avatar "$AVATAR" --json "$WORK/compare-${cand//\//-}.json"
        else
            skip "compare/$cand" "compare not available (python -m lipsync_trt compare is missing in this tree)"
        fi
    done
fi

# ---------------------------------------------------------------------------------------------- 2c. the rest compiled
if [ "$DRY" = 0 ] && [ -n "$AVATAR" ] && { [ -z "${GPU_CHECK_ONLY:-}" ] || [[ ",$GPU_CHECK_ONLY," == *,compile,* ]]; }; then
    for prec in ${CPRECS//,/ }; do
        [ "$prec" = "$FIRST_CPREC" ] || compiled "$prec" 200 5
    done
fi

# ---------------------------------------------------------------------------------------------- summary
say "== summary"
timeout 120 "$PY" - "$OUT" "$WORK" "$MODE" "$DATA" "$REPO" "$BUDGET" <<'EOF' 2>&1 | tee -a "$LOG"
import datetime, glob, json, os, subprocess, sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, work, mode, data, repo, budget = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4], Path(sys.argv[5]), sys.argv[6]
TARGETS = {"generator_fp16_fps": 5000.0, "e2e_device_fps": 2500.0, "streams": 150, "p99_ms": 150.0}


def load(path):
    try:
        return json.loads(Path(path).read_text())
    except Exception as exc:   # missing or unreadable: the step's row says why
        return None


def write(path, obj):
    tmp = Path(str(path) + ".part")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def med(res, metric):
    s = (res.get("summary") or {}).get(metric) or {}
    return s.get("median")


def rev():
    try:
        return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        f = repo / ".gpu-data" / "revision.txt"
        return (f.read_text().splitlines()[0] + " (at bench/gpu-fetch.sh time)") if f.is_file() else "unknown"


steps = []
for line in (work / "steps.tsv").read_text().splitlines():
    name, status, rc, secs, note = (line.split("\t") + [""] * 5)[:5]
    steps.append({"step": name, "status": status, "exit": int(rc) if rc.strip("-").isdigit() else None,
                  "seconds": float(secs or 0), "note": note})

machine = {"gpu": (work / "gpu.txt").read_text().strip() if (work / "gpu.txt").is_file() else None}
try:
    import torch
    machine.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
                   device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
except Exception as exc:
    machine["torch"] = f"not importable: {exc}"
try:
    import triton
    machine["triton"] = triton.__version__
except Exception:
    machine["triton"] = None
machine["cpus"] = os.cpu_count()

lines = [f"GPU check ({mode}, data {data}), revision {rev()}, {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
         f"machine: {machine.get('device')} | nvidia-smi: {machine['gpu']} | torch {machine.get('torch')} "
         f"(CUDA {machine.get('cuda')}), triton {machine.get('triton')}, {machine['cpus']} CPUs", "",
         f"{'step':<24} {'status':<8} {'exit':>4} {'seconds':>8}  note"]
for s in steps:
    lines.append(f"{s['step']:<24} {s['status']:<8} {'' if s['exit'] is None else s['exit']:>4} {s['seconds']:>8.1f}  {s['note']}")
lines.append(f"total {sum(s['seconds'] for s in steps):.0f} s of steps, budget {budget} s")

# pytest -m gpu
tests = None
x = out / "pytest.xml"
if x.is_file():
    try:
        root = ET.parse(x).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        cases = []
        for c in suite.iter("testcase"):
            outcome = "passed"
            msg = ""
            for kind in ("failure", "error", "skipped"):
                e = c.find(kind)
                if e is not None:
                    outcome, msg = {"failure": "failed", "error": "error", "skipped": "skipped"}[kind], (e.get("message") or "")[:200]
            cases.append({"test": f"{c.get('classname')}::{c.get('name')}", "outcome": outcome, "message": msg})
        tests = {k: sum(1 for c in cases if c["outcome"] == k) for k in ("passed", "failed", "error", "skipped")}
        tests["cases"] = cases
        lines += ["", "pytest -m gpu: " + ", ".join(f"{tests[k]} {k}" for k in ("passed", "failed", "error", "skipped"))]
        lines += [f"  {c['outcome']:<7} {c['test']}  {c['message']}" for c in cases if c["outcome"] != "passed"][:30]
    except Exception as exc:
        lines.append(f"pytest.xml unreadable: {exc}")

# bench: eager and compiled
benches = {"eager": load(out / "bench.json")}
compiled = {}
for f in sorted(work.glob("bench-compile-*.json")):
    r = load(f)
    if r is not None:
        compiled[f.stem.removeprefix("bench-compile-")] = r
if compiled:
    write(out / "bench-compile.json", compiled)
for prec, r in compiled.items():
    benches[f"compiled {prec}"] = r
E2E_KEYS = ("e2e_device_fps", "e2e_gpu_fps", "e2e_memory_fps")   # frames on the device, if the bench has it
rows, best = [], {"generator_fp16_fps": (None, None), "e2e_fps": (None, None, None)}
stage_src = None
for label, r in benches.items():
    if not r:
        continue
    for key, res in r.get("results", {}).items():
        if label != "eager" and key.startswith("baseline/"):
            continue   # the same baseline again in each compiled run
        g, m4 = med(res, "generator_fps"), med(res, "e2e_mp4_fps")
        e_key = next((k for k in E2E_KEYS if med(res, k)), None)
        e = med(res, e_key) if e_key else None
        cuda_mb = med(res, "cuda_peak_mb")
        rows.append((key, g, e, m4, cuda_mb))
        cfg = res.get("config", {})
        if cfg.get("precision") == "fp16" and g and (best["generator_fp16_fps"][0] or 0) < g:
            best["generator_fp16_fps"] = (g, key)
        if cfg.get("backend") != "baseline" and e and (best["e2e_fps"][0] or 0) < e:
            best["e2e_fps"] = (e, key, e_key)
            stage_src = res
fmt = lambda v, d=0: "-" if v is None else f"{v:.{d}f}"
if rows:
    lines += ["", f"{'bench config':<38} {'gen f/s':>9} {'e2e f/s':>9} {'mp4 f/s':>9} {'CUDA MB':>8}"]
    lines += [f"{k:<38} {fmt(g, 1):>9} {fmt(e, 1):>9} {fmt(m, 1):>9} {fmt(c):>8}" for k, g, e, m, c in rows]
    if best["e2e_fps"][2]:
        lines.append(f"(e2e = {best['e2e_fps'][2]}; mp4 = e2e_mp4_fps; medians over the rounds)")
shares = {}
if stage_src:
    per = [s for s in stage_src.get("stages", []) if s.get("metric") in ("e2e_device", "e2e_memory")]
    if per:
        total = sum(s["seconds"] / max(s["frames"], 1) for s in per) / len(per)
        for k in sorted({k for s in per for k in s} - {"metric", "seconds", "frames", "bytes"}):
            v = sum(s.get(k, 0.0) for s in per) / len(per)
            shares[k] = {"ms_per_frame": 1000 * v, "share_of_wall": v / total if total else None}
        lines.append(f"stage shares of {best['e2e_fps'][1]} (ms/frame, share of the end-to-end wall time; stages overlap): "
                     + ", ".join(f"{k} {v['ms_per_frame']:.2f} ({100 * v['share_of_wall']:.0f}%)" for k, v in shares.items()))

# e2e on the device (the e2e-device step)
e2e_dev = load(work / "e2e-device.json")
dev_best = None
if e2e_dev:
    lines += ["", f"e2e on the device ({e2e_dev['device']}; WAV -> mel -> encoder -> frames left on the device, whole clip):"]
    for r in e2e_dev.get("results", []):
        if "error" in r:
            lines.append(f"  torch/{r['precision']}: {r['error']}")
            continue
        last = r["stages"][-1] if r["stages"] else {}
        wall = last.get("seconds") or 0
        st = ", ".join(f"{k} {100 * last[k] / wall:.0f}%" for k in ("audio", "prepare", "model", "paste") if k in last and wall)
        lines.append(f"  {r['config']:<24} {r['frames']:>5} frames  {r['fps_median']:>9.1f} f/s  (stage time / wall: {st})")
        if dev_best is None or r["fps_median"] > dev_best["fps_median"]:
            dev_best = r

# serve
serve = load(out / "serve.json")
serve_best = None
if serve:
    lines += ["", f"serve ({serve.get('server', {}).get('backend')}): {'K':>4} {'made':>7} {'p50 ms':>7} {'p99 ms':>7} {'fps made':>9} {'needed':>7}  verdict"]
    for r in serve.get("results", []):
        lat = r.get("latency_ms", {})
        lines.append(f"{'':<17}{r['k']:>4} {r['frames']['made']:>7} {fmt(lat.get('p50'), 1):>7} {fmt(lat.get('p99'), 1):>7} "
                     f"{r['made_fps']:>9.1f} {r['needed_fps']:>7g}  {'keeps up' if r['keeps_up'] else 'behind: ' + ', '.join(r['why_not'])}")
    kept = [r for r in serve.get("results", []) if r.get("keeps_up")]
    serve_best = max(kept, key=lambda r: r["k"]) if kept else None
    lines.append(f"largest K keeping up: {serve.get('max_streams_keeping_up')}")

# compare
have, frames = (work / "compare.txt").read_text().split() if (work / "compare.txt").is_file() else ("0", "")
comp = {"available": have == "1", "reference": "cpu/fp32 (torch, batch 1)", "frames": frames, "results": {}}
for f in sorted(work.glob("compare-*.json")):
    comp["results"][f.stem.removeprefix("compare-").replace("-", "/")] = load(f)
write(out / "compare.json", comp)
if not comp["available"]:
    lines += ["", "compare: not available (python -m lipsync_trt compare is missing in this tree)"]
elif comp["results"]:
    lines += ["", f"compare vs {comp['reference']}, frames {frames}:"]
    for cand, r in comp["results"].items():
        if not isinstance(r, dict):
            lines.append(f"  {cand}: no JSON")
            continue
        def part(d):
            if not isinstance(d, dict):
                return "-"
            psnr = d.get("psnr")
            psnr = f"{psnr:.2f} dB" if isinstance(psnr, (int, float)) else str(psnr)
            return (f"PSNR {psnr}, SSIM {d.get('ssim', float('nan')):.5f}, max |d| {d.get('max_abs')}, "
                    f"mean |d| {d.get('mean_abs', float('nan')):.4f}")
        lines.append(f"  {cand:<12} {r.get('frames')} frames | whole: {part(r.get('whole'))} | face: {part(r.get('face'))}")

# targets (issue #17)
g, gk = best["generator_fp16_fps"]
e, ek, ekey = best["e2e_fps"]
targets = [
    {"target": "generator fp16 >= 5,000 frames/s", "measured": g, "config": gk,
     "met": None if g is None else g >= TARGETS["generator_fp16_fps"]},
    ({"target": "audio -> composited frames on the device >= 2,500 frames/s", "measured": dev_best["fps_median"],
      "config": dev_best["config"], "metric": "e2e-device step", "stages": dev_best["stages"][-1],
      "met": None if mode != "gpu" else dev_best["fps_median"] >= TARGETS["e2e_device_fps"]} if dev_best else
     {"target": "audio -> composited frames on the device >= 2,500 frames/s", "measured": e, "config": ek,
      "metric": ekey, "met": None if e is None or mode != "gpu" else e >= TARGETS["e2e_device_fps"],
      "note": "from the bench: frames copied to host numpy"}),
    {"target": ">= 150 concurrent real-time streams, p99 < 150 ms beyond the delay",
     "measured": serve.get("max_streams_keeping_up") if serve else None,
     "p99_ms": (serve_best or {}).get("latency_ms", {}).get("p99"),
     "met": None if not serve or mode != "gpu" else serve.get("max_streams_keeping_up", 0) >= TARGETS["streams"]},
]
lines += ["", "targets:"]
for t in targets:
    verdict = "n/a (dry run)" if mode != "gpu" else {True: "MET", False: "MISSED", None: "not measured"}[t["met"]]
    lines.append(f"  {t['target']:<66} {fmt(t['measured'], 1) if isinstance(t['measured'], float) else t['measured']!s:>8}  {verdict}"
                 + (f"  [{t['config']}]" if t.get("config") else "") + (f"  ({t['note']})" if t.get("note") else ""))

text = "\n".join(lines)
print(text)
write(out / "summary.json", {"schema": 1, "mode": mode, "data": data, "revision": rev(),
                             "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                             "machine": machine, "budget_s": int(budget), "steps": steps, "pytest": tests,
                             "targets": targets, "stage_shares": {"config": best["e2e_fps"][1], "stages": shares},
                             "serve_max_streams": serve.get("max_streams_keeping_up") if serve else None,
                             "e2e_device": e2e_dev,
                             "files": sorted(p.name for p in out.iterdir() if not p.name.endswith(".part")) + ["summary.json"],
                             "table": text})
EOF
SUMMARY_RC=${PIPESTATUS[0]}
[ "$SUMMARY_RC" = 0 ] || { say "gpu-check: the summary failed (exit $SUMMARY_RC)"; record summary failed "$SUMMARY_RC" 0 ""; }
bad=$(awk -F'\t' '$2 == "failed" || $2 == "timeout" || $2 == "no-time" { print $1 }' "$STEPS" | tr '\n' ' ')
say "gpu-check: $(($(date +%s) - START)) s in all; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
if [ -n "$bad" ]; then
    say "gpu-check: FAILED steps: $bad"
    exit 1
fi
say "gpu-check: no step failed"
