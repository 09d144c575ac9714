"""The STL and HPS baselines of the report: trained once per (data, backbone, budget, seed) and cached in the
baseline cache (:mod:`mamo.cache`), which processes share: a network another process trains is waited for,
after the networks nobody trains, so runs started together share the work."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mamo.cache import baseline_key
from mamo.errors import MamoError
from mamo.runs import counted
from mamo.session import EQUAL, Session, train_network
from mamo.trainer import Callback


def _cached_network(
    session: Session, kind: str, epochs: int, task_names: list[str] | None, name: str, training: str,
    callbacks: list[Callback] | None = None, wait: bool = True,
) -> dict | None:
    """One baseline network's result: from the cache, else trained and cached. Its training is checkpointed
    beside the cache, so a stopped run continues it (a baseline of NYUv2 is hours on a GPU). While another
    process trains it, waits for its result, or with ``wait=False`` returns None."""
    key = baseline_key(session.config, kind, epochs)
    cached = session.cache.get(key)
    if cached is not None:
        session.log(f"{name}: reusing the cached result {key}")
        return cached
    with session.cache.claim(key, session.log, name, wait) as claim:
        if claim is None:
            cached = session.cache.get(key)  # None: another process still trains it
            if cached is not None:
                session.log(f"{name}: reusing the result another process cached meanwhile, {key}")
            return cached
        session.log(f"{name}: {training} for {counted(epochs, 'epoch')}")
        checkpoint = session.cache.checkpoint_path(key)
        result = train_network(session, epochs, EQUAL, task_names, description=kind.replace("-", " "),
                               callbacks=callbacks, checkpoint=checkpoint, discard_damaged=True).result()
        session.cache.put(key, result)
        checkpoint.unlink(missing_ok=True)
    return result


def _merge_stl(results: list[dict]) -> dict:
    """STL's result: its networks' metrics side by side, their sizes and epoch times added."""
    merged: dict = {"tasks": {}, "val": {}, "params": 0, "seconds_per_epoch": 0.0}
    for result in results:
        merged["tasks"].update(result["tasks"])
        merged["val"].update(result["val"])
        merged["params"] += result["params"]
        merged["seconds_per_epoch"] += result["seconds_per_epoch"]
    return merged


Network = tuple[str, list[str] | None, str, str]  # (cache kind, its tasks, its name in the log, how it trains)


@dataclass(frozen=True)
class Baseline:
    """A kind of baseline: the networks it consists of and how their results make its own."""

    networks: Callable[[Session], list[Network]]
    merge: Callable[[list[dict]], dict] | None = None  # None: one network, whose cached result is the baseline's


BASELINES: dict[str, Baseline] = {
    # One network per task, each cached on its own, so a stopped STL keeps its finished tasks.
    "stl": Baseline(lambda session: [(f"stl-{task}", [task], f"STL '{task}'", "training it alone")
                                     for task in session.data.tasks], _merge_stl),
    "hps": Baseline(lambda session: [("hps", None, "HPS baseline", "equal weighting")]),
}


def cached_baselines(
    session: Session, kinds: Sequence[str], epochs: int, callbacks: list[Callback] | None = None
) -> dict[str, dict]:
    """The STL and/or HPS (equal weighting) baselines for this data, backbone, budget and seed, each trained once
    and cached (STL one network per task, each cached on its own, so a stopped STL keeps its finished tasks).
    Networks another process is training are left to the end and waited for, so runs started together share
    the work; ``callbacks`` watch the trainings there are."""
    unknown = [kind for kind in kinds if kind not in BASELINES]
    if unknown:
        raise MamoError(f"unknown baseline kind '{unknown[0]}'; use one of {', '.join(BASELINES)}.")
    results, networks = {}, []
    for kind in kinds:
        key = baseline_key(session.config, kind, epochs)
        cached = session.cache.get(key)
        if cached is not None:
            session.log(f"{kind.upper()} baseline: reusing the cached result {key}")
            results[kind] = cached
        else:
            networks += BASELINES[kind].networks(session)
    trained: dict[str, dict] = {}
    for wait in (False, True):
        for network, task_names, name, training in networks:
            if network not in trained:
                result = _cached_network(session, network, epochs, task_names, name, training, callbacks, wait)
                if result is not None:
                    trained[network] = result
    for kind in kinds:
        if kind not in results:
            baseline = BASELINES[kind]
            parts = [trained[network] for network, *_ in baseline.networks(session)]
            if baseline.merge is None:
                results[kind] = parts[0]
            else:
                results[kind] = baseline.merge(parts)
                session.cache.put(baseline_key(session.config, kind, epochs), results[kind])
    return {kind: results[kind] for kind in kinds}


def cached_baseline(session: Session, kind: str, epochs: int, callbacks: list[Callback] | None = None) -> dict:
    """:func:`cached_baselines` of one kind."""
    return cached_baselines(session, [kind], epochs, callbacks)[kind]
