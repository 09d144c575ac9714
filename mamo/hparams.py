"""TensorBoard's HPARAMS record of one Optuna trial: its parameters and state against its metrics, in an event
file of its own in the trial's run folder (``tune`` writes it; the run's other events come from mamo/board.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
from torch.utils.tensorboard.summary import hparams as hparams_summaries

from mamo.errors import MamoError
from mamo.event_file import EventFileWriter, scalar_summary

# A trial's Optuna state, recorded as the hparam "state", and the TensorBoard session status it ends with.
TRIAL_STATES = {"complete": "STATUS_SUCCESS", "pruned": "STATUS_SUCCESS", "failed": "STATUS_FAILURE"}
HPARAMS_SUFFIX = ".hparams"  # ends the name of the event file that holds a trial's HPARAMS record


def drop_hparams(log_dir: Path) -> None:
    """Remove the HPARAMS records in ``log_dir``: a retried trial's stopped run wrote "failed", and TensorBoard
    keeps the first record it reads of a run, so the retry's own would not show."""
    for path in Path(log_dir).glob(f"events.out.tfevents.*{HPARAMS_SUFFIX}"):
        path.unlink()


def write_hparams(
    log_dir: Path,
    hparams: dict[str, float | int | str],
    metrics: dict[str, float | None],
    *,
    state: str = "complete",
    metric_names: Sequence[str] = (),
) -> None:
    """One Optuna trial for TensorBoard's HPARAMS tab: its parameters and ``state`` (complete, pruned or failed)
    against its metrics in ``log_dir``. ``metric_names`` are declared as columns too, values or not: TensorBoard
    takes the columns from whichever trial it reads first, so every trial of a study should declare the same."""
    if state not in TRIAL_STATES:
        raise ValueError(f"unknown trial state {state!r}; one of {', '.join(TRIAL_STATES)}")
    clean: dict[str, float | int | str | bool] = {}
    for key, value in {**hparams, "state": state}.items():
        if isinstance(value, (bool, int, float, str)):
            clean[key] = value
        elif isinstance(value, np.generic):
            clean[key] = value.item()
        else:
            clean[key] = "none" if value is None else str(value)  # lists, None: shown as text
    scores = {key: float(value) for key, value in metrics.items() if value is not None}
    if not scores and state == "complete":
        raise MamoError(f"write_hparams got no metric values for {log_dir}; pass at least the trial's objective.")
    # torch's helper declares a column per key of its metric dict and writes no values.
    columns = dict.fromkeys([*metric_names, *scores], 0.0)
    experiment, start, end = hparams_summaries(clean, columns)
    if TRIAL_STATES[state] != "STATUS_SUCCESS":
        plugin = end.value[0].metadata.plugin_data
        content = plugin_data_pb2.HParamsPluginData.FromString(plugin.content)
        content.session_end_info.status = api_pb2.Status.Value(TRIAL_STATES[state])
        plugin.content = content.SerializeToString()
    with EventFileWriter(log_dir, suffix=HPARAMS_SUFFIX) as events:
        for summary in (experiment, start, end):
            events.add_summary(summary)
        if scores:
            events.add_summary(scalar_summary(scores), 0)
