"""argparse options shared by the commands that load a backend (`generate`, `serve`)."""
from __future__ import annotations

import argparse
import math


def add_backend_args(p: argparse.ArgumentParser) -> None:
    """--backend, --device, --precision, --engines: which runtime runs the networks, where, and from what."""
    from .backends import NAMES   # (imports no optional runtime)

    p.add_argument("--backend", default="auto", choices=["auto", *NAMES],
                   help="runtime (default auto: TensorRT when --engines holds a TensorRT build of these checkpoints and CUDA is there, else torch on CUDA, else Core ML on macOS, "
                        "else ONNX Runtime when installed, else torch); `python -m lipsync_trt info` lists what is "
                        "usable here")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="generator precision (default fp32). fp16/bf16 are for CUDA, where they should halve the "
                        "generator's cost (not measured on a GPU yet); the torch backend also runs them on a CPU "
                        "(slowly: for checking their fidelity with `compare`)")
    p.add_argument("--engines", metavar="DIR", default=None,
                   help="folder of builds from `python -m lipsync_trt.build`. TensorRT: its engines for these "
                        "checkpoints (default engines/; built there when missing). ONNX Runtime: a build of these "
                        "checkpoints found there is used; else ONNX is exported and verified once into the cache "
                        "folder ($LIPSYNC_TRT_CACHE, default ~/.cache/lipsync_trt) and reused from there")


def add_blend_arg(p: argparse.ArgumentParser) -> None:
    """--blend: how the generated box meets the template frame (compose.parse_blend checks the value)."""
    from .compose import DEFAULT_FEATHER

    p.add_argument("--blend", default="none", metavar="none|feather[:PX]",
                   help="none (default): paste the generated box as the reference does, with a hard edge; "
                        f"feather[:PX]: fade it into the template frame over PX pixels inside the box edge (default "
                        f"{DEFAULT_FEATHER}; raised cosine), which hides the seam; outside the box and deeper than PX "
                        "inside it the pixels are the same as with none")


# ------------------------------------------------------------------------------------------------ numeric options

SECONDS_MAX = 86_400.0   # a day: longer than any timeout, idle limit or benchmark run means a typo

