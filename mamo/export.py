"""Taking a trained model away: the ``export`` and ``show`` commands.

A run folder holds ``architecture.json`` (node-link JSON, the canonical description) and
``weights.safetensors``; :func:`load_trained` rebuilds the model from those two files alone. ``export`` writes
the graph as GraphML, DOT or a PNG drawing, and the model as an ONNX file or a ``torch.export`` program
(``.pt2``); every format is one entry of :data:`FORMATS`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import networkx as nx
import torch
from tqdm import tqdm

from mamo import graph as g
from mamo.config import load_config
from mamo.errors import MamoError
from mamo.model import MamoNet, compile_model
from mamo.runs import (
    cli,
    counted,
    in_use,
    refuse_file_above,
    run_command,
    stderr_on_terminal,
    utf8_path,
)
from mamo.writes import replace_atomically, temporary_beside, write_text_atomically, write_through_file


def _trains_per_task(directory: Path) -> bool:
    """Whether ``directory`` is a ``train.mode=stl`` run (its config.yaml says so)."""
    try:
        return load_config(str(directory / "config.yaml")).train.mode == "stl"
    except MamoError:  # no or no readable config.yaml: not a run this question can answer
        return False


class _Damaged(Exception):
    """What :func:`load_trained` found wrong in architecture.json, for its one error sentence."""


def load_trained(run_dir: str | Path, device: torch.device | str = "cpu") -> MamoNet:
    """The model of a finished run, rebuilt from architecture.json + weights.safetensors, in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = utf8_path(run_dir, "the run folder")  # else safetensors refuses it, which read as damaged files
    paths = [directory / "architecture.json", directory / "weights.safetensors"]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise MamoError(_no_model(directory, missing))
    try:
        data = json.loads(paths[0].read_text(encoding="utf-8"))
        if not isinstance(data, dict):  # valid JSON, but not the node-link object save_model writes
            kinds = {list: "an array", str: "a string", type(None): "null", bool: "a boolean"}
            kind = kinds.get(type(data), "a number")
            raise _Damaged(f"architecture.json holds {kind}, not a graph object")
        graph = g.graph_from_dict(data)
        damage = g.structure_error(graph)
        if damage:
            raise _Damaged(f"architecture.json is damaged: {damage}")
        g.drop_initial_weights(graph)
        # On the CPU: a device's errors (no driver, out of memory) are not the files' and must not read as them.
        state = load_file(str(paths[1]), device="cpu")
        model = compile_model(graph, device="cpu")
        model.load_state_dict(state)  # RuntimeError when the weights do not fit the architecture
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError, OSError, RuntimeError,
            SafetensorError, nx.NetworkXException, _Damaged) as exc:  # what a damaged file makes networkx, torch raise
        what = str(exc) if isinstance(exc, _Damaged) else type(exc).__name__
        raise MamoError(f"the model files in {directory} are unreadable or do not fit together "
                        f"({what}); restore them from a copy or {_rerun(directory, run_command(directory))}.") from exc
    from mamo.trainer import resolve_device  # here: export's commands need no trainer until a model loads

    # Checked by name: torch's own error on a machine without CUDA ("Found no NVIDIA driver") named no option.
    return model.to(resolve_device(str(device), option="load_trained's device")).eval()


def _no_model(directory: Path, missing: list[Path]) -> str:
    """Why ``directory`` has no model to load, and what to pass or do instead."""
    if not directory.exists():
        return f"{directory} does not exist; pass the folder of a finished train or search run."
    if directory.is_file():
        holder = next((p for p in directory.parents if (p / "config.yaml").is_file()), directory.parent)
        return f"{directory} is a file; pass the run folder that holds it, e.g. {holder}."
    if _trains_per_task(directory):
        return (f"{directory} holds an STL run (train.mode=stl: one network per task), which has no single "
                "architecture to show or export; pass a search run or an HPS train run.")
    if (directory / "study.yaml").is_file():
        trials = sorted(p.parent for p in directory.glob("trial-*/architecture.json"))
        if not trials:
            return (f"{directory} is a tune study folder none of whose trials has finished yet; pass a trial "
                    "folder once one has.")
        return (f"{directory} is a tune study folder; pass one of its trial folders, e.g. {trials[0]} (summary.md "
                "names the best).")
    command = run_command(directory)
    names = " and ".join(p.name for p in missing)
    if command and not (directory / "metrics.json").exists() and in_use(directory):
        # Its --resume would only be refused beside the running command.
        return (f"{directory} holds a {command} run that is still running (no {missing[0].name} yet); pass it "
                "again once it has finished.")
    if command and not (directory / "metrics.json").exists() and (directory.parent / "study.yaml").is_file():
        # A tune trial: pruned, failed or still running; --resume would finish what the pruner stopped.
        return (f"{directory} is a tune trial that did not finish (pruned, failed or still running: no "
                f"{missing[0].name}); pass a finished trial of its study (summary.md in {directory.parent} names "
                "the best).")
    if command and not (directory / "metrics.json").exists():
        return (f"{directory} holds a {command} run that has not finished (no {missing[0].name}); finish it with "
                f"{cli(command, '--resume', directory)}.")
    if command:
        return (f"{directory} is a finished {command} run whose {names} is gone; restore it from a copy or "
                f"{_rerun(directory, command)}.")
    return f"{', '.join(map(str, missing))} not found; pass the folder of a finished train or search run."


