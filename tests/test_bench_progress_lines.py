"""What `bench step`, `bench logic` and `bench logic3` show while they run: a line on stderr per setup as it starts
and per method or row as it finishes (``[elapsed] ... (k of n)``, as `bench ablation` names its variants), in a pipe
or a file too, where no bar is drawn; stdout keeps the tables. A user's audit found them silent: `bench step` on
ResNet-18 m = 3 for 170 s, `bench logic` for 66 s before its whole table at once."""

from __future__ import annotations

import json
import re
import time

from mamo.bench.logic import MAIN
from mamo.bench.step import EQUAL, FLOOR, methods
from mamo.cli import main

LINE = re.compile(r"^\[ *\d+ s\] (.+)$")
CELL = r"(?:[\d.]+ ± [\d.]+|–) \(\d+%\)"  # a logic cell: mean ± std (rate), or – (rate)


def progress(text: str) -> list[str]:
    """The progress lines of ``text``, without their elapsed time."""
    return [match.group(1) for match in map(LINE.match, text.splitlines()) if match]


STEP = ["bench", "step", "--quick", "--rounds", "2", "--threads", "1"]


def test_step_names_each_setup_as_it_starts_and_each_method_as_it_finishes(tmp_path, capsys) -> None:
    assert main([*STEP, "--setups", "lenet-m2", "--out", str(tmp_path / "step")]) == 0
    out, err = capsys.readouterr()
    lines = progress(err)
    timed = [name for name in methods() if name not in (EQUAL, FLOOR)]  # those two run in every method's session
    assert lines[0] == "LeNet m=2, batch 4 (setup 1 of 1)"
    assert len(lines) == 1 + len(timed) + 1, lines
    for k, (line, name) in enumerate(zip(lines[1:-1], timed, strict=True), 1):
        assert line.startswith(f"LeNet m=2, batch 4: {name}: ") and line.endswith(f" ({k} of {len(timed)})"), line
    ran = next(line for line in lines if ": mgda + tensioner: " in line)
    assert re.fullmatch(r"LeNet m=2, batch 4: mgda \+ tensioner: [\d.]+ ms, [\d.]+× equal \(\d+ of \d+\)", ran), ran
    graphs = next(line for line in lines if ": equal (CUDA graphs): " in line)  # not run on a CPU, and says why
    assert "not run: CUDA graphs need a CUDA device" in graphs, graphs
    assert lines[-1] == "the exact min-norm solver"
    assert "## LeNet m=2, 28×28, batch 4" in out and not progress(out)


def test_step_prints_only_between_timed_steps(tmp_path, capsys, monkeypatch) -> None:
    # bench step measures time: a line written inside a timed step would be counted in that step's time.
    import mamo.bench.step as bench_step

    events: list[str] = []

    def tick() -> float:
        events.append("tick")
        return time.perf_counter()

    real = bench_step.progress_lines

    def recorded(*args: object) -> object:
        say = real(*args)
        return lambda text: events.append("line") or say(text)

    monkeypatch.setitem(bench_step.CLOCKS, "wall", tick)
    monkeypatch.setattr(bench_step, "progress_lines", recorded)
    assert main([*STEP, "--setups", "lenet-m2", "--out", str(tmp_path / "step")]) == 0
    assert events.count("line") == len(progress(capsys.readouterr().err)) > 2
    assert events.count("tick") > 0 and events.count("tick") % 2 == 0
    timing = False
    for event in events:  # ticks come in pairs, begin and end of one step
        if event == "tick":
            timing = not timing
        else:
            assert not timing, "a progress line was written while a step was timed"


