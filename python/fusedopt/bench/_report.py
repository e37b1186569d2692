"""Output of the step benchmark: the printed table, the JSON file and the plot."""

from __future__ import annotations

import datetime
import json
import os
import platform
from importlib import metadata

COLUMNS = [("workload", "<", 9), ("algorithm", "<", 18), ("implementation", "<", 38),
           ("ms/step", ">", 9), ("µs/tensor", ">", 10), ("GB/s", ">", 6), ("% limit", ">", 7),
           ("vs best", ">", 7)]


def _version(dist):
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_info(args, threads, impls):
    import numpy as np

    import fusedopt

    versions = {"python": platform.python_version(), "numpy": np.__version__,
                "fusedopt": fusedopt.__version__}
    keys = [i.key for i in impls]
    if any(k.startswith(("torch", "deepspeed")) for k in keys):
        versions["torch"] = _version("torch")
    if "deepspeed" in keys:
        versions["deepspeed"] = _version("deepspeed")
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": _cpu_model(), "cores": os.cpu_count(), "memory_gib": _memory_gib(),
        "platform": platform.platform(), "isa": fusedopt._cpu.get_isa(), "threads": threads,
        "dtype": args.dtype, "repeats": args.repeats or "auto", "seed": args.seed,
        "implementations": [i.key for i in impls], "versions": versions,
        "load_average_start": _load(),
    }


def _load():
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _num(x):
    if x >= 100:
        return f"{x:.1f}"
    if x >= 10:
        return f"{x:.2f}"
    if x >= 1:
        return f"{x:.3f}"
    return f"{x:.4f}"


def header_lines(info, markdown=False):
    """The lines above the table: what ran where, and which competitors are missing."""
    v = info["versions"]
    others = ", ".join(f"{k} {x}" for k, x in v.items() if k != "fusedopt")
    keys = info["implementations"]
    ours = [k for k in keys if k.startswith("fusedopt")]
    theirs = [k for k in keys if not k.startswith("fusedopt")]
    lines = [f"fusedopt {v['fusedopt']} step benchmark: {info['dtype']}, {info['threads']} "
             f"threads, ISA {info['isa']}",
             f"{info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB; {others}",
             f"{info['date']}, load average {info['load_average_start']} (other work on the "
             "machine adds noise)",
             f"fusedopt ({', '.join(ours)}) against: {', '.join(theirs) or 'nothing'}"]
    for m in info.get("missing", []):
        lines.append(f"not installed: {m['name']} ({m['how']})")
    if info.get("not_run"):
        lines.append(f"installed but not in the default run: {', '.join(info['not_run'])} "
                     "(--impls all adds it)")
    if markdown:
        lines = [lines[0], ""] + [f"- {line}" for line in lines[1:]]
    return lines + [""] + _column_lines(markdown)


def _column_lines(markdown):
    if markdown:
        return [_line([c[0] for c in COLUMNS], True),
                "|" + "|".join("---:" if a == ">" else "---" for _, a, _ in COLUMNS) + "|"]
    return [_line([c[0] for c in COLUMNS], False),
            "-" * (sum(w for _, _, w in COLUMNS) + 2 * (len(COLUMNS) - 1))]


def _line(cells, markdown):
    if markdown:
        return "| " + " | ".join(cells) + " |"
    return "  ".join(f"{c:{align}{width}}" for c, (_, align, width) in zip(cells, COLUMNS))


def row_lines(rows, markdown=False):
    """The lines of one (workload, algorithm) group of rows."""
    lines = []
    for k, r in enumerate(rows):
        name = r["impl"] + (" *" if r["best_competitor"] else "")
        cells = [r["workload"] if k == 0 else "", r["algo"] if k == 0 else "", name,
                 _num(r["ms"]), _num(r["us_per_tensor"]), f"{r['gbps']:.1f}",
                 f"{r['pct_limit']:.1f}",
                 f"{r['vs_best']:.2f}x" if r["vs_best"] is not None else ""]
        lines.append(_line(cells, markdown))
    return lines


