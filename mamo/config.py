"""The typed run configuration: YAML presets in search_spaces/, validated, with ``--set`` overrides.

Every key a preset may hold is a field below. Unknown or mistyped keys fail with one sentence that names
the key, the file and the valid keys. :func:`load_config` is the only entry point the CLI uses.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mamo.errors import MamoError
from mamo.yaml_core import DuplicateKeyError, YamlDumper, load_yaml


def _preset_dir() -> Path:
    """The copy of search_spaces/ an installed wheel carries inside the package, else (a checkout, editable
    installs included) the folder beside the package."""
    package = Path(__file__).resolve().parent
    packaged = package / "search_spaces"
    return packaged if packaged.is_dir() else package.parent / "search_spaces"


PRESET_DIR = _preset_dir()
# torch.finfo(torch.float32).max, without importing torch: the optimizers pass the learning rate and weight decay
# through float32, so a larger one cannot even be held (one below may still overflow in the update: a divergence).
FLOAT32_MAX = 3.4028234663852886e38


@dataclass
class DataConfig:
    name: str = "multimnist"  # built-in name, or 'path/to/file.py:function' / 'package.module:function'
    root: str | None = None  # local data folder (Fashion-MNIST idx files, plugin data)
    seed: int = 0  # seeds dataset construction; splits are a pure function of it
    train_size: int | None = None  # None: the dataset's default
    val_size: int | None = None
    test_size: int | None = None
    options: dict[str, Any] = field(default_factory=dict)  # dataset-specific keyword arguments


@dataclass
class ModelConfig:
    backbone: str = "lenet"  # mlp | cnn | lenet | timm:<model name>
    hidden: list[int] = field(default_factory=lambda: [64, 64])  # mlp: width of each shared cell; cnn: channels
    activation: str = "relu"  # mlp, cnn: relu | sigmoid | tanh | identity
    weights: str | None = None  # timm: local file with pretrained weights (never downloaded)
    latent: int = 50  # lenet: size of the shared representation (Sener & Koltun use 50)
    head_hidden: int = 50  # hidden width of each task head; 0 = a single linear layer


@dataclass
class TrainConfig:
    mode: str = "mtl"  # mtl: one shared network | stl: one network per task
    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-2
    optimizer: str = "sgd"  # sgd | adam | adamw
    momentum: float = 0.9
    weight_decay: float = 0.0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    gradients: str = "exact"  # exact: per-parameter task gradients | ub: MGDA-UB on the shared representation
    precision: str = "fp32"  # fp32 | bf16 (autocast forward; gradients, Gramian and solve stay fp32)
    gradient_path: str = "auto"  # auto | loop | batched: how per-task gradients are computed (auto: per device)
    gradient_layout: str = "auto"  # auto | flat | parameters: how they are held (auto: by device, size, tasks)
    cuda_graphs: bool = False  # on CUDA: replay each step's forward and backward passes from CUDA graphs
    checkpoint_seconds: float = 60.0  # at most this long between in-run checkpoints (0: after every epoch)
    threads: int | None = None  # torch's CPU threads for the run (None: torch's default); CPU results depend on it


MAX_WINDOW = 10**9  # direction.tensioner.T: longer than any training; far larger overflowed the norm history


@dataclass
class TensionerConfig:
    formulation: str = "thesis"  # off | thesis | relative
    T: int = 10  # in [1, MAX_WINDOW]
    alpha: float = 0.3


@dataclass
class DirectionConfig:
    name: str = "mgda"  # a key of mamo.directions.DIRECTIONS (the search default: MGDA + tensioner)
    normalization: str = "none"  # mgda: none | l2 | loss | loss+
    cagrad_c: float = 0.5
    tensioner: TensionerConfig = field(default_factory=TensionerConfig)


@dataclass
class SearchConfig:
    rounds: int = 2  # Z, the number of conflict-detection rounds (0 = HPS)
    pretrain_epochs: int = 2
    round_epochs: int = 1
    final_epochs: int | None = None  # None: the rest of train.epochs (the baselines' budget), whatever Z is
    threshold: str = "global"  # global | layer | topk:K
    modules: str = "gmk"  # gmk: pair modules (MAMO) | exclusive: task-exclusive modules (CoNAL, 'w/o GMK')
    baselines: bool = True  # train (or reuse cached) STL and HPS for the report
    keep_checkpoints: bool = True  # false: a finished search removes its phase checkpoints (tune studies' disk)


@dataclass
class TuneConfig:
    """The Optuna search space of ``mamo tune``; ranges are [low, high], choices are lists (None: not tuned)."""

    T: list[int] | None = field(default_factory=lambda: [2, 30])  # the tensioner's window; null: not tuned
    alpha: list[float] | None = field(default_factory=lambda: [0.0, 1.0])  # the tensioner's sensitivity
    rounds: list[int] | None = field(default_factory=lambda: [0, 5])  # Z, conflict-detection rounds
    lr: list[float] | None = None  # [low, high], log-uniform
    threshold: list[str] | None = None  # e.g. [global, layer, topk:2]
    direction: list[str] | None = None  # base directions, e.g. [mgda, central]
    formulation: list[str] | None = None  # tensioner formulations, e.g. [thesis, relative]
    normalization: list[str] | None = None  # mgda gradient normalisations, e.g. [none, l2]
    modules: list[str] | None = None  # what grows, e.g. [gmk, exclusive] (MAMO's GMKs or task-exclusive modules)
    pruner: str = "median"  # median | percentile | hyperband | none
    trials: int = 20  # default of --trials


@dataclass
class Config:
    name: str = "default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    direction: DirectionConfig = field(default_factory=DirectionConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_PLAIN_TYPES = {int: "a whole number", float: "a number", str: "a string", bool: "true or false",
                type(None): "null"}


def _type_name(kind: Any) -> str:
    """The type a setting takes, as a user writes it in YAML ("a whole number or null", not "int | None")."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(map(_type_name, typing.get_args(kind)))
    if origin is list:
        return "a list"
    if origin is dict:
        return "a mapping"
    return _PLAIN_TYPES.get(kind, getattr(kind, "__name__", str(kind).replace("typing.", "")))


