"""Bring your own model, data and checkpoints to the scale path.

A small CNN defined in a file outside pbrf_fast, trained here, saved as a checkpoint
with its data; `pbrf-fast scores` on them equals Influence(solver="direct"). Through
the Python API: a Dataset instead of tensors, two checkpoints (= the mean of the two
single-checkpoint runs), and the margin measurement (= the explicit formula)."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

import pbrf_fast
from pbrf_fast.scale import ScoreArguments, ScorePipeline, ScoreTask, load_scores, margin
from pbrf_fast.scale.loading import build_user_model
from pbrf_fast.scale.safetensors_io import load_safetensors

NET = textwrap.dedent("""
    import torch
    from torch import nn

    def make_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, stride=2),
                             nn.Tanh(), nn.Flatten(), nn.Linear(2 * 2 * 2, 3)).double()
""")
DAMPING, WEIGHT_DECAY = 1e-2, 1e-3


def data(seed=0, n_train=40, n_test=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_test, 1, 6, 6, dtype=torch.float64, generator=g)
    y = (x.mean((1, 2, 3)) * 8).round().clamp(-1, 1).long() + 1
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def train(model, x, y, steps, seed):
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def exact_scores(model, state, x_tr, y_tr, x_te, y_te, measurement=None):
    """Dense float64 reference: grad f_test^T (G + (wd + damping) I)^{-1} grad L_i / N."""
    model.load_state_dict(state)
    problem = pbrf_fast.Problem(model, "cross_entropy", x_tr, y_tr, weight_decay=WEIGHT_DECAY)
    influence = pbrf_fast.Influence(problem, damping=DAMPING, solver="direct")
    if measurement is None:
        return influence.scores(x_te, y_te).numpy()
    theta = problem.theta

    def f(th, xi, ti):
        return measurement(problem.forward(th, xi[None]), ti[None]).sum()

    grads = torch.stack([torch.func.grad(f)(theta, x_te[j], y_te[j]) for j in range(len(x_te))], 1)
    return influence.scores_from_s_test(influence._solve(grads)).numpy()


def test_scores_command_on_a_users_own_cnn_equals_direct_influence(tmp_path):
    (tmp_path / "my_net.py").write_text(NET)
    model = build_user_model(f"{tmp_path / 'my_net.py'}:make_model")
    x_tr, y_tr, x_te, y_te = data()
    state = train(model, x_tr, y_tr, steps=30, seed=0)
    torch.save(state, tmp_path / "model.pt")
    torch.save({"x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te}, tmp_path / "data.pt")
    out = tmp_path / "run"
    command = [sys.executable, "-m", "pbrf_fast", "scores", "--model", f"{tmp_path / 'my_net.py'}:make_model",
               "--checkpoint", str(tmp_path / "model.pt"), "--data", str(tmp_path / "data.pt"),
               "--loss", "cross_entropy", "--measurement", "loss", "--solver", "cg", "--cg-iters", "500",
               "--tol", "1e-12", "--damping", str(DAMPING), "--weight-decay", str(WEIGHT_DECAY),
               "--curvature-samples", "0", "--rank", "8", "--query-chunk", "2", "--no-progress", "--self-influence",
               "--out", str(out)]
    env = dict(**__import__("os").environ)
    env["PYTHONPATH"] = str(Path(pbrf_fast.__file__).resolve().parents[1])
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count('"stage_seconds"') == 1  # the summary, printed once
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]  # a finished resume also exits 0

    expected = exact_scores(build_user_model(f"{tmp_path / 'my_net.py'}:make_model"), state, x_tr, y_tr, x_te, y_te)
    results = load_scores(out)
    rel = np.abs(np.asarray(results.scores) - expected).max() / np.abs(expected).max()
    assert rel < 1e-4, rel
    assert results.arguments["measurement"] == "loss" and results.self_influence.shape == (40,)
    assert results.topk["0"]["proponents"][0][0] == int(np.argmax(expected[:, 0]))
    np.testing.assert_array_equal(load_safetensors(out / "scores.safetensors")["scores"], np.asarray(results.scores))
    shown = subprocess.run([sys.executable, "-m", "pbrf_fast", "show", str(out), "--test-points", "2", "-k", "3"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert shown.returncode == 0, shown.stderr[-3000:]
    for name in ("self_influence.png", "proponents.png"):
        assert (out / name).stat().st_size > 1000 and name in shown.stdout


class PairDataset(Dataset):
    """A map-style dataset that hands out one (input, target) pair at a time."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def run_api(out, model, train_data, test_data, checkpoints, measurement="loss"):
    task = ScoreTask(model, "cross_entropy", train_data, test_data, measurement, checkpoints)
    arguments = ScoreArguments(damping=DAMPING, weight_decay=WEIGHT_DECAY, solver="direct", rank=8,
                               batch_size=16, query_chunk=3, self_influence=True)
    ScorePipeline(task, arguments, out, progress=False).run()
    return load_scores(out)


