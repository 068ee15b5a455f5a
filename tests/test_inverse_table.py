"""The one solver table (pbrf_fast.INVERSES) and the one curvature table
(pbrf_fast.curvatures.CURVATURES) are the only places their names are defined: every row is
correct against a dense float64 solve, every option is typed and documented, and the command
line, evaluate, the score pipeline and the README's table are read from or checked against
them. A new row without tests, docs or CLI fails here."""
import ast
import dataclasses
import re
from pathlib import Path

import pytest
import torch

import pbrf_fast
from pbrf_fast.curvatures import CURVATURES
from pbrf_fast.errors import InputError
from pbrf_fast.inverses import AUTO, INVERSES, InverseOptions, make_options
from pbrf_fast.inverses.flags import flag_names

from factories import dense_gnh, dense_hessian, make_problem, rel_err

PACKAGE = Path(pbrf_fast.__file__).resolve().parent
README = Path(__file__).resolve().parents[1] / "README.md"  # the checkout's, also when pbrf_fast is installed


# ---------------------------------------------------------------- the rows
def _operator_for(name, problem, damping):
    """The operator each inverse applies to: its own curvature for an own inverse, else the GNH."""
    owners = [c for c in CURVATURES.values() if c.own_inverse == name]
    kind = owners[0].name if owners else "gnh"
    op = pbrf_fast.make_curvature(problem, kind, damping, **({"pseudo_gradients": "exact"} if owners else {}))
    return op, (op.dense() if owners else dense_gnh(problem, damping))


@pytest.mark.parametrize("name", list(INVERSES))
def test_every_inverse_meets_its_promise_against_a_dense_float64_solve(name):
    problem = make_problem("cross_entropy", weight_decay=0.01, n=11, hidden=(4,), outputs=3)
    op, dense = _operator_for(name, problem, 0.1)
    B = torch.randn(problem.dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = torch.linalg.solve(dense, B)
    options = {"lissa": {"depth": 3000, "batch_size": problem.n, "scale": float(torch.linalg.eigvalsh(dense).max())},
               "lowrank": {"rank": problem.dim, "iterations": problem.dim},
               "cg": {"tol": 1e-12}, "pcg": {"tol": 1e-12, "preconditioner_rank": 5}}.get(name, {})
    result = pbrf_fast.solve(op, B, name, **options)
    assert isinstance(result, pbrf_fast.SolveResult) and result.solution.shape == B.shape
    if name == "identity":  # no curvature: s_test is the gradient itself
        assert torch.equal(result.solution, B)
    else:  # exact rows to their tolerance; the approximations made exact by their options
        assert rel_err(result.solution, exact) < 1e-6, name


@pytest.mark.parametrize("name", list(INVERSES))
def test_every_inverse_has_typed_documented_options(name):
    entry = INVERSES[name]
    assert entry.name == name and entry.use_when and callable(entry.run)
    assert dataclasses.is_dataclass(entry.options) and issubclass(entry.options, InverseOptions)
    for field in dataclasses.fields(entry.options):
        assert field.metadata.get("help"), f"{name}.{field.name} has no help text"
        assert field.default is not dataclasses.MISSING, f"{name}.{field.name} has no default"
    assert isinstance(make_options(name, {}), entry.options)
    with pytest.raises(InputError, match="has no option 'no_such_option'"):
        make_options(name, {"no_such_option": 1})


@pytest.mark.parametrize("name", list(CURVATURES))
def test_every_curvature_follows_the_protocol(name):
    problem = make_problem("mse", weight_decay=0.01, n=9, hidden=(4,), outputs=2)
    kind = CURVATURES[name]
    op = pbrf_fast.make_curvature(problem, name, 0.1)
    assert isinstance(op, pbrf_fast.CurvatureOperator) and op.kind == name
    V = torch.randn(problem.dim, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    if kind.exact:
        reference = dense_gnh(problem, 0.1) if name == "gnh" else dense_hessian(problem, 0.1)
        assert rel_err(op.matvec(V), reference @ V) < 1e-10
    assert isinstance(op.coverage, dict) and isinstance(op.state_dict(), dict)
    if kind.own_inverse:
        assert kind.own_inverse in INVERSES and callable(op.inverse_matvec)
        assert rel_err(op.matvec(op.inverse_matvec(V)), V) < 1e-8
    with pytest.raises(InputError, match="not options of curvature"):
        pbrf_fast.make_curvature(problem, name, 0.1, no_such_option=1)


# ------------------------------------------------------- readers of the tables
def test_the_readme_solver_table_lists_exactly_the_inverses():
    text = README.read_text()
    table = text[text.index("| method | use it when | notes |"):].split("\n\n")[0]
    rows = re.findall(r"^\| `(\w+)` \|", table, flags=re.M)
    assert rows == list(INVERSES) or sorted(rows) == sorted(INVERSES), \
        f"README's solver table lists {rows}; the table pbrf_fast.INVERSES has {list(INVERSES)}"


def test_the_command_line_reads_its_solver_choices_and_flags_from_the_table():
    from pbrf_fast.cli import command_parser

    scores = command_parser("scores")
    solver = next(a for a in scores._actions if a.dest == "solver")
    assert list(solver.choices) == [*INVERSES, AUTO]
    flags = {s for a in scores._actions for s in a.option_strings}
    for name, entry in INVERSES.items():
        for field in dataclasses.fields(entry.options):
            if field.metadata.get("cli"):
                assert set(flag_names(field)) <= flags, f"{name}.{field.name} has no flag"
    curvature = next(a for a in scores._actions if a.dest == "curvature")
    assert set(curvature.choices) == {n for n, c in CURVATURES.items() if c.at_scale}


def test_evaluate_and_the_pipeline_read_the_tables():
    from pbrf_fast.paper.config import EVALUATE_SOLVERS
    from pbrf_fast.scale.pipeline import SCORE_CURVATURES, SCORE_SOLVERS

    own = {c.own_inverse for c in CURVATURES.values()}
    assert set(EVALUATE_SOLVERS) == ({n for n in INVERSES if n not in own}
                                     | {n for n, c in CURVATURES.items() if c.own_inverse})
    assert SCORE_SOLVERS == (*INVERSES, AUTO)
    assert set(SCORE_CURVATURES) == {n for n, c in CURVATURES.items() if c.at_scale}


def _name_literals(names: set[str], allowed: set[str]):
    """Tuple / list / set literals in the package made of two or more of ``names``, outside
    the modules in ``allowed``: a second list of the table's names."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                values = [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
                if len(values) >= 2 and len(values) == len(node.elts) and set(values) <= names:
                    found.append(f"{relative}:{node.lineno} {values}")
    return found


def test_no_second_list_of_solver_or_curvature_names():
    solvers = set(INVERSES) | {AUTO}
    assert _name_literals(solvers, {"inverses/__init__.py"}) == []
    # curvatures/kronecker.py: the one operator class that implements both kfac and ekfac checks its kind
    assert _name_literals(set(CURVATURES), {"curvatures/__init__.py", "curvatures/kronecker.py"}) == []
