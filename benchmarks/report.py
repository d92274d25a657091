"""Result files of a benchmark run: <op>.json (every measurement and its stamp), <op>.md
(the table) and <op>.png (the headline pass's throughput per case and provider: forward+
backward, or forward for a forward-only op, or a model's training step or generation)."""

import json
import os


PASS_NAMES = {
    "fwd": "forward",
    "bwd": "backward",
    "fwd+bwd": "forward+backward",
    "step": "training step",  # forward, backward and optimizer (benchmarks/bench_models.py)
    "decode": "decoding step",
    "generate": "generation",
}


def headline_pass(result):
    """The pass a result is summed up by: its last (results written before ops declared
    their passes timed all three, forward+backward last)."""
    return result.get("passes", ["fwd+bwd"])[-1]


def rate_text(row, result):
    """", 1234 tokens/s" (three significant digits below 100) for an op that counts what
    it processes, else ""."""
    if "rate" not in row:
        return ""
    rate = row["rate"]
    return f", {rate:.0f} {result['rate_unit']}" if rate >= 100 else f", {rate:.3g} {result['rate_unit']}"


def _cell(row, result):
    if "absent" in row:
        return "absent"
    if "error" in row:
        return "error"
    percent = "" if row["percent_of_peak"] is None else f", {row['percent_of_peak']:.0f}%"
    return f"{row['median_ms']:.3f} ms ({row['throughput']:.1f} {result['metric']}{percent}{rate_text(row, result)})"


def markdown(result):
    providers = list(dict.fromkeys(row["provider"] for row in result["rows"]))
    labels = list(dict.fromkeys(row["label"] for row in result["rows"]))
    by_key = {}
    for row in result["rows"]:
        by_key[(row["label"], row.get("pass_name"), row["provider"])] = row
    versions = ", ".join(f"{name} {version}" for name, version in result["versions"].items())
    lines = [
        f"# {result['op']} on {result['device']}",
        "",
        f"{result['dtype']}{', quick sizes' if result['quick'] else ''}; commit {result['commit']}, "
        f"{result['date']}; {versions}.",
        "",
        f"Median time (throughput in {result['metric']}, % of the device's peak where known"
        f"{', ' + result['rate_unit'] if 'rate_unit' in result else ''}).",
        "",
        "| case | pass | " + " | ".join(providers) + " |",
        "|---|---|" + "---|" * len(providers),
    ]
    passes = list(dict.fromkeys(row["pass_name"] for row in result["rows"] if "pass_name" in row))
    for label in labels:
        for pass_name in passes:
            cells = []
            for provider in providers:
                row = by_key.get((label, pass_name, provider)) or by_key.get((label, None, provider))
                cells.append(_cell(row, result) if row else "")
            lines.append(f"| {label} | {pass_name} | " + " | ".join(cells) + " |")
    headline = headline_pass(result)
    lines += ["", f"Peak memory of {PASS_NAMES[headline]} above the inputs (MiB).", ""]
    lines += ["| case | " + " | ".join(providers) + " |", "|---|" + "---|" * len(providers)]
    for label in labels:
        cells = []
        for provider in providers:
            row = by_key.get((label, headline, provider))
            cells.append(f"{row['fwd_bwd_peak_mib']:.0f}" if row else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    notes = {row["provider"]: row["absent"] for row in result["rows"] if "absent" in row}
    notes.update({f"{row['provider']} on {row['label']}": row["error"] for row in result["rows"] if "error" in row})
    if notes:
        lines += ["", *(f"- {name}: {why}" for name, why in notes.items())]
    return "\n".join(lines) + "\n"


def plot(result, path):
    """Writes the PNG; returns False without matplotlib (a GPU check machine installs
    lmkern with --no-deps and may lack it), True otherwise."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")  # no display on benchmark machines
    import matplotlib.pyplot as plt

    table = {}
    headline = headline_pass(result)
    for row in result["rows"]:
        if row.get("pass_name") == headline:
            table.setdefault(row["provider"], {})[row["label"]] = row["throughput"]
    labels = list(dict.fromkeys(row["label"] for row in result["rows"]))
    figure, axes = plt.subplots(figsize=(max(6, 1.6 * len(labels)), 4))
    width = 0.8 / max(1, len(table))
    for index, (provider, values) in enumerate(table.items()):
        positions = [i + index * width for i, label in enumerate(labels) if label in values]
        axes.bar(positions, [values[label] for label in labels if label in values], width, label=provider)
    axes.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels, rotation=15)
    axes.set_ylabel(f"{PASS_NAMES[headline]} {result['metric']}")
    axes.set_title(f"{result['op']}, {result['dtype']}, {result['device']}", fontsize=9)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def write(result, folder):
    """Writes <op>.json, <op>.md and <op>.png (if matplotlib is there) into folder; returns
    the paths written."""
    os.makedirs(folder, exist_ok=True)
    stem = os.path.join(folder, result["op"])
    with open(stem + ".json", "w") as file:
        json.dump(result, file, indent=1)
    with open(stem + ".md", "w") as file:
        file.write(markdown(result))
    plotted = plot(result, stem + ".png")
    return [stem + ".json", stem + ".md"] + ([stem + ".png"] if plotted else [])
