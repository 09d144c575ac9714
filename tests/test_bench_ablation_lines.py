"""What `bench ablation` shows while it runs: its searches run quietly (their own lines would interleave), so a
line names each variant as it starts; a --quick run showed nothing for 12 s, a full one only bars of epochs that
never said which variant or seed they trained."""

from __future__ import annotations

import re

from mamo.cli import main


def test_each_variant_is_named_as_it_starts(tmp_path, capsys) -> None:
    out = tmp_path / "logic"
    assert main(["bench", "ablation", "--quick", "--preset", "logic", "--rounds-sweep", "--out", str(out)]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if re.match(r"^\[ *\d+ s\] ", line)]
    assert [re.sub(r"^\[ *\d+ s\] ", "", line) for line in lines] == [
        "seed 0: MAMO (Z=1) (1 of 3)", "seed 0: w/o MO (equal weighting) (2 of 3)",
        "seed 0: w/o GMK (task-exclusive modules) (3 of 3)"]
