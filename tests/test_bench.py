"""Benchmarks: the ``bench`` dispatcher, smoke runs, and the vectorised logic trainer against mamo's own step."""

from __future__ import annotations

import contextlib
import json
import statistics
from importlib import metadata

import numpy as np
import pytest
import torch
from cli_errors import single_error

from mamo import graph as g
from mamo.bench import BENCHES, load_bench, output_dir
from mamo.bench.ablation import matching_latent, network_parameters, variants
from mamo.bench.logic import POINTS, TARGETS, TASKS, best_rate, initial_parameters
from mamo.bench.logic_numpy import VectorDirection, VectorMLP
from mamo.cli import COMMANDS, main
from mamo.config import PRESET_DIR, DirectionConfig, TensionerConfig, load_config
from mamo.data import load_data
from mamo.directions import create_direction
from mamo.errors import MamoError
from mamo.export import load_trained
from mamo.model import compile_model
from mamo.report import delta
from mamo.search_plan import final_epochs
from mamo.spaces import create_space
from mamo.step import TrainStep
from mamo.tasks import parse_tasks

# (base, formulation) pairs the logic benchmark trains; T = 2 so the tensioner is active within a few steps.
# equal + tensioner too: for m = 2 and a convex base (mgda, central) the two unit pulls of the thesis formulation
# are opposite, so only a non-convex base exercises a pull that does not reduce to (c1 - c2)·unit(g1 - g2).
DIRECTION_CASES = [("equal", "off"), ("mgda", "off"), ("central", "off"), ("mgda", "thesis"), ("central", "thesis"),
                   ("equal", "thesis"), ("mgda", "relative"), ("central", "relative"), ("equal", "relative")]


def mamo_direction(base: str, formulation: str, alpha: float, T: int = 2):
    return create_direction(DirectionConfig(name=base, tensioner=TensionerConfig(formulation=formulation, T=T,
                                                                                 alpha=alpha)))


@pytest.mark.parametrize("base,formulation", DIRECTION_CASES)
def test_vector_direction_matches_the_direction_objects(base, formulation):
    rng = np.random.default_rng(7)
    alphas = np.array([0.0, 0.3, 1.0, 0.7])
    vector = VectorDirection(base, formulation, T=2, alpha=alphas, runs=len(alphas))
    objects = [mamo_direction(base, formulation, float(a)) for a in alphas]
    for _ in range(8):
        J = rng.standard_normal((len(alphas), 2, 6)) * np.exp(rng.uniform(0, 3, (len(alphas), 2, 1)))
        J[1, 1] = -0.5 * J[1, 0]  # opposed gradients: the shrink that keeps g_t · v_n ≥ 0 must act
        J[2, 1] = 3.0 * J[2, 0] + 0.3 * rng.standard_normal(6) * np.abs(J[2, 0]).mean()  # MGDA at its vertex
        G = np.einsum("rtp,rsp->rts", J, J)
        losses = np.exp(rng.uniform(-4, 1, (len(alphas), 2)))
        got = vector(np.moveaxis(G, 0, -1), losses.T)
        for r, direction in enumerate(objects):
            want = direction(torch.from_numpy(G[r]), torch.from_numpy(losses[r])).weights.numpy()
            np.testing.assert_allclose(got[:, r], want, rtol=1e-10, atol=1e-12)


def test_reference_min_norm_solver_replaces_only_a_vertex_answer():
    # (g11, g12, g22) -> weight of the first task in the reference code's m = 2 solver (Sener & Koltun's).
    cases = {(1.0, 0.0, 1e-4 / 0.9999): 1e-4,  # inside the segment: exact, even below 0.001 (was clipped to it)
             (1.0, 2.0, 9.0): 0.999, (9.0, 2.0, 1.0): 0.001, (1.0, 1.0, 1.0): 0.999,  # vertices: 0.999 / 0.001
             (4.0, -1.0, 1.0): 2.0 / 7.0}
    G = np.array([[[g11 for g11, _, _ in cases], [g12 for _, g12, _ in cases]],
                  [[g12 for _, g12, _ in cases], [g22 for _, _, g22 in cases]]])
    weights = VectorDirection("mgda-reference", runs=len(cases))(G, np.ones((2, len(cases))))
    np.testing.assert_allclose(weights[0], list(cases.values()), rtol=1e-12)
    np.testing.assert_allclose(weights.sum(axis=0), 1.0, rtol=1e-12)


