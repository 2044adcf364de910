"""Benchmark: ``convmat shape`` and ``convmat show`` on a large layer, as a user runs them.

Columns:
  command        what runs
  wall           wall time of the whole process (``python -m convmat ...``), best of --repeat
  in-process     ``main(argv)`` alone in an interpreter that has already imported convmat
                 (what the command itself costs), best of --repeat
  peak RSS       peak resident memory of the process (the wall-time run)

The first row, ``import convmat``, is the floor: starting Python and importing convmat (and
with it torch) is most of any command's wall time.

Run: python benchmarks/command.py [--repeat N] [--input 224,224] [--channels 64]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def _wall(args: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of one subprocess."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"{args!r} exited with {process.returncode}")
    return seconds, usage.ru_maxrss


def _in_process(argv: list[str], repeat: int) -> float:
    """Best wall seconds of ``main(argv)`` in a fresh interpreter that imported convmat first."""
    code = (
        "import io, sys, time, contextlib\n"
        "from convmat.presentation.cli import main\n"
        "best = float('inf')\n"
        f"for _ in range({repeat}):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        t = time.perf_counter()\n"
        f"        assert main({argv!r}) == 0\n"
        "        best = min(best, time.perf_counter() - t)\n"
        "print(best)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--input", default="224,224")
    parser.add_argument("--channels", default="64")
    opts = parser.parse_args()
    layer = ["--input", opts.input, "--kernel", "3", "--padding", "1",
             "--in-channels", opts.channels, "--out-channels", opts.channels]  # fmt: skip
    rows = [("import convmat", ["-c", "import convmat"], None)]
    for command in ("shape", "show"):
        rows.append((f"convmat {command}", ["-m", "convmat", command, *layer], [command, *layer]))
    print(f"layer: {' '.join(layer)}; best of {opts.repeat}")
    print(f"{'command':<16} {'wall':>8} {'in-process':>11} {'peak RSS':>10}")
    for name, args, argv in rows:
        runs = [_wall(args) for _ in range(opts.repeat)]
        wall = min(s for s, _ in runs)
        rss = max(k for _, k in runs)
        inner = "-" if argv is None else f"{_in_process(argv, opts.repeat) * 1e3:.1f} ms"
        print(f"{name:<16} {wall:>7.2f}s {inner:>11} {rss / 1024:>8.0f} MB")


if __name__ == "__main__":
    main()
