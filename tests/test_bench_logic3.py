"""The three-gate logic benchmark (mamo.bench.logic3): its network, its lockstep bookkeeping, its command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cli_errors import single_error

from mamo.bench.logic import POINTS, shuffles
from mamo.bench.logic3 import TARGETS, TASKS, initial_parameters, run_row, train_row
from mamo.bench.logic_numpy import VectorMLP
from mamo.cli import main


def test_the_vectorised_network_gives_torch_s_losses_and_gradients_for_three_tasks():
    init = initial_parameters([0, 1], fixed=False)
    net = VectorMLP(init, lr=np.full(2, 0.05))
    x = POINTS[[1, 3]][:, :, None].repeat(2, axis=2)  # (B, 2, R)
    y = TARGETS[[1, 3]][:, :, None].repeat(2, axis=2) * np.array([10.0, 1.0, 1.0])[None, :, None]
    losses, jacobian, heads = net.gradients(x, y)
    for r in range(2):
        W, b, V, a = (torch.tensor(init[k][..., r], requires_grad=True) for k in "WbVa")
        hidden = torch.sigmoid(torch.tensor(x[:, :, r]) @ W.T + b)
        residual = hidden @ V.T + a - torch.tensor(y[:, :, r])
        per_task = (residual ** 2).mean(dim=0)
        np.testing.assert_allclose(losses[:, r], per_task.detach().numpy(), rtol=1e-12)
        for t in range(len(TASKS)):
            gW, gb, gV, ga = torch.autograd.grad(per_task[t], (W, b, V, a), retain_graph=True)
            np.testing.assert_allclose(jacobian[t, :, r], torch.cat([gW.reshape(-1), gb]).numpy(), rtol=1e-10,
                                       atol=1e-14)
            np.testing.assert_allclose(heads["V"][t, :, r], gV[t].numpy(), rtol=1e-10, atol=1e-14)
            np.testing.assert_allclose(heads["a"][t, r], ga[t].numpy(), rtol=1e-10, atol=1e-14)


def test_the_three_gates_are_learnable_by_two_shared_neurons():
    # OR and AND as the hidden features, XOR their difference: the targets the heads can reach exactly.
    or_, and_ = TARGETS[:, 2], TARGETS[:, 1]
    np.testing.assert_array_equal(TARGETS[:, 0], or_ - and_)
    np.testing.assert_array_equal(TARGETS[:, 0], np.logical_xor(POINTS[:, 0], POINTS[:, 1]))


@pytest.mark.parametrize("base,formulation", [("mgda", "thesis"), ("pcgrad", "relative")])
def test_runs_trained_together_converge_exactly_as_each_trained_alone(base, formulation):
    # Runs that converge leave the lockstep arrays; each remaining run must keep its own direction object (its
    # tensioner history, its generator), so every run's epoch matches its run alone.
    seeds, epochs = [0, 1, 2, 3], 400
    init, orders = initial_parameters(seeds, fixed=False), shuffles(seeds, epochs)
    c, _, together = train_row(base, formulation, [0.05], seeds, init, orders, "reference", T=10, alpha=0.3)
    assert len(set(together.tolist())) > 2  # the runs end at different epochs, so some leave before others
    for k, seed in enumerate(seeds):
        _, _, alone = train_row(base, formulation, [0.05], [seed], {key: v[..., k : k + 1] for key, v in init.items()},
                                orders[k : k + 1], "reference", T=10, alpha=0.3)
        assert alone.tolist() == together[[k, len(seeds) + k]].tolist()  # c = 1, then c = 10


def test_quick_run_writes_every_direction_row_and_refuses_bad_options(tmp_path, capsys):
    # A name given twice runs once (its rows were printed twice).
    assert main(["bench", "logic3", "--quick", "--directions", "mgda,upgrad,mgda", "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [table["columns"] for table in result["tables"]] == [["Direction", "tensioner off", "thesis",
                                                                 "relative"]] * 2
    assert [row[0] for row in result["tables"][0]["rows"]] == ["Single XOR", "Single AND", "Single OR", "mgda",
                                                               "upgrad"]
    assert len(result["raw"]) == (3 + 2 * 3) * 2
    capsys.readouterr()
    assert main(["bench", "logic3", "--quick", "--directions", "mgda,nope", "--out", str(tmp_path / "x")]) == 2
    assert ("--directions names unknown direction 'nope'; pass a comma-separated list of equal, mgda"
            in single_error(capsys.readouterr().err))
    assert main(["bench", "logic3", "--quick", "--alpha", "-1", "--out", str(tmp_path / "y")]) == 2
    assert "--alpha must be a finite number ≥ 0, got -1.0" in single_error(capsys.readouterr().err)


def test_a_diverging_run_counts_as_not_converged():
    # lr 50 sends every run's weights to inf and NaN: the direction objects refuse non-finite Gramians, the run
    # never meets the rule, and nothing raises.
    seeds = [0, 1]
    init, orders = initial_parameters(seeds, fixed=True), shuffles(seeds, 20)
    result = run_row("mgda", "off", [50.0], seeds, init, orders, "reference", T=10, alpha=0.3)
    assert result[1.0][0] == 0.0 and result[10.0][0] == 0.0  # rate 0%


def test_fixed_initialisation_is_one_draw_for_every_seed_and_seeded_is_not():
    fixed, seeded = initial_parameters([0, 5], fixed=True), initial_parameters([0, 5], fixed=False)
    np.testing.assert_array_equal(fixed["W"][..., 0], fixed["W"][..., 1])
    assert not np.array_equal(seeded["W"][..., 0], seeded["W"][..., 1])
    assert fixed["V"].shape == (3, 2, 2)  # three heads, two seeds


def test_a_bad_learning_rate_names_the_fix(capsys):
    # Each refusal of --lrs says what to pass, as the one for a list that is not numbers does.
    for text in ("abc", "0.05,-1", "nan"):
        with pytest.raises(SystemExit) as stop:
            main(["bench", "logic3", "--lrs", text])
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and f"argument --lrs: '{text}'" in err and "pass e.g. 0.05,0.01" in err, err