def test_converged_epochs_are_reported_from_zero_as_the_reference_code_counts():
    # Epochs trained until convergence (0: never) -> rate over all runs, mean and std of the 0-based index.
    rate, mean, std, lr = best_rate(np.array([0, 5, 7, 3, 3]), np.array([0.05, 0.05, 0.05, 0.01, 0.01]))
    assert (rate, mean, std, lr) == (100.0, 2.0, 0.0, 0.01)
    rate, mean, std, lr = best_rate(np.array([0, 5, 7]), np.array([0.05, 0.05, 0.05]))
    assert (round(rate, 4), mean, std, lr) == (66.6667, 5.0, 1.0, 0.05)


def logic_model(seed: int):
    config = load_config("logic")
    data = load_data(config.data)
    graph = g.build_hps_graph(create_space(config.model, data.input_shape), data.tasks)
    return compile_model(graph, seed=seed)


@pytest.mark.parametrize("base,formulation", [("equal", "off"), ("mgda", "thesis"), ("central", "relative")])
def test_vectorised_trainer_matches_train_step(base, formulation):
    """A few SGD steps of VectorMLP + VectorDirection equal TrainStep + the direction objects on the same init."""
    seeds, c, lr, alpha = [3, 11], 10.0, 0.05, 0.6
    net = VectorMLP(initial_parameters(seeds), lr=np.full(len(seeds), lr))
    vector = VectorDirection(base, formulation, T=2, alpha=np.full(len(seeds), alpha), runs=len(seeds))
    models = [logic_model(seed) for seed in seeds]
    steps = [TrainStep(model, mamo_direction(base, formulation, alpha),
                       torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)) for model in models]
    assert list(models[0].tasks) == list(TASKS)
    targets = TARGETS * np.array([c, 1.0])
    rng = np.random.default_rng(0)
    for _ in range(10):
        idx = np.stack([rng.permutation(4)[:2] for _ in seeds])
        x, y = POINTS[idx.T].transpose(0, 2, 1), targets[idx.T].transpose(0, 2, 1)  # runs on the last axis
        vector_losses = net.step(x, y, vector)
        for r, step in enumerate(steps):
            batch = {task: torch.tensor(targets[idx[r], t:t + 1], dtype=torch.float32) for t, task in enumerate(TASKS)}
            result = step(torch.tensor(POINTS[idx[r]], dtype=torch.float32), batch)
            np.testing.assert_allclose(vector_losses[:, r], result.losses.double().numpy(), rtol=1e-4, atol=1e-6)
    for r, model in enumerate(models):
        cell = [p.detach().double().numpy() for p in model.blocks[g.cell_id(0)].parameters()]
        np.testing.assert_allclose(net.params["W"][..., r], cell[0], atol=2e-5)
        np.testing.assert_allclose(net.params["b"][..., r], cell[1], atol=2e-5)
        for t, task in enumerate(TASKS):
            head = [p.detach().double().numpy() for p in model.blocks[g.head_id(task)].parameters()]
            np.testing.assert_allclose(net.params["V"][t, :, r], head[0][0], atol=2e-5)
            np.testing.assert_allclose(net.params["a"][t, r], head[1][0], atol=2e-5)


# ------------------------------------------------------------------------------------------------ dispatcher


def test_unknown_benchmark_names_the_known_ones(capsys):
    with pytest.raises(MamoError, match="logic, logic3, multimnist_recon, step"):
        load_bench("nope")
    assert main(["bench", "nope"]) == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "option"), [("logic", "--seeds"), ("step", "--batch-sizes")])
