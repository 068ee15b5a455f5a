"""The output-space (Woodbury, method="kernel") solver against dense float64 solves."""
import numpy as np
import pytest
import torch
from torch import nn

import pbrf_fast
from pbrf_fast.inverses.output_space import _gram_and_products, _gram_by_jacobians, jacobian_gram
from pbrf_fast.inverses import choose_method

from factories import LOSSES, dense_gnh, dense_gradients, make_problem, make_targets, rel_err


@pytest.mark.parametrize("loss, outputs", [("mse", 2), ("bce", 3), ("cross_entropy", 10)])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_kernel_solve_equals_numpy(loss, outputs, weight_decay):
    problem = make_problem(loss, weight_decay, n=9, outputs=outputs, hidden=(6,))
    op = pbrf_fast.GaussNewton(problem, damping=0.01)
    B = torch.randn(problem.dim, 4, dtype=torch.float64)
    expected = torch.from_numpy(np.linalg.solve(dense_gnh(problem, 0.01).numpy(), B.numpy()))
    result = pbrf_fast.solve(op, B, method="kernel")
    assert rel_err(result.solution, expected) < 1e-8
    assert float(result.residual_norms.max()) < 1e-8
    assert rel_err(result.solution, pbrf_fast.solve(op, B, method="direct").solution) < 1e-8


def test_damping_sweep_reuses_one_factorisation():
    problem = make_problem("cross_entropy", 0.01, n=7, outputs=4)
    op = pbrf_fast.GaussNewton(problem, damping=0.1)
    B = torch.randn(problem.dim, 2, dtype=torch.float64)
    for damping in (0.1, 1e-3, 1.0):
        other = op.with_damping(damping)
        expected = torch.linalg.solve(dense_gnh(problem, damping), B)
        assert rel_err(pbrf_fast.solve(other, B, method="kernel").solution, expected) < 1e-8
    state = op._cache["output_space"][1]
    assert state["eigh"] is not None  # the second damping switched to one eigendecomposition


def test_layerwise_gram_equals_explicit_jacobians():
    problem = make_problem("cross_entropy", n=6, outputs=3, hidden=(5, 4))
    assert rel_err(jacobian_gram(problem), _gram_by_jacobians(problem, problem.inputs)) < 1e-12


def test_models_beyond_linear_layers_use_explicit_jacobians():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    problem = pbrf_fast.Problem(model, "mse", x, torch.randn(8, 2, dtype=torch.float64), weight_decay=0.01)
    op = pbrf_fast.GaussNewton(problem, 1e-3)
    B = torch.randn(problem.dim, 3, dtype=torch.float64)
    assert rel_err(pbrf_fast.solve(op, B, method="kernel").solution, torch.linalg.solve(dense_gnh(problem, 1e-3), B)) < 1e-8


@pytest.mark.parametrize("loss", LOSSES)
def test_output_space_scores_equal_explicit_formula(loss):
    problem = make_problem(loss, 0.01, n=10, outputs=3)
    g = torch.Generator().manual_seed(2)
    x_test = torch.randn(5, 3, generator=g, dtype=torch.float64)
    t_test = make_targets(loss, 5, 3, g)
    influence = pbrf_fast.Influence(problem, damping=0.02, solver="kernel")
    x_c, t_c = problem.check_data(x_test, t_test)
    expected = (dense_gradients(problem, *problem.batch(None))
                @ torch.linalg.solve(dense_gnh(problem, 0.02), dense_gradients(problem, x_c, t_c).T)) / problem.n
    assert rel_err(influence.scores(x_test, t_test), expected) < 1e-8
    assert rel_err(influence.scores(x_test, t_test, train_idx=[1, 7]), expected[[1, 7]]) < 1e-8
    assert rel_err(influence.s_test(x_test, t_test),
                   torch.linalg.solve(dense_gnh(problem, 0.02), dense_gradients(problem, x_c, t_c).T)) < 1e-8


def test_float32_model_is_exact_to_float32_precision():
    problem64 = make_problem("mse", 0.0, n=30, outputs=1, hidden=(40, 40))
    model32 = make_problem("mse", 0.0, n=30, outputs=1, hidden=(40, 40)).model.float()
    problem32 = pbrf_fast.Problem(model32, "mse", problem64.inputs.float(), problem64.targets.float())
    B = torch.randn(problem64.dim, 3, dtype=torch.float64)
    exact = torch.linalg.solve(dense_gnh(problem64, 1e-3), B)
    got = pbrf_fast.solve(pbrf_fast.GaussNewton(problem32, 1e-3), B.float(), method="kernel").solution
    assert rel_err(got.double(), exact) < 1e-4


