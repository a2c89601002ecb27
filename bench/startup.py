"""Start-up time: ``import dualwrite`` and the command line, against a bare interpreter.

Each case runs as a fresh process ``--runs`` times, interleaved with a bare ``python -c pass`` so
that the machine's load hits all of them alike; the figures are medians, and each is also given as
a ratio to the bare interpreter measured in the same run. The goal (issue 20) is under 0.3 s.

    python bench/startup.py            # 15 runs of each
    python bench/startup.py --runs 31
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

CLI = "from dualwrite.cli import main; main()"

#: The cases the issue's goal (under 0.3 s) is about; the others are shown for what they cost.
GOALS = {"python -c 'import dualwrite'", "dualwrite --help", "dualwrite config check --help"}

#: What is timed: a name, then the command line after the interpreter.
CASES: tuple[tuple[str, list[str]], ...] = (
    ("python -c pass (baseline)", ["-c", "pass"]),
    ("python -c 'import dualwrite'", ["-c", "import dualwrite"]),
    (
        "python -c 'import dualwrite; dualwrite.Settings'",
        ["-c", "import dualwrite; dualwrite.Settings"],
    ),
    ("dualwrite --help", ["-c", CLI, "--help"]),
    ("dualwrite --version", ["-c", CLI, "--version"]),
    ("dualwrite config check --help", ["-c", CLI, "config", "check", "--help"]),
    ("dualwrite report --help", ["-c", CLI, "report", "--help"]),
)


def _once(args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    """Time every case, interleaved, and print medians and ratios to the bare interpreter."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="runs of each case (default 15)")
    options = parser.parse_args()
    for _, args in CASES:  # warm the file cache and the bytecode
        _once(args)
    times: dict[str, list[float]] = {name: [] for name, _ in CASES}
    for _ in range(options.runs):
        for name, args in CASES:
            times[name].append(_once(args))
    baseline = statistics.median(times[CASES[0][0]])
    print(f"{options.runs} runs each, medians; Python {sys.version.split()[0]}")
    print(f"{'case':<52} {'median':>9} {'p90':>9} {'x bare':>8}")
    for name, samples in times.items():
        median = statistics.median(samples)
        p90 = sorted(samples)[int(0.9 * (len(samples) - 1))]
        verdict = "" if name not in GOALS else ("  goal met" if median < 0.3 else "  over 0.3 s")
        print(
            f"{name:<52} {median * 1000:7.1f}ms {p90 * 1000:7.1f}ms {median / baseline:7.1f}x{verdict}"
        )


if __name__ == "__main__":
    main()