def yaml_text(value: Any) -> str:
    """A value as config.yaml writes it: ``null``, ``true``, ``false``, quoted strings, numbers."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return repr(value)


def _coerce(value: Any, kind: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``kind``; ints are accepted where floats are expected."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(kind):
            if option is type(None) and value is None:
                return None
            if option is not type(None):
                if isinstance(value, list) and typing.get_origin(option) is list:
                    return _coerce(value, option, key, source)  # a list: its error names the bad item
                try:
                    return _coerce(value, option, key, source)
                except MamoError:
                    continue
        raise MamoError(f"'{key}' in {source} must be {_type_name(kind)}, got {yaml_text(value)}; fix the value.")
    if origin is list:
        (item,) = typing.get_args(kind)
        if not isinstance(value, list):
            raise MamoError(f"'{key}' in {source} must be a list, got {value!r}; write it as [a, b, ...].")
        items = []
        for entry in value:
            try:
                items.append(_coerce(entry, item, key, source))
            except MamoError:
                raise MamoError(f"every item of '{key}' in {source} must be {_type_name(item)}, got "
                                f"{yaml_text(entry)} in {yaml_text(value)}; fix the value.") from None
        return items
    if origin is dict:
        if not isinstance(value, dict):
            raise MamoError(f"'{key}' in {source} must be a mapping, got {value!r}; write it as {{k: v}}.")
        return dict(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():  # 1e3 is YAML's float, and means 1000
        return int(value)
    if kind is Any or (isinstance(value, kind) and not (kind is int and isinstance(value, bool))):
        return value
    raise MamoError(f"'{key}' in {source} must be {_type_name(kind)}, got {yaml_text(value)}; fix the value.")


def _build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    if not isinstance(raw, dict):
        example = f"{prefix}.{dataclasses.fields(cls)[0].name}" if prefix else "train.epochs"
        raise MamoError(f"'{prefix or 'the preset'}' in {source} must be a mapping of keys, got {raw!r}; set its "
                        f"keys (such as {example}), not the section itself.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            valid = ", ".join(names)
            raise MamoError(f"unknown key '{full}' in {source}; valid keys in '{prefix or 'the top level'}': {valid}.")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            # An empty section ("train:" with every key commented out) means the defaults.
            kwargs[key] = _build(kind, {} if value is None else value, full, source)
        else:
            kwargs[key] = _coerce(value, kind, full, source)
    return cls(**kwargs)


NAME_MAX_BYTES = 200  # a folder name may hold 255 bytes; run folders add a time stamp and the command to the name


def _unfit_name(name: str) -> bool:
    return (not name.strip() or name in (".", "..") or any(c in "/\\" or ord(c) < 32 or ord(c) == 127 for c in name)
            or len(name.encode("utf-8", "surrogatepass")) > NAME_MAX_BYTES)


def _check_name(config: Config, source: str) -> Config:
    """``config`` after checking that its ``name`` fits in one folder name: run folders are
    runs/<time>-<command>-<name>, so a '/' in it made nested folders and '../..' left runs/."""
    name = config.name
    if _unfit_name(name):
        raise MamoError(f"'name' in {source} is {name!r}, which cannot be part of a run folder name; use letters, "
                        f"digits, spaces and punctuation other than '/' and '\\', at most {NAME_MAX_BYTES} bytes and "
                        "not '.' or '..', e.g. my-run.")
    return config


def _set_path(raw: dict, path: list[str], value: Any) -> dict:
    """A copy of ``raw`` with the value at ``path`` replaced; sections along the path are copied, not shared.

    Only the named key changes: ``data.options.d=3`` keeps the other options, ``data.options={d: 3}`` replaces them.
    """
    out = dict(raw)
    head, *rest = path
    if rest:
        inner = out.get(head)
        out[head] = _set_path(inner if isinstance(inner, dict) else {}, rest, value)
    else:
        out[head] = value
    return out


def resolve_preset(preset: str | None) -> Path | None:
    """A preset is a YAML path, or a name looked up in search_spaces/ (``quick`` -> search_spaces/quick.yaml)."""
    if preset is None:
        return None
    path = Path(preset)
    # A YAML path, else search_spaces/<name>.yaml (an absolute path without its suffix lands on <path>.yaml).
    for candidate in ([path] if path.suffix in (".yaml", ".yml") else []) + [PRESET_DIR / f"{preset}.yaml"]:
        if candidate.is_dir():
            raise MamoError(f"preset {candidate} is a folder, not a YAML file; pass the file inside it or another "
                            "preset.")
        if candidate.exists():
            return candidate
    if path.is_file():  # was "not found", for a file that is there
        raise MamoError(f"preset {path} is not named as a YAML file; presets are YAML, so give the file a .yaml or "
                        ".yml ending.")
    known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    raise MamoError(f"preset '{preset}' was not found; pass a YAML file or one of: {', '.join(known)}.")


def split_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=0.1`` -> ``(["train", "lr"], 0.1)``; the value is read as YAML (an empty value is null)."""
    key, sep, value = text.partition("=")
    path = key.strip().split(".")
    if not sep or not all(part.strip() for part in path):
        raise MamoError(f"--set '{text}' is not of the form section.key=value; write e.g. --set train.epochs=3.")
    try:
        parsed = load_yaml(value) if value.strip() else None
    except DuplicateKeyError as exc:
        raise MamoError(f"--set '{text}' has the key '{exc.key}' twice; keep one of them.") from exc
    except yaml.YAMLError as exc:
        # Quoting alone was the advice, which turns a broken number into a string the key then refuses.
        raise MamoError(
            f"--set '{text}' has a value that is not valid YAML; write a plain value ({key.strip()}=0.5, a list as "
            f"[1, 2]) or quote a text ({key.strip()}='...')."
        ) from exc
    return [part.strip() for part in path], parsed