def test_a_count_past_a_million_is_refused(tmp_path, capsys, name, option):
    # Before: 10**21 seeds crashed with OverflowError, 10**10 with MemoryError building the seed list.
    with pytest.raises(SystemExit) as stop:
        main(["bench", name, option, str(10**21), "--out", str(tmp_path / "out")])
    assert stop.value.code == 2
    assert f"argument {option}: must be at most 1,000,000, got {10**21}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_step_setup_too_large_for_memory_asks_for_smaller_batches(tmp_path, capsys, monkeypatch):
    import mamo.bench.step

    def too_large(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 25088000000000 bytes")

    monkeypatch.setattr(mamo.bench.step, "build_setup", too_large)
    assert main(["bench", "step", "--quick", "--setups", "lenet-m2", "--batch-sizes", "100000",
                 "--out", str(tmp_path / "out")]) == 2
    assert single_error(capsys.readouterr().err) == (
        "LeNet m=2 at batch 100000 needs more memory than this machine can give ([enforce fail at alloc_cpu.cpp:117] "
        "DefaultCPUAllocator: can't allocate memory: you tried to allocate 25088000000000 bytes); pass smaller "
        "--batch-sizes.")


def test_more_threads_than_a_process_can_start_is_refused(tmp_path, capsys):
    # Before: torch's pool crashed ("can't start new thread"; OverflowError past a C long).
    with pytest.raises(SystemExit) as stop:
        main(["bench", "step", "--threads", "99999999999", "--out", str(tmp_path / "out")])
    assert stop.value.code == 2
    assert "argument --threads: must be at most 1,024, got 99999999999" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("name", "option"), [
    ("logic", "--seeds"), ("logic", "--epochs"), ("multimnist_recon", "--epochs"), ("step", "--rounds"),
    ("step", "--threads"), ("step", "--batch-sizes"), ("ablation", "--train-size"),
])
def test_a_zero_count_is_refused_not_read_as_the_default(tmp_path, capsys, name, option):
    # Before: "--epochs 0" was falsy and ran the full default benchmark (50 seeds x 3,000 epochs for logic).
    with pytest.raises(SystemExit) as stop:
        main(["bench", name, option, "0", "--out", str(tmp_path / "out")])
    assert stop.value.code == 2
    assert f"argument {option}: must be a positive integer, got 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,expected", [
    (["logic", "--quick", "--sweep-lr", "inf"], "--sweep-lr must be a finite positive learning rate, got inf"),
    (["multimnist_recon", "--quick", "--lrs", "0.01,inf"],
     "argument --lrs: '0.01,inf' holds a learning rate that is not finite and positive; pass e.g. 0.05,0.01"),
    (["multimnist_recon", "--quick", "--lrs", ","], "argument --lrs: ',' holds a learning rate that is not finite"),
])
def test_an_infinite_learning_rate_is_refused_before_the_benchmark_runs(tmp_path, capsys, args, expected):
    # Before: exit 0 with every MSE nan, or 0% converged everywhere.
    try:
        code = main(["bench", *args, "--out", str(tmp_path / "out")])
    except SystemExit as stop:  # argparse's refusal of an option's value
        code = stop.code
    assert code == 2 and expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("name", "option"), [("step", ["--seeds", "3"]), ("logic", ["--device", "cpu"])])
def test_a_shared_option_the_benchmark_does_not_read_is_refused(tmp_path, capsys, name, option):
    # Both were accepted, recorded in results.json and ignored.
    with pytest.raises(SystemExit) as stop:
        main(["bench", name, *option, "--out", str(tmp_path / "out")])
    assert stop.value.code == 2
    assert f"unrecognized arguments: {' '.join(option)}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("setting", "key", "instead"), [
    ("train.epochs=3", "train.epochs", "use --epochs"), ("train.seed=7", "train.seed", "use --seeds (seeds 0 to N-1)"),
    ("direction.name=pcgrad", "direction.name", "the benchmark trains each row's direction itself"),
    # A mapping got past the check.
    ("train={epochs: 5, seed: 3}", "train.epochs", "use --epochs"),
])
def test_multimnist_recon_refuses_a_set_it_would_not_use(tmp_path, capsys, setting, key, instead):
    # The run trained 1 epoch of seed 0 with its own directions while results.json recorded the --set.
    assert main(["bench", "multimnist_recon", "--quick", "--set", setting, "--out", str(tmp_path / "out")]) == 2
    assert f"--set {key} is set by the multimnist_recon benchmark itself; {instead}." in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("option", "setting"), [(["--lrs", "0.01"], "train.lr=5"),
                                                 (["--optimizer", "sgd"], "train={optimizer: adam}")])