def test_auto_dispatch_picks_the_cheaper_exact_solver():
    wide = make_problem("mse", n=5, outputs=1, hidden=(30,))  # N*C = 5 << d
    assert choose_method(pbrf_fast.GaussNewton(wide, 1e-3))[0] == "kernel"
    tall = make_problem("cross_entropy", n=200, outputs=3, hidden=())  # d = 12 << N*C
    assert choose_method(pbrf_fast.GaussNewton(tall, 1e-3))[0] == "direct"
    assert choose_method(pbrf_fast.Hessian(wide, 1e-3))[0] == "direct"


def test_kernel_refuses_hessian_and_zero_shift():
    problem = make_problem("mse")
    with pytest.raises(ValueError, match="gnh"):
        pbrf_fast.solve(pbrf_fast.Hessian(problem, 0.1), torch.zeros(problem.dim, dtype=torch.float64), method="kernel")
    with pytest.raises(ValueError, match="> 0"):
        pbrf_fast.solve(pbrf_fast.GaussNewton(problem, 0.0), torch.zeros(problem.dim, dtype=torch.float64), method="kernel")


# ------------------------------------------------- conv nets: J's rows, chunked Gram
from pbrf_fast.errors import InputError  # noqa: E402
from pbrf_fast.jacobian_rows import JacobianRows  # noqa: E402
from pbrf_fast.inverses.output_space import OutputSpaceSolver, _RowStream  # noqa: E402
from test_products_layerwise import MODELS, conv_problem  # noqa: E402


def dense_jacobian(problem):
    J = torch.autograd.functional.jacobian(lambda th: problem.forward(th, problem.inputs), problem.theta.clone())
    return J.reshape(-1, problem.dim)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_layer_rows_equal_the_dense_jacobian(name):
    problem = conv_problem(name, n=5)
    rows = JacobianRows(problem, chunk_bytes=1 << 24)
    got = rows(problem.inputs)
    assert rows.source == "layers", rows.reason
    assert rel_err(got, dense_jacobian(problem)) < 1e-12


def forced_stream(problem, chunk, panel):
    stream = _RowStream(problem, 1 << 30)
    stream.chunk, stream.panel = chunk, panel
    return stream


