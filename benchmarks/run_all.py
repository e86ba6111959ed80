"""Regenerates ``benchmarks/RESULTS.md``: states the machine, runs every benchmark script, and stitches in
every ``benchmarks/results/*.md`` fragment with the exact command that produced it.

    python benchmarks/run_all.py                   # everything (about 5-8 minutes on 2 CPU cores)
    python benchmarks/run_all.py --skip suite      # skip a script (by fragment name); its old fragment stays
    python benchmarks/run_all.py --no-run          # only re-stitch the fragments already there

A script takes part by declaring, on one line, ``COMMAND = "python benchmarks/<script>.py --markdown
benchmarks/results/<name>.md ..."`` (or, failing that, by a usage line ``python benchmarks/<script>.py ...``
in its docstring): ``benchmarks/suite.py`` and every ``benchmarks/bench_*.py`` are scanned for it.
The fragment is the path after ``--markdown`` (default ``results/<script name without bench_>.md``).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BENCHMARKS = ROOT / "benchmarks"
RESULTS = BENCHMARKS / "results"
OUTPUT = BENCHMARKS / "RESULTS.md"
COMMAND = "python benchmarks/run_all.py"
_COMMAND_LINE = re.compile(r"""^COMMAND\s*=\s*(["'])(?P<command>.+?)\1\s*$""", re.MULTILINE)


@dataclass(frozen=True)
class Script:
    path: Path
    command: str | None
    fragment: Path


@dataclass(frozen=True)
class Run:
    seconds: float
    returncode: int | None  # None: timed out
    tail: str


def discover() -> list[Script]:
    """``suite.py`` first, then ``bench_*.py`` and the GPU-only ``gpu_*.py`` in name order, with their declared
    commands."""
    paths = [BENCHMARKS / "suite.py", *sorted(BENCHMARKS.glob("bench_*.py")), *sorted(BENCHMARKS.glob("gpu_*.py"))]
    scripts = []
    for path in paths:
        if not path.is_file():
            continue
        source = path.read_text(encoding="utf-8")
        match = _COMMAND_LINE.search(source)
        if match is None:  # a usage line in the docstring, e.g. "    python benchmarks/x.py --markdown ..."
            usage = re.compile(rf"^\s*(?P<command>python3? benchmarks/{re.escape(path.name)}(?: [^\n]*)?)$",
                               re.MULTILINE)
            match = usage.search(source)
        command = match.group("command").strip() if match else None
        markdown = re.search(r"--markdown\s+(\S+)", command or "")
        name = path.stem.removeprefix("bench_")
        fragment = ROOT / markdown.group(1) if markdown else RESULTS / f"{name}.md"
        scripts.append(Script(path, command, fragment))
    return scripts


def run_script(script: Script, timeout: float) -> Run:
    argv = shlex.split(script.command or "")
    if argv and argv[0] in ("python", "python3"):
        argv[0] = sys.executable  # the interpreter running this script, with its packages
    print(f"[run_all] {script.command}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        tail = (error.stderr or b"")[-2000:]
        return Run(time.perf_counter() - start, None, tail.decode(errors="replace") if isinstance(tail, bytes)
                   else str(tail))
    seconds = time.perf_counter() - start
    print(f"[run_all]   exit {done.returncode} after {seconds:.0f} s", file=sys.stderr, flush=True)
    return Run(seconds, done.returncode, done.stderr[-2000:])


# ------------------------------------------------------------------------------------------- machine
def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _memory_gib() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def machine_section(load_before: str | None) -> list[str]:
    import torch

    from torchbricks_fx.reporting import cpu_model

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU only)"
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    if load_before is None:
        load = "- stitched without running any script (`--no-run`): each fragment states its own run"
    else:
        load = (f"- load average (1 min) before / after the run: {load_before} / {_load()} (the machine was "
                f"shared with other processes; every script interleaves what it compares so that load hits all "
                f"alike, and keeps the best of several medians)")
    return ["## Machine", "",
            f"- date: {now}",
            f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores; memory {_memory_gib()}; GPU: {gpu}",
            f"- OS: {platform.platform()}; Python {platform.python_version()}",
            f"- torch {torch.__version__}, onnxruntime {_version('onnxruntime')}, onnx {_version('onnx')}, "
            f"onnxscript {_version('onnxscript')}, torchbricks (peer) {_version('torchbricks')}",
            load, ""]


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _load() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "unknown"


# ------------------------------------------------------------------------------------------- stitching
def fragment_section(script: Script | None, fragment: Path, run: Run | None) -> list[str]:
    relative = fragment.relative_to(ROOT).as_posix()
    if script is None or script.command is None:
        how = f"Produced by: command not declared (fragment `{relative}`)."
    else:
        how = f"Produced by: `{script.command}`"
        if run is not None:
            how += f" ({run.seconds:.0f} s this run)."
    lines = [f"<!-- {relative} -->", how]
    if run is not None and run.returncode != 0:
        status = "timed out" if run.returncode is None else f"failed with exit code {run.returncode}"
        stamp = datetime.datetime.fromtimestamp(fragment.stat().st_mtime).strftime("%Y-%m-%d %H:%M") \
            if fragment.exists() else None
        lines.append(f"**This run {status}**; " + (f"the fragment below is from an earlier run ({stamp})."
                                                      if stamp else "no fragment."))
        lines += ["", "```text", *run.tail.strip().splitlines()[-15:], "```"]
    lines.append("")
    if fragment.exists():
        lines += [fragment.read_text(encoding="utf-8").rstrip(), ""]
    return lines


def stitch(scripts: list[Script], runs: dict[Path, Run], load_before: str | None) -> str:
    lines = ["# Benchmark results", "",
             f"Regenerated by `{COMMAND}` (machine, then every script's fragment from `benchmarks/results/`). "
             "Benchmarks are scripts and reports, never timed assertions in tests: targets below are checked "
             "and printed as measured.", ""]
    lines += machine_section(load_before)
    by_fragment = {s.fragment: s for s in scripts}
    fragments = [s.fragment for s in scripts] + sorted(p for p in RESULTS.glob("*.md") if p not in by_fragment)
    for fragment in dict.fromkeys(fragments):
        if fragment.exists() or fragment in runs:
            lines += fragment_section(by_fragment.get(fragment), fragment, runs.get(fragment))
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip", action="append", default=[], metavar="NAME",
                        help="do not run this script (fragment name, e.g. suite, overhead); repeatable")
    parser.add_argument("--no-run", action="store_true", help="run nothing; stitch the existing fragments")
    parser.add_argument("--timeout", type=float, default=480, help="seconds per script (default 480)")
    args = parser.parse_args(argv)
    load_before = _load()
    scripts = discover()
    runs: dict[Path, Run] = {}
    for script in scripts:
        name = script.fragment.stem
        if args.no_run or name in args.skip or script.path.stem in args.skip:
            continue
        if script.path.name.startswith("gpu_") and not _has_cuda():
            print(f"[run_all] {script.path.name} needs a GPU; its last fragment is kept", file=sys.stderr)
            continue
        if script.command is None:
            print(f"[run_all] {script.path.name} declares no COMMAND; not run", file=sys.stderr)
            continue
        runs[script.fragment] = run_script(script, args.timeout)
    text = stitch(scripts, runs, None if args.no_run else load_before)
    partial = OUTPUT.with_name(f".{OUTPUT.name}.partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, OUTPUT)
    print(f"[run_all] wrote {OUTPUT.relative_to(ROOT)}", file=sys.stderr)
    failed = [run for run in runs.values() if run.returncode != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
