#!/usr/bin/env python3
"""Reads a server log written with RUST_LOG=...,lipstream::lipsync::renderer=trace (serve_ab.sh:
SERVE_LOG="info,lipstream::lipsync::renderer=trace") and prints, per run of sessions (runs are
split at gaps of more than 3 s) and per second of it, the GPU time the renderer's batches took,
the frames given up and how many batches of each profile it ran; then each profile's batch times.

    python3 scripts/device/batch_trace.py serve.log
"""
import collections
import datetime
import re
import statistics
import sys

ANSI = re.compile(r"\x1b\[[0-9;]*m")
FIELD = re.compile(r"(\w+)=([-\w.]+)")


def events(path):
    for line in open(path, errors="replace"):
        line = ANSI.sub("", line)
        kind = "decided" if "batch decided" in line else "done" if "batch done" in line else None
        if kind:
            at = datetime.datetime.fromisoformat(line[:26]).timestamp()
            yield at, kind, dict(FIELD.findall(line))


def main(path):
    runs, run = [], []
    for e in events(path):
        if run and e[0] - run[-1][0] > 3:
            runs.append(run)
            run = []
        run.append(e)
    if run:
        runs.append(run)
    if not runs:
        sys.exit(f"{path}: no batch trace lines (was the renderer's trace level on?)")
    t0 = runs[0][0][0]
    for run in runs:
        start = run[0][0]
        print(f"run from {start - t0:.1f} s, {run[-1][0] - start:.1f} s long")
        print("second  batch GPU ms  given up  batches by profile")
        per = collections.defaultdict(collections.Counter)
        times = collections.defaultdict(list)
        for at, kind, f in run:
            s = per[int(at - start)]
            if kind == "decided":
                s[int(f["profile"])] += 1
                s["late"] += int(f["late"])
            else:
                s["ms"] += float(f["ms"])
                times[int(f["profile"])].append(float(f["ms"]))
        for sec in sorted(per):
            s = per[sec]
            batches = " ".join(f"B{p}:{n}" for p, n in sorted((k, v) for k, v in s.items() if isinstance(k, int) and k))
            print(f"{sec:6d}  {s['ms']:12.0f}  {s['late']:8d}  {batches}")
        for p in sorted(times):
            t = times[p]
            print(f"  B={p}: {len(t)} batches, mean {statistics.mean(t):.2f} ms, median "
                  f"{statistics.median(t):.2f}, {min(t):.2f} .. {max(t):.2f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "serve.log")