def _rerun(directory: Path, command: str | None) -> str:
    """How to make a run's model files again: its saved config, run anew by ``command`` (seeded, so it trains
    the same)."""
    if command is None:
        return "rerun it"
    config = directory / "config.yaml"
    if not config.is_file():  # gone too: the command it names would fail on it
        kept = " (metrics.json lists them under 'config')" if (directory / "metrics.json").is_file() else ""
        again = cli(command, "PRESET", "--set", "KEY=VALUE")
        return f"rerun it with the preset and --set options it ran with{kept}: {again}"
    return f"rerun it with {cli(command, config, '--run-dir', 'NEW_FOLDER')}"


def example_input(model: MamoNet, batch: int = 2) -> torch.Tensor:
    shape = model.graph.graph["space"]["input_shape"]
    weight = next(model.parameters())  # its dtype, not torch's default: a notebook's float64 failed the export
    return torch.zeros(batch, *shape, device=weight.device, dtype=weight.dtype)


class _TupleOutputs(torch.nn.Module):
    """ONNX and torch.export want a tuple of tensors; outputs keep the task order of the graph."""

    def __init__(self, model: MamoNet):
        super().__init__()
        self.model = model
        self.tasks = list(model.tasks)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model(x)
        return tuple(outputs[t] for t in self.tasks)


def _flat_graph(graph: nx.DiGraph) -> nx.DiGraph:
    """A copy whose list/dict attributes are JSON strings: GraphML and DOT hold scalars only."""
    flat = nx.DiGraph()
    flat.graph.update({k: json.dumps(v) for k, v in graph.graph.items()})
    for node, data in graph.nodes(data=True):
        flat.add_node(node, **{k: v if isinstance(v, (int, float, str)) else json.dumps(v) for k, v in data.items()})
    flat.add_edges_from(graph.edges)
    return flat


def write_json(model: MamoNet, path: Path) -> None:
    write_text_atomically(path, g.graph_to_json(model.graph))


def write_graphml(model: MamoNet, path: Path) -> None:
    replace_atomically(path, lambda tmp: nx.write_graphml(_flat_graph(model.graph), tmp))


def write_dot(model: MamoNet, path: Path) -> None:
    def quote(*parts: object) -> str:
        # Escape each line's backslashes and quotes, then join with DOT's own line break (escaping the break
        # too would show a literal "\n").
        escaped = (str(part).replace("\\", "\\\\").replace('"', '\\"') for part in parts)
        return '"' + "\\n".join(escaped) + '"'

    lines = ["digraph mamo {", "  rankdir=LR;"]
    for node, data in model.graph.nodes(data=True):
        label = quote(node) if "params" not in data else quote(node, f"{data['params']:,} params")
        lines.append(f"  {quote(node)} [label={label}, kind={quote(data['kind'])}];")
    lines += [f"  {quote(a)} -> {quote(b)};" for a, b in model.graph.edges]
    write_text_atomically(path, "\n".join(lines + ["}"]) + "\n")


def write_png(model: MamoNet, path: Path) -> None:
    from mamo.drawing import draw_architecture

    draw_architecture(model.graph, path)


ONNX_INLINE_BYTES = 1 << 30  # weights up to this size go inside the .onnx file (protobuf's limit is 2 GiB)


def write_onnx(model: MamoNet, path: Path) -> None:
    """One self-contained .onnx file; only weights above :data:`ONNX_INLINE_BYTES` go to ``<name>.data`` beside
    it (torch's default writes them there always, and the .onnx copied alone does not load)."""
    wrapped = _TupleOutputs(model).eval()
    size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])

    def write(target: Path) -> None:
        try:
            torch.onnx.export(wrapped, (example_input(model),), str(target), input_names=["x"],
                              output_names=wrapped.tasks, dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                              dynamo=True, verbose=False, external_data=size > ONNX_INLINE_BYTES)
        except ImportError as exc:
            raise MamoError(f"ONNX export needs the onnx package ({exc}); pip install 'mamo[onnx]'.") from exc

    replace_from_folder(path, write)
    if size <= ONNX_INLINE_BYTES:  # a larger model's weights file from an earlier export would lie beside it unused
        path.with_name(f"{path.name}.data").unlink(missing_ok=True)


