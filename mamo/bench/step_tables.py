"""The tables and notes of ``mamo bench step``: ratios of the measured rounds to the two reference rows, the
issue's targets, and what a reader needs to know to read them."""

from __future__ import annotations

import statistics
from importlib import metadata

import torch

from mamo.bench.peers import LIBMTL_LIMIT_S

EQUAL, FLOOR = "equal", "forward + m backward"  # the two reference rows every method is timed beside
UPDATE = "optimizer update alone"  # in every row: taken out of both sides for the floor target as the issue words it
PEER_PACKAGES = ("torchjd", "LibMTL")  # recorded with their versions when installed


def _ratio(results: dict[str, dict], name: str, reference: str) -> float:
    """Median paired ratio of ``name`` to equal or the floor; to another method, the ratio of their × equal."""
    res, ref = results.get(name, {}), results.get(reference, {})
    if reference in (EQUAL, FLOOR):
        return statistics.median(res[reference]) if res.get(reference) else float("nan")
    if not res.get(EQUAL) or not ref.get(EQUAL):
        return float("nan")
    return statistics.median(res[EQUAL]) / statistics.median(ref[EQUAL])


def step_table(title: str, results: dict[str, dict]) -> dict:
    rows = []
    for name, res in results.items():
        if "error" in res:
            rows.append([name, "—", "—", "—", "—"])
            continue
        memory = res["memory"]
        rows.append([name, statistics.median(res["times"]) * 1e3, _ratio(results, name, EQUAL),
                     _ratio(results, name, FLOOR), "n/a" if memory is None else memory])
    return {"title": title, "columns": ["method", "ms (median)", "× equal", "× floor", "peak added MiB"],
            "rows": rows}


def _passes_ratio(results: dict[str, dict]) -> float:
    """MGDA + tensioner over the bare forward and m backward passes, the optimizer's update taken out of both:
    the method's × floor as measured beside the floor in its own session, the update's share of the floor from
    the update's session. Ratios of × equal medians across sessions drifted from the side-by-side one by up to
    0.015 on LeNet, where the update's share is 0.03."""
    method, update = (_ratio(results, name, FLOOR) for name in ("mgda + tensioner", UPDATE))
    return (method - update) / (1.0 - update) if update < 1.0 else float("nan")


def targets(label: str, results: dict[str, dict], device: torch.device, precision: str, batch: int) -> list:
    rows = [[label, "mgda + tensioner ÷ floor, the update out of both", "≤ 1.05", _passes_ratio(results)],
            [label, "mgda + tensioner ÷ floor (both with the update)", "", _ratio(results, "mgda + tensioner", FLOOR)],
            [label, "mgda-ub ÷ equal", "≤ 1.1", _ratio(results, "mgda-ub", "equal")]]
    for peer in ("torchjd mgda", "torchjd mgda (chunk 1)", "libmtl mgda"):
        rows.append([label, f"mgda + tensioner ÷ {peer}", "≤ 0.65" if "m=3" in label else "< 1",
                     _ratio(results, "mgda + tensioner", peer)])
    if device.type == "cuda" and precision == "bf16" and batch == 32 and "m=3" in label:
        rows.append([label, "mgda + tensioner ÷ equal (H100 target)", "≤ 1.6",
                     _ratio(results, "mgda + tensioner", "equal")])
        rows.append([label, "the same, both with CUDA graphs", "≤ 1.6",
                     _ratio(results, "mgda + tensioner (CUDA graphs)", "equal (CUDA graphs)")])
    return rows


def step_notes(device: torch.device, threads: int, precision: str, clock: str, rounds: int | None,
               raw: dict[str, dict[str, dict]]) -> list[str]:
    """The notes under the tables: the run's settings, how the ratios and the floor are made, the peers' versions
    and workarounds, the rows that did not run, and how memory is read."""
    notes = [
        f"device {device}; torch {torch.__version__}; {threads} intra-op threads; "
        f"precision {precision}; clock {clock}; "
        f"{rounds or '10 to 200 (2 s of equal steps)'} rounds after warm-up.",
        "× equal and × floor are medians of per-round ratios; each method runs in its own session of rounds "
        "beside equal and the floor (shuffled order each round); a ratio between two methods is the ratio of "
        "their × equal. ms is the median over the method's own session (equal's and the floor's over all of "
        "them), so where the machine's load changed between sessions ms over ms differs from the paired × "
        "columns (e.g. 7.33 ms beside equal's 6.12 ms read 1.38× equal on a shared machine): read the × columns.",
        "floor = forward + m autograd.grad passes, each task's gradients set as .grad (no zero_grad: like "
        "mamo's exact step it sets gradients, never accumulates) + the optimizer's update: what any exact "
        "per-task-gradient step does before it combines anything. Every row includes the update; the first "
        "target row takes it (the 'optimizer update alone' row) out of both sides, as the issue words the target.",
        "mamo's rows take the gradient layout and path that auto picks for the setup (in its title), except the "
        "two 'mgda (… path)' rows, which take the loop and the batched path whatever auto picks.",
    ]
    peers = {name: version for name, version in ((name, _version(name)) for name in PEER_PACKAGES) if version}
    if peers:
        notes.append("peers: " + ", ".join(f"{name} {version}" for name, version in peers.items()) + ".")
    if any("libmtl mgda" in results and "error" not in results["libmtl mgda"] for results in raw.values()):
        notes.append(f"LibMTL {peers.get('LibMTL', '')} runs with two benchmark-only workarounds: a stand-in "
                     "torchvision.models.utils module for its import, and in-place zeroing of shared gradients "
                     "(its _reset_grad fails on None gradients); its min-norm loop never increments its counter, "
                     f"so a step is cut off after {LIBMTL_LIMIT_S} s.")
    for key, results in raw.items():
        notes += [f"{key}: {name} did not run: {res['error']}" for name, res in results.items() if "error" in res]
    if device.type == "cpu":
        notes.append("CPU memory is the resident-set high-water mark above the resident set before the step "
                     "(allocator caching can hide or add a few MiB); n/a where /proc/self/clear_refs is absent.")
    return notes


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
