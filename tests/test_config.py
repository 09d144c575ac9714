"""Presets: every shipped one loads; mistakes name the key, the file and the fix; --set overrides; round trips."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mamo.config import (
    PRESET_DIR,
    Config,
    DataConfig,
    TrainConfig,
    config_from_dict,
    dump_config,
    load_config,
    split_override,
)
from mamo.errors import MamoError
from mamo.yaml_core import load_yaml

PRESETS = sorted(path.stem for path in PRESET_DIR.glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "mine.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(preset: str | None, overrides: list[str] | tuple[str, ...] = ()) -> str:
    with pytest.raises(MamoError) as info:
        load_config(preset, overrides)
    return str(info.value)


# ------------------------------------------------------------------------------------------------ presets


def test_the_shipped_presets_are_the_ones_the_issue_promises() -> None:
    expected = {"multimnist", "multimnist_recon", "multifashion", "multi_fashion_mnist", "logic", "concave", "quick"}
    assert expected <= set(PRESETS)


def test_a_wheel_installs_every_module_and_every_preset(tmp_path: Path) -> None:
    # `pip install .` (no -e) installs a wheel (built here by setuptools, a dev dependency): the presets must
    # travel inside it, since search_spaces/ sits beside the package, where an installed mamo found nothing
    # ("one of: ." for every preset name).
    root = Path(__file__).resolve().parent.parent
    source = tmp_path / "source"
    for name in ("mamo", "search_spaces"):
        shutil.copytree(root / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    build = ("import sys, setuptools.build_meta as backend; "
             "print(backend.build_wheel(sys.argv[1]))")
    done = subprocess.run([sys.executable, "-c", build, str(tmp_path / "dist")], cwd=source, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    wheel = tmp_path / "dist" / done.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "site")
        names = set(archive.namelist())
    modules = {path.relative_to(root).as_posix() for path in (root / "mamo").rglob("*.py")}
    assert modules <= names
    assert {f"mamo/search_spaces/{preset}.yaml" for preset in PRESETS} <= names
    # Installed, away from any checkout: every preset resolves to its packaged copy.
    check = ("from mamo.config import PRESET_DIR, load_config; "
             f"print(PRESET_DIR); print(','.join(load_config(name).name for name in {PRESETS!r}))")
    ran = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"})
    assert ran.returncode == 0, ran.stderr[-2000:]
    folder, loaded = ran.stdout.split()
    assert Path(folder) == tmp_path / "site" / "mamo" / "search_spaces"
    assert loaded.split(",") == PRESETS


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_loads_with_its_own_values(preset: str) -> None:
    raw = load_yaml((PRESET_DIR / f"{preset}.yaml").read_text())
    config = load_config(preset)
    assert config.name == preset
    # Every value the file sets arrives in the typed config (floats may be written as ints in YAML).
    for section, values in raw.items():
        for key, value in values.items():
            got = getattr(getattr(config, section), key)
            if dataclasses.is_dataclass(got):
                for inner, inner_value in value.items():
                    assert getattr(got, inner) == inner_value, f"{preset}: {section}.{key}.{inner}"
            else:
                assert got == value, f"{preset}: {section}.{key}"


def test_off_in_a_preset_is_the_string_off_not_false() -> None:
    # YAML 1.1 would read "off" as False; the concave preset relies on the string.
    assert load_config("concave").direction.tensioner.formulation == "off"
    assert load_config(None, ["direction.tensioner.formulation=off"]).direction.tensioner.formulation == "off"


def test_a_preset_may_be_a_path(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  epochs: 3\n")
    config = load_config(str(path))
    assert config.train.epochs == 3
    assert config.name == "mine"
    assert config.train.lr == TrainConfig().lr  # untouched keys keep their defaults


def test_no_preset_gives_the_defaults() -> None:
    assert load_config(None) == Config()


def test_unknown_preset_lists_the_known_ones() -> None:
    message = error_of("no_such_preset")
    assert "'no_such_preset'" in message
    for name in PRESETS:
        assert name in message


def test_a_preset_file_without_a_yaml_ending_is_named_so_not_not_found(tmp_path: Path) -> None:
    for name in ("mine.txt", "mine"):
        path = write(tmp_path, "train:\n  epochs: 3\n", name)
        assert error_of(str(path)) == (f"preset {path} is not named as a YAML file; presets are YAML, so give the file "
                                       "a .yaml or .yml ending.")


def test_a_file_name_that_cannot_name_a_run_is_blamed_on_the_file_name(tmp_path: Path) -> None:
    # The message said "'name' in FILE is '.'", a key the file never set.
    path = write(tmp_path, "train:\n  epochs: 3\n", "..yaml")
    assert error_of(str(path)) == (f"preset {path} sets no 'name', so its file name would name the runs, and '.' "
                                   "cannot be part of a run folder name (at most 200 bytes, no '/' or '\\', not '.' or "
                                   "'..'); add a line such as name: my-run to the file, or rename it.")
    path.write_text("name: fine\ntrain:\n  epochs: 3\n")
    assert load_config(str(path)).name == "fine"


# ----------------------------------------------------------------------------------------------- bad keys


def test_mistyped_key_names_key_file_and_valid_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  epoch: 3\n")
    message = error_of(str(path))
    assert "'train.epoch'" in message
    assert str(path) in message
    for key in ("epochs", "batch_size", "lr", "optimizer", "device", "seed"):
        assert key in message


def test_unknown_section_names_the_top_level_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "trian:\n  epochs: 3\n")
    message = error_of(str(path))
    assert "'trian'" in message and str(path) in message
    for section in ("data", "model", "train", "direction", "search"):
        assert section in message


def test_unknown_nested_key_is_named_with_its_full_path(tmp_path: Path) -> None:
    path = write(tmp_path, "direction:\n  tensioner:\n    alfa: 0.3\n")
    message = error_of(str(path))
    assert "'direction.tensioner.alfa'" in message
    assert "alpha" in message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("train:\n  epochs: three\n", "train.epochs"),
        ("train:\n  epochs: 2.5\n", "train.epochs"),
        ("train:\n  epochs: true\n", "train.epochs"),  # a bool is not an int here
        ("train:\n  lr: fast\n", "train.lr"),
        ("model:\n  hidden: 64\n", "model.hidden"),
        ("model:\n  hidden: [64, x]\n", "model.hidden"),
        ("data:\n  options: [1, 2]\n", "data.options"),
        ("data:\n  root: 5\n", "data.root"),
        ("train: 5\n", "train"),
    ],
)
def test_wrong_type_names_the_key_and_file(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path, text)
    message = error_of(str(path))
    assert f"'{key}'" in message
    assert str(path) in message


def test_ints_are_accepted_where_floats_are_expected(tmp_path: Path) -> None:
    config = load_config(str(write(tmp_path, "train:\n  lr: 1\n")))
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)


@pytest.mark.parametrize(("text", "value"), [("01", 1), ("010", 10), ("-007", -7), ("0o17", 15), ("0x1f", 31)])
def test_a_leading_zero_is_a_decimal_int_as_in_yaml_1_2(tmp_path: Path, text: str, value: int) -> None:
    # PyYAML's 1.1 rules read 01 as a float here ("must be a whole number, got 1.0") and 010 as octal 8.
    assert load_config(None, [f"train.epochs={text}"]).train.epochs == value
    assert load_config(str(write(tmp_path, f"train:\n  epochs: {text}\n"))).train.epochs == value


def test_a_string_of_digits_with_a_leading_zero_survives_the_round_trip(tmp_path: Path) -> None:
    config = load_config(None, ["data.root='007'"])
    dump_config(config, tmp_path / "config.yaml")
    assert load_config(str(tmp_path / "config.yaml")).data.root == "007"


def test_a_key_given_twice_in_a_preset_is_refused_with_the_key_and_the_file(tmp_path: Path) -> None:
    # PyYAML keeps the last of the two silently: one of the user's settings was dropped unseen.
    path = write(tmp_path, "train:\n  epochs: 2\n  lr: 0.1\n  epochs: 5\n")
    message = error_of(str(path))
    assert "'epochs' twice" in message and str(path) in message and "line 4" in message
    assert "'train' twice" in error_of(str(write(tmp_path, "train: {epochs: 2}\ntrain: {lr: 0.1}\n", "two.yaml")))


def test_a_key_given_twice_in_a_set_value_is_refused() -> None:
    message = error_of(None, ["data.options={a: 1, a: 2}"])
    assert "'a' twice" in message and "--set 'data.options={a: 1, a: 2}'" in message


def test_overrides_given_as_one_string_are_refused_not_read_letter_by_letter() -> None:
    # Before: load_config("quick", "train.epochs=2") read 't' as the first override: "--set 't' is not of the form".
    assert error_of("quick", "train.epochs=2") == (
        "overrides must be a list of 'section.key=value' strings, got the string 'train.epochs=2'; wrap it in a "
        "list: ['train.epochs=2'].")


def test_a_merged_key_may_still_be_overridden() -> None:
    # << merges are not duplicates: overriding a merged key is their purpose.
    assert load_yaml("a: &b {x: 1, y: 2}\nc:\n  <<: *b\n  x: 3\n")["c"] == {"x": 3, "y": 2}


def test_a_preset_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "- a\n- b\n")
    assert str(path) in error_of(str(path))


def test_a_section_set_to_a_value_names_a_key_to_set_instead(tmp_path: Path) -> None:
    assert error_of(None, ["train=3"]) == ("'train' in --set train=3 must be a mapping of keys, got 3; set its keys "
                                           "(such as train.mode), not the section itself.")
    path = write(tmp_path, "direction:\n  tensioner: off\n")
    assert "'direction.tensioner' in " in error_of(str(path)) and "(such as direction.tensioner.formulation)" in (
        error_of(str(path)))


def test_invalid_yaml_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "train: [unclosed\n")
    message = error_of(str(path))
    assert str(path) in message and "YAML" in message



def test_a_preset_that_cannot_be_read_as_utf8_text_is_refused(tmp_path: Path, monkeypatch) -> None:
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe train: 1\n")
    assert "is not UTF-8 text" in error_of(str(binary))
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    assert "is a folder, not a YAML file" in error_of(str(folder))
    # Named without its suffix: said "cannot be read (Is a directory); make it readable".
    assert error_of(str(tmp_path / "folder")) == (f"preset {folder} is a folder, not a YAML file; pass the file "
                                                  "inside it or another preset.")
    locked = write(tmp_path, "train: {epochs: 1}\n")

    def denied(self, *args, **kwargs):  # root reads any file, so permissions cannot be tested directly
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_text", denied)
    assert "cannot be read (Permission denied)" in error_of(str(locked))

# ------------------------------------------------------------------------------------------------- --set


def test_set_overrides_a_value_over_the_preset() -> None:
    config = load_config("quick", ["train.epochs=1"])
    assert config.train.epochs == 1
    assert config.data.train_size == load_config("quick").data.train_size


def test_set_reaches_nested_sections_and_repeats_apply_in_order() -> None:
    config = load_config(
        "multimnist",
        ["direction.tensioner.T=5", "train.lr=0.5", "train.lr=1e-3", "direction.tensioner.alpha=0"],
    )
    assert config.direction.tensioner.T == 5
    assert config.direction.tensioner.alpha == 0.0
    assert config.direction.tensioner.formulation == "thesis"  # siblings of an overridden key stay
    assert config.train.lr == 0.001  # the last --set of a key wins; 1e-3 is a number, not a string


def test_set_values_are_read_as_yaml() -> None:
    config = load_config(
        None,
        ["model.hidden=[8, 4]", "data.root=null", "search.baselines=false", "data.options={d: 3, gates: [xor]}",
         "model.backbone=timm:resnet18", "data.name=plugins/my.py:build"],
    )
    assert config.model.hidden == [8, 4]
    assert config.data.root is None
    assert config.search.baselines is False
    assert config.data.options == {"d": 3, "gates": ["xor"]}
    assert config.model.backbone == "timm:resnet18"
    assert config.data.name == "plugins/my.py:build"


def test_set_changes_only_the_named_key_of_a_mapping() -> None:
    # The logic preset sets data.options gates and scale.
    config = load_config("logic", ["data.options.scale=4"])
    assert config.data.options == {"gates": ["xor", "and"], "scale": 4}
    # A whole mapping as the value replaces it: the way to drop a preset's dataset options.
    assert load_config("logic", ["data.options={}"]).data.options == {}
    assert load_config("logic", ["data.options={scale: 2}"]).data.options == {"scale": 2}


def test_empty_section_means_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  # epochs: 3\nsearch:\n  rounds: 0\n")
    config = load_config(str(path))
    assert config.train == TrainConfig() and config.search.rounds == 0


def test_set_with_an_unknown_key_names_the_override_and_valid_keys() -> None:
    message = error_of("quick", ["train.epoch=1"])
    assert "'train.epoch'" in message
    assert "--set train.epoch=1" in message
    assert "epochs" in message


def test_set_with_a_wrong_type_names_the_override() -> None:
    message = error_of("quick", ["train.batch_size=big"])
    assert "'train.batch_size'" in message and "--set train.batch_size=big" in message


@pytest.mark.parametrize(("override", "wanted"), [
    ("train.batch_size=big", "a whole number, got 'big'"), ("train.lr=fast", "a number, got 'fast'"),
    ("train.optimizer=3", "a string, got 3"), ("search.baselines=maybe", "true or false, got 'maybe'"),
    ("search.final_epochs=abc", "a whole number or null, got 'abc'"),
    ("train.threads=1.5", "a whole number or null, got 1.5"),
])
def test_a_wrong_type_is_named_as_yaml_writes_it(override: str, wanted: str) -> None:
    assert error_of("quick", [override]).endswith(f"must be {wanted}; fix the value.")


def test_a_whole_number_written_as_a_float_is_taken() -> None:
    # "must be a whole number, got 1000.0" for data.train_size=1e3: YAML reads 1e3 as a float, the user means 1000.
    config = load_config("quick", ["data.train_size=1e3", "train.epochs=2.0", "tune.T=[1e1, 20]"])
    assert (config.data.train_size, config.train.epochs, config.tune.T) == (1000, 2, [10, 20])
    assert all(type(v) is int for v in (config.data.train_size, config.train.epochs, *config.tune.T))


@pytest.mark.parametrize(("override", "message"), [
    # Before: "'tune.T' in ... must be a list or null, got [2, inf]", though it was a list.
    ("tune.T=[2, .inf]", "every item of 'tune.T' in --set tune.T=[2, .inf] must be a whole number, got inf in "
                         "[2, inf]"),
    ("tune.T=[2.5, 3]", "every item of 'tune.T' in --set tune.T=[2.5, 3] must be a whole number, got 2.5 in [2.5, 3]"),
    ("tune.threshold=[1, 2]", "every item of 'tune.threshold' in --set tune.threshold=[1, 2] must be a string, got 1 "
                              "in [1, 2]"),
    ("model.hidden=[8, x]", "every item of 'model.hidden' in --set model.hidden=[8, x] must be a whole number, got "
                            "'x' in [8, 'x']"),
    ("tune.T=3", "'tune.T' in --set tune.T=3 must be a list or null, got 3"),
])
def test_a_bad_item_of_a_list_is_named(override: str, message: str) -> None:
    assert error_of("quick", [override]) == f"{message}; fix the value."


@pytest.mark.parametrize("text", ["train.epochs", "=3", " =3", "train.epochs 3", "train..lr=1", "train.=1"])
def test_bad_set_syntax_shows_the_expected_form(text: str) -> None:
    message = error_of(None, [text])
    assert f"'{text}'" in message
    assert "section.key=value" in message


@pytest.mark.parametrize("value", ["[unclosed", "!!float abc", "!!bool abc", "!!timestamp abc", "!!int abc"])
def test_set_with_invalid_yaml_value_is_refused(value: str) -> None:
    # A tag whose text PyYAML cannot read crashed with its constructor's ValueError, KeyError or AttributeError.
    message = error_of(None, [f"train.lr={value}"])
    assert message == (f"--set 'train.lr={value}' has a value that is not valid YAML; write a plain value "
                       "(train.lr=0.5, a list as [1, 2]) or quote a text (train.lr='...').")


def test_a_preset_with_an_unreadable_tagged_value_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  lr: !!bool maybe\n")
    assert error_of(str(path)) == f"preset {path} is not valid YAML (ConstructorError); fix its syntax there."


@pytest.mark.parametrize(("text", "where"), [
    ("data:\n  name: x\n   epochs: 2\n", "mapping values are not allowed here, line 3 column 10"),
    ("train:\n\tepochs: 2\n", "a tab, where YAML indents with spaces only, line 2 column 1"),
    ("train:\n  epochs: [2\n", "expected ',' or ']', but got '<stream end>', line 3 column 1, while parsing a flow "
                               "sequence from line 2"),
])
def test_a_preset_with_a_syntax_error_names_its_line_and_column(tmp_path: Path, text: str, where: str) -> None:
    # The message named only PyYAML's class (ScannerError, ParserError): no way to find the slip in a long preset.
    path = write(tmp_path, text)
    assert error_of(str(path)) == f"preset {path} is not valid YAML ({where}); fix its syntax there."


def test_split_override_reads_the_key_path_and_a_yaml_value() -> None:
    assert split_override("a.b.c=1") == (["a", "b", "c"], 1)
    assert split_override("train.device=cuda:0") == (["train", "device"], "cuda:0")
    assert split_override(" data.root =") == (["data", "root"], None)


# -------------------------------------------------------------------------------------------- round trip


def test_resolved_config_round_trips_through_yaml(tmp_path: Path) -> None:
    config = load_config(
        "concave",
        ["train.lr=1e-5", "data.options={d: 3}", "model.weights=/tmp/w.pt", "direction.tensioner.alpha=0.25"],
    )
    path = tmp_path / "config.yaml"
    dump_config(config, path)
    assert config_from_dict(load_yaml(path.read_text()), str(path)) == config
    # The written file is itself a preset: a run can be repeated from its folder.
    assert load_config(str(path)) == config


def test_strings_that_look_like_numbers_survive_the_round_trip(tmp_path: Path) -> None:
    # A preset named 1e3.yaml: PyYAML's own dumper writes the name unquoted (a string in YAML 1.1), and mamo's
    # core-schema loader would read it back as 1000.0, so --resume and re-running from config.yaml failed.
    preset = tmp_path / "1e3.yaml"
    preset.write_text("train: {epochs: 2}\n")
    config = load_config(str(preset), ["data.root='0x1f'", "direction.tensioner.formulation=off"])
    dump_config(config, tmp_path / "config.yaml")
    assert load_config(str(tmp_path / "config.yaml")) == config
    assert load_config(str(tmp_path / "config.yaml")).name == "1e3"


def test_config_from_dict_validates_like_a_preset() -> None:
    raw = dataclasses.asdict(Config())
    raw["data"] = {**raw["data"], "sede": 1}
    with pytest.raises(MamoError, match="'data.sede' in checkpoint"):
        config_from_dict(raw, "checkpoint")
    assert config_from_dict({"data": {"seed": 4}}, "x").data == DataConfig(seed=4)
