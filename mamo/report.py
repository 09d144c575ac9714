"""Δ and win rate against single-task learning (MAMO Eq 15), and the paper-style report of a run.

Rows are methods (STL, HPS, the grown model, ...), columns every (task, metric). As in MAMO Table 1, the
STL row shows absolute values and every other row the relative change against STL in percent, signed so
that "+" means better than STL; Δ and Win close each row. A second table gives every row's absolute values.
"""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path

import torch

import mamo
from mamo.runs import format_duration, table_lines
from mamo.tasks import TaskSpec
from mamo.trainer import mean_epoch_seconds
from mamo.writes import write_csv_atomically, write_text_atomically

Metrics = dict[str, dict[str, float]]


def metric_columns(tasks: dict[str, TaskSpec]) -> list[tuple[str, str, bool]]:
    """Every (task, metric, higher_is_better) that Δ and the win rate run over."""
    return [(name, m.name, m.higher_is_better) for name, spec in tasks.items() for m in spec.metrics]


def relative_changes(mtl: Metrics, stl: Metrics, tasks: dict[str, TaskSpec]) -> dict[tuple[str, str], float]:
    """(-1)^s (MTL - STL) / |STL| * 100 per metric, s = 0 where higher is better: positive means better.

    Where STL is exactly 0, Eq 15 is undefined; the difference is then taken against 1 (``(MTL - STL) * 100``), so
    Δ stays finite and keeps its sign.
    """
    changes = {}
    for task, metric, higher in metric_columns(tasks):
        reference = stl[task][metric]
        diff = mtl[task][metric] - reference
        sign = 1.0 if higher else -1.0
        changes[(task, metric)] = sign * diff / abs(reference) * 100.0 if reference != 0 else sign * diff * 100.0
    return changes


def delta(mtl: Metrics, stl: Metrics, tasks: dict[str, TaskSpec]) -> float:
    """MAMO Eq 15: the mean signed relative change over every metric of every task (those its spec chose), in
    percent."""
    changes = relative_changes(mtl, stl, tasks)
    return sum(changes.values()) / len(changes)


NEAR_ZERO = 1e-4  # an STL metric this close to 0 turns a tiny error there into a huge relative change


def near_zero_metrics(stl: Metrics, tasks: dict[str, TaskSpec]) -> str:
    """The STL metrics next to (but not at) 0, as "task.metric = value, …" ("" if none): Eq 15 divides by them,
    so one of them can decide Δ alone."""
    return ", ".join(f"{task}.{metric} = {stl[task][metric]:.1e}" for task, metric, _ in metric_columns(tasks)
                     if 0 < abs(stl[task][metric]) < NEAR_ZERO)


def near_zero_note(stl_val: Metrics, tasks: dict[str, TaskSpec]) -> str | None:
    """The log's note for a run whose report divides by an STL that scores a metric next to 0, or takes a metric
    at exactly 0 in points (:func:`relative_changes`); None if neither."""
    notes = []
    if shown := near_zero_metrics(stl_val, tasks):
        notes.append(f"note: STL scores {shown} on the validation split; the report's Δ divides by STL (Eq 15), so a "
                     "tiny error there decides it alone: read the per-metric columns.")
    zeros = [f"{task}.{metric}" for task, metric, _ in metric_columns(tasks) if stl_val[task][metric] == 0]
    if zeros:
        notes.append(f"note: STL scores {', '.join(zeros)} = 0 on the validation split, where Eq 15's relative change "
                     "is undefined; the report's Δ takes that change as (MTL − STL) × 100, in points, not percent.")
    return "\n".join(notes) or None


def win_rate(mtl: Metrics, stl: Metrics, tasks: dict[str, TaskSpec]) -> float:
    """The fraction of metrics on which the multi-task model is strictly better than STL, in [0, 1]."""
    changes = relative_changes(mtl, stl, tasks)
    return sum(1 for value in changes.values() if value > 0) / len(changes)


def build_rows(
    results: dict[str, dict], stl_name: str | None, tasks: dict[str, TaskSpec]
) -> list[dict]:
    """One row per method: its metrics, Δ and Win against the STL row (when there is one), params, time."""
    stl = results[stl_name]["tasks"] if stl_name else None
    rows = []
    for name, result in results.items():
        row = {"method": name, "tasks": result["tasks"], "params": result.get("params"),
               "seconds_per_epoch": result.get("seconds_per_epoch")}
        if stl is not None and name != stl_name:
            row["relative"] = relative_changes(result["tasks"], stl, tasks)
            row["delta"] = delta(result["tasks"], stl, tasks)
            row["win_rate"] = win_rate(result["tasks"], stl, tasks)
        elif stl is not None:
            row["delta"], row["win_rate"] = 0.0, 0.0
        rows.append(row)
    return rows


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.3e}"


def markdown_table(rows: list[dict], tasks: dict[str, TaskSpec], stl_name: str | None) -> str:
    columns = metric_columns(tasks)
    header = ["Method"] + [f"{t} {m} {'↑' if h else '↓'}" for t, m, h in columns]
    extra = ["Δ % ↑", "Win ↑"] if stl_name else []
    header += extra + ["Params", "s/epoch"]
    body = []
    for row in rows:
        cells = [row["method"]]
        for task, metric, _ in columns:
            if "relative" in row:
                cells.append(f"{row['relative'][(task, metric)]:+.2f}")
            else:
                cells.append(_fmt(row["tasks"][task][metric]))
        if stl_name:  # STL's own Win would read 0%: it is the reference, not a method that lost everywhere
            cells += [f"{row['delta']:+.2f}", f"{row['win_rate']:.0%}" if "relative" in row else "–"]
        cells += [f"{row['params']:,}" if row["params"] else "-", _fmt(row["seconds_per_epoch"], 3)]
        body.append(cells)
    return "\n".join(table_lines(header, body))