def replace_from_folder(path: Path, write: Callable[[Path], object]) -> None:
    """``write(file)`` to a file of ``path``'s name in a temporary folder beside it, then each file written there
    renamed into ``path``'s folder, ``path`` last: a failed write leaves the earlier files and no half of a new one.
    A folder, not a temporary name, because an .onnx file records the name of its weights file (``<name>.data``),
    which must be the final one; an error names the final file, not the temporary one."""
    staging = temporary_beside(path)
    try:
        staging.mkdir()
        write(staging / path.name)
        for written in sorted(staging.iterdir(), key=lambda file: file.name == path.name):
            written.replace(path.with_name(written.name))
    except OSError as exc:
        failed = Path(exc.filename) if isinstance(exc.filename, str) else None  # a failed write() names none
        if failed is not None and staging not in (failed, failed.parent):
            raise
        final = path if failed is None or failed == staging else path.with_name(failed.name)
        raise OSError(exc.errno, exc.strerror, str(final)) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_pt2(model: MamoNet, path: Path) -> None:
    wrapped = _TupleOutputs(model).eval()
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(wrapped, (example_input(model),), dynamic_shapes=({0: batch},))
    # Through a Python file into a temporary one: given a path, torch's own writer reported a full disk as
    # "unexpected pos", aborted the process and left half a model.pt2 in place of the earlier one.
    replace_atomically(path, lambda tmp: write_through_file(tmp, lambda file: torch.export.save(program, file)))


FORMATS: dict[str, tuple[str, Callable[[MamoNet, Path], None]]] = {
    "json": ("architecture.json", write_json),
    "graphml": ("architecture.graphml", write_graphml),
    "dot": ("architecture.dot", write_dot),
    "png": ("architecture.png", write_png),
    "onnx": ("model.onnx", write_onnx),
    "pt2": ("model.pt2", write_pt2),
}


