"""TensorBoard's HPARAMS record of one Optuna trial: its parameters and state against its metrics, in an event
file of its own in the trial's run folder (``tune`` writes it; the run's other events come from mamo/board.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

from mamo.errors import MamoError
from mamo.event_file import EventFileWriter, scalar_summary

# A trial's Optuna state, recorded as the hparam "state", and the TensorBoard session status it ends with.
TRIAL_STATES = {"complete": "STATUS_SUCCESS", "pruned": "STATUS_SUCCESS", "failed": "STATUS_FAILURE"}
HPARAMS_SUFFIX = ".hparams"  # ends the name of the event file that holds a trial's HPARAMS record

# The HPARAMS plugin's names as tensorboard.plugins.hparams.metadata defines them (importing that module, as
# torch's helper did, takes 0.12 s; a test checks they agree), and each value type's data type and field.
PLUGIN, VERSION = "hparams", 0
EXPERIMENT_TAG = "_hparams_/experiment"
START_TAG, END_TAG = "_hparams_/session_start_info", "_hparams_/session_end_info"
VALUE_TYPES = ((bool, "DATA_TYPE_BOOL", "bool_value"), (str, "DATA_TYPE_STRING", "string_value"),
               ((int, float), "DATA_TYPE_FLOAT64", "number_value"))  # bool first: it is an int too


def drop_hparams(log_dir: Path) -> None:
    """Remove the HPARAMS records in ``log_dir``: a retried trial's stopped run wrote "failed", and TensorBoard
    keeps the first record it reads of a run, so the retry's own would not show."""
    for path in Path(log_dir).glob(f"events.out.tfevents.*{HPARAMS_SUFFIX}"):
        path.unlink()


def _plugin_summary(tag: str, content: plugin_data_pb2.HParamsPluginData) -> Summary:
    content.version = VERSION
    plugin = SummaryMetadata.PluginData(plugin_name=PLUGIN, content=content.SerializeToString())
    return Summary(value=[Summary.Value(tag=tag, metadata=SummaryMetadata(plugin_data=plugin))])


def hparams_summaries(hparams: dict[str, bool | int | float | str], metric_names: Sequence[str],
                      status: str = "STATUS_SUCCESS") -> tuple[Summary, Summary, Summary]:
    """The three records of one session in the HPARAMS tab: the experiment (its hparam and metric columns), the
    session's start (its values) and its end (``status``)."""
    start, infos = plugin_data_pb2.SessionStartInfo(), []
    for name, value in hparams.items():
        kind, field = next((kind, field) for types, kind, field in VALUE_TYPES if isinstance(value, types))
        setattr(start.hparams[name], field, value)
        infos.append(api_pb2.HParamInfo(name=name, type=api_pb2.DataType.Value(kind)))
    experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=[
        api_pb2.MetricInfo(name=api_pb2.MetricName(tag=name)) for name in metric_names])
    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.Status.Value(status))
    return (_plugin_summary(EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(experiment=experiment)),
            _plugin_summary(START_TAG, plugin_data_pb2.HParamsPluginData(session_start_info=start)),
            _plugin_summary(END_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=end)))


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
    columns = list(dict.fromkeys([*metric_names, *scores]))  # declared in order, values or not
    experiment, start, end = hparams_summaries(clean, columns, TRIAL_STATES[state])
    with EventFileWriter(log_dir, suffix=HPARAMS_SUFFIX) as events:
        for summary in (experiment, start, end):
            events.add_summary(summary)
        if scores:
            events.add_summary(scalar_summary(scores), 0)
