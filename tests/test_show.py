"""`pbrf-fast show`: the proponent figure is labelled (index, class, value) and says what it
draws; relative influence re-ranks by score / self-influence; a run whose images cannot be
drawn says why instead of drawing only the histogram silently."""
import json

import numpy as np
import pytest
import torch

from pbrf_fast.cli import main
from pbrf_fast.errors import InputError
from pbrf_fast.paper.show import _ranked, show_scores
from pbrf_fast.scale import compute_scores, load_scores

MODEL_FILE = '''
import torch
from torch import nn


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3))
'''


@pytest.fixture
def image_run(tmp_path):
    (tmp_path / "net.py").write_text(MODEL_FILE)
    g = torch.Generator().manual_seed(0)
    data = {"x_train": torch.randn(10, 1, 4, 4, generator=g), "y_train": torch.randint(3, (10,), generator=g),
            "x_test": torch.randn(3, 1, 4, 4, generator=g), "y_test": torch.randint(3, (3,), generator=g)}
    torch.save(data, tmp_path / "data.pt")
    assert main(["scores", "--model", f"{tmp_path / 'net.py'}:make_model", "--data", str(tmp_path / "data.pt"),
                 "--solver", "direct", "--rank", "4", "--top-k", "3", "--no-progress", "--self-influence",
                 "--out", str(tmp_path / "run")]) == 0
    return tmp_path / "run"


def test_relative_influence_ranks_by_score_over_self_influence(image_run):
    results = load_scores(image_run)
    proponents, opponents = _ranked(results, 1, 3, relative=True)
    relative = np.asarray(results.scores[:, 1], dtype=np.float64) / results.self_influence
    assert [i for i, _ in proponents] == list(np.argsort(relative)[::-1][:3])
    assert [i for i, _ in opponents] == list(np.argsort(relative)[:3])
    assert proponents[0][1] == pytest.approx(relative.max())
    absolute, _ = _ranked(results, 1, 3, relative=False)
    assert absolute == results.topk["1"]["proponents"][:3]  # the stored top-k, as the run wrote it


def test_show_draws_both_figures_and_says_what_it_drew(image_run, capsys):
    assert main(["show", str(image_run), "--test-points", "2", "-k", "2", "--relative"]) == 0
    printed = capsys.readouterr().out
    for name in ("self_influence.png", "proponents.png"):
        assert (image_run / name).stat().st_size > 1000 and name in printed


def test_a_python_api_run_says_why_no_proponent_figure(tmp_path):
    g = torch.Generator().manual_seed(1)
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(8, 3, generator=g), torch.randint(2, (8,), generator=g)
    compute_scores(model, "cross_entropy", x, y, x[:2], y[:2], tmp_path / "api", solver="direct", rank=2,
                   progress=False, self_influence=True)
    with pytest.warns(UserWarning, match="proponents.png not drawn: the run recorded no data file"):
        written = show_scores(tmp_path / "api")
    assert [p.name for p in written] == ["self_influence.png"]


def test_relative_needs_self_influence(image_run, tmp_path):
    arguments = json.loads((image_run / "arguments.json").read_text())
    assert arguments["self_influence"]  # the fixture's run has it; a run without is refused by name
    compute_scores(torch.nn.Linear(3, 2), "cross_entropy", torch.randn(6, 3), torch.randint(2, (6,)),
                   torch.randn(2, 3), torch.randint(2, (2,)), tmp_path / "plain", solver="direct",
                   self_influence=False, progress=False)
    with pytest.raises(InputError, match="--relative divides by self-influence"):
        show_scores(tmp_path / "plain", relative=True)