FOOTER = """\
limit: a measured streaming kernel, not a hardware bound: fusedopt's CPU driver reading and
  writing the same arrays as the step (for Adam: read p, g, m, v; write p, m, v) and
  computing nothing, run on the implementation's own buffers in the same rounds. % limit =
  the limit's time / the step's time, the median over rounds (the limit row: on buffers of
  its own). A step can beat the limit by a few percent (above 100) when its access pattern
  streams better: its loads and stores interleave differently, which the prefetchers and
  the write-back of this machine may favour.
GB/s counts the ideal bytes: each input read once, each output written once.
vs best: the best competitor's time / fusedopt's time (above 1: fusedopt is faster),
  likewise; * marks that competitor. NumPy by hand runs on one thread. ms/step: medians."""


def footer_lines(wall, skipped, markdown=False):
    lines = FOOTER.splitlines()
    if skipped:
        lines.append(f"Installed but not in the default run: {', '.join(skipped)} (--impls all "
                     "adds it).")
    lines.append(f"wall time: {wall:.1f} s, load average now {_load()}")
    if markdown:
        lines = [line if line.startswith("  ") else f"- {line}" for line in lines]
    return [""] + lines


class Table:
    """Prints the table's rows as each (workload, algorithm) group completes, each line
    through `emit` (print by default)."""

    def __init__(self, markdown, emit=print):
        self.markdown, self.emit = markdown, emit

    def header(self, info):
        for line in header_lines(info, self.markdown):
            self.emit(line)

    def rows(self, rows):
        for line in row_lines(rows, self.markdown):
            self.emit(line)

    def footer(self, wall, skipped):
        for line in footer_lines(wall, skipped, self.markdown):
            self.emit(line)


def _groups(results):
    """The rows of `results` in runs of one (workload, algorithm) each."""
    groups = []
    for r in results:
        if groups and (groups[-1][0]["workload"], groups[-1][0]["algo"]) == \
                (r["workload"], r["algo"]):
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


def write_table(path, info, results, wall, skipped, markdown):
    """The whole table, as printed, in a text (or Markdown) file."""
    lines = header_lines(info, markdown)
    for group in _groups(results):
        lines += row_lines(group, markdown)
    lines += footer_lines(wall, skipped, markdown)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def write_json(path, info, results, wall):
    with open(path, "w") as f:
        json.dump({"machine": info, "wall_s": round(wall, 2), "load_average_end": _load(),
                   "results": results}, f, indent=1)


# Colours by implementation: blues for fusedopt's, warm colours and grey for the others.
COLORS = {"fusedopt": "#1f77b4", "fusedopt-class": "#6baed6", "fusedopt-torch": "#08306b",
          "numpy": "#8c8c8c", "torch-loop": "#fdae6b", "torch-foreach": "#f16913",
          "torch-fused": "#a63603", "deepspeed": "#807dba"}


