"""The paper's numbers, read from its text: Tables 2 and 4-8, and Figure 5's swept values
with the trend the paper reports for each. Nothing here runs; :mod:`.rows` pairs each
value with the job that measures ours."""
from __future__ import annotations

__all__ = ["GAP_NAMES", "GAP_LABELS", "TABLE2", "TABLE4", "TABLE5", "TABLE6", "TABLE7", "TABLE8", "TWO_STAGE",
           "FIGURE5"]

GAP_NAMES = ("warm_start_gap", "proximity_gap", "non_convergence_gap", "linearization_error", "solver_error")
GAP_LABELS = ("warm-start", "proximity", "non-convergence", "linearization", "solver")

def _gaps(*pairs):
    return {name: pair for name, pair in zip(GAP_NAMES, pairs)}


def _corr(*values, responses=("cold_start", "warm_start", "pbrf")):
    return {r: {"pearson": values[2 * k], "spearman": values[2 * k + 1]} for k, r in enumerate(responses)}


Z = (0.0, 0.0)
TABLE5 = {  # Table 5: mean ± std over 20 removed points
    "cancer": _gaps(Z, Z, Z, Z, Z),
    "diabetes": _gaps(Z, Z, Z, Z, Z),
    "concrete": _gaps((0.079, 0.008), (0.002, 0.0), (0.082, 0.001), Z, (0.001, 0.002)),
    "energy": _gaps((0.016, 0.001), (0.001, 0.0), (0.016, 0.001), Z, Z),
    "mlp-mnist": _gaps((0.208, 0.732), (0.006, 0.024), (0.211, 0.745), Z, (0.001, 0.004)),
    "mlp-fashion_mnist": _gaps((2.968, 0.545), (0.385, 0.028), (0.408, 0.033), (0.0, 0.001), (0.007, 0.010)),
    "autoencoder-mnist": _gaps((20.743, 0.522), (14.330, 0.184), (11.409, 0.430), Z, (0.307, 0.088)),
    "lenet-mnist": _gaps((7.434, 1.068), (5.393, 0.547), (3.748, 0.324), (0.0, 0.001), (0.001, 0.001)),
    "alexnet-mnist": _gaps((13.403, 1.289), (0.001, 0.0), (0.118, 0.0), Z, (0.013, 0.002)),
    "vgg13-mnist": _gaps((7.389, 0.744), (4.872, 1.052), (8.601, 0.478), Z, (0.001, 0.001)),
    "resnet20-mnist": _gaps((4.433, 0.059), (4.061, 0.157), (4.940, 0.155), (0.001, 0.0), (0.002, 0.001)),
    "lenet-cifar10": _gaps((10.668, 0.162), (6.520, 0.442), (5.032, 0.799), (0.001, 0.0), Z),
    "alexnet-cifar10": _gaps((7.530, 0.233), (5.956, 0.102), (2.864, 0.367), Z, Z),
    "vgg13-cifar10": _gaps((8.410, 1.926), (6.279, 0.708), (6.031, 0.660), Z, (0.073, 0.161)),
    "resnet20-cifar10": _gaps((5.827, 0.152), (4.435, 0.669), (3.280, 0.429), Z, (0.003, 0.001)),
    "transformer-ptb": _gaps((57.926, 5.055), (30.756, 0.673), (61.675, 1.042), (5.002, 1.556), (3.316, 2.630)),
}
TABLE4 = {  # Table 4: the same with the Hessian instead of the GNH (only the solver error changes)
    "concrete": _gaps((0.079, 0.008), (0.002, 0.0), (0.082, 0.001), Z, (0.017, 0.026)),
    "energy": _gaps((0.016, 0.001), (0.001, 0.0), (0.016, 0.001), Z, Z),
    "mlp-mnist": _gaps((0.208, 0.732), (0.006, 0.024), (0.211, 0.745), Z, (0.003, 0.006)),
    "mlp-fashion_mnist": _gaps((2.968, 0.545), (0.385, 0.028), (0.408, 0.033), (0.0, 0.001), (0.009, 0.014)),
}
TABLE2 = {  # Table 2 (MNIST): Pearson, Spearman of IF against cold start, warm start, PBRF
    "mlp-mnist": _corr(-0.55, 0.01, 0.22, 0.35, 0.98, 0.99),
    "lenet-mnist": _corr(-0.19, 0.12, 0.32, 0.25, 0.93, 0.52),
    "alexnet-mnist": _corr(-0.16, -0.08, 0.51, 0.58, 0.99, 0.99),
    "vgg13-mnist": _corr(0.45, -0.07, -0.28, -0.51, 0.98, 0.77),
    "resnet20-mnist": _corr(0.09, -0.06, 0.02, 0.09, 0.81, 0.76),
}
TABLE6 = {  # GNH
    "concrete": _corr(-0.11, 0.12, 0.09, 0.11, 0.93, 0.94),
    "energy": _corr(0.03, 0.04, 0.09, 0.13, 0.97, 0.91),
    "mlp-mnist": _corr(-0.10, 0.01, 0.22, 0.35, 0.98, 0.91),
    "mlp-fashion_mnist": _corr(0.16, 0.00, 0.06, 0.07, 0.90, 0.92),
}
TABLE7 = {  # Hessian
    "concrete": _corr(-0.14, 0.32, 0.24, 0.37, 0.85, 0.71),
    "energy": _corr(-0.01, -0.24, 0.44, 0.57, 0.95, 0.83),
    "mlp-mnist": _corr(-0.16, -0.12, 0.21, -0.14, 0.98, 0.81),
    "mlp-fashion_mnist": _corr(-0.19, 0.01, 0.05, 0.24, 0.91, 0.88),
}
TWO_STAGE = ("two_stage", "warm_start", "pbrf")
TABLE8 = {  # two-stage LOO; its warm-start and PBRF columns equal Table 7's, so the Hessian runs
    "concrete": _corr(0.52, 0.61, 0.24, 0.37, 0.85, 0.71, responses=TWO_STAGE),
    "energy": _corr(0.92, 0.75, 0.44, 0.57, 0.95, 0.83, responses=TWO_STAGE),
    "mlp-mnist": _corr(0.73, 0.53, 0.21, -0.14, 0.98, 0.81, responses=TWO_STAGE),
    "mlp-fashion_mnist": _corr(0.69, 0.52, 0.05, 0.24, 0.91, 0.88, responses=TWO_STAGE),
}