# Every numeric option of every command (generate, features, serve, batch, compare, build, bench), inclusive range
# and unit. `Parser.parse_args` checks them right after parsing, before anything loads: inf, nan, a negative or an
# absurd value is exit 2 with one line naming the option and its range (serve --max-wait-ms inf used to start and
# kill the model worker at the first stream). tests/test_cli_numbers.py checks that no numeric option is missing.
BOUNDS: dict[str, tuple[float, float, str]] = {
    # generate, batch, compare, the offline benchmark
    "--batch-size": (1, 4096, "frames per model call"),
    "--start-frame": (0, 1_000_000, "a template image index"),
    "--crf": (0, 51, "H.264 quality"),
    # serve
    "--port": (0, 65535, "0: any free port"),
    "--max-batch": (1, 1024, "frames per generator call"),
    "--max-wait-ms": (0, 10_000, "ms"),
    "--max-streams": (1, 100_000, "streams"),
    "--max-queue": (1, 100_000, "frames"),
    "--max-delay-ms": (0, 600_000, "ms; 0: none"),
    "--jpeg-quality": (1, 100, "JPEG quality"),
    "--max-message": (3_920, 1 << 20, "bytes: from a 64-byte name's audio request to the 1 MiB WebSocket limit"),
    "--stream-idle-s": (0, SECONDS_MAX, "s; 0: never"),
    "--http-idle-s": (0.1, SECONDS_MAX, "s"),
    "--ws-idle-s": (0, SECONDS_MAX, "s; 0: never"),
    "--webrtc-wait-ms": (0, 10_000, "ms"),
    "--webrtc-silence-db": (-200, 0, "dBFS"),
    # batch --ray, serve --ray
    "--workers": (1, 100_000, "worker actors"),
    "--gpus-per-worker": (0, 1024, "GPUs"),
    "--cpus-per-worker": (0, 4096, "CPUs"),
    "--max-retries": (0, 1000, "retries"),
    "--gpus-per-replica": (0, 1024, "GPUs"),
    "--cpus-per-replica": (0, 4096, "CPUs"),
    # bench
    "--frames": (1, 1_000_000, "video frames"),
    "--seconds": (0.04, SECONDS_MAX, "s"),
    "--duration": (0.04, SECONDS_MAX, "s"),
    "--warmup": (0, SECONDS_MAX, "s"),
    "--generator-seconds": (0.04, SECONDS_MAX, "s"),
    "--rounds": (1, 10_000, "rounds"),
    "--jobs": (1, 100_000, "jobs"),
    "--pushes": (1, 10_000_000, "pushes"),
    "--max-k": (1, 100_000, "streams"),
    "--client-procs": (1, 1024, "processes"),
    "--idle-streams": (0, 100_000, "streams; 0: skip"),
    "--bursts": (1, 100_000, "bursts"),
    "--burst-s": (0.04, SECONDS_MAX, "s"),
    "--gap": (0, SECONDS_MAX, "s"),
    "--utterance": (0.04, SECONDS_MAX, "s"),
    "--speech": (0, 1, "a share"),
    "--pace": (0, SECONDS_MAX, "s between chunks"),
    "--wait-ms": (0, 60_000, "ms"),
    "--budget-ms": (1, 600_000, "ms"),
    "--rate": (8_000, 384_000, "Hz"),
    "--audio-seconds": (0.2, SECONDS_MAX, "s: at least one mel window"),
    "--repeat": (1, 10_000, "runs"),
    "--utterances": (1, 100_000, "utterances"),
    "--idle-services": (0, 10_000, "services; 0: skip"),
    "--idle-seconds": (0.04, SECONDS_MAX, "s"),
}


def _numeric_actions(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """The int/float options of `parser` and of the subcommand chosen in `args`, recursively."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = getattr(args, action.dest, None) if action.dest is not argparse.SUPPRESS else None
            for name, sub in action.choices.items():
                if chosen is None or name == chosen:
                    yield from _numeric_actions(sub, args)
        elif action.type in (int, float) and action.option_strings:
            yield action


def check_numbers(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """UsageError (one line, exit 2 by `errors.run_command`) for a numeric option outside its BOUNDS range, inf or
    nan; an option missing from BOUNDS is only checked to be finite."""
    from .errors import UsageError

    for action in _numeric_actions(parser, args):
        value = getattr(args, action.dest, None)
        if value is None or value is action.default:
            continue
        name = max(action.option_strings, key=len)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if name in BOUNDS:
                lo, hi, unit = BOUNDS[name]
                if not (math.isfinite(v) and lo <= v <= hi):
                    raise UsageError(f"{name} must be within {_num(lo)}..{_num(hi)} ({unit}), got {_num(v)}")
            elif not math.isfinite(v):
                raise UsageError(f"{name} must be a finite number, got {v}")


def _num(x: float) -> str:
    """A bound or value as written: 1000000, 0.1, 1e+300, inf, nan."""
    return str(int(x)) if isinstance(x, int) or (math.isfinite(x) and x == int(x) and abs(x) < 1e15) else f"{x:g}"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`error: PROG: argument --x: ...`, exit 2, no usage block) and every numeric
    option checked against BOUNDS right after parsing, before the command loads anything. Subcommand parsers made
    with add_subparsers() are of this class too."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message}\n")

    def parse_known_args(self, args=None, namespace=None):
        ns, rest = super().parse_known_args(args, namespace)
        if namespace is None:   # (a subcommand's parser is called with None too: its options are checked twice)
            check_numbers(self, ns)   # UsageError: one line and exit 2 from errors.run_command, main() returns 2
        return ns, rest