def test_multimnist_recon_refuses_a_set_of_what_one_of_its_options_sets(tmp_path, capsys, option, setting):
    # --lrs won over train.lr, and --set train.optimizer over --optimizer, without a word.
    assert main(["bench", "multimnist_recon", "--quick", *option, "--set", setting, "--out",
                 str(tmp_path / "out")]) == 2
    key = "train.lr" if "lr" in setting else "train.optimizer"
    assert f"--set {key} and {option[0]} both set it; keep one of them." in capsys.readouterr().err


def test_results_json_has_null_where_a_table_has_nan_or_infinity():
    from mamo.bench import finite_or_null

    assert finite_or_null({"a": [1.0, float("nan"), ("x", float("-inf"))], "b": {"c": float("inf")}, "d": 2}) == {
        "a": [1.0, None, ["x", None]], "b": {"c": None}, "d": 2}


def test_a_bad_device_is_named_as_the_bench_option(tmp_path, capsys):
    # Before: the error named train.device, which the user had not written.
    assert main(["bench", "step", "--quick", "--device", "gpu", "--out", str(tmp_path / "out")]) == 2
    assert "unknown device 'gpu' (--device); use auto, cpu, cuda or cuda:N." in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bench_without_a_name_asks_for_the_name_alone(capsys):
    # Python 3.11's argparse required the REMAINDER options too: "required: name, options".
    with pytest.raises(SystemExit) as stop:
        main(["bench"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == "mamo bench: error: the following arguments are required: name"


def test_the_command_list_names_every_benchmark():
    # The top-level help is written by hand so that `mamo --help` imports no benchmark; keep it complete.
    assert f"({', '.join(BENCHES)})" in COMMANDS["bench"].help


def test_default_output_folders_never_collide(tmp_path, monkeypatch):
    import mamo.bench

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(mamo.bench.time, "strftime", lambda fmt: "20261124-120000")
    first, second = output_dir(None, "logic"), output_dir(None, "logic")
    assert first.is_dir() and second.is_dir()
    assert [first.name, second.name] == ["logic-20261124-120000", "logic-20261124-120000-2"]
    assert first.parent.resolve() == second.parent.resolve() == tmp_path.resolve() / "runs" / "bench"


# ---------------------------------------------------------------------------------------------- smoke runs


def test_logic_quick_reproduces_the_single_and_row_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "logic"
    assert main(["bench", "logic", "--quick", "--out", str(out)]) == 0
    # Strict JSON: Python's bare NaN tokens (in "raw") made other readers fail.
    result = json.loads((out / "results.json").read_text(), parse_constant=lambda token: pytest.fail(token))
    markdown = (out / "results.md").read_text()
    assert "Thesis Table 3" in markdown and "Thesis Table 2: central + tensioner (relative)" in markdown
    # Said nowhere but in results.json's options, beside the thesis' full-budget numbers (a helper's audit).
    assert markdown.startswith("# mamo bench logic\n\n**A `--quick` smoke run**")
    assert "**A `--quick` smoke run**" in capsys.readouterr().out
    assert len(result["tables"]) == 2 + 2 * 2  # Tables 3-4, then Tables 1-2 per formulation
    # The reference initialisation and data order give the thesis' single-task AND row (351.7 ± 2.6 epochs).
    rate, mean, _, lr = result["raw"]["Single AND|off|c=1.0|alpha=0.3"]
    assert rate == 100.0 and 340.0 < mean < 365.0 and lr == 0.05
    # α = 0 switches both tensioners off: the sweep's first row is the central direction's own result.
    for formulation in ("thesis", "relative"):
        off = result["raw"][f"sweep|{formulation}|T=10|c=10.0|alpha=0.0"]
        assert off == result["raw"]["Central|off|c=10.0|alpha=0.3"]
    before = (out / "results.json").read_text()
    assert main(["bench", "logic", "--quick", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "results.json").read_text() == before


def test_logic_and_step_show_a_bar_per_method_on_a_terminal(tmp_path, monkeypatch):
    # Both ran silent: a full logic run is about a CPU-minute, a ResNet-18 step setup minutes (a helper's audit).
    import sys

    import mamo.bench.logic
    import mamo.bench.step

    shown = []
    for module in (mamo.bench.logic, mamo.bench.step):
        real = module.tqdm
        monkeypatch.setattr(module, "tqdm", lambda items, real=real, **kwargs: shown.append(
            (kwargs["desc"], kwargs["disable"], len(items))) or real(items, **{**kwargs, "disable": True}))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["bench", "logic", "--quick", "--no-sweep", "--out", str(tmp_path / "logic")]) == 0
    assert main(["bench", "step", "--quick", "--setups", "lenet-m2", "--out", str(tmp_path / "step")]) == 0
    assert [desc for desc, _, _ in shown] == ["logic", "LeNet m=2, batch 4"] and not any(off for _, off, _ in shown)
    assert shown[0][2] == len(mamo.bench.logic.MAIN) and shown[1][2] > 5


def test_multimnist_recon_quick(tmp_path):
    out = tmp_path / "recon"
    assert main(["bench", "multimnist_recon", "--quick", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    methods = [(row[0], row[1]) for row in result["rows"]]
    assert methods[0] == ("STL", "-") and ("Central + tensioner", "relative") in methods
    assert len(methods) == 8
    for row in result["rows"]:
        accuracy, mse = (float(cell.split(" ± ")[0]) for cell in row[3:5])
        assert 0.0 <= accuracy <= 1.0 and 0.0 < mse < 1.0
    assert "Thesis Table 5" in (out / "results.md").read_text()
    assert "**A `--quick` smoke run** (few seeds, a small grid, short training, so a tensioner may never switch " \
           "on)" in (out / "results.md").read_text()


def test_the_step_benchmark_says_what_its_quick_run_cuts(capsys):
    # Its help promised "few seeds, small grid, short training" (it takes no --seeds and trains nothing) under a
    # description that began with reStructuredText quotes (a user audit).
    from mamo.bench import load_bench, quick_banner

    with pytest.raises(SystemExit):
        main(["bench", "step", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "mamo bench step: the time and memory of one training step per method" in help_text
    assert "``" not in help_text
    assert "--quick a smoke run: LeNet m = 2 and timm's test_resnet m = 3 at batch 4" in help_text
    assert "seeds" not in quick_banner(load_bench("step")) and "seeds" in quick_banner(load_bench("logic"))



def test_ablation_variants_train_as_long_as_the_baselines_and_run_the_default_once():
    search = load_config("multimnist").search
    table = variants(search, 30, range(0, 6))
    assert list(table)[0] == f"MAMO (Z={search.rounds})" and table[list(table)[0]][:-1] == []
    assert f"MAMO Z={search.rounds}" not in table  # the default row is not trained twice
    assert len(table) == 3 + 5
    for name, overrides in table.items():
        config = load_config("multimnist", overrides)
        used = config.search.pretrain_epochs + config.search.rounds * config.search.round_epochs
        assert used + final_epochs(config) == 30, name
    assert "search.modules=exclusive" in table["w/o GMK (task-exclusive modules)"]


def test_ablation_refuses_a_budget_the_rounds_do_not_fit():
    with pytest.raises(MamoError, match="train.epochs=8"):
        variants(load_config("multimnist").search, 8, range(0, 6))


def test_ablation_runs_on_another_preset_with_the_chosen_rounds(tmp_path, capsys):
    out = tmp_path / "sum"
    args = ["bench", "ablation", "--quick", "--preset", "multimnist_sum", "--rounds-sweep", "--out", str(out)]
    assert main(args) == 0
    result = json.loads((out / "results.json").read_text())
    assert "multimnist_sum" in result["title"]
    assert "MAMO (mgda+tensioner(thesis))" in result["title"]  # the direction: the rows say only "MAMO (Z=…)"
    assert [row[0] for row in result["rows"]] == ["HPS (equal)", "MAMO (Z=2)", "w/o MO (equal weighting)",
                                                  "w/o GMK (task-exclusive modules)"]
    assert [c for c in result["columns"] if c.endswith("(% vs STL)")] == [
        f"{task} accuracy (% vs STL)" for task in ("left", "right", "sum")]
    per_seed = next(note for note in result["notes"] if note.startswith("Δ % per seed"))
    delta_column = result["columns"].index("Δ %")
    assert [part.split(": ")[-1] for part in per_seed.split("; ")] == [row[delta_column] for row in result["rows"]]
    val_per_seed = next(note for note in result["notes"] if note.startswith("validation Δ % per seed"))
    val_column = result["columns"].index("val Δ %")
    assert [part.split(": ")[-1] for part in val_per_seed.split("; ")] == [row[val_column] for row in result["rows"]]
    # --equal-params sizes a fully grown pair, which is every task only with two tasks.
    assert main([*args[:-2], "--equal-params", "--out", str(tmp_path / "eq")]) == 2
    assert not (tmp_path / "eq").exists()  # refused before any training, and its empty folder removed
    assert "needs two tasks, and preset 'multimnist_sum' has 3; drop --equal-params" in capsys.readouterr().err
    assert main(["bench", "ablation", "--quick", "--rounds-sweep", "0", "-1", "--out", str(tmp_path / "z")]) == 2
    assert "--rounds-sweep takes numbers of detection rounds ≥ 0, got [0, -1]" in capsys.readouterr().err


def test_ablation_quick_on_a_dataset_of_fixed_splits_shortens_only_its_training(tmp_path, capsys):
    # logic has fixed splits: --quick sets no sizes for it, so no note says they are unused.
    out = tmp_path / "logic"
    assert main(["bench", "ablation", "--quick", "--preset", "logic", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert [row[0] for row in result["rows"]][:2] == ["HPS (equal)", "MAMO (Z=1)"]
    assert "not used" not in capsys.readouterr().err


def test_ablation_quick_keeps_a_presets_smaller_split_sizes(tmp_path):
    # --quick set 512/128/128 over the preset's own sizes: a 12-image NYUv2-format folder could not hold out 128
    # for validation, and no setting could change it (a helper's dense-task audit).
    preset = tmp_path / "small.yaml"
    preset.write_text((PRESET_DIR / "quick.yaml").read_text().replace("train_size: 2048", "train_size: 64")
                      .replace("val_size: 512", "val_size: 32").replace("test_size: 512", "test_size: 1024"))
    out = tmp_path / "ablation"
    assert main(["bench", "ablation", "--quick", "--preset", str(preset), "--rounds-sweep", "--out", str(out)]) == 0
    saved = load_config(str(out / "runs" / "seed0-MAMO" / "config.yaml")).data
    assert (saved.train_size, saved.val_size, saved.test_size) == (64, 32, 128)


def test_matching_latent_picks_the_width_with_the_nearest_parameter_count():
    tasks = parse_tasks({t: {"type": "classification", "classes": 10} for t in ("left", "right")}, "test")
    space = create_space(load_config("multimnist").model, (1, 28, 28))
    template = g.build_hps_graph(space, tasks)
    mamo = network_parameters(template, 50, "gmk")
    assert (network_parameters(template, 50), mamo, network_parameters(template, 50, "exclusive")) == (
        27450, 48782, 70112)  # HPS, MAMO and w/o GMK of the ablation table
    for modules in (None, "exclusive"):
        width = matching_latent(template, mamo, modules)
        gaps = [abs(network_parameters(template, w, modules) - mamo) for w in (width - 1, width, width + 1)]
        assert gaps[1] == min(gaps), modules
    assert (matching_latent(template, mamo), matching_latent(template, mamo, "exclusive")) == (101, 30)


def test_ablation_quick_runs_every_variant_with_its_architecture(tmp_path, capsys):
    args = ["bench", "ablation", "--quick", "--equal-params", "--device", "cpu", "--out", str(tmp_path / "ablation")]
    assert main(args) == 0
    for variant in ("MAMO", "exclusive_latent30"):  # --device reaches every variant (it used to reach none)
        saved = load_config(str(tmp_path / "ablation" / "runs" / f"seed0-{variant}" / "config.yaml"))
        assert saved.train.device == "cpu", variant
    result = json.loads((tmp_path / "ablation" / "results.json").read_text())
    rows = {row[0]: dict(zip(result["columns"], row, strict=True)) for row in result["rows"]}
    assert list(rows)[:4] == ["HPS (equal)", "MAMO (Z=2)", "w/o MO (equal weighting)",
                              "w/o GMK (task-exclusive modules)"]
    assert float(rows["MAMO Z=0"]["GMKs"]) == 0 and rows["MAMO Z=0"]["Params"] == rows["HPS (equal)"]["Params"]
    # Task-exclusive modules grow one branch per task of the pair where a GMK grows one per pair.
    assert float(rows["w/o GMK (task-exclusive modules)"]["GMKs"]) == 2 * float(rows["MAMO (Z=2)"]["GMKs"]) > 0
    reports = {name: (tmp_path / "ablation" / "runs" / f"seed0-{name}" / "report.md").read_text()
               for name in ("MAMO", "wo_GMK")}
    assert "GMK modules grown per detection round" in reports["MAMO"]
    assert "Task-exclusive modules (w/o GMK) grown per detection round" in reports["wo_GMK"]
    # --equal-params: HPS and w/o GMK at MAMO's size, each Δ against the seed's STL at the preset's width.
    hps_row, exclusive_row = list(rows)[-2:]
    assert hps_row == "HPS (equal), MAMO's size (latent 101)" and exclusive_row == "w/o GMK, MAMO's size (latent 30)"
    assert rows[hps_row]["Params"] == "48,921" and float(rows[hps_row]["GMKs"]) == 0
    narrow = json.loads((tmp_path / "ablation" / "runs" / "seed0-exclusive_latent30" / "metrics.json").read_text())
    main_run = json.loads((tmp_path / "ablation" / "runs" / "seed0-MAMO" / "metrics.json").read_text())
    stl = main_run["baselines"]["stl"]["tasks"]
    assert not narrow.get("baselines")  # it trained no STL or HPS of its own
    tasks = load_trained(tmp_path / "ablation" / "runs" / "seed0-MAMO").tasks
    assert rows[exclusive_row]["Δ %"] == f"{delta(narrow['tasks'], stl, tasks):+.2f}"
    # Validation Δ beside it, each run's validation metrics against the seed's STL's (the bench printed none).
    stl_val = main_run["baselines"]["stl"]["val"]
    assert rows[exclusive_row]["val Δ %"] == f"{delta(narrow['val'], stl_val, tasks):+.2f}"
    assert rows["HPS (equal)"]["val Δ %"] == f"{delta(main_run['baselines']['hps']['val'], stl_val, tasks):+.2f}"
    assert rows["MAMO (Z=2)"]["val Δ %"] == f"{main_run['val_delta']:+.2f}"  # the search's own, recomputed

    # A stopped ablation continues: finished variants are read back, a missing one retrains to the same row,
    # on another device if asked (here the default, auto; where auto is a GPU, the CPU, whose rounding the
    # first run's rows have).
    runs = tmp_path / "ablation" / "runs"
    for path in (runs / "seed0-wo_MO").rglob("*"):
        if path.is_file():
            path.unlink()
    device = ["--device", "cpu"] if torch.cuda.is_available() else []
    assert main(["bench", "ablation", "--quick", "--equal-params", *device, "--out", str(tmp_path / "again"),
                 "--resume", str(tmp_path / "ablation")]) == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["rows"] == result["rows"]
    assert any(p.name.startswith("seed0-wo_MO.incomplete-") for p in runs.iterdir())
    assert not (tmp_path / "again" / "runs").exists()
    # Without --out the tables go back into the folder it continues (they used to land in a new runs/bench one).
    (tmp_path / "ablation" / "results.json").unlink()
    assert main(["bench", "ablation", "--quick", "--equal-params", "--resume", str(tmp_path / "ablation")]) == 0
    assert json.loads((tmp_path / "ablation" / "results.json").read_text())["rows"] == result["rows"]
    # --out naming the folder it continues is the same (it was refused: "already exists and is not empty").
    assert main(["bench", "ablation", "--quick", "--equal-params", "--out", str(tmp_path / "ablation"),
                 "--resume", str(tmp_path / "ablation")]) == 0
    # Other options are never mixed into one table, nor do fewer options silently drop rows from it.
    capsys.readouterr()
    assert main(["bench", "ablation", "--quick", "--train-size", "256", "--out", str(tmp_path / "other"),
                 "--resume", str(tmp_path / "ablation")]) == 2
    assert "--quick --rounds-sweep 0 1 --train-size 256; resume it with the options" in capsys.readouterr().err
    assert main(["bench", "ablation", "--quick", "--resume", str(tmp_path / "ablation")]) == 2
    assert single_error(capsys.readouterr().err) == (
        f"{tmp_path / 'ablation'} holds an ablation with --preset multimnist --seeds 1 --quick --rounds-sweep 0 1 "
        "--equal-params but this command asks for --preset multimnist --seeds 1 --quick --rounds-sweep 0 1; resume "
        "it with the options it was started with (more seeds, Z rows or --equal-params may be added), or pass a new "
        "--out.")
    record = tmp_path / "ablation" / "ablation.json"
    kept = record.read_text()
    for damaged in ("{", "[]"):  # crashed with JSONDecodeError / TypeError
        record.write_text(damaged)
        assert main(["bench", "ablation", "--quick", "--equal-params", "--resume", str(tmp_path / "ablation")]) == 2
        message = single_error(capsys.readouterr().err)
        assert message.startswith(f"{record} is damaged (") and message.endswith(
            "so the options this ablation was started with are unknown; restore the file, or delete it to have the "
            "folder's run names checked instead.")
    record.write_text(kept)
    record.unlink()  # a folder from before the options were recorded
    assert main(["bench", "ablation", "--quick", "--equal-params", "--train-size", "256",
                 "--resume", str(tmp_path / "ablation")]) == 2
    assert "another configuration" in capsys.readouterr().err
    assert not (tmp_path / "ablation" / "ablation.json").exists()  # the refused options are not recorded as its own
    # Its run folders name its seeds and variants: a command that would leave some out of the table is refused.
    assert main(["bench", "ablation", "--quick", "--rounds-sweep", "--resume", str(tmp_path / "ablation")]) == 2
    assert single_error(capsys.readouterr().err) == (
        f"{tmp_path / 'ablation'} holds runs this command would leave out of its table (seed0-MAMO_Z=0, "
        "seed0-MAMO_Z=1, seed0-exclusive_latent30); resume it with the options it was started with (--seeds, "
        "--rounds-sweep, --equal-params), or pass a new --out.")
    # With its own options it continues, and from then on has a record of them.
    assert main(["bench", "ablation", "--quick", "--equal-params", "--resume", str(tmp_path / "ablation")]) == 0
    assert json.loads((tmp_path / "ablation" / "results.json").read_text())["rows"] == result["rows"]
    assert json.loads((tmp_path / "ablation" / "ablation.json").read_text())["equal_params"] is True


def test_step_benchmark_saves_both_floor_targets_its_peers_and_the_ratios_behind_its_columns(tmp_path, capsys):
    out = tmp_path / "step"
    assert main(["bench", "step", "--quick", "--setups", "lenet-m2", "--rounds", "2", "--threads", "1",
                 "--out", str(out)]) == 0
    saved = json.loads((out / "results.json").read_text())
    targets = {(row[0], row[1]): row[3] for row in saved["tables"][-1]["rows"]}
    assert ("LeNet m=2", "mgda + tensioner ÷ floor, the update out of both") in targets
    assert ("LeNet m=2", "mgda + tensioner ÷ floor (both with the update)") in targets
    table = saved["tables"][0]
    raw = saved["raw_times"][next(iter(saved["raw_times"]))]
    for row in table["rows"]:
        if row[0] in raw:  # the × columns are the medians of the saved per-round ratios
            assert row[2] == pytest.approx(statistics.median(raw[row[0]]["equal"]))
            assert row[3] == pytest.approx(statistics.median(raw[row[0]]["forward + m backward"]))
    ran = {row[0] for row in table["rows"] if row[1] != "—"}
    workaround = any("benchmark-only workarounds" in note for note in saved["notes"])
    assert workaround == ("libmtl mgda" in ran)  # the LibMTL note only where LibMTL ran
    installed = []
    for package in ("torchjd", "LibMTL"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            installed.append(f"{package} {metadata.version(package)}")
    assert [note for note in saved["notes"] if note.startswith("peers: ")] == (
        [f"peers: {', '.join(installed)}."] if installed else [])