def test_dataset_and_two_checkpoints_give_the_mean_of_single_runs(tmp_path):
    exec(NET, namespace := {})
    model = namespace["make_model"]()
    x_tr, y_tr, x_te, y_te = data(seed=1)
    first = train(model, x_tr, y_tr, steps=10, seed=1)
    second = train(model, x_tr, y_tr, steps=25, seed=2)
    singles = [run_api(tmp_path / f"single{k}", model, PairDataset(x_tr, y_tr), (x_te, y_te), [state])
               for k, state in enumerate((first, second))]
    both = run_api(tmp_path / "both", model, DataLoader(PairDataset(x_tr, y_tr), batch_size=7),
                   PairDataset(x_te, y_te), [first, second])
    mean = (np.asarray(singles[0].scores, np.float64) + np.asarray(singles[1].scores, np.float64)) / 2
    np.testing.assert_allclose(np.asarray(both.scores), mean, rtol=1e-5, atol=1e-7 * np.abs(mean).max())
    np.testing.assert_allclose(both.self_influence, (singles[0].self_influence + singles[1].self_influence) / 2,
                               rtol=1e-6)
    for k, state in enumerate((first, second)):  # each checkpoint scored with its own curvature
        expected = exact_scores(model, state, x_tr, y_tr, x_te, y_te)
        got = np.load(tmp_path / "both" / f"checkpoint_{k}" / "scores.npy")
        assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-4
    assert json.loads((tmp_path / "both" / "summary.json").read_text())["checkpoints"] == 2


def test_margin_measurement_equals_the_explicit_formula(tmp_path):
    exec(NET, namespace := {})
    model = namespace["make_model"]()
    x_tr, y_tr, x_te, y_te = data(seed=2)
    state = train(model, x_tr, y_tr, steps=20, seed=3)
    results = run_api(tmp_path / "margin", model, (x_tr, y_tr), (x_te, y_te), [state], measurement="margin")

    def explicit_margin(outputs, targets):  # y_true - log sum_{c != true} exp(y_c), written out
        rows = []
        for o, t in zip(outputs, targets):
            others = torch.cat([o[:t], o[t + 1:]])
            rows.append(o[t] - torch.log(torch.exp(others).sum()))
        return torch.stack(rows)

    expected = exact_scores(model, state, x_tr, y_tr, x_te, y_te, measurement=explicit_margin)
    rel = np.abs(np.asarray(results.scores) - expected).max() / np.abs(expected).max()
    assert rel < 1e-4, rel
    y = torch.randn(5, 4, dtype=torch.float64)
    t = torch.tensor([0, 3, 1, 2, 0])
    torch.testing.assert_close(margin(y, t), explicit_margin(y, t))


def test_every_scores_flag_in_the_readme_exists():
    import re

    from pbrf_fast.cli import command_parser

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    commands = re.findall(r"pbrf-fast scores ((?:\\\n|[^\n])*)", readme)  # with continued lines
    flags = {f for command in commands for f in re.findall(r"(--[a-z][a-z-]*)", command)}
    scores = command_parser("scores")
    known = {option for action in scores._actions for option in action.option_strings}
    assert flags and flags <= known, flags - known


def test_the_scores_job_on_a_users_model_never_loads_the_paper_harness(tmp_path):
    (tmp_path / "my_net.py").write_text(NET)
    x_tr, y_tr, x_te, y_te = data(n_train=12, n_test=2)
    torch.save({"x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te}, tmp_path / "data.pt")
    code = textwrap.dedent(f"""
        import sys
        from pbrf_fast.scale.scores_job import ScoresConfig, run_scores
        config = ScoresConfig(out={str(tmp_path / 'run')!r}, model={str(tmp_path / 'my_net.py') + ':make_model'!r},
                              data={str(tmp_path / 'data.pt')!r}, solver="direct", rank=4, curvature_samples=0,
                              no_progress=True)
        summary = run_scores(config)
        assert summary["train_log"] is None
        print("harness modules:", [m for m in sys.modules if m.startswith("pbrf_fast.paper") or m == "pbrf_fast.cli"])
    """)
    env = dict(**__import__("os").environ)
    env["PYTHONPATH"] = str(Path(pbrf_fast.__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "harness modules: []" in done.stdout
    assert load_scores(tmp_path / "run").scores.shape == (12, 2)