def absolute_table(rows: list[dict], tasks: dict[str, TaskSpec]) -> str:
    columns = metric_columns(tasks)
    header = ["Method"] + [f"{t} {m}" for t, m, _ in columns]
    body = [[row["method"], *(_fmt(row["tasks"][t][m]) for t, m, _ in columns)] for row in rows]
    return "\n".join(table_lines(header, body))


def write_report(
    run_dir: Path, title: str, rows: list[dict], tasks: dict[str, TaskSpec], stl_name: str | None, notes: str = "",
    grown: bool = False,
) -> str:
    """Write report.md and report.csv into ``run_dir``; returns the markdown (``grown``: a search's, whose last row
    is the grown network)."""
    parts = [f"# {title}", ""]
    if stl_name:
        parts += [
            f"Test metrics as the relative change against {stl_name} in % (+ is better than {stl_name}); the "
            f"{stl_name} row is absolute.",
            "Δ is MAMO Eq 15 over every metric in the table; Win is the share of them better than STL.",
        ]
    # Only what the table holds: a train run has no grown model, and without a cached STL no STL row.
    sums = [*(["STL's adds its networks'"] if any(row["method"] == "STL" for row in rows) else []),
            *(["a grown model's is its final phase's"] if grown else [])]
    parts += ["s/epoch is the training time of one epoch (validation excluded)" + (
        f"; {' and '.join(sums)}" if sums else "") + ".", ""]
    parts += [markdown_table(rows, tasks, stl_name), "", "Absolute test metrics:", "", absolute_table(rows, tasks)]
    if notes:
        parts += ["", notes]
    text = "\n".join(parts) + "\n"
    write_text_atomically(run_dir / "report.md", text)
    # s/epoch too, beside the params as in the markdown table (DESIGN §8); None (unknown) is written empty.
    table = [["method", "task", "metric", "value", "relative_to_stl_percent", "delta", "win_rate", "params",
              "seconds_per_epoch"]]
    for row in rows:
        for task, metric, _ in metric_columns(tasks):
            relative = row.get("relative", {}).get((task, metric))
            table.append([row["method"], task, metric, row["tasks"][task][metric],
                          "" if relative is None else relative, row.get("delta", ""), row.get("win_rate", ""),
                          row["params"], row["seconds_per_epoch"]])
    write_csv_atomically(run_dir / "report.csv", table)
    return text


def growth_notes(rounds: list[dict], counts: dict[str, int], dataset: str, module_name: str = "GMK modules") -> str:
    """The report's growth section: modules per detection round (MAMO Table 3's layout) and per position. A
    plugin's ``dataset`` (``data.name``) is shown without its folders."""
    dataset = dataset.replace("\\", "/").rsplit("/", 1)[-1]
    lines = ["## Growth", "", f"{module_name[0].upper()}{module_name[1:]} grown per detection round (MAMO Table 3 "
             "layout):", ""]
    header = ["Detection", *(f"MAMO-{r['round']}" for r in rounds)] if rounds else ["Detection", "(no rounds)"]
    lines += table_lines(header, [[dataset, *(str(r["modules"]) for r in rounds or [{"modules": "–"}])]])
    lines += ["", "Modules per activated (pair, cell):", ""]
    lines += [f"- {key}: {n}" for key, n in counts.items()] or ["- none (the network stayed HPS)"]
    return "\n".join(lines)


def time_notes(history: list[dict], phase_seconds: dict[str, float], total_seconds: float) -> str:
    """The report's time section: each search phase's epochs, wall time (a round's with its growth and pictures)
    and training seconds per epoch, what the rest of the run took (loading the data, the baselines, testing)
    and the whole."""
    lines = ["## Time", "", "| Phase | Epochs | Wall time | Training s/epoch |", "|---|---|---|---|"]
    for phase, seconds in phase_seconds.items():
        epochs = sum(h.get("phase") == phase for h in history)
        per_epoch = _fmt(mean_epoch_seconds(history, phase), 3) if epochs else "-"
        lines.append(f"| {phase} | {epochs or '-'} | {format_duration(seconds)} | {per_epoch} |")
    rest = max(0.0, total_seconds - sum(phase_seconds.values()))
    lines.append(f"| other: data, baselines, test | - | {format_duration(rest)} | - |")
    lines.append(f"| all | {len(history)} | {format_duration(total_seconds)} | - |")
    lines += ["", "A detection round's wall time includes growing the network and drawing the round's pictures."]
    return "\n".join(lines)


def run_environment(device: torch.device) -> dict:
    """What produced a run, for comparing results across machines: versions, device and thread count."""
    # torch's own string keeps the build (+cu130, +cpu); the package metadata drops it.
    versions = {"mamo": mamo.__version__, "python": platform.python_version(), "torch": torch.__version__}
    for package in ("numpy", "timm", "optuna"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:  # a source checkout run without installing its dependencies' metadata
            versions[package] = None
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {**versions, "platform": platform.platform(), "device": str(device), "hardware": hardware,
            "threads": torch.get_num_threads()}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
    except OSError:  # not Linux
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def write_metrics(run_dir: Path, metrics: dict) -> None:
    """metrics.json, written last: its presence marks a finished run, so it is never there half-written."""
    text = json.dumps(metrics, indent=2, default=float)
    write_text_atomically(run_dir / "metrics.json", text)
