"""The command line's process. Its exit (mamo.stops.exit_quickly): the atexit hooks and buffered output survive,
the interpreter's tear-down is skipped, and a thread still running gets Python's ordinary exit. Its start with a
standard stream closed (mamo.stops.hold_standard_descriptors, runs.stderr_on_terminal): the command runs, and no
file it opens takes the closed descriptor."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A module-level object whose __del__ speaks: only the interpreter's tear-down deletes it.
PRELUDE = """
import atexit, threading, time
from mamo.stops import exit_quickly

class Loud:
    def __del__(self):
        print("torn down", flush=True)

keep = Loud()
atexit.register(lambda: print("atexit ran"))
print("buffered, no newline", end="")
"""


# Block-buffered standard streams, as a pipe gets them by default, so the exit's flush is what writes them.
BUFFERED = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(PRELUDE) + textwrap.dedent(code)], cwd=ROOT,
                          env=BUFFERED, capture_output=True, text=True, timeout=60)


def test_exit_keeps_the_code_the_atexit_hooks_and_the_buffered_output_and_skips_the_tear_down():
    done = _python("exit_quickly(3)")
    assert done.returncode == 3
    assert done.stdout == "buffered, no newlineatexit ran\n"  # nothing lost, nothing torn down
    assert done.stderr == ""


def test_a_thread_still_running_gets_the_ordinary_exit_which_waits_for_it():
    done = _python("""
        def late():
            time.sleep(0.3)
            print("thread finished", flush=True)

        threading.Thread(target=late).start()
        exit_quickly(4)
    """)
    assert done.returncode == 4
    assert "thread finished" in done.stdout and "atexit ran" in done.stdout
    assert "torn down" in done.stdout  # Python's own exit: the tear-down ran


def test_a_reader_that_left_the_pipe_early_costs_neither_the_code_nor_a_warning():
    # The output waits in the pipe's buffer until the exit flushes it, by which time the reader is gone (as
    # after `| head -1`): Python's own exit says "Exception ignored ... BrokenPipeError" and returns 120.
    script = textwrap.dedent(PRELUDE) + "time.sleep(0.5)\nexit_quickly(0)\n"
    reader = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=BUFFERED, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    reader.stdout.close()
    _, err = reader.communicate(timeout=60)
    assert reader.returncode == 0
    assert err == b""


def test_the_command_line_exits_through_it_with_the_command_s_status(tmp_path):
    # `python cli.py` (and the console script, mamo.cli:run): a user error's status and sentence come through.
    done = subprocess.run([sys.executable, str(ROOT / "cli.py"), "show", str(tmp_path / "missing")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("mamo: error: ") and "missing" in done.stderr


def test_a_closed_standard_output_keeps_the_code_and_prints_no_traceback():
    # Started with stdout closed (`>&-`, some service managers), Python sets sys.stdout to None: the exit's flush
    # raised AttributeError there, so a finished command ended with status 1 and a traceback.
    script = textwrap.dedent(PRELUDE) + "exit_quickly(3)\n"
    done = subprocess.run(["sh", "-c", '"$0" -c "$1" >&-', sys.executable, script], cwd=ROOT, env=BUFFERED,
                          stderr=subprocess.PIPE, text=True, timeout=60)
    assert done.returncode == 3
    assert done.stderr == ""


def test_a_command_started_with_stderr_closed_still_runs(tmp_path):
    # Progress bars ask whether stderr is a terminal; started with it closed (`2>&-`) Python has no sys.stderr, and
    # asking crashed the command before it did anything.
    done = subprocess.run(["sh", "-c", '"$0" "$1" bench logic --quick --seeds 1 --epochs 5 --no-sweep --out "$2" 2>&-',
                           sys.executable, str(ROOT / "cli.py"), str(tmp_path / "out")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout
    assert (tmp_path / "out" / "results.json").is_file()


def test_a_closed_stderr_is_held_by_dev_null_so_no_file_takes_its_descriptor(tmp_path):
    # The next file opened took descriptor 2, and anything written to stderr below Python (C++ warnings) went in.
    script = ("import os, sys\nfrom mamo.stops import hold_standard_descriptors\nhold_standard_descriptors()\n"
              "with open(sys.argv[1], 'w') as f:\n    print(f.fileno(), os.readlink('/proc/self/fd/2'))\n")
    done = subprocess.run(["sh", "-c", '"$0" -c "$1" "$2" 2>&-', sys.executable, script, str(tmp_path / "f")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    number, target = done.stdout.split()
    assert int(number) > 2 and target == os.devnull


def test_a_reader_that_leaves_ends_the_command_quietly_and_a_finished_run_is_not_called_stopped(tmp_path):
    # `train ... | head` printed a BrokenPipeError traceback after the run had finished, and log.txt said it was
    # "stopped by BrokenPipeError; its checkpoints are kept for: ... --resume" (a user audit).
    run = tmp_path / "run"
    reader, writer = os.pipe()
    os.close(reader)  # the reader has left before the report is printed
    done = subprocess.run([sys.executable, "cli.py", "train", "quick", "--set", "train.epochs=1", "--set",
                           "data.train_size=64", "--set", "data.val_size=32", "--set", "data.test_size=32",
                           "--no-tensorboard", "--run-dir", str(run)], cwd=ROOT, stdout=writer,
                          stderr=subprocess.PIPE, text=True, timeout=300)
    os.close(writer)
    assert done.returncode == 141, done.stderr  # 128 + SIGPIPE, as a program that SIGPIPE ends
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr
    assert (run / "metrics.json").is_file()
    assert (run / "log.txt").read_text().splitlines()[-1].endswith(
        "its output's reader left (BrokenPipeError: a pipe such as | head closed) after it had finished")


def test_only_a_reader_that_left_counts_as_one_not_any_broken_pipe():
    # A BrokenPipeError may come from a socket a data plugin reads: that one must not end the command quietly.
    code = "import sys\nfrom mamo.stops import output_reader_left\nsys.stderr.write(str(output_reader_left()))\n"
    reader, writer = os.pipe()
    os.close(reader)
    left = subprocess.run([sys.executable, "-c", code], cwd=ROOT, stdout=writer, stderr=subprocess.PIPE, text=True,
                          timeout=60)
    os.close(writer)
    stayed = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (left.stderr, stayed.stderr) == ("True", "False")
    patched = ("import mamo.cli\nfrom unittest import mock\n"
               "def broken(args):\n    raise BrokenPipeError(32, 'Broken pipe')\n"
               "with mock.patch.object(mamo.cli, '_handler', lambda *a: broken):\n    mamo.cli.main(['show', 'x'])\n")
    raised = subprocess.run([sys.executable, "-c", patched], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert raised.returncode == 1 and "BrokenPipeError" in raised.stderr  # a pipe of its own: not silenced
