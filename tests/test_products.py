"""Following one GNH product of a ResNet-20 (a warm GaussNewton.matvec on the layer-wise path)
visits at most four pbrf_fast files, and never goes back to one it left.

The measurement (:func:`files_entered`): sys.setprofile records every Python function *call*
(a frame entered, including a generator resumed and a comprehension run) whose code lies in
pbrf_fast, as the source file it lies in, in order, consecutive repeats merged. A return to the
caller is not an entry: a file counts again only if a function in it is called again after
another file's was. Calls into torch or the compiled extensions are not pbrf_fast files.
Property getters (``problem.theta``, ``op.shift``) are attribute reads, not hops, and are left
out; nothing else is. Measured on 4 images: one data chunk and one tangent chunk (a larger batch
repeats the same chain per chunk). The product is warm: its plan, traced network, forward state
and bound output-Hessian kernel were made by a first product.

Today's path: curvatures/operators.py (checks V, slices the data) -> products/__init__.py (the
kept plan, the kept forward state, the bound output Hessian) -> products/layerwise.py (tangent
pass through per-layer torch functions bound from the layer adapters at parse time, then
backward) -> kernels/output_hessian.py (H_y u, straight to the compiled kernel)."""
import inspect
import sys
from pathlib import Path

import torch

import pbrf_fast
from pbrf_fast.paper.resnet import resnet20

PACKAGE = Path(pbrf_fast.__file__).resolve().parent


def _property_getters() -> set:
    codes = set()
    for name, module in list(sys.modules.items()):
        if not name.startswith("pbrf_fast"):
            continue
        for _, cls in inspect.getmembers(module, inspect.isclass):
            for value in vars(cls).values():
                if isinstance(value, property) and hasattr(value.fget, "__code__"):
                    codes.add(value.fget.__code__)
    return codes


def files_entered(run) -> list[str]:
    """The pbrf_fast source files (relative paths) entered by calls while ``run()`` runs."""
    getters, sequence = _property_getters(), []

    def profile(frame, event, arg):
        if event != "call" or frame.f_code in getters:
            return
        path = Path(frame.f_code.co_filename).resolve()
        if PACKAGE in path.parents:
            name = str(path.relative_to(PACKAGE.parent))
            if not sequence or sequence[-1] != name:
                sequence.append(name)

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return sequence


def resnet20_operator(n=4):
    torch.manual_seed(0)
    model = resnet20(seed=0).eval()
    x = torch.randn(n, 3, 32, 32)
    problem = pbrf_fast.Problem(model, "cross_entropy", x, torch.randint(10, (n,)))
    return pbrf_fast.GaussNewton(problem, 1e-3)


def test_one_resnet20_product_visits_at_most_four_files_without_returning():
    op = resnet20_operator()
    V = torch.randn(op.dim, 2)
    op.matvec(V)  # the first product traces the model and keeps the forward state
    sequence = files_entered(lambda: op.matvec(V))
    print(" -> ".join(sequence))
    assert op.plan_product(op.problem.inputs, V).implementation == "layerwise"
    assert len(sequence) == len(set(sequence)), f"returns to a file it left: {sequence}"
    assert len(sequence) <= 4, sequence
    assert sequence == ["pbrf_fast/curvatures/operators.py", "pbrf_fast/products/__init__.py",
                        "pbrf_fast/products/layerwise.py", "pbrf_fast/kernels/output_hessian.py"], sequence
