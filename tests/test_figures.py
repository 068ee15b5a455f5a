"""Every figure pbrf_fast writes, drawn on tiny data: the file is written, and no text
runs into other text (tests/figure_checks.py). Each goes through the shared style of
pbrf_fast/paper/plotting.py, whose scatter helper draws y = x and the correlation."""
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from figure_checks import overlapping_text
from pbrf_fast.paper import evaluate_job, plotting, report, show
from pbrf_fast.paper.decomposition import GAPS
from pbrf_fast.paper.reproduce import figures as reproduce_figures

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import track  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def drawn(monkeypatch):
    """Each figure saved through plotting.save, checked for overlapping text first."""
    checked, save = [], plotting.save

    def check_then_save(fig, path):
        checked.append((Path(path).name, overlapping_text(fig)))
        return save(fig, path)

    monkeypatch.setattr(plotting, "save", check_then_save)
    yield checked
    for name, overlaps in checked:
        assert not overlaps, f"{name}: overlapping text {overlaps}"


def _records(n=12, tests=4, scale=5e-3, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        truth = rng.normal(0, scale, tests)
        out.append({"predicted_test_loss_change": (truth + rng.normal(0, scale / 5, tests)).tolist(),
                    "test_loss_change": {"cold_start": (30 * truth + rng.normal(0, 0.05, tests)).tolist(),
                                         "warm_start": (3 * truth).tolist(), "pbrf": truth.tolist(),
                                         "two_stage": (1.1 * truth).tolist()},
                    "gaps": {g: float(10 ** rng.uniform(-9, 0)) for g, _, _ in GAPS}})
    return out


def _written(path):
    assert Path(path).read_bytes()[:8] == PNG
    return path


def test_the_correlation_panels_have_y_equals_x_and_the_tables_pearson(tmp_path, drawn):
    records = _records()
    _written(report.figure_scatter(tmp_path / "correlation.png", records, "MLP / Concrete (seed 0)"))
    corr = report.correlation_table(records)
    # the panel titles carry the same Pearson as table.md
    with plotting.styled() as plt:
        fig, ax = plt.subplots()
        plotting.estimate_vs_truth(ax, [0.0, 1e-4, 2e-4], [0.0, 1.1e-4, 1.9e-4], xlabel="truth", ylabel="estimate",
                                   title="t", correlation=corr["pbrf"]["pearson"], correlation_name="Pearson")
        assert f"Pearson = {corr['pbrf']['pearson']:.2f}" in ax.get_title()
        diagonal = [line for line in ax.lines if line.get_linestyle() == "--"]
        assert diagonal and np.allclose(*diagonal[0].get_data())  # the y = x line
        assert "10^{-4}" in ax.get_xlabel()  # tiny values: the power of ten in the label, not an offset
        plotting.save(fig, tmp_path / "small.png")


@pytest.mark.parametrize("experiments", [1, 2, 16])
def test_decomposition_bars(tmp_path, drawn, experiments):
    gaps = {f"experiment-{i}-{'x' * (i % 7)}": report.gap_table(_records(seed=i)) for i in range(experiments)}
    _written(report.figure_gap_bars(tmp_path / "decomposition.png", gaps, title="Demo (seed 0)"))


def test_legends_of_the_bar_chart_sit_below_the_axes(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plotting, "save", lambda fig, path: figures.append(fig) or path)  # kept open to measure
    report.figure_gap_bars(tmp_path / "d.png", {"a": report.gap_table(_records())})
    fig = figures[0]
    fig.canvas.draw()
    (ax,), (legend,) = fig.axes, fig.legends
    assert legend.get_window_extent().y1 <= ax.get_window_extent().y0  # below the data, not over a bar
    plt.close(fig)


def test_mislabel_and_sweep(tmp_path, drawn):
    fractions = [0, 0.1, 0.2, 0.5]
    _written(report.figure_detection(tmp_path / "mislabel.png", fractions,
                                     {"influence": [0, 0.6, 1, 1], "pbrf": [0, 0.6, 1, 1]}, "MLP / Digits"))
    tables = [report.gap_table(_records(seed=s)) for s in range(3)]
    _written(report.figure_sweep(tmp_path / "sweep.png", "weight_decay", [1e-4, 1e-3, 1e-2], tables, title="t"))


def test_reproduction_figure1(tmp_path, drawn):
    panels = [("LR / Cancer vs LOO", _records(), "cold_start", 0.99),
              ("MLP / Concrete vs PBRF", _records(scale=1e-1), "pbrf", 1.0)]
    _written(reproduce_figures.figure_scatter(tmp_path / "figure1.png", panels, "Figure 1, ours (quick preset)"))


def _lds(value):
    return {"lds_retraining": {"mean": value}, "lds_pbrf": {"mean": 0.9}, "damping": [1e-3], "seconds": 1.0}


def test_evaluate_figures_keep_the_results_layout(tmp_path, drawn):
    # results["methods"][solver][damping label][checkpoint count], as evaluate writes it
    methods = {"cg": {"0.001": {"1": _lds(0.5)}, "0.1": {"1": _lds(0.7)}, "auto": {"1": _lds(0.6)}},
               "identity": {"0.001": {"1": _lds(float("nan"))}, "0.1": {"1": _lds(-0.1)}, "auto": {"1": _lds(0.2)}},
               "pcg": {"skipped": "not asked for"}}
    evaluate_job._figure(tmp_path / "lds.png", "digits / logreg", {"methods": methods})
    evaluate_job._damping_figure(tmp_path / "lds_damping.png", "digits / logreg", {"methods": methods})
    _written(tmp_path / "lds.png")
    _written(tmp_path / "lds_damping.png")


def test_show_figures(tmp_path, drawn):
    rng = np.random.default_rng(0)
    run = tmp_path / "run"
    run.mkdir()
    with plotting.styled() as plt:
        _written(show._histogram(SimpleNamespace(self_influence=rng.lognormal(-9, 1, 200)), run, plt))
    topk = {str(j): {"proponents": [(i, 0.5 - i / 10) for i in range(3)], "opponents": [(9 - i, -i / 10) for i in range(3)]}
            for j in range(2)}
    images = (torch.randn(10, 1, 6, 6), torch.randint(3, (10,)), torch.randn(2, 1, 6, 6))
    with plotting.styled() as plt:
        _written(show._proponents(SimpleNamespace(topk=topk, self_influence=None), images, run, plt, 2, 3, False))


def test_bench_tracking_history(tmp_path, drawn):
    runs = [{"commit": f"{i:07x}ab", "dirty": i == 2, "device": "cpu", "ratios": {"block_cg": 2.0 + i, "lissa": 3.0}}
            for i in range(15)]
    _written(track.plot_history(runs, {"ratios": {"block_cg": 3.0}}, track.THRESHOLD, tmp_path / "ratios.png"))


def test_the_style_is_left_behind_after_a_figure():
    import matplotlib

    before = dict(matplotlib.rcParams)
    with plotting.styled():
        assert matplotlib.rcParams["figure.constrained_layout.use"]
    assert dict(matplotlib.rcParams) == before


def test_the_checker_finds_overlapping_tick_labels():
    with plotting.styled() as plt:
        fig, ax = plt.subplots(figsize=(1.0, 1.0))
        ax.set_xticks(np.linspace(0, 1, 12), [f"{v:.4f}" for v in np.linspace(-0.005, 0.005, 12)])
        assert overlapping_text(fig)
        plt.close(fig)


def test_a_correlation_near_zero_is_written_without_a_sign():
    with plotting.styled() as plt:
        fig, ax = plt.subplots()
        plotting.estimate_vs_truth(ax, [0, 1, 2], [0, 1, 2], xlabel="x", ylabel="y", title="t", correlation=-0.001)
        assert "Pearson r = 0.00;" in ax.get_title()
        plt.close(fig)