def test_a_stopped_step_keeps_the_tables_of_its_finished_setups(tmp_path, capsys, monkeypatch) -> None:
    # A stopped bench step lost every finished setup ("nothing was saved, because the empty --out folder was removed").
    import mamo.bench.step as bench_step

    real, built = bench_step.build_setup, []

    def build_setup(*args: object, **kwargs: object) -> object:
        built.append(args[0])
        if len(built) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the second setup is built
        return real(*args, **kwargs)

    monkeypatch.setattr(bench_step, "build_setup", build_setup)
    out = tmp_path / "step"
    assert main([*STEP, "--setups", "lenet-m2", "lenet-m3", "--out", str(out)]) == 130
    captured = capsys.readouterr()
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["raw_times"]) == ["LeNet m=2 batch 4"]
    assert saved["notes"][0] == ("Stopped after 1 of 2 setups (Ctrl-C or a stop signal): the tables hold the "
                                 "finished ones, without the min-norm solver's.")
    markdown = (out / "results.md").read_text()
    assert "## LeNet m=2, 28×28, batch 4" in markdown and "LeNet m=3" not in markdown
    assert "## LeNet m=2, 28×28, batch 4" in captured.out  # stdout still carries the tables
    assert captured.err.splitlines()[-1] == (f"stopped; what finished is saved in {out / 'results.md'} and "
                                             f"{out / 'results.json'}")
    assert "mamo: interrupted." not in captured.err


def test_logic_names_each_method_and_sweep_as_it_finishes(tmp_path, capsys) -> None:
    assert main(["bench", "logic", "--quick", "--out", str(tmp_path / "logic")]) == 0
    out, err = capsys.readouterr()
    lines = progress(err)
    total = len(MAIN) + 2  # --quick sweeps one period T per formulation
    assert len(lines) == total, lines
    for k, (line, method) in enumerate(zip(lines, MAIN, strict=False), 1):
        assert re.fullmatch(rf"{re.escape(method.label)} \({method.formulation}\): c=1 {CELL}, c=10 {CELL} "
                            rf"\({k} of {total}\)", line), line
    assert lines[-2:] == [f"T × α sweep, central + tensioner ({form}), T=10 ({k} of {total})"
                          for k, form in ((total - 1, "thesis"), (total, "relative"))]
    assert "Thesis Table 3" in out and not progress(out)


def test_logic3_names_each_row_as_it_finishes(tmp_path, capsys) -> None:
    assert main(["bench", "logic3", "--quick", "--directions", "mgda", "--out", str(tmp_path / "logic3")]) == 0
    out, err = capsys.readouterr()
    lines = progress(err)
    rows = ["Single XOR (off)", "Single AND (off)", "Single OR (off)", "mgda (off)", "mgda (thesis)",
            "mgda (relative)"]
    assert len(lines) == len(rows), lines
    for k, (line, row) in enumerate(zip(lines, rows, strict=True), 1):
        assert re.fullmatch(rf"{re.escape(row)}: c=1 {CELL}, c=10 {CELL} \({k} of {len(rows)}\)", line), line
    assert "Three gates" in out and not progress(out)


def test_a_stopped_logic3_keeps_its_finished_rows(tmp_path, capsys, monkeypatch) -> None:
    # Six CPU-minutes of rows were lost to a Ctrl-C; now the finished ones are saved and the rest marked.
    import mamo.bench.logic3 as logic3

    real, ran = logic3.run_row, []

    def run_row(*args: object, **kwargs: object) -> object:
        ran.append(args[:2])
        if len(ran) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the second row
        return real(*args, **kwargs)

    monkeypatch.setattr(logic3, "run_row", run_row)
    out = tmp_path / "logic3"
    assert main(["bench", "logic3", "--quick", "--directions", "mgda", "--out", str(out)]) == 130
    saved = json.loads((out / "results.json").read_text())
    assert saved["notes"][0] == ("Stopped after 1 of 6 rows (Ctrl-C or a stop signal): the other cells say 'not run "
                                 "(stopped)'.")
    assert {key.split("|c=")[0] for key in saved["raw"]} == {"single:xor|off"}
    first = saved["tables"][0]["rows"]
    assert first[0][1] != "not run (stopped)" and first[1][1] == "not run (stopped)"
    assert "stopped; what finished is saved in" in capsys.readouterr().err