# Figure 5 (Appendix E.4): the paper's values of each swept parameter, and the trend it reports.
FIGURE5 = {
    "width": ((16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192), (16, 64, 256),
              "linearization error falls as the width grows", (("linearization_error", "down"),)),
    "depth": ((1, 3, 5, 7, 9, 11, 13, 15), (1, 3), "no strong relationship between the terms and the depth", ()),
    "epochs": ((100, 500, 1000, 3000, 5000, 7000, 9000), (10, 60), "non-convergence gap falls with longer training",
               (("non_convergence_gap", "down"),)),
    "weight_decay": ((0.5, 0.1, 0.05, 0.01, 0.005, 0.001, 0.0005, 0.0001, 0.00005, 0.00001), (1e-4, 1e-2),
                     "every term falls as weight decay grows", (("all", "down"),)),
    "damping": ((0.5, 0.1, 0.05, 0.01, 0.005, 0.001, 0.0005, 0.0001, 0.00005, 0.00001, 0.000005, 0.000001),
                (1e-4, 1e-2), "solver and linearization errors fall, the proximity gap rises with damping",
                (("solver_error", "down"), ("linearization_error", "down"), ("proximity_gap", "up"))),
    "fraction_removed": ((0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), (0.01, 0.1),
                         "linearization error rises sharply, and the warm-start gap rises, as more is removed",
                         (("linearization_error", "up"), ("warm_start_gap", "up"))),
}

