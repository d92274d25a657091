"""One screen on a GPU check's folder (scripts/gpu_check.sh): which steps ran, tests
passed and failed per backend and device, and per op the headline forward+backward
throughput of lmkern's best backend, as % of the device's peak and as a ratio to the best
other provider.

    python -m benchmarks.summary FOLDER
"""

import collections
import glob
import json
import os
import sys
import xml.etree.ElementTree as ElementTree

from .report import PASS_NAMES, headline_pass, rate_text

BACKENDS = ("torch", "triton", "native")
DEVICES = ("cpu", "cuda")


def test_counts(junit_path):
    """{(backend, device): Counter(outcome)} from pytest's JUnit XML; tests without a
    backend parameter count under ("other", "")."""
    counts = collections.defaultdict(collections.Counter)
    for case in ElementTree.parse(junit_path).iter("testcase"):
        params = case.get("name", "").partition("[")[2].rstrip("]").split("-")
        backend = next((p for p in params if p in BACKENDS), "other")
        device = next((p for p in params if p in DEVICES), "")
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
            elif child.tag == "skipped":
                outcome = "skipped"
        counts[(backend, device)][outcome] += 1
    return counts


def headline(result):
    """For the op's largest case: lmkern's best throughput in the op's headline pass
    (forward+backward, or forward for a forward-only op), its % of peak, and its ratio to
    the best other provider."""
    pass_name = headline_pass(result)
    rows = [row for row in result["rows"] if row.get("pass_name") == pass_name]
    if not rows:
        return f"{result['op']}: no {PASS_NAMES[pass_name]} measurement"
    label = rows[-1]["label"]
    rows = [row for row in rows if row["label"] == label]
    ours = max((row for row in rows if row["provider"].startswith("lmkern")), key=lambda r: r["throughput"], default=None)
    others = max((row for row in rows if not row["provider"].startswith("lmkern")), key=lambda r: r["throughput"],
                 default=None)
    if ours is None:
        return f"{result['op']} {label}: no lmkern backend measured"
    text = f"{result['op']} {label}: {ours['provider']} {ours['throughput']:.1f} {result['metric']}"
    if ours["percent_of_peak"] is not None:
        text += f" ({ours['percent_of_peak']:.0f}% of peak)"
    text += rate_text(ours, result)
    if others is not None:
        text += f", {ours['throughput'] / others['throughput']:.2f}x {others['provider']}"
    return text


def summary(folder):
    lines = [f"GPU check in {folder}"]
    steps = os.path.join(folder, "steps.txt")
    if os.path.exists(steps):
        with open(steps) as file:
            lines += ["steps (name, exit code, seconds):", *("  " + line.strip() for line in file)]
    junit = os.path.join(folder, "tests.xml")
    if os.path.exists(junit):
        counts = test_counts(junit)
        total = sum(counts.values(), collections.Counter())
        lines.append(f"tests: {total['passed']} passed, {total['failed']} failed, {total['skipped']} skipped")
        for (backend, device), count in sorted(counts.items()):
            lines.append(
                f"  {backend:<7} {device:<5} {count['passed']:>5} passed {count['failed']:>4} failed "
                f"{count['skipped']:>5} skipped"
            )
    else:
        lines.append("tests: no tests.xml (the tests did not run)")
    results = sorted(glob.glob(os.path.join(folder, "results", "*.json")))
    lines.append("benchmarks (headline pass, largest case):" if results else "benchmarks: no results")
    for path in results:
        with open(path) as file:
            lines.append("  " + headline(json.load(file)))
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary(sys.argv[1]))
