"""One set of defaults, and solves that say when they fall short: the `scores` command's
defaults are ScoreArguments' and the options dataclasses' (and --help prints them), a solve
that leaves columns above tolerance warns by name, the default tolerance fits the dtype, and
`last_solve` describes a whole chunked call."""
import dataclasses
import warnings

import pytest
import torch

import pbrf_fast
from pbrf_fast.cli import build_parser, command_parser
from pbrf_fast.inverses import INVERSES, choose_method
from pbrf_fast.inverses.common import default_tol
from pbrf_fast.scale import ScoreArguments
from pbrf_fast.scale.scores_job import ScoresConfig

from factories import make_problem


def _scores_parser():
    return command_parser("scores")


def test_the_scores_command_defaults_are_the_python_defaults():
    args = build_parser().parse_args(["scores", "--out", "x"])
    python = ScoreArguments()
    for name in ("damping", "weight_decay", "solver", "rank", "memory_gb", "query_chunk", "batch_size",
                 "curvature_batch_size", "top_k", "seed", "curvature"):
        assert getattr(args, name) == getattr(python, name), name
    assert args.self_influence == python.self_influence == "auto"
    assert args.curvature_samples == 0 and python.curvature_samples is None  # both: every training point
    # no solver option is set unless given: each solver's dataclass defaults apply, as in Python
    assert not any(key.startswith("solver_option_") for key in vars(args))
    config = ScoresConfig(out="x", model="my_net.py:make_model")
    assert (config.damping, config.weight_decay, config.solver) == (python.damping, python.weight_decay, python.solver)


def test_scores_help_shows_every_default():
    text = _scores_parser().format_help()
    text = text[text.index("options:"):]  # the flags' help, not the usage line
    for flag, default in (("--damping", "auto"), ("--weight-decay", "0.0"), ("--memory-gb", "4.0"),
                          ("--solver", "auto"), ("--rank", "32"), ("--top-k", "10"), ("--depth", "1000"),
                          ("--repeats", "1"), ("--preconditioner", "'nystrom'")):
        start = text.index(f"  {flag} ")
        entry = " ".join(text[start:].split("\n  -")[0].split())  # the flag's help, joined across lines
        assert f"default: {default}" in entry or f"default {default}" in entry, (flag, entry)


def test_a_solve_short_of_its_tolerance_warns_by_name():
    problem = make_problem("cross_entropy", n=30, hidden=(8,), outputs=3)
    op = pbrf_fast.GaussNewton(problem, 1e-4)
    B = torch.randn(problem.dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with pytest.warns(pbrf_fast.NotConvergedWarning, match=r"cg: 3 of 3 columns did not reach tol=1e-06 "
                                                           r"\(columns \[0, 1, 2\]; worst relative residual .* "
                                                           r"max_iter=2\): raise max_iter, use solver='pcg'"):
        pbrf_fast.solve(op, B, "cg", max_iter=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a converged solve is silent
        assert bool(pbrf_fast.solve(op, B, "cg").converged.all())


def test_the_default_tolerance_fits_the_dtype():
    assert default_tol(torch.float64) == 1e-6 and default_tol(torch.float32) == 1e-4
    for dtype in (torch.float64, torch.float32):
        problem = make_problem("mse", n=20, hidden=(6,), outputs=2)
        if dtype == torch.float32:
            problem = pbrf_fast.Problem(problem.model.float(), "mse", problem.inputs.float(), problem.targets.float())
        op = pbrf_fast.GaussNewton(problem, 1e-3)
        B = torch.randn(problem.dim, 4, dtype=dtype, generator=torch.Generator().manual_seed(1))
        result = pbrf_fast.solve(op, B, "cg")
        assert result.info["tol"] == default_tol(dtype) and bool(result.converged.all()), dtype


def test_last_solve_covers_every_chunk_of_self_influence():
    problem = make_problem("cross_entropy", n=23, hidden=(5,), outputs=3)
    influence = pbrf_fast.Influence(problem, 1e-3, solver="cg")
    influence.self_influence(chunk_size=5)
    last = influence.last_solve
    assert last.info["blocks"] == 5 and last.info["columns"] == 23
    assert last.converged.shape == (23,) and last.residual_norms.shape == (23,) and last.iterations.shape == (23,)


def test_auto_falls_back_to_nystrom_pcg_not_plain_cg(monkeypatch):
    import pbrf_fast.inverses as inverses

    problem = make_problem("mse", n=40, hidden=(9,), outputs=2)
    monkeypatch.setattr(inverses, "DIRECT_MAX_DIM", 10)
    monkeypatch.setattr(inverses, "KERNEL_MEMORY_BYTES", 10)
    method, reason = choose_method(pbrf_fast.GaussNewton(problem, 1e-3))
    assert method == "pcg" and "Nystrom" in reason
    assert dataclasses.fields(INVERSES["pcg"].options)  # the row it names exists
