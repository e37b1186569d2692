"""Output of the step benchmark: the printed table, the JSON file and the plot."""

from __future__ import annotations

import datetime
import json
import os
import platform
from importlib import metadata

COLUMNS = [("workload", "<", 9), ("algorithm", "<", 12), ("implementation", "<", 22),
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


class Table:
    """Prints rows as each (workload, algorithm) group completes."""

    def __init__(self, markdown):
        self.markdown = markdown

    def _line(self, cells):
        if self.markdown:
            return "| " + " | ".join(cells) + " |"
        return "  ".join(f"{c:{align}{width}}" for c, (_, align, width) in zip(cells, COLUMNS))

    def header(self, info):
        v = info["versions"]
        print(f"fusedopt {v['fusedopt']} step benchmark: {info['dtype']}, {info['threads']} "
              f"threads, ISA {info['isa']}")
        others = ", ".join(f"{k} {x}" for k, x in v.items() if k != "fusedopt")
        print(f"{info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB; {others}")
        print(f"{info['date']}, load average {info['load_average_start']} (other work on the "
              "machine adds noise)")
        print()
        print(self._line([c[0] for c in COLUMNS]))
        if self.markdown:
            print("|" + "|".join("---:" if a == ">" else "---" for _, a, _ in COLUMNS) + "|")
        else:
            print("-" * (sum(w for _, _, w in COLUMNS) + 2 * (len(COLUMNS) - 1)))

    def rows(self, rows):
        for k, r in enumerate(rows):
            name = r["impl"] + (" *" if r["best_competitor"] else "")
            cells = [r["workload"] if k == 0 else "", r["algo"] if k == 0 else "", name,
                     _num(r["ms"]), _num(r["us_per_tensor"]), f"{r['gbps']:.1f}",
                     f"{r['pct_limit']:.1f}",
                     f"{r['vs_best']:.2f}x" if r["vs_best"] is not None else ""]
            print(self._line(cells), flush=True)

    def footer(self, wall, skipped):
        print()
        print("limit: an in-place streaming kernel with the algorithm's reads and writes, run "
              "in the same process;\n  % limit = its time on the implementation's own "
              "buffers / the implementation's time, the median\n  over rounds timed together "
              "(the limit row: on buffers of its own). GB/s counts the ideal bytes:\n  each "
              "input read once, each output written once.")
        print("vs best: the best competitor's time / fusedopt's time (above 1: fusedopt is "
              "faster), likewise; * marks\n  that competitor. NumPy by hand runs on one thread. "
              "ms/step: medians.")
        if skipped:
            print(f"Installed but not in the default run: {', '.join(skipped)} (--impls all "
                  "adds it).")
        print(f"wall time: {wall:.1f} s, load average now {_load()}")


def write_json(path, info, results, wall):
    with open(path, "w") as f:
        json.dump({"machine": info, "wall_s": round(wall, 2), "load_average_end": _load(),
                   "results": results}, f, indent=1)


def plot(path, results, info):
    """Bars of % of the limit per implementation, one panel per workload. The tiny
    workload fits in cache, so its panel shows the time per tensor instead."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in results))
    keys = list(dict.fromkeys(r["key"] for r in results if r["kind"] != "limit"))
    colors = {k: f"C{i}" for i, k in enumerate(keys)}
    fig, axes = plt.subplots(len(workloads), 1, figsize=(12, 3 * len(workloads) + 0.6),
                             squeeze=False)
    for ax, w in zip(axes[:, 0], workloads):
        rows = [r for r in results if r["workload"] == w and r["kind"] != "limit"]
        algos = list(dict.fromkeys(r["algo"] for r in rows))
        width = 0.8 / len(keys)
        per_tensor = w == "tiny"
        for j, key in enumerate(keys):
            xs, ys = [], []
            for i, a in enumerate(algos):
                for r in rows:
                    if r["algo"] == a and r["key"] == key:
                        xs.append(i + (j - (len(keys) - 1) / 2) * width)
                        ys.append(r["us_per_tensor"] if per_tensor else r["pct_limit"])
            ax.bar(xs, ys, width, color=colors[key], label=key)
        if per_tensor:
            ax.set_yscale("log")
            ax.set_ylabel("µs per tensor")
        else:
            ax.axhline(100, color="black", linewidth=0.8)
            ax.set_ylabel("% of limit")
        ax.set_xticks(range(len(algos)), algos)
        ax.set_xlim(-0.5, max(len(algos), 3) - 0.5)
        ax.set_title(w)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(keys), fontsize="small")
    top = 1 - 0.7 / fig.get_figheight()  # room for the legend and the title
    fig.suptitle(f"{info['dtype']}, {info['threads']} threads, {info['cpu']}", y=top + 0.1 * (1 - top))
    fig.tight_layout(rect=(0, 0, 1, top))
    fig.savefig(path, dpi=120)
    plt.close(fig)
