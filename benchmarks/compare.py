"""Two runs of the suite side by side: for every op, case, pass and provider that both
measured, the median time before and after and their ratio. Run both on the same machine
in one sitting (ideally op by op, alternating), so that the ratio is the change's.

    python -m benchmarks.compare BEFORE_DIR AFTER_DIR [--out FILE]

A provider that is not lmkern's (torch eager, torch.compile, ...) ran the same code both
times: its ratios show how far the machine's noise reaches.
"""

import argparse
import glob
import json
import os


def rows_by_key(path):
    with open(path) as file:
        result = json.load(file)
    rows = {
        (row["label"], row.get("pass_name"), row["provider"]): row
        for row in result["rows"]
        if "median_ms" in row
    }
    return result, rows


def op_table(before_path, after_path):
    before, before_rows = rows_by_key(before_path)
    after, after_rows = rows_by_key(after_path)
    lines = [
        f"## {after['op']}",
        "",
        f"{after['dtype']}; before: commit {before['commit']}, {before['date']}; after: commit {after['commit']}, "
        f"{after['date']}.",
        "",
        "| case | pass | provider | before (ms) | after (ms) | after / before |",
        "|---|---|---|---|---|---|",
    ]
    for key, row in after_rows.items():
        if key in before_rows:
            old, new = before_rows[key]["median_ms"], row["median_ms"]
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {old:.3f} | {new:.3f} | {new / old:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", help="folder of <op>.json files")
    parser.add_argument("after", help="folder of <op>.json files")
    parser.add_argument("--out", help="write the tables to this file (default: print them)")
    args = parser.parse_args(argv)
    sections = []
    for after_path in sorted(glob.glob(os.path.join(args.after, "*.json"))):
        before_path = os.path.join(args.before, os.path.basename(after_path))
        if os.path.exists(before_path):
            sections.append(op_table(before_path, after_path))
    if not sections:
        raise SystemExit(f"no <op>.json is in both {args.before} and {args.after}")
    text = "\n".join(sections)
    if args.out:
        with open(args.out, "w") as file:
            file.write(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
