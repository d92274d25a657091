"""Rewrites the README's results section from the committed result files: per device
under benchmarks/results/ and per op, the table of its headline pass (forward+backward,
or forward for a forward-only op) and the plot, each citing its file. Run it after
committing new results.

    python -m benchmarks.readme
"""

import glob
import json
import os

from .report import PASS_NAMES, headline_pass, rate_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
START, END = "<!-- results:start -->", "<!-- results:end -->"


def op_section(result, json_path):
    stem = os.path.splitext(os.path.relpath(json_path, ROOT))[0]
    headline = headline_pass(result)
    rows = [row for row in result["rows"] if row.get("pass_name") == headline]
    providers = list(dict.fromkeys(row["provider"] for row in result["rows"]))
    measured = [p for p in providers if any(row["provider"] == p for row in rows)]
    labels = list(dict.fromkeys(row["label"] for row in rows))
    by_key = {(row["label"], row["provider"]): row for row in rows}
    lines = [
        f"**{result['op']}** ({result['dtype']}; commit {result['commit']}, {result['date']}): {PASS_NAMES[headline]} "
        f"median time, {result['metric']}{', ' + result['rate_unit'] if 'rate_unit' in result else ''} and peak "
        f"memory. From [`{stem}.json`]({stem}.json); every pass and "
        f"provider in [`{stem}.md`]({stem}.md).",
        "",
        "| case | " + " | ".join(measured) + " |",
        "|---|" + "---|" * len(measured),
    ]
    for label in labels:
        cells = []
        for provider in measured:
            row = by_key.get((label, provider))
            cells.append(
                f"{row['median_ms']:.1f} ms, {row['throughput']:.1f}{rate_text(row, result)}, "
                f"{row['fwd_bwd_peak_mib']:.0f} MiB" if row else "-"
            )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    absent = [p for p in providers if p not in measured]
    if absent:
        lines += ["", f"Not measured here: {', '.join(absent)} (reasons in the .md)."]
    lines += ["", f"![{result['op']} on {result['device']}]({stem}.png)", ""]
    return lines


def section():
    lines = []
    for folder in sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "*", ""))):
        paths = sorted(glob.glob(os.path.join(folder, "*.json")))
        if not paths:
            continue
        results = [json.load(open(path)) for path in paths]
        versions = ", ".join(f"{name} {version}" for name, version in results[0]["versions"].items())
        lines += [f"### {results[0]['device']}", "", f"{versions}.", ""]
        for result, path in zip(results, paths):
            lines += op_section(result, path)
    return "\n".join(lines).rstrip() + "\n"


def main():
    with open(README) as file:
        text = file.read()
    before, _, rest = text.partition(START)
    _, _, after = rest.partition(END)
    if not rest:
        raise SystemExit(f"README.md has no {START} ... {END} section")
    with open(README, "w") as file:
        file.write(before + START + "\n" + section() + END + after)


if __name__ == "__main__":
    main()
