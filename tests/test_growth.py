"""Growth (DESIGN §3–4): function preservation, live spawned modules, task sets from reachability, optimizer state."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mamo import graph as g
from mamo.config import DirectionConfig, ModelConfig, TensionerConfig
from mamo.directions import create_direction
from mamo.export import TREE_WIDTH, architecture_tree
from mamo.model import compile_model
from mamo.spaces import create_space
from mamo.step import TrainStep
from mamo.tasks import parse_tasks
from mamo.trainer import add_new_parameters

TASKS3 = parse_tasks({name: {"type": "classification", "classes": 4} for name in ("a", "b", "c")}, "test")


def lenet_model(tasks=TASKS3, seed: int = 0, backbone: str = "lenet"):
    # Three cells either way: lenet's, or the cnn's three convolution cells.
    space = create_space(ModelConfig(backbone=backbone, latent=16, hidden=[8, 8, 8], head_hidden=8), (1, 28, 28))
    return compile_model(g.build_hps_graph(space, tasks), seed=seed)


def test_compiling_a_model_leaves_every_global_generator_as_it_was(monkeypatch):
    # torch.manual_seed inside fork_rng(devices=[]) also reseeded the CUDA generators, which fork_rng does not
    # restore (a review of the CUDA paths); the CPU generator was restored and still is.
    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", seeded.append)
    before = torch.random.get_rng_state()
    first, again = lenet_model(seed=1234), lenet_model(seed=1234)
    assert seeded == [] and torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True))


def batch(n: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 28, 28, generator=gen)
    return x, {t: torch.randint(0, 4, (n,), generator=gen) for t in TASKS3}


def make_step(model, name: str = "mgda", lr: float = 1e-3):
    direction = create_direction(DirectionConfig(name=name, tensioner=TensionerConfig(formulation="off")))
    return TrainStep(model, direction, torch.optim.Adam(model.parameters(), lr=lr))


def spawn(model, position, modules: str = "gmk") -> list[str]:
    added = g.grow(model.graph, position, modules)
    model.sync(copy_from_trunk=True)
    return added


def test_building_the_graph_leaves_the_callers_random_state_alone():
    # It builds cells to measure their shapes and sizes; those draws used to advance the global RNG.
    space = create_space(ModelConfig(backbone="lenet", latent=16, head_hidden=8), (1, 28, 28))
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    g.build_hps_graph(space, TASKS3)
    assert torch.equal(torch.random.get_rng_state(), before)


@pytest.mark.parametrize("position", [(("a", "b"), 0), (("b", "c"), 1), (("a", "c"), 2)])
@pytest.mark.parametrize("modules", ["gmk", "exclusive"])
@pytest.mark.parametrize("backbone", ["lenet", "cnn"])
def test_growth_preserves_the_function(position, modules, backbone):
    model = lenet_model(backbone=backbone)
    step = make_step(model)
    for seed in range(3):  # trained weights, not the initialisation
        step(*batch(seed=seed))
    x, _ = batch(seed=9)
    model.eval()
    before = {t: y.clone() for t, y in model(x).items()}
    added = spawn(model, position, modules)
    assert added, "growth must create modules"
    after = model(x)
    for task in TASKS3:
        torch.testing.assert_close(after[task], before[task], rtol=0, atol=1e-6)


def test_a_new_branch_is_an_exact_fork_of_the_trunk():
    # β = 0 hides the branch from the outputs, so the preservation test above cannot see how a GMK starts:
    # copied from the trunk (DESIGN §3), the branch's last features equal the trunk's exactly.
    model = lenet_model()
    step = make_step(model)
    for seed in range(3):
        step(*batch(seed=seed))
    model.eval()
    spawn(model, (("a", "b"), 1))
    with torch.no_grad():
        features = model.forward_features(batch(seed=9)[0])
    torch.testing.assert_close(features[g.branch_id(("a", "b"), 2)], features[g.cell_id(2)], rtol=0, atol=0)


def test_a_branch_module_reads_the_mean_of_the_trunk_and_branch_streams():
    model = lenet_model()
    spawn(model, (("a", "b"), 1))
    with torch.no_grad():
        for param in model.blocks[g.branch_id(("a", "b"), 1)].parameters():
            param.add_(0.1)  # the branch stream now differs from the trunk's
    model.eval()
    x, _ = batch()
    with torch.no_grad():
        trunk0 = model.blocks[g.cell_id(0)](x)
        trunk1 = model.blocks[g.cell_id(1)](trunk0)
        branch1 = model.blocks[g.branch_id(("a", "b"), 1)](trunk0)  # at its first cell: the trunk's input
        expected = model.blocks[g.branch_id(("a", "b"), 2)]((trunk1 + branch1) / 2)
        got = model.forward_features(x)[g.branch_id(("a", "b"), 2)]
    torch.testing.assert_close(got, expected)


def test_growth_into_an_existing_branch_preserves_the_function():
    model = lenet_model()
    spawn(model, (("a", "b"), 2))
    make_step(model)(*batch())  # β ≠ 0 now, so the branch changes the output
    x, _ = batch(seed=3)
    model.eval()
    before = model(x)
    added = spawn(model, (("a", "b"), 0))  # prepends the branch's cells 0 and 1
    assert added == [g.branch_id(("a", "b"), 0), g.branch_id(("a", "b"), 1)]
    for task, value in model(x).items():
        torch.testing.assert_close(value, before[task], rtol=0, atol=1e-6)
    # The prepended cells must feed the branch that was already there: the preservation above would hold
    # even if they were left dangling, since a module nothing reads changes no output.
    assert model.graph.has_edge(g.branch_id(("a", "b"), 1), g.branch_id(("a", "b"), 2))
    sets = g.task_sets(model.graph)
    assert all(sets[node] == {"a", "b"} for node in g.branch_nodes(model.graph))
    model.train()
    step = make_step(model, "equal")  # MGDA may put zero weight on both a and b at a step
    step(*batch(seed=4))
    for node in g.branch_nodes(model.graph):
        for name, param in model.blocks[node].named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, f"{node}.{name} has no gradient"


def test_timm_batchnorm_growth_preserves_train_and_eval_outputs():
    space = create_space(ModelConfig(backbone="timm:resnet18", head_hidden=0), (1, 32, 32))
    model = compile_model(g.build_hps_graph(space, TASKS3), seed=0)
    x = torch.rand(4, 1, 32, 32)
    # Train mode normalises with batch statistics, eval mode with running ones: both must be preserved.
    for mode, position in ((False, (("a", "c"), 2)), (True, (("a", "b"), 1))):
        model.train(mode)
        with torch.no_grad():
            before = model(x)
            added = g.grow(model.graph, position)
            model.sync()
            after = model(x)
        assert added
        for task in TASKS3:
            torch.testing.assert_close(after[task], before[task], rtol=1e-5, atol=1e-5)


def test_every_spawned_parameter_gets_a_gradient_after_one_step():
    # Equal weighting: MGDA may legitimately put zero weight on both tasks of a pair at some step.
    model = lenet_model()
    step = make_step(model, "equal")
    step(*batch())
    added = spawn(model, (("a", "b"), 1))
    add_new_parameters(step.optimizer, model)
    step.refresh()
    step(*batch(seed=1))  # the fusion weights leave 0
    step(*batch(seed=2))
    for node in added:
        for name, param in model.blocks[node].named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, f"{node}.{name} has no gradient"


def test_a_gmk_gets_no_gradient_from_tasks_outside_its_pair():
    model = lenet_model()
    spawn(model, (("a", "b"), 1))
    model.betas["a|a+b"].data.fill_(0.5)
    model.betas["b|a+b"].data.fill_(-0.3)
    x, targets = batch()
    losses = {t: torch.nn.functional.cross_entropy(y, targets[t]) for t, y in model(x).items()}
    gmk = [p for node in g.branch_nodes(model.graph) for p in model.blocks[node].parameters()]
    from_c = torch.autograd.grad(losses["c"], gmk, allow_unused=True, retain_graph=True)
    assert all(grad is None or grad.abs().sum() == 0 for grad in from_c)
    from_a = torch.autograd.grad(losses["a"], gmk, allow_unused=True)
    assert all(grad is not None and grad.abs().sum() > 0 for grad in from_a)
    sets = g.task_sets(model.graph)
    assert sets[g.branch_id(("a", "b"), 2)] == {"a", "b"}
    assert sets[g.cell_id(0)] == {"a", "b", "c"}
    assert sets[g.fusion_id("c")] == {"c"}


def test_a_task_in_two_groups_fuses_both_branches():
    # a belongs to a+b and a+c: its fusion adds both branches to the trunk, each with its own β.
    model = lenet_model()
    spawn(model, (("a", "b"), 2))
    spawn(model, (("a", "c"), 2))
    assert g.fusion_groups(model.graph, "a") == [("a", "b"), ("a", "c")]
    last = g.num_cells(model.graph) - 1
    ab, ac = g.branch_id(("a", "b"), last), g.branch_id(("a", "c"), last)
    with torch.no_grad():
        model.betas["a|a+b"].fill_(0.7)
        model.betas["a|a+c"].fill_(0.3)
        for offset, node in ((0.05, ab), (0.02, ac)):  # the branches now differ from the trunk and each other
            for param in model.blocks[node].parameters():
                param.add_(offset)
    model.eval()
    x, targets = batch()
    with torch.no_grad():
        below = x
        for k in range(last):
            below = model.blocks[g.cell_id(k)](below)
        trunk = model.blocks[g.cell_id(last)](below)
        # A branch starting at the last cell reads the trunk's input to that cell.
        fused = trunk + 0.7 * model.blocks[ab](below) + 0.3 * model.blocks[ac](below)
        expected = model.blocks[g.head_id("a")](fused)
    out = model(x)
    torch.testing.assert_close(out["a"], expected)
    loss = torch.nn.functional.cross_entropy(out["a"], targets["a"])
    grads = torch.autograd.grad(loss, [model.betas["a|a+b"], model.betas["a|a+c"]], allow_unused=True)
    assert all(grad is not None and grad.abs() > 0 for grad in grads)


def test_growing_restarts_the_tensioner_window_only_when_something_grew():
    # The tensioner's norm history describes the old parameter set; after growth it must start a new window.
    from mamo.config import Config
    from mamo.conflicts import ConflictStats
    from mamo.directions import MGDA, Tensioner
    from mamo.search_phases import grow_network

    model = lenet_model()
    direction = Tensioner(MGDA(), "relative", T=2, alpha=0.5)
    step = TrainStep(model, direction, torch.optim.Adam(model.parameters(), lr=1e-3))
    for seed in range(3):
        result = step(*batch(seed=seed))
    assert direction.iteration == 3 and result.info["active"].item() == 1.0
    trainer = SimpleNamespace(model=model, step=step)
    config = Config()  # search.modules gmk, search.threshold global
    stats = ConflictStats.for_graph(model.graph)
    activated, new_nodes = grow_network(trainer, stats, config, 1)  # no conflicts counted: nothing grows
    assert activated == [] and new_nodes == []
    assert direction.iteration == 3 and all(len(norms) == 3 for norms in direction.state_dict()["norms"])
    stats.counts[1, 0, 1] = stats.counts[1, 1, 0] = 4  # a and b conflicted at cell 1 in 4 mini-batches
    activated, new_nodes = grow_network(trainer, stats, config, 1)
    assert activated == [(("a", "b"), 1)] and new_nodes == [g.branch_id(("a", "b"), 1), g.branch_id(("a", "b"), 2)]
    assert direction.iteration == 0 and direction.state_dict()["norms"] == []
    result = step(*batch(seed=3))  # the grown network's first step opens a new window
    assert direction.iteration == 1 and result.info["active"].item() == 0.0


def test_a_pair_activated_at_two_cells_grows_one_branch_from_the_shallower():
    # DESIGN §3: shallowest first, so the deeper position is covered and creates nothing. Deepest first gave the
    # same wiring but split the modules between the two positions in metrics.json's modules_per_position.
    from mamo.config import Config
    from mamo.conflicts import ConflictStats
    from mamo.search_phases import grow_network

    model = lenet_model()
    step = TrainStep(model, create_direction(DirectionConfig()), torch.optim.SGD(model.parameters(), lr=0.1))
    stats = ConflictStats.for_graph(model.graph)
    for cell in (0, 2):
        stats.counts[cell, 0, 1] = stats.counts[cell, 1, 0] = 4
    activated, new_nodes = grow_network(SimpleNamespace(model=model, step=step), stats, Config(), 1)
    assert sorted(activated) == [(("a", "b"), 0), (("a", "b"), 2)]
    assert new_nodes == [g.branch_id(("a", "b"), cell) for cell in range(3)]
    assert g.module_counts(model.graph) == {(("a", "b"), 0): 3}


def test_the_architecture_tree_names_each_branch_from_its_current_first_cell():
    model = lenet_model()
    spawn(model, (("a", "b"), 2))
    spawn(model, (("a", "b"), 0))  # the branch now starts at cell 0; its cell-2 module reads from cell 1's
    spawn(model, (("a", "c"), 1), modules="exclusive")
    tree = architecture_tree(model)
    assert "├─ cell2  (5,136 params, shared by all tasks)\n│   ├─ GMK a+b  (5,136 params, grown in round 0, " \
           "continues the branch from cell0)\n" in tree
    assert "│   ├─ task-exclusive a  (5,020 params, grown in round 0, starts here)\n" \
           "│   └─ task-exclusive c  (5,020 params, grown in round 0, starts here)\n├─ cell2" in tree  # the last closes
    assert [line[:5] for line in tree.splitlines() if ": fusion" in line] == ["├─ a:", "├─ b:", "└─ c:"]
    assert tree.count("starts here") == 3  # a+b at cell 0, the exclusive a and c at cell 1
    assert tree.splitlines()[-1].startswith("7 GMK and task-exclusive modules, ")
    # Every parameter is on a line: the fusions' betas were left out, so the lines fell short of the total.
    import re

    listed = sum(int(n.replace(",", "")) for n in re.findall(r"\(([\d,]+) params?\b", tree))
    assert listed == sum(p.numel() for p in model.parameters())
    assert "a: fusion [trunk + β·a+b + β·a] (2 params) → head" in tree


def test_long_task_names_wrap_every_line_of_the_tree_under_its_width():
    names = ["semantic_segmentation_of_roads", "monocular_depth_in_metres", "surface_normal"]
    model = lenet_model(parse_tasks({n: {"type": "classification", "classes": 4} for n in names}, "test"))
    spawn(model, ((names[0], names[1]), 1))
    spawn(model, ((names[0], names[2]), 1))
    lines = architecture_tree(model).splitlines()
    assert max(len(line) for line in lines) <= TREE_WIDTH
    first = lines.index(f"│   ├─ GMK {names[0]}+{names[1]}")  # the detail goes under the name
    assert lines[first + 1] == "│   │    (5,020 params, grown in round 0, starts here)"  # the twig's rail goes on
    last = lines.index(f"│   └─ GMK {names[0]}+{names[2]}")
    assert lines[last + 1] == "│        (5,020 params, grown in round 0, starts here)"  # the last closes the list
    # A long task name leaves its fusion's terms a short indent, not one under the first term.
    fusion = lines.index(f"├─ {names[0]}: fusion [trunk")
    assert lines[fusion + 2] == f"│    + β·{names[0]}+{names[2]}] (2 params) → head (172 params)"
    assert lines[-3:-1] == [f"└─ {names[2]}: fusion [trunk + β·{names[0]}+{names[2]}]",
                            " " * len(f"└─ {names[2]}: fusion [") + "(1 param) → head (172 params)"]
    spawn(short := lenet_model(), (("a", "b"), 1))  # short names keep a module and a fusion on one line each
    assert "│   └─ GMK a+b  (5,020 params, grown in round 0, starts here)\n" in architecture_tree(short)
    assert "├─ a: fusion [trunk + β·a+b] (1 param) → head (172 params)\n" in architecture_tree(short)


def test_a_fusion_of_many_branches_wraps_its_terms_and_keeps_the_tree_readable():
    # Ten tasks put up to 500 characters on one fusion line (longer names, longer lines).
    names = ["segmentation", "depth", "normal", "edges", "keypoints", "curvature", "reshading", "occlusion",
             "autoencoder", "denoising"]
    model = lenet_model(parse_tasks({n: {"type": "classification", "classes": 4} for n in names}, "test"))
    for other in names[1:]:
        spawn(model, ((names[0], other), 1))
    tree = architecture_tree(model)
    lines = tree.splitlines()
    start = next(k for k, line in enumerate(lines) if line.startswith(f"├─ {names[0]}: fusion [trunk + β·"))
    end = next(k for k in range(start, len(lines)) if "(9 params) → head" in lines[k])
    assert max(len(line) for line in lines) <= TREE_WIDTH
    indent = "│".ljust(len(f"├─ {names[0]}: fusion ["))
    assert end > start and all(line.startswith(indent + "+ β·") for line in lines[start + 1:end])
    assert lines[end - 1].endswith("]") and lines[end] == f"{indent}(9 params) → head (172 params)"
    fused = " ".join(line.strip("│ ") for line in lines[start:end])
    assert fused.count("+ β·") == 9 and all(f"β·{names[0]}+{other}" in fused for other in names[1:])
    assert f"└─ {names[-1]}: fusion [trunk + β·{names[0]}+{names[-1]}] (1 param) → head" in tree  # short: one line
    assert lines[-1].startswith("18 GMK modules, ")  # nine branches over cells 1 and 2


def test_exclusive_modules_are_task_specific():
    model = lenet_model()
    spawn(model, (("a", "c"), 1), modules="exclusive")
    sets = g.task_sets(model.graph)
    assert sets[g.branch_id(("a",), 1)] == {"a"} and sets[g.branch_id(("c",), 2)] == {"c"}
    step = make_step(model)
    assert step.partition.node_slices.keys() == {g.cell_id(k) for k in range(3)}


def test_an_exclusive_pair_sharing_a_grown_task_still_grows_the_other_task():
    # Exclusive modules: (a, b) at cell 1 grew a's and b's. (a, c) at cell 1 is grown only once c has its own
    # module too; a's existing one does not cover it.
    model = lenet_model()
    spawn(model, (("a", "b"), 1), modules="exclusive")
    candidates = g.candidate_positions(model.graph, "exclusive")
    assert (("a", "b"), 1) not in candidates and (("a", "b"), 2) not in candidates
    assert (("a", "c"), 1) in candidates and (("b", "c"), 1) in candidates
    assert not g.is_grown(model.graph, (("a", "c"), 1), "exclusive")
    added = spawn(model, (("a", "c"), 1), modules="exclusive")
    assert added == [g.branch_id(("c",), 1), g.branch_id(("c",), 2)]
    assert g.is_grown(model.graph, (("a", "c"), 1), "exclusive")
    assert g.fusion_groups(model.graph, "a") == [("a",)]  # a's module is not duplicated
    assert g.fusion_groups(model.graph, "c") == [("c",)]


def test_the_same_position_cannot_grow_twice():
    model = lenet_model()
    spawn(model, (("a", "b"), 1))
    with pytest.raises(ValueError, match="already grown"):
        g.grow(model.graph, (("a", "b"), 1))
    with pytest.raises(ValueError, match="already grown"):
        g.grow(model.graph, (("a", "b"), 2))  # the branch already runs through cell 2
    candidates = g.candidate_positions(model.graph)
    assert (("a", "b"), 1) not in candidates and (("a", "b"), 2) not in candidates
    assert (("a", "b"), 0) in candidates and (("b", "c"), 1) in candidates


def test_growth_keeps_the_optimizer_state_of_old_parameters():
    model = lenet_model()
    step = make_step(model)
    step(*batch())
    trunk = next(model.blocks[g.cell_id(1)].parameters())
    moment = step.optimizer.state[trunk]["exp_avg"].clone()
    spawn(model, (("a", "b"), 1))
    assert add_new_parameters(step.optimizer, model) == 2 * 2 + 2  # two cells' weight and bias, two betas
    held = {id(p) for group in step.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in held for p in model.parameters())
    assert torch.equal(step.optimizer.state[trunk]["exp_avg"], moment)


@pytest.mark.parametrize("modules", ["gmk", "exclusive"])
def test_every_node_records_its_builder_and_its_parameter_count(modules):
    model = lenet_model()
    spawn(model, (("a", "b"), 1), modules)
    spawn(model, (("a", "c"), 2), modules)
    graph = model.graph
    for node, named in model.node_parameters().items():
        assert graph.nodes[node]["params"] == sum(p.numel() for _, p in named), node
    assert sum(params for _, params in graph.nodes(data="params", default=0)) == sum(
        p.numel() for p in model.parameters())
    for _, data in graph.nodes(data=True):
        if data["kind"] in ("cell", "gmk"):
            assert data["builder"] == "cell" and data["args"] == {"cell": data["cell"]}
        elif data["kind"] == "head":
            assert data["builder"] == "head" and data["args"]["task"] == data["task"]


@pytest.mark.parametrize("modules", ["gmk", "exclusive"])
@pytest.mark.parametrize("order_seed", [0, 1, 2])
def test_every_edge_of_a_grown_graph_is_one_the_model_reads(modules, order_seed):
    # Grow every position in a random order; the wiring check accepts each graph on the way, rejects the
    # final one with any single edge removed or any single edge added (so an edited architecture.json
    # cannot compile to a model that silently reads the wrong streams).
    graph = lenet_model().graph
    generator = torch.Generator().manual_seed(order_seed)
    while positions := g.candidate_positions(graph, modules):
        g.grow(graph, positions[int(torch.randint(len(positions), (1,), generator=generator))], modules)
        assert g.structure_error(graph) is None
    assert g.branch_nodes(graph), "the test should cover a fully grown graph"
    for edge in list(graph.edges):
        graph.remove_edge(*edge)
        assert g.structure_error(graph) is not None, f"removing {edge} went unnoticed"
        graph.add_edge(*edge)
    for source in list(graph.nodes):
        for target in list(graph.nodes):
            if source != target and not graph.has_edge(source, target):
                graph.add_edge(source, target)
                assert g.structure_error(graph) is not None, f"adding {source} -> {target} went unnoticed"
                graph.remove_edge(source, target)
    assert g.structure_error(graph) is None


def test_a_grown_module_is_trained():
    # The new branch's parameters must reach the optimizer: without them it stays a frozen copy of the trunk.
    from mamo.config import Config
    from mamo.conflicts import ConflictStats
    from mamo.search_phases import grow_network

    model = lenet_model()
    step = TrainStep(model, create_direction(DirectionConfig()), torch.optim.SGD(model.parameters(), lr=0.1))
    stats = ConflictStats.for_graph(model.graph)
    stats.counts[1, 0, 1] = stats.counts[1, 1, 0] = 4
    _, new_nodes = grow_network(SimpleNamespace(model=model, step=step), stats, Config(), 1)
    assert new_nodes
    held = {id(p) for group in step.optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in model.parameters()} <= held
    grown = [p for node in new_nodes for p in model.blocks[node].parameters()]
    before = [p.detach().clone() for p in grown]
    for seed in range(5, 8):  # the fusion's beta starts at 0: the branch gets gradients once beta moved
        step(*batch(seed=seed))
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, grown, strict=True))
