"""The Table 1 responses: vectorised retraining, replayed cold start, exact optima."""
import copy

import pytest
import torch

import pbrf_fast
from pbrf_fast.paper.responses import ResponseSettings, ResponseSolver
from pbrf_fast.paper.training import TrainConfig, batch_order, train

from factories import dense_gnh, dense_gradients, make_problem, rel_err


def _trained(optimizer="sgd", loss="mse", weight_decay=0.01, epochs=6, batch_size=8, **kw):
    problem = make_problem(loss, weight_decay, n=24, hidden=(6,), **kw)
    config = TrainConfig(epochs=epochs, lr=0.05, batch_size=batch_size, optimizer=optimizer, seed=3,
                         lr_milestones=(4,), lr_gamma=0.5)
    return problem, train(problem, config)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("response", ["warm_start", "proximal", "pbrf", "cold_start"])
def test_vectorised_retraining_equals_one_by_one(optimizer, response):
    problem, base = _trained(optimizer)
    solver = ResponseSolver(problem, base, ResponseSettings(damping=0.01, response_epochs=3))
    together = solver.compute(response, [2, 5, 11])
    alone = torch.cat([solver.compute(response, [i]) for i in (2, 5, 11)])
    assert rel_err(together, alone) < 1e-5


def test_cold_start_replays_the_base_run_exactly():
    problem, base = _trained("momentum")
    solver = ResponseSolver(problem, base, ResponseSettings(epsilon=0.0, response_epochs=0))
    assert rel_err(solver.cold_start([0])[0], base.theta) < 1e-12


def test_batch_order_is_a_pure_function_of_seed_and_epoch():
    assert torch.equal(batch_order(50, 3, 7), batch_order(50, 3, 7))
    assert not torch.equal(batch_order(50, 3, 7), batch_order(50, 3, 8))


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_linearized_pbrf_optimum_is_the_damped_gnh_influence(loss):
    problem, base = _trained(loss=loss)
    solver = ResponseSolver(problem, base, ResponseSettings(damping=0.05, influence_solver="direct"))
    grads = dense_gradients(problem, *problem.batch([1, 7]))
    expected = base.theta + (torch.linalg.solve(dense_gnh(problem, 0.05), grads.T) / problem.n).T
    assert rel_err(solver.linearized_pbrf([1, 7]), expected) < 1e-8
    assert rel_err(solver.influence([1, 7]), expected) < 1e-8


def test_group_removal_sums_the_members():
    problem, base = _trained()
    solver = ResponseSolver(problem, base, ResponseSettings(damping=0.05, influence_solver="direct"))
    delta = solver.influence([[1, 7]])[0] - base.theta
    singles = solver.influence([1, 7]) - base.theta
    assert rel_err(delta, singles.sum(0)) < 1e-10


def test_pbrf_objective_gradient_at_theta_s_is_the_removal_gradient():
    """The Bregman term and the proximity term are flat at theta^s, so only -eps grad L_z remains."""
    problem, base = _trained(loss="bce", outputs=2)
    solver = ResponseSolver(problem, base, ResponseSettings(damping=0.1))
    removal = solver.removal([4])
    objective = solver._objective("pbrf")
    grad = torch.func.grad(objective)(base.theta, torch.arange(problem.n), removal.index[0], removal.weight[0])
    expected = -solver.removal_gradients([4])[:, 0]
    assert rel_err(grad, expected) < 1e-10


def test_trained_linearized_pbrf_approaches_its_optimum():
    problem, base = _trained(weight_decay=0.5, batch_size=24)  # full batch: plain gradient descent
    settings = ResponseSettings(damping=0.5, linearized="train", response_epochs=150, bregman_lr_factor=1.0)
    solver = ResponseSolver(problem, base, settings)
    trained = solver.linearized_pbrf([3])
    solver.settings.linearized = "exact"
    exact = solver.linearized_pbrf([3])
    assert rel_err(trained - base.theta, exact - base.theta) < 0.05


def test_two_stage_is_theta_s_plus_difference_of_warm_starts():
    problem, base = _trained()
    solver = ResponseSolver(problem, base, ResponseSettings(response_epochs=2))
    nothing = ResponseSolver(problem, base, ResponseSettings(response_epochs=2, epsilon=0.0)).warm_start([0])[0]
    expected = base.theta + solver.warm_start([5])[0] - nothing
    assert rel_err(solver.two_stage([5])[0], expected) < 1e-10


def test_responses_need_the_trained_parameters():
    problem, base = _trained()
    problem.set_theta(base.theta0)
    with pytest.raises(ValueError, match="theta"):
        ResponseSolver(problem, base)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_test_loss_changes_of_a_float32_network_are_evaluated_in_float64(loss):
    # A float32 network's test losses change by far less than one float32 rounding step
    # when one point is removed; the changes must come from a float64 evaluation.
    from pbrf_fast.paper.decomposition import test_loss_changes

    p64 = make_problem(loss, n=9, outputs=3)
    model32 = copy.deepcopy(p64.model).float()
    p32 = pbrf_fast.Problem(model32, loss, p64.inputs.float(),
                            p64.targets.float() if p64.targets.is_floating_point() else p64.targets)
    g = torch.Generator().manual_seed(3)
    # parameter rows representable in float32, moved from theta^s by ~1e-6 per entry
    params32 = p32.theta + 1e-6 * torch.randn(4, p32.dim, generator=g).float()
    # inputs and targets as float32 holds them, so the reference differs only in the arithmetic
    x = p64.inputs[:5].float().double()
    t = p64.targets[:5].float().double() if p64.targets.is_floating_point() else p64.targets[:5]
    got = test_loss_changes(p32, params32, x.float(), t.float() if t.is_floating_point() else t)
    p64.set_theta(p32.theta.double())
    reference = torch.stack([p64.example_losses(th, x, t) for th in params32.double()]) \
        - p64.example_losses(p64.theta, x, t)
    assert got.dtype == torch.float64
    assert rel_err(got, reference) < 1e-10
    # the float32 subtraction this replaces is off by rounding at this size
    naive = torch.stack([p32.example_losses(th, x.float(), t.float() if t.is_floating_point() else t)
                         for th in params32]) - p32.example_losses(p32.theta, x.float(),
                                                                   t.float() if t.is_floating_point() else t)
    assert rel_err(naive.double(), reference) > 1e-4
