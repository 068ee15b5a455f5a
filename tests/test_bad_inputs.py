"""Bad and edge inputs across the public API and the command line, as a table.

Every row must raise a pbrf_fast error (a PBRFError subclass) whose message names the
argument and what was expected, or, on the command line, a usage error (exit 2 from
argparse) or exit status 2 with the error on stderr. None may return silently.
"""
import pytest
import torch
from torch import nn

import pbrf_fast
from pbrf_fast import cli
from pbrf_fast.errors import PBRFError

from factories import make_mlp, make_problem


def mlp_problem(loss="mse", **kw):
    return make_problem(loss, n=12, d_in=3, hidden=(4,), outputs=3, **kw)


def model():
    return make_mlp(3, (4,), 3)


X = torch.randn(12, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
T = torch.randn(12, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def Problem(**changes):
    args = dict(model=model(), loss="mse", inputs=X, targets=T) | changes
    return pbrf_fast.Problem(**args)


def gnh(**kw):
    return pbrf_fast.GaussNewton(mlp_problem(), **({"damping": 0.1} | kw))


def solve(method, B=None, **options):
    op = gnh()
    B = torch.randn(op.dim, 2, dtype=torch.float64) if B is None else B
    return pbrf_fast.solve(op, B, method, **options)


def influence(**kw):
    return pbrf_fast.Influence(mlp_problem("cross_entropy"), **({"damping": 0.1, "solver": "cg"} | kw))


def frozen_model():
    m = model()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def meta_model():
    with torch.device("meta"):
        return nn.Linear(3, 3)


def custom_mse_named_mse(y, t):
    return 2.0 * (y - t).pow(2).sum(-1)


def nonconvex(y, t):
    return torch.cos(y).sum(-1)


def soft(rows):
    return torch.tensor(rows, dtype=torch.float64)


CE = dict(loss="cross_entropy")
API_CASES = [
    # ---- Problem
    ("1-D inputs, model wants 3 features", lambda: Problem(inputs=torch.randn(12, dtype=torch.float64)), "inputs"),
    ("1-D inputs, one-feature model", lambda: Problem(model=make_mlp(1, (4,), 3), inputs=torch.randn(12, dtype=torch.float64)),
     "leading example dimension"),
    ("targets of another length", lambda: Problem(targets=T[:5]), "targets have 5 rows"),
    ("NaN in the inputs", lambda: Problem(inputs=X.clone().index_fill_(0, torch.tensor([2]), float("nan"))), "inputs contain NaN"),
    ("Inf in the targets", lambda: Problem(targets=T.clone().fill_(float("inf"))), "targets contain NaN"),
    ("negative weight decay", lambda: Problem(weight_decay=-1.0), "weight_decay"),
    ("NaN weight decay", lambda: Problem(weight_decay=float("nan")), "weight_decay"),
    ("batch size zero", lambda: Problem(batch_size=0), "batch_size"),
    ("no trainable parameters", lambda: Problem(model=frozen_model()), "trainable"),
    ("model on the meta device", lambda: Problem(model=meta_model()), "meta device"),
    ("integer inputs to a float model", lambda: Problem(inputs=torch.ones(12, 3, dtype=torch.long)), "cannot run on inputs"),
    ("class targets out of range", lambda: Problem(targets=torch.full((12,), 7), **CE), "class targets must lie in [0, 3)"),
    ("negative soft targets", lambda: Problem(targets=soft([[1.5, -0.5, 0.0]] * 12), **CE), "soft targets must be finite and >= 0"),
    ("soft targets not summing to 1", lambda: Problem(targets=soft([[0.5, 0.2, 0.1]] * 12), **CE), "sum to 1"),
    ("no examples", lambda: Problem(inputs=X[:0], targets=T[:0]), "at least one example"),
    ("unknown loss name", lambda: Problem(loss="hinge"), "unknown loss 'hinge'"),
    ("NaN parameters", lambda: Problem(model=make_mlp(3, (4,), 3).apply(
        lambda m: m.weight.data.fill_(float("nan")) if isinstance(m, nn.Linear) else None)), "NaN"),
    ("theta of the wrong shape", lambda: mlp_problem().set_theta(torch.zeros(3, dtype=torch.float64)), "theta must have shape"),
    ("test inputs of another shape", lambda: mlp_problem().check_data(torch.randn(4, 5, dtype=torch.float64), T[:4]),
     "test inputs have per-example shape"),
    # ---- curvature operators
    ("negative damping", lambda: gnh(damping=-1.0), "damping"),
    ("NaN damping", lambda: gnh(damping=float("nan")), "damping"),
    ("damping that overflows float32", lambda: pbrf_fast.GaussNewton(
        pbrf_fast.Problem(model().float(), "mse", X.float(), T.float()), 1e300), "overflows torch.float32"),
    ("unknown curvature", lambda: pbrf_fast.make_curvature(mlp_problem(), "fisher"), "unknown curvature 'fisher'"),
    ("vectors of the wrong length", lambda: gnh().matvec(torch.zeros(5, dtype=torch.float64)), "vectors must have shape"),
    ("vectors of another dtype", lambda: gnh().matvec(torch.zeros(gnh().dim)), "vectors must be torch.float64"),
    ("vectors not a tensor", lambda: gnh().matvec([0.0] * 31), "vectors must be a torch.Tensor"),
    ("batch index out of range", lambda: gnh().matvec(torch.zeros(31, dtype=torch.float64), [0, 99]), "out of range"),
    ("float batch indices", lambda: gnh().matvec(torch.zeros(31, dtype=torch.float64), [0.5, 1.5]), "integers"),
    ("mask of the wrong length", lambda: gnh().matvec(torch.zeros(31, dtype=torch.float64), torch.ones(5, dtype=torch.bool)),
     "boolean mask must have one entry per example (12)"),
    ("empty batch", lambda: gnh().matvec(torch.zeros(31, dtype=torch.float64), []), "empty index batch"),
    ("GNH of a loss not convex in the outputs",
     lambda: pbrf_fast.GaussNewton(Problem(loss=pbrf_fast.AutogradLoss(nonconvex, convex_in_outputs=False)), 0.1),
     "not convex"),
    # ---- solve, every method
    ("unknown method", lambda: solve("newton"), "unknown solver 'newton'"),
    ("NaN right-hand side", lambda: solve("cg", torch.full((31, 1), float("nan"), dtype=torch.float64)),
     "right-hand side B has NaN/Inf"),
    ("right-hand side of the wrong shape", lambda: solve("direct", torch.zeros(7, 2, dtype=torch.float64)),
     "right-hand side B: vectors must have shape"),
    ("cg tol 0", lambda: solve("cg", tol=0.0), "tol must be finite and > 0"),
    ("cg tol NaN", lambda: solve("cg", tol=float("nan")), "tol must be finite and > 0"),
    ("cg tol negative", lambda: solve("cg", tol=-1e-3), "tol must be finite and > 0"),
    ("cg x0 of the wrong shape", lambda: solve("cg", x0=torch.zeros(31, 5, dtype=torch.float64)), "warm start x0"),
    ("cg x0 with NaN", lambda: solve("cg", x0=torch.full((31, 2), float("nan"), dtype=torch.float64)), "warm start x0 has NaN"),
    ("cg max_iter negative", lambda: solve("cg", max_iter=-1), "max_iter must be >= 0"),
    ("cg max_iter not an integer", lambda: solve("cg", max_iter=2.5), "max_iter must be an integer"),
    ("direct tol negative", lambda: solve("direct", tol=-1.0), "tol must be finite and > 0"),
    ("kernel with a custom loss named mse",
     lambda: pbrf_fast.solve(pbrf_fast.GaussNewton(Problem(loss=pbrf_fast.AutogradLoss(custom_mse_named_mse, name="mse")), 0.1),
                             torch.zeros(31, 1, dtype=torch.float64), "kernel"), "closed-form output Hessian"),
    ("kernel tol 0", lambda: solve("kernel", tol=0.0), "tol must be finite and > 0"),
    ("lissa depth 0", lambda: solve("lissa", depth=0), "depth must be >= 1"),
    ("lissa depth not an integer", lambda: solve("lissa", depth=2.5), "depth must be an integer"),
    ("lissa repeats 0", lambda: solve("lissa", repeats=0), "repeats must be >= 1"),
    ("lissa batch_size 0", lambda: solve("lissa", batch_size=0), "batch_size must be >= 1"),
    ("lissa check_every 0", lambda: solve("lissa", check_every=0, engine="python"), "check_every must be >= 1"),
    ("lissa scale negative", lambda: solve("lissa", scale=-1.0), "LiSSA scale must be finite and > 0"),
    ("lissa scale NaN", lambda: solve("lissa", scale=float("nan")), "LiSSA scale must be finite and > 0"),
    ("lissa unknown engine", lambda: solve("lissa", engine="fast"), "unknown LiSSA engine 'fast'"),
    ("lissa scale far too small", lambda: solve("lissa", scale=1e-3, depth=50), "LiSSA diverged in column"),
    ("lissa tol 0", lambda: solve("lissa", tol=0.0, depth=2), "tol must be finite and > 0"),
    ("unknown option", lambda: solve("cg", tolerance=1e-3), "has no option 'tolerance'; its options are"),
    # ---- Influence
    ("float training indices", lambda: influence().scores(X[:2], torch.tensor([0, 1]), train_idx=[0.5, 1.5]), "integers"),
    ("mask of the wrong length", lambda: influence().scores(X[:2], torch.tensor([0, 1]),
                                                            train_idx=torch.ones(3, dtype=torch.bool)), "boolean mask"),
    ("float indices to param_change", lambda: influence().param_change([0.7, 1.2]), "must be an integer index"),
    ("NaN epsilon", lambda: influence().param_change([0], epsilon=float("nan")), "epsilon must be a finite number"),
    ("no removal groups", lambda: influence().param_change([]), "non-empty sequence"),
    ("an empty removal group", lambda: influence().param_change([[0], []]), "removal group 1 is empty"),
    ("self-influence index out of range", lambda: influence().self_influence([40]), "out of range"),
    ("test inputs of another shape", lambda: influence().scores(torch.randn(2, 4, dtype=torch.float64), torch.tensor([0, 1])),
     "test inputs have per-example shape"),
    ("s_test of the wrong shape", lambda: influence().scores(X[:2], torch.tensor([0, 1]),
                                                             s_test=torch.zeros(4, 2, dtype=torch.float64)), "vectors must have shape"),
    ("unknown curvature", lambda: influence(curvature="fisher"), "unknown curvature 'fisher'"),
    ("negative damping", lambda: influence(damping=-1.0), "damping"),
    ("a measurement returning one number for the batch", lambda: __import__(
        "pbrf_fast.scale.measurement", fromlist=["x"]).measurement_gradients(
        mlp_problem(), lambda y, t: y.sum(), X[:2], T[:2]), "one value per example"),
    ("a string for indices", lambda: influence().param_change("abc"), "non-empty sequence"),
    ("test targets out of range", lambda: influence().scores(X[:2], torch.tensor([0, 9])), "class targets must lie in [0, 3)"),
]


@pytest.mark.parametrize("what,call,message", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input_raises_a_named_error(what, call, message):
    with pytest.raises((PBRFError, TypeError)) as caught:
        call()
    error = caught.value
    if not isinstance(error, PBRFError):  # only Python's own "unexpected keyword argument" may be raw
        assert "unexpected keyword" in str(error), f"{what}: raw {type(error).__name__}: {error}"
    assert message in str(error), f"{what}: {type(error).__name__}: {error}"


def test_empty_index_sets_agree_with_the_kernel_path():
    inf = influence()
    assert inf.scores(X[:2], torch.tensor([0, 1]), train_idx=[]).shape == (0, 2)
    assert inf.self_influence([]).shape == (0,)
    kernel = influence(solver="kernel")
    assert kernel.scores(X[:2], torch.tensor([0, 1]), train_idx=[]).shape == (0, 2)


def test_boolean_mask_selects_its_examples():
    inf = influence()
    mask = torch.zeros(12, dtype=torch.bool)
    mask[[2, 5, 7]] = True
    S = inf.s_test(X[:2], torch.tensor([0, 1]))
    torch.testing.assert_close(inf.scores_from_s_test(S, mask), inf.scores_from_s_test(S, [2, 5, 7]))
    torch.testing.assert_close(inf.param_change(mask), inf.param_change([2, 5, 7]))


CLI_CASES = [
    ("scores --test-points -3", ["scores", "--dataset", "synthetic", "--model", "mlp", "--test-points", "-3"], "usage", "--test-points"),
    ("scores --tol 0", ["scores", "--dataset", "synthetic", "--tol", "0"], "usage", "--tol"),
    ("scores --memory-gb -1", ["scores", "--dataset", "synthetic", "--memory-gb", "-1"], "usage", "--memory-gb"),
    ("scores --solver newton", ["scores", "--dataset", "synthetic", "--solver", "newton"], "usage", "--solver"),
    ("decompose --removed 0", ["decompose", "--dataset", "cancer", "--removed", "0"], "usage", "--removed"),
    ("decompose --test-points -3", ["decompose", "--dataset", "cancer", "--test-points", "-3"], "usage", "--test-points"),
    ("decompose --chunk 0", ["decompose", "--dataset", "cancer", "--chunk", "0"], "usage", "--chunk"),
    ("decompose --damping -1", ["decompose", "--dataset", "cancer", "--damping", "-1"], "usage", "--damping"),
    ("decompose --dataset nope", ["decompose", "--dataset", "nope"], "usage", "--dataset"),
    ("mislabel --corrupt -0.1", ["mislabel", "--corrupt", "-0.1"], "usage", "--corrupt"),
    ("sweep --parameter colour", ["sweep", "--parameter", "colour", "--values", "1"], "usage", "--parameter"),
    ("backends --columns 0", ["backends", "--explain", "--columns", "0"], "usage", "--columns"),
    ("decompose --model mlp on cancer", ["decompose", "--dataset", "cancer", "--model", "mlp"], "error", "use logreg"),
    ("mislabel on a regression set", ["mislabel", "--dataset", "cancer", "--corrupt", "0.1"], "error", "classification"),
    ("decompose --out names a file", ["decompose", "--dataset", "cancer", "--removed", "1", "--out", "{file}"], "error",
     "is an existing file"),
    ("scores --out names a file", ["scores", "--dataset", "synthetic", "--model", "mlp", "--train-points", "20",
                                   "--test-points", "1", "--train-epochs", "0", "--no-progress", "--out", "{file}"],
     "error", "is an existing file"),
]


@pytest.mark.parametrize("what,argv,kind,message", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_exits_2_and_names_it(what, argv, kind, message, tmp_path, capsys):
    file = tmp_path / "a_file"
    file.write_text("not a folder")
    argv = [a.replace("{file}", str(file)) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    if kind == "usage":
        with pytest.raises(SystemExit) as caught:
            cli.main(argv)
        assert caught.value.code == 2
    else:
        assert cli.main(argv) == 2
    assert message in capsys.readouterr().err, what