@pytest.mark.parametrize("chunk, panel", [(2, 4), (3, 9), (1, 1), (9, 9)])
def test_chunked_gram_and_products_equal_dense(chunk, panel):
    # N*C = 9 * 5 = 45 rows; chunks of 2 examples and panels of 4 divide neither
    problem = conv_problem("resnet-blocks", n=9)
    J = dense_jacobian(problem)
    V = torch.randn(problem.dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    theta, JV = _gram_and_products(forced_stream(problem, chunk, panel), V)
    assert rel_err(theta, J @ J.T) < 1e-12
    assert torch.equal(theta, theta.T)
    assert rel_err(JV, J @ V) < 1e-12
    assert rel_err(jacobian_gram(problem), _gram_by_jacobians(problem, problem.inputs)) < 1e-12


@pytest.mark.parametrize("block", [1, 7, 45])
def test_in_place_mirror_and_symmetrize_by_blocks_equal_the_dense_forms(block, monkeypatch):
    # N*C = 45: blocks of 7 divide neither the matrix nor the examples' C = 5 rows
    monkeypatch.setattr(output_space_module, "_MIRROR_BLOCK", block)
    A = torch.randn(45, 45, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    mirrored = output_space_module._mirror_upper_(A.clone())
    assert torch.equal(mirrored, torch.triu(A) + torch.triu(A, 1).T)
    assert torch.equal(output_space_module._symmetrize_(A.clone()), 0.5 * (A + A.T))
    problem = conv_problem("resnet-blocks", "cross_entropy", n=9, weight_decay=0.01)
    J = dense_jacobian(problem)
    theta, _ = _gram_and_products(forced_stream(problem, 2, 4))
    assert rel_err(theta, J @ J.T) < 1e-12 and torch.equal(theta, theta.T)
    B = torch.randn(problem.dim, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    solver = OutputSpaceSolver(pbrf_fast.GaussNewton(problem, 0.02))
    assert rel_err(solver.solve(B), torch.linalg.solve(dense_gnh(problem, 0.02), B)) < 1e-9
    assert torch.equal(solver._state()["gram"], solver._state()["gram"].T)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "bce"])
def test_kernel_solve_and_scores_on_a_resnet_equal_dense(loss):
    problem = conv_problem("resnet-blocks", loss, n=9, weight_decay=0.01)
    g = torch.Generator().manual_seed(3)
    B = torch.randn(problem.dim, 4, dtype=torch.float64, generator=g)
    dense = dense_gnh(problem, 0.02)
    op = pbrf_fast.GaussNewton(problem, 0.02)
    solver = OutputSpaceSolver(op)
    solver._stream = forced_stream(problem, 2, 4)
    assert rel_err(solver.solve(B), torch.linalg.solve(dense, B)) < 1e-9
    assert op._cache["output_space"][1]["path"] == "rows"
    # the scores from a fresh operator: the state is built in the same pass as J V
    op = pbrf_fast.GaussNewton(problem, 0.02)
    scores = OutputSpaceSolver(op, memory_bytes=1).training_scores(B)  # 1 byte: one example at a time
    expected = dense_gradients(problem, *problem.batch(None)) @ torch.linalg.solve(dense, B) / problem.n
    assert rel_err(scores, expected) < 1e-9
    # the cached state serves another damping: J V then comes from a fresh pass over the rows
    other = op.with_damping(0.5)
    assert rel_err(OutputSpaceSolver(other).solve(B), torch.linalg.solve(dense_gnh(problem, 0.5), B)) < 1e-9


def test_influence_kernel_on_a_conv_net_equals_dense():
    problem = conv_problem("mixed", n=6, weight_decay=0.0)
    x_test, t_test = problem.inputs[:2] + 0.1, problem.targets[:2]
    expected = (dense_gradients(problem, *problem.batch(None))
                @ torch.linalg.solve(dense_gnh(problem, 0.05), dense_gradients(problem, x_test, t_test).T)) / problem.n
    assert rel_err(pbrf_fast.Influence(problem, 0.05, solver="kernel").scores(x_test, t_test), expected) < 1e-9


class ParameterOutsideForward(nn.Module):
    """Reads conv.weight in its own forward: the hooks would miss that use."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        h = torch.relu(self.conv(x)) + torch.nn.functional.conv2d(x, self.conv.weight).tanh()
        return self.fc(h.mean((2, 3)))


class SharedLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.out = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4, 2))

    def forward(self, x):
        return self.out(torch.tanh(self.fc(torch.tanh(self.fc(x)))))


INPLACE = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(inplace=True), nn.Flatten(),
                        nn.Linear(3 * 3 * 3, 2))


@pytest.mark.parametrize("model, shape, source, reason", [
    (ParameterOutsideForward(), (2, 5, 5), "torch.func", "disagree"),
    (SharedLayer(), (4, 3), "torch.func", "more than once"),
    (nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)), (3,), "torch.func", "LayerNorm"),
    (INPLACE, (2, 5, 5), "layers", "every trainable"),
])
def test_rows_fall_back_to_torch_func_where_the_hooks_cannot_see(model, shape, source, reason):
    torch.manual_seed(0)
    model = model.double()
    x = torch.randn(5, *shape, dtype=torch.float64)
    problem = pbrf_fast.Problem(model, "mse", x, torch.randn(5, 2, dtype=torch.float64))
    rows = JacobianRows(problem, chunk_bytes=1 << 24)
    got = rows(problem.inputs)
    assert (rows.source, reason in rows.reason) == (source, True), rows.reason
    assert rel_err(got, dense_jacobian(problem)) < 1e-12


def test_float32_conv_net_rows_path_is_exact_to_float32_precision():
    problem64 = conv_problem("resnet-2-per-stage", n=8, weight_decay=0.01)
    model32 = conv_problem("resnet-2-per-stage", n=8).model.float()
    problem32 = pbrf_fast.Problem(model32, "cross_entropy", problem64.inputs.float(), problem64.targets,
                                  weight_decay=0.01)
    B = torch.randn(problem64.dim, 3, dtype=torch.float64)
    exact = torch.linalg.solve(dense_gnh(problem64, 1e-3), B)
    got = OutputSpaceSolver(pbrf_fast.GaussNewton(problem32, 1e-3)).solve(B.float())
    assert rel_err(got.double(), exact) < 1e-4


@pytest.mark.parametrize("bad", [0, -5, 1.5, True, "1GB"])
def test_memory_budget_must_be_a_positive_integer(bad):
    op = pbrf_fast.GaussNewton(conv_problem("lenet-like", n=3), 0.1)
    with pytest.raises(InputError, match="memory_bytes"):
        OutputSpaceSolver(op, memory_bytes=bad)
    with pytest.raises(InputError, match="memory_bytes"):
        jacobian_gram(op.problem, memory_bytes=bad)
    with pytest.raises(InputError, match="chunk_bytes"):
        JacobianRows(op.problem, chunk_bytes=bad)


def test_kept_rows_follow_a_new_theta():
    problem = conv_problem("lenet-like", n=6)
    op = pbrf_fast.GaussNewton(problem, 0.1)
    solver = OutputSpaceSolver(op)
    B = torch.randn(problem.dim, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    solver.solve(B)
    assert solver._stream.kept is not None  # six examples' rows fit the default budget
    problem.set_theta(problem.theta * 0.9)
    assert rel_err(solver.solve(B), torch.linalg.solve(dense_gnh(problem, 0.1), B)) < 1e-9


# ------------------------------------- issue 15: one forward per chunk, rows written in place
from pbrf_fast import jacobian_rows as jacobian_rows_module  # noqa: E402
from pbrf_fast.inverses import output_space as output_space_module  # noqa: E402


@pytest.mark.parametrize("forward", ["once", "replicated"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_layer_rows_equal_jacrev_rows_for_either_forward(name, forward, monkeypatch):
    monkeypatch.setattr(jacobian_rows_module, "FORWARD", forward)
    problem = conv_problem(name, n=5)
    rows = JacobianRows(problem, chunk_bytes=1 << 24)
    x = problem.inputs[1:4]  # a chunk that is not the whole set
    got = rows(x)
    assert rows.source == "layers", rows.reason
    assert rel_err(got, rows._func_rows(x)) < 1e-12
    again = rows(x)  # the checked path (no vjp check, graph freed after the last output)
    assert rel_err(again, got) < 1e-15


def test_rows_are_written_into_the_callers_buffer():
    problem = conv_problem("resnet-blocks", n=4)
    rows = JacobianRows(problem, chunk_bytes=1 << 24)
    c = problem.num_outputs
    buffer = torch.full((4 * c, problem.dim), float("nan"), dtype=torch.float64)
    result = rows(problem.inputs, out=buffer)
    assert result.data_ptr() == buffer.data_ptr()
    assert rel_err(buffer, dense_jacobian(problem)) < 1e-12
    with pytest.raises(InputError, match="out must be"):
        rows(problem.inputs, out=buffer[:-1])
    with pytest.raises(InputError, match="out must be"):
        rows(problem.inputs, out=buffer.float())


def test_default_row_budget_is_half_the_free_memory(monkeypatch):
    monkeypatch.setattr(output_space_module, "_free_bytes", lambda device: 8 << 30)
    assert output_space_module.default_rows_bytes() == 4 << 30
    op = pbrf_fast.GaussNewton(conv_problem("lenet-like", n=3), 0.1)
    assert OutputSpaceSolver(op).memory_bytes == 4 << 30
    assert OutputSpaceSolver(op, memory_bytes=123).memory_bytes == 123
    monkeypatch.setattr(output_space_module, "_free_bytes", lambda device: None)
    assert output_space_module.default_rows_bytes() == output_space_module.JACOBIAN_ROWS_BYTES
    monkeypatch.undo()  # the real reader, on this machine
    free = output_space_module._free_bytes(torch.device("cpu"))
    assert free is None or free > 0


def test_a_budget_that_recomputes_the_rows_many_times_warns_by_name():
    import warnings

    problem = conv_problem("resnet-blocks", n=9)
    B = torch.randn(problem.dim, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    expected = torch.linalg.solve(dense_gnh(problem, 0.02), B)
    with pytest.warns(pbrf_fast.SlowPathWarning, match=r"memory_bytes=.* computed ~\d+ times over"):
        small = OutputSpaceSolver(pbrf_fast.GaussNewton(problem, 0.02), memory_bytes=1).solve(B)
    assert rel_err(small, expected) < 1e-9  # slow, still exact
    with warnings.catch_warnings():
        warnings.simplefilter("error", pbrf_fast.SlowPathWarning)
        assert rel_err(OutputSpaceSolver(pbrf_fast.GaussNewton(problem, 0.02)).solve(B), expected) < 1e-9