def plot(path, results, info):
    """One panel per workload: a bar per implementation and algorithm, its % of the limit,
    with the limit as a line at 100 %. The tiny workload fits in cache and measures the
    cost per tensor, so its panel shows µs per tensor (lower is better) and the limit's
    as the line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in results))
    keys = list(dict.fromkeys(r["key"] for r in results if r["kind"] != "limit"))
    labels = {r["key"]: _legend_label(r) for r in results if r["kind"] != "limit"}
    colors = {k: COLORS.get(k, f"C{i}") for i, k in enumerate(keys)}
    algos_of = {w: list(dict.fromkeys(r["algo"] for r in results if r["workload"] == w))
                for w in workloads}
    widest = max(len(a) for a in algos_of.values())
    fig_w = min(16.0, max(7.0, 1.6 + widest * (0.28 * len(keys) + 0.5)))
    fig, axes = plt.subplots(len(workloads), 1, figsize=(fig_w, 2.9 * len(workloads) + 1.2),
                             squeeze=False)
    for ax, w in zip(axes[:, 0], workloads):
        rows = [r for r in results if r["workload"] == w]
        algos = algos_of[w]
        per_tensor = w == "tiny"
        width = 0.84 / len(keys)
        tops = []
        missing = []  # (x, key) of an implementation that has no step for an algorithm
        for j, key in enumerate(keys):
            xs, ys = [], []
            for i, a in enumerate(algos):
                x = i + (j - (len(keys) - 1) / 2) * width
                found = [r for r in rows if r["algo"] == a and r["key"] == key]
                for r in found:
                    xs.append(x)
                    ys.append(r["us_per_tensor"] if per_tensor else r["pct_limit"])
                if not found:
                    missing.append(x)
            bars = ax.bar(xs, ys, width * 0.92, color=colors[key], label=labels[key])
            tops += ys
            bar_px = 110 * 0.85 * fig_w / (len(algos) * len(keys))
            ax.bar_label(bars, [_short(y) for y in ys], fontsize=6.5, padding=1.5,
                         rotation=0 if bar_px >= 20 else 90)
        for x in missing:
            ax.annotate("n/a", (x, 0), xytext=(0, 2), textcoords="offset points",
                        xycoords=("data", "axes fraction"), ha="center", va="bottom",
                        fontsize=6.5, color="0.4", rotation=90)
        limits = [r for r in rows if r["kind"] == "limit"]
        if per_tensor:
            for i, a in enumerate(algos):
                lim = [r["us_per_tensor"] for r in limits if r["algo"] == a]
                if lim:
                    ax.hlines(lim[0], i - 0.46, i + 0.46, colors="black", linewidth=1.4,
                              linestyles="--", label=LIMIT_LABEL if i == 0 else None)
            ax.set_yscale("log")
            lo, hi = min(tops + [r["us_per_tensor"] for r in limits]), max(tops)
            ax.set_ylim(lo / 2, hi * 2.5)
            ax.set_ylabel("µs per tensor\n(lower is better)")
        else:
            ax.axhline(100, color="black", linewidth=1.4, linestyle="--", label=LIMIT_LABEL)
            ax.set_ylim(0, max(125, max(tops, default=0) * 1.22))
            ax.set_ylabel("% of limit\n(higher is better)")
        ax.set_xticks(range(len(algos)), algos)
        ax.set_xlim(-0.5, len(algos) - 0.5)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        ax.set_title(_workload_title(w, rows), fontsize=10, loc="left")
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    legend = {}
    for ax in axes[:, 0]:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(name, handle)
    height = fig.get_figheight()
    # a plain text, not a suptitle, for which tight_layout would keep room of its own
    fig.text(0.5, 1 - 0.12 / height, f"Optimizer step against the limit: {info['dtype']}, "
             f"{info['threads']} threads, {info['cpu']}", fontsize=11, ha="center", va="top")
    ncol = max(1, min(len(legend), int((fig_w - 0.4) / 2.3)))
    box = fig.legend(legend.values(), legend.keys(), loc="upper center", ncol=ncol,
                     fontsize=8.5, frameon=False, bbox_to_anchor=(0.5, 1 - 0.42 / height))
    fig.canvas.draw()
    legend_bottom = box.get_window_extent().transformed(fig.transFigure.inverted()).y0
    fig.tight_layout(rect=(0, 0, 1, legend_bottom - 0.08 / height))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _legend_label(row):
    names = {"fusedopt": "fusedopt functional", "fusedopt-class": "fusedopt class",
             "fusedopt-torch": "fusedopt.torch", "numpy": "NumPy by hand (1 thread)",
             "torch-loop": "torch.optim for-loop", "torch-foreach": "torch.optim foreach",
             "torch-fused": "torch.optim fused", "deepspeed": "DeepSpeed CPU"}
    return names.get(row["key"], row["key"])


LIMIT_LABEL = "limit: a streaming kernel with the step's reads and writes"


def _workload_title(name, rows):
    r = rows[0]
    numel, tensors = r["elements"], r["tensors"]
    what = "µs per tensor" if name == "tiny" else "% of the limit"
    if numel % tensors == 0:
        per = numel // tensors
        size = f"{per // 2**20}M" if per % 2**20 == 0 else \
            f"{per // 2**10}K" if per % 2**10 == 0 else str(per)
        shape = f"{tensors} tensor{'s' if tensors != 1 else ''} of {size} elements"
    else:
        shape = f"{tensors} tensors, {numel / 1e6:.3g}M elements"
    return f"{name}: {shape} ({what})"


def _short(y):
    return f"{y:.0f}" if y >= 10 else f"{y:.2g}"