def export(run_dir: str | Path, formats: str | Sequence[str], out_dir: str | Path | None = None,
           progress: bool = False, on_written: Callable[[Path], object] | None = None) -> list[Path]:
    """Write each of ``formats`` (one name, or several) for the run's model into ``out_dir`` (default: the run
    folder). ``progress``: a bar naming the file being written (an ONNX or .pt2 program of a ResNet-18 takes
    seconds); ``on_written(path)`` is called as each file is done."""
    # One name as a string: iterated, "pt2" was the formats "p", "t" and "2".
    formats = [formats] if isinstance(formats, str) else list(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise MamoError(f"unknown export format {', '.join(unknown)}; use any of {', '.join(FORMATS)}.")
    model = load_trained(run_dir)
    folder = utf8_path(out_dir, "--out") if out_dir else Path(run_dir)  # torch.export's writer aborts on another
    if folder.exists() and not folder.is_dir():
        raise MamoError(f"--out {folder} is a file; --out takes a folder to write into, e.g. --out {folder.parent}.")
    refuse_file_above(folder, "--out", "pass a folder elsewhere to --out")
    source = Path(run_dir).resolve()
    if folder.resolve() != source and any((folder / name).is_file() for name in RUN_FILES):
        raise MamoError(f"--out {folder} is the folder of another run (it holds {_run_file(folder)}), whose "
                        "architecture export would replace; pass a new or empty folder to --out.")
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    bar = tqdm(formats, unit="file", disable=not progress, leave=False, dynamic_ncols=True)
    for name in bar:
        filename, writer = FORMATS[name]
        bar.set_description(f"exporting {filename}")
        target = folder / filename
        # The canonical file the model was loaded from stays as the run wrote it (a rewrite would drop the
        # starting-weights path that load_trained forgets).
        if target.resolve() != source / "architecture.json":
            writer(model, target)
        written.append(target)
        if on_written is not None:
            on_written(target)
    return written


# Files only a run folder holds (an export folder holds architecture files and programs, never these).
RUN_FILES = ("config.yaml", "weights.safetensors", "metrics.json")


def _run_file(folder: Path) -> str:
    return next(name for name in RUN_FILES if (folder / name).is_file())


def architecture_tree(model: MamoNet) -> str:
    """The network as an indented tree: trunk cells, the branches that leave each cell, fusions and heads."""
    graph = model.graph
    params = {node: sum(p.numel() for _, p in named) for node, named in model.node_parameters().items()}
    lines = [f"input {graph.nodes[g.INPUT]['shape']}"]
    branches = g.branch_nodes(graph)
    first_cell = g.branch_first_cells(graph)
    for index in range(g.num_cells(graph)):
        lines.append(f"├─ cell{index}  ({params.get(g.cell_id(index), 0):,} params, shared by all tasks)")
        here = [node for node in branches if graph.nodes[node]["cell"] == index]
        for position, node in enumerate(here):
            data = graph.nodes[node]
            group = tuple(data["group"])
            start = first_cell[group]
            origin = "starts here" if start == index else f"continues the branch from cell{start}"
            name = f"│   {_twig(position, len(here))} {_module_kind(group)} {'+'.join(group)}"
            detail = f"({params.get(node, 0):,} params, grown in round {data['round']}, {origin})"
            if len(name) + 2 + len(detail) <= TREE_WIDTH:
                lines.append(f"{name}  {detail}")
            else:  # long task names: the detail goes under the name, indented past the twig
                lines += [name, f"│   {'│' if position < len(here) - 1 else ' '}    {detail}"]
    for position, task in enumerate(model.tasks):
        terms = ["trunk", *(f"β·{'+'.join(grp)}" for grp in g.fusion_groups(graph, task))]
        betas = params.get(g.fusion_id(task), 0)
        weighed = f"({counted(betas, 'param')}) " if betas else ""
        opening = f"{_twig(position, len(model.tasks))} {task}: fusion ["
        details = f"{weighed}→ head ({params.get(g.head_id(task), 0):,} params)"
        rail = "│" if position < len(model.tasks) - 1 else " "
        # Continued terms line up under the first, unless a long task name leaves them too little room.
        indent = rail.ljust(len(opening) if len(opening) <= TREE_WIDTH // 3 else 5)
        lines.append(_wrapped(terms, opening, details, indent))
    total = sum(p.numel() for p in model.parameters())
    kinds = sorted({_module_kind(tuple(graph.nodes[node]["group"])) for node in branches}) or ["GMK"]
    lines.append(f"{counted(len(branches), ' and '.join(kinds) + ' module')}, {total:,} parameters in all")
    return "\n".join(lines)


TREE_WIDTH = 100  # longer lines wrap (ten tasks made fusion lines of 500 characters)


def _wrapped(terms: list[str], opening: str, details: str, indent: str) -> str:
    """``opening``, ``terms`` joined by " + " and closed by "]", then ``details``; continued on lines that start
    with ``indent`` wherever a line would pass :data:`TREE_WIDTH`."""
    lines, line = [], opening + terms[0]
    for term in terms[1:]:
        if len(line) + 3 + len(term) > TREE_WIDTH:
            lines.append(line)
            line = f"{indent}+ {term}"
        else:
            line += f" + {term}"
    line += "]"
    if len(line) + 1 + len(details) > TREE_WIDTH:
        lines.append(line)
        line = indent + details
    else:
        line += " " + details
    return "\n".join([*lines, line])


def _twig(position: int, count: int) -> str:
    """The tree's connector for item ``position`` of ``count`` siblings: the last one closes the list."""
    return "└─" if position == count - 1 else "├─"


def _module_kind(group: tuple[str, ...]) -> str:
    """What a branch module of ``group`` is called: a pair's GMK, or one task's exclusive module (w/o GMK)."""
    return "GMK" if len(group) > 1 else "task-exclusive"


def add_arguments_export(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a finished train or search run folder")
    parser.add_argument("--format", dest="formats", action="append", choices=list(FORMATS), default=None,
                        help="what to write (repeatable; default: json, graphml, dot, png, onnx, pt2)")
    parser.add_argument("--out", default=None, help="folder to write into (default: the run folder)")


def command_export(args: argparse.Namespace) -> int:
    def named(path: Path) -> None:  # as each file is done: printed at the end, the terminal showed nothing for
        tqdm.write(str(path), file=sys.stdout)  # seconds (around the bar, which stays on stderr)
        sys.stdout.flush()

    export(args.run_dir, args.formats or list(FORMATS), args.out, progress=stderr_on_terminal(), on_written=named)
    return 0


def add_arguments_show(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a finished train or search run folder")


# The tree's lines and arrow in ASCII, for a terminal whose encoding has no box-drawing characters.
ASCII_TREE = str.maketrans({"├": "|", "└": "`", "│": "|", "─": "-", "→": "->", "β": "beta", "·": "*"})


def command_show(args: argparse.Namespace) -> int:
    tree = architecture_tree(load_trained(args.run_dir))
    try:
        tree.encode(getattr(sys.stdout, "encoding", None) or "utf-8")  # None: started with stdout closed (>&-)
    except (UnicodeEncodeError, LookupError):
        tree = tree.translate(ASCII_TREE)
    print(tree)
    return 0
