"""One screen on a GPU check's folder (scripts/gpu_check.sh): its steps (exit code,
seconds, limit), the tests passed and failed per op and backend, the device's measured
ceilings, and per op and lmkern backend the headline throughput (forward+backward, or
forward for a forward-only op) of the largest case measured, as % of the measured ceiling
(copy bandwidth for GB/s, the matrix-product rate for TFLOP/s; the datasheet peak when no
ceiling was measured) and as a ratio to the best other provider.

    python -m benchmarks.summary FOLDER
"""

import collections
import glob
import json
import os
import sys
import xml.etree.ElementTree as ElementTree

from .report import PASS_NAMES, headline_pass

BACKENDS = ("torch", "triton", "native")


def test_counts(junit_paths):
    """{(op, backend): Counter(outcome)} over pytest's JUnit XML files; the op is the test
    module's name (tests/test_<op>.py), the backend the test's backend parameter ("-" if
    it has none)."""
    counts = collections.defaultdict(collections.Counter)
    for path in junit_paths:
        for case in ElementTree.parse(path).iter("testcase"):
            op = case.get("classname", "").split(".")[-1].removeprefix("test_")
            params = case.get("name", "").partition("[")[2].rstrip("]").split("-")
            backend = next((p for p in params if p in BACKENDS), "-")
            outcome = "passed"
            for child in case:
                if child.tag in ("failure", "error"):
                    outcome = "failed"
                elif child.tag == "skipped":
                    outcome = "skipped"
            counts[(op, backend)][outcome] += 1
    return counts


def headlines(result, ceilings):
    """Lines for an op's largest case: each lmkern backend's throughput in the headline
    pass, its % of the ceiling and its ratio to the best other provider."""
    pass_name = headline_pass(result)
    rows = [row for row in result["rows"] if row.get("pass_name") == pass_name]
    if not rows:
        return [f"{result['op']}: no {PASS_NAMES[pass_name]} measurement"]
    label = rows[-1]["label"]
    rows = [row for row in rows if row["label"] == label]
    peers = [row for row in rows if not row["provider"].startswith("lmkern")]
    best_peer = max(peers, key=lambda row: row["throughput"], default=None)
    ceiling = ceilings.get(result["metric"])
    lines = [f"{result['op']} {label} ({PASS_NAMES[pass_name]}, {result['metric']}):"]
    for row in rows:
        if not row["provider"].startswith("lmkern"):
            continue
        text = f"  {row['provider']:<14} {row['throughput']:9.1f}"
        if ceiling:
            text += f"  {100 * row['throughput'] / ceiling:5.1f}% of measured ceiling"
        elif row["percent_of_peak"] is not None:
            text += f"  {row['percent_of_peak']:5.1f}% of datasheet peak"
        if best_peer is not None:
            text += f"  {row['throughput'] / best_peer['throughput']:.2f}x {best_peer['provider']}"
        lines.append(text)
    if best_peer is None:
        lines.append("  (no other provider measured)")
    return lines


def summary(folder):
    lines = [f"GPU check in {folder}"]
    steps = os.path.join(folder, "steps.txt")
    if os.path.exists(steps):
        with open(steps) as file:
            lines += ["steps (name, exit code, seconds, limit; 124 = stopped at its limit):",
                      "  " + "; ".join(line.strip() for line in file)]
    junits = sorted(glob.glob(os.path.join(folder, "*.xml")))
    if junits:
        counts = test_counts(junits)
        total = sum(counts.values(), collections.Counter())
        lines.append(f"tests: {total['passed']} passed, {total['failed']} failed, {total['skipped']} skipped "
                     "(per op and backend: passed/failed)")
        by_op = collections.defaultdict(dict)
        for (op, backend), count in counts.items():
            by_op[op][backend] = f"{count['passed']}/{count['failed']}"
        for op, cells in sorted(by_op.items()):
            lines.append(f"  {op:<26} " + "  ".join(f"{backend} {cell}" for backend, cell in sorted(cells.items())))
    else:
        lines.append("tests: no JUnit files (no test step ran)")
    ceilings = {}
    ceilings_path = os.path.join(folder, "results", "ceilings.json")
    if os.path.exists(ceilings_path):
        with open(ceilings_path) as file:
            ceilings = json.load(file)
        lines.append(f"ceilings: copy {ceilings['GB/s']:.0f} GB/s ({ceilings['copy']}), matrix product "
                     f"{ceilings['TFLOP/s']:.1f} TFLOP/s ({ceilings['matmul']})")
    results = sorted(path for path in glob.glob(os.path.join(folder, "results", "*.json")) if path != ceilings_path)
    if not results:
        lines.append("benchmarks: no results")
    for path in results:
        with open(path) as file:
            lines += headlines(json.load(file), ceilings)
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary(sys.argv[1]))
