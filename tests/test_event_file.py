"""The event file writer: checksums equal to tensorboard's own, records its reader reads back (and rejects
when damaged), unique file names, writes from several threads, flushing."""

from __future__ import annotations

import errno
import random
import threading
import time
import types

import pytest
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as reference_crc

from mamo import event_file
from mamo.event_file import FILE_VERSION, EventFileWriter, masked_crc32c


def scalar(tag: str, value: float) -> Summary:
    return Summary(value=[Summary.Value(tag=tag, simple_value=value)])


def read(path) -> list[Event]:
    """The events as written (tensorboard's reader checks both checksums of each record)."""
    return [Event.FromString(data) for data in RawEventFileLoader(str(path)).Load()]


def test_checksum_matches_tensorboards_pure_python_one():
    rng = random.Random(0)
    for length in [0, 1, 3, 7, 8, 9, 63, 64, 65, 255, 1000, 4096]:
        data = bytes(rng.randrange(256) for _ in range(length))
        assert masked_crc32c(data) == reference_crc(data), length


def test_events_read_back_with_steps_values_and_the_file_version_first(tmp_path):
    with EventFileWriter(tmp_path) as events:
        for step in range(5):
            events.add_summary(scalar("loss", 0.5 * step), step)
        events.add_event(Event(step=3, session_log=SessionLog(status=SessionLog.START)))
    read_back = read(events.path)
    assert read_back[0].file_version == FILE_VERSION
    assert [(e.step, e.summary.value[0].simple_value) for e in read_back[1:6]] == [(s, 0.5 * s) for s in range(5)]
    assert read_back[6].session_log.status == SessionLog.START and read_back[6].step == 3
    assert all(e.wall_time > 0 for e in read_back)


def test_a_damaged_record_stops_the_reader_there(tmp_path):
    with EventFileWriter(tmp_path) as events:
        for step in range(4):
            events.add_summary(scalar("loss", float(step)), step)
    data = bytearray(events.path.read_bytes())
    data[-6] ^= 0x01  # one bit of the last record's data (its last 4 bytes are the data's checksum)
    events.path.write_bytes(bytes(data))
    assert len(read(events.path)) == 4  # the file version and the first three scalars: the checksum caught it


def test_two_writers_in_one_folder_write_two_files_in_order(tmp_path):
    first, second = EventFileWriter(tmp_path), EventFileWriter(tmp_path)
    first.close()
    second.close()
    assert first.path != second.path and sorted([second.path, first.path]) == [first.path, second.path]
    assert all(p.name.startswith("events.out.tfevents.") for p in tmp_path.iterdir())


def test_a_dozen_writers_in_one_second_sort_in_the_order_they_were_made(tmp_path, monkeypatch):
    # One second for all: only the number after the stem orders the names. Before: ".10" sorted before ".2".
    clock = types.SimpleNamespace(time=lambda: 1_700_000_000.5, monotonic=time.monotonic)
    monkeypatch.setattr(event_file, "time", clock)
    paths = []
    for _ in range(12):
        with EventFileWriter(tmp_path) as events:
            paths.append(events.path)
    assert len(set(paths)) == 12 and sorted(paths) == paths
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in paths]


def test_events_from_several_threads_all_arrive_whole(tmp_path):
    events = EventFileWriter(tmp_path)

    def write(offset: int) -> None:
        for step in range(300):
            events.add_summary(scalar(f"thread{offset}", float(step)), offset * 1000 + step)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    events.close()
    steps = sorted(e.step for e in read(events.path)[1:])
    assert steps == sorted(n * 1000 + s for n in range(3) for s in range(300))


def test_flush_puts_every_event_on_disk_while_the_file_stays_open(tmp_path):
    events = EventFileWriter(tmp_path, flush_seconds=3600)
    for step in range(20):
        events.add_summary(scalar("loss", 1.0), step)
    events.flush()
    assert len(read(events.path)) == 21
    events.add_summary(scalar("loss", 1.0), 20)
    events.close()
    events.close()  # twice is fine
    assert len(read(events.path)) == 22


def test_a_failed_write_names_the_event_file(tmp_path):
    events = EventFileWriter(tmp_path)

    class FullDisk:
        closed = False

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    events._file = FullDisk()  # what a full disk does to the buffered file's writes
    with pytest.raises(OSError) as caught:
        events.add_summary(scalar("loss", 1.0), 1)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(events.path)