def yaml_problem(exc: yaml.YAMLError) -> str:
    """Where and what PyYAML found wrong, in words: ``mapping values are not allowed here, line 3 column 10``."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if problem is None or mark is None:
        return exc.__class__.__name__
    if "'\\t'" in problem:  # PyYAML's words for a tab read as a Python escape
        problem = "a tab, where YAML indents with spaces only"
    where = f"{problem}, line {mark.line + 1} column {mark.column + 1}"
    context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and start is not None and start.line != mark.line:  # an unclosed bracket: where it opened
        where += f", {context} from line {start.line + 1}"
    return where


def load_config(preset: str | None = None, overrides: list[str] | tuple[str, ...] = (), kind: str = "preset",
                ) -> Config:
    """The preset's values over the defaults, then each ``--set`` override; validated as a whole. ``kind`` is
    what messages call the file (a run's saved config.yaml is not a preset to its user)."""
    if isinstance(overrides, str):  # iterated, it gave one override per character: "--set 't' is not of the form"
        raise MamoError(f"overrides must be a list of 'section.key=value' strings, got the string {overrides!r}; "
                        f"wrap it in a list: [{overrides!r}].")
    path = resolve_preset(preset)
    raw: dict = {}
    if path is not None:
        try:
            raw = load_yaml(path.read_text(encoding="utf-8")) or {}
        except DuplicateKeyError as exc:
            raise MamoError(f"{kind} {path} has the key '{exc.key}' twice (again on line {exc.line}); keep one of "
                            "them.") from exc
        except yaml.YAMLError as exc:
            raise MamoError(f"{kind} {path} is not valid YAML ({yaml_problem(exc)}); fix its syntax there.") from exc
        except UnicodeDecodeError as exc:
            raise MamoError(f"{kind} {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8 YAML.") from exc
        except OSError as exc:
            raise MamoError(f"{kind} {path} cannot be read ({exc.strerror or exc}); make it readable.") from exc
        if not isinstance(raw, dict):
            raise MamoError(f"{kind} {path} holds a {type(raw).__name__}, not a mapping of sections; "
                            "write it as 'section: {key: value}'.")
        if "name" not in raw and _unfit_name(path.stem):
            raise MamoError(f"{kind} {path} sets no 'name', so its file name would name the runs, and "
                            f"'{path.stem}' cannot be part of a run folder name (at most {NAME_MAX_BYTES} bytes, no "
                            "'/' or '\\', not '.' or '..'); add a line such as name: my-run to the file, or rename it.")
        raw.setdefault("name", path.stem)
    source = str(path) if path else "the defaults"
    config = config_from_dict(raw, source)
    for text in overrides:
        raw = _set_path(raw, *split_override(text))
        config = config_from_dict(raw, f"--set {text}")
    return config


def config_text(config: Config) -> str:
    """The resolved config as YAML that :func:`load_config` reads back unchanged (config.yaml, TensorBoard's text)."""
    return yaml.dump(config.to_dict(), Dumper=YamlDumper, sort_keys=False, allow_unicode=True)


def dump_config(config: Config, path: Path) -> None:
    path.write_text(config_text(config), encoding="utf-8")  # what load_config reads, whatever the locale


def config_from_dict(raw: dict, source: str) -> Config:
    return _check_name(_build(Config, raw, "", source), source)


def given_config(config: object, resume: bool, caller: str) -> None:
    """Refuse what ``caller`` (``run_search``, ``run_train``) cannot run: a new run needs a :class:`Config`;
    with ``resume=True`` the run folder's own is read and ``config`` may be None."""
    if not resume and not isinstance(config, Config):
        raise MamoError(f"{caller} got {type(config).__name__} for config; pass mamo.config.load_config(...) for a "
                        "new run, or resume=True (with None) to continue the one in run_dir.")
