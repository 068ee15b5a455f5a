"""The user's own files checked at the door (issue 32, item 3): checkpoints matched to the
model before any work (all of them), unreadable checkpoints and data files named, numpy
arrays in data.pt read, a .npy told how to save, the user's factory errors wrapped with the
function named, and --data refused for a built-in model. Every CLI case: one line, exit 2."""
import numpy as np
import pytest
import torch

from pbrf_fast.cli import main
from pbrf_fast.errors import InputError
from pbrf_fast.scale.loading import build_user_model, load_data_file

MODEL_FILE = '''
import torch
from torch import nn


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))


def make_wider():
    return nn.Sequential(nn.Linear(3, 7), nn.Tanh(), nn.Linear(7, 2))


def broken():
    raise RuntimeError("no GPU here")
'''


@pytest.fixture
def files(tmp_path):
    (tmp_path / "net.py").write_text(MODEL_FILE)
    g = torch.Generator().manual_seed(0)
    data = {"x_train": torch.randn(12, 3, generator=g), "y_train": torch.randint(2, (12,), generator=g),
            "x_test": torch.randn(3, 3, generator=g), "y_test": torch.randint(2, (3,), generator=g)}
    torch.save(data, tmp_path / "data.pt")
    namespace = {}
    exec(MODEL_FILE, namespace)
    torch.save(namespace["make_model"]().state_dict(), tmp_path / "good.pt")
    torch.save(namespace["make_wider"]().state_dict(), tmp_path / "other.pt")
    return tmp_path, data


def _scores(tmp, *extra, model="make_model", data="data.pt", out="run"):
    return main(["scores", "--model", f"{tmp / 'net.py'}:{model}", "--data", str(tmp / data), "--loss",
                 "cross_entropy", "--solver", "direct", "--no-progress", "--no-self-influence",
                 "--out", str(tmp / out), *extra])


def test_a_checkpoint_for_another_architecture_is_refused_by_name_before_any_work(files, capsys):
    tmp, _ = files
    assert _scores(tmp, "--checkpoint", str(tmp / "good.pt"), "--checkpoint", str(tmp / "other.pt")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "other.pt does not fit the model" in err
    assert "other shapes ['0.weight (7, 3) (model (5, 3))'" in err
    assert not (tmp / "run" / "scores.npy").exists()  # the first, good checkpoint was not scored first


def test_missing_and_unexpected_keys_are_named(files, capsys):
    tmp, _ = files
    state = torch.load(tmp / "good.pt")
    state["extra.weight"] = torch.zeros(1)
    del state["2.bias"]
    torch.save(state, tmp / "keys.pt")
    assert _scores(tmp, "--checkpoint", str(tmp / "keys.pt")) == 2
    err = capsys.readouterr().err
    assert "missing keys ['2.bias']" in err and "unexpected keys ['extra.weight']" in err


def test_a_truncated_checkpoint_is_named(files, capsys):
    tmp, _ = files
    (tmp / "cut.pt").write_bytes((tmp / "good.pt").read_bytes()[:100])
    assert _scores(tmp, "--checkpoint", str(tmp / "cut.pt")) == 2
    err = capsys.readouterr().err
    assert "checkpoint" in err and "cut.pt cannot be read by torch.load" in err and "Traceback" not in err


def test_a_fitting_checkpoint_runs(files):
    tmp, _ = files
    assert _scores(tmp, "--checkpoint", str(tmp / "good.pt")) == 0
    assert np.load(tmp / "run" / "scores.npy").shape == (12, 3)


def test_numpy_arrays_in_data_pt_are_read(files):
    tmp, data = files
    torch.save({k: v.numpy() for k, v in data.items()}, tmp / "numpy.pt")
    loaded = load_data_file(tmp / "numpy.pt")
    for key, value in data.items():
        assert torch.equal(loaded[key], value), key
    assert _scores(tmp, data="numpy.pt", out="numpy") == 0


def test_a_npy_or_unreadable_data_file_says_how_to_save_it(files):
    tmp, _ = files
    np.save(tmp / "x.npy", np.zeros(3))
    with pytest.raises(InputError, match=r"a \.npy file holds one array; save the four as np\.savez\('data\.npz', "
                                         r"x_train=x_train"):
        load_data_file(tmp / "x.npy")
    (tmp / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(InputError, match=r"junk\.pt cannot be read as a dict of tensors .*; save it as torch\.save"):
        load_data_file(tmp / "junk.pt")


def test_the_users_factory_error_names_the_function_and_keeps_the_cause(files, capsys):
    tmp, _ = files
    with pytest.raises(InputError, match=r"calling broken\(\) raised RuntimeError: no GPU here") as caught:
        build_user_model(f"{tmp / 'net.py'}:broken")
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert _scores(tmp, model="broken") == 2
    err = capsys.readouterr().err
    assert "broken() raised RuntimeError" in err and "Traceback" not in err


def test_data_with_a_built_in_model_is_a_usage_error_not_ignored(files, capsys):
    tmp, _ = files
    assert main(["scores", "--model", "mlp", "--dataset", "synthetic", "--data", str(tmp / "data.pt"),
                 "--out", str(tmp / "builtin")]) == 2
    assert "--data is your own data" in capsys.readouterr().err


def test_float_class_labels_for_cross_entropy_say_integer_labels_expected():
    import pbrf_fast

    model = torch.nn.Linear(3, 4)
    with pytest.raises(InputError, match=r"integer class labels expected \(n,\), got float targets; convert them "
                                         r"with \.long\(\), or give soft targets of shape \(n, 4\)"):
        pbrf_fast.Problem(model, "cross_entropy", torch.randn(5, 3), torch.tensor([0.0, 1.0, 2.0, 3.0, 1.0]))


def test_an_explicit_dense_solve_that_cannot_fit_memory_is_refused_by_size(monkeypatch):
    import pbrf_fast
    from pbrf_fast.inverses import output_space

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    problem = pbrf_fast.Problem(model, "mse", torch.randn(6, 3, dtype=torch.float64),
                                torch.randn(6, 2, dtype=torch.float64))
    B = torch.randn(problem.dim, dtype=torch.float64)
    monkeypatch.setattr(output_space, "_free_bytes", lambda device: 1000)  # a machine with 1000 bytes free
    for method, what in (("kernel", r"N\*C = 12 training outputs' float64 Gram matrices need"),
                         ("direct", rf"d = {problem.dim} parameters' dense float64 matrices need")):
        with pytest.raises(InputError, match=rf"solver '{method}': {what} .* GiB are free; use solver='pcg'"):
            pbrf_fast.solve(pbrf_fast.GaussNewton(problem, 0.1), B, method)


def test_a_data_set_missing_from_its_folder_is_one_line_naming_the_files_and_layout(tmp_path, capsys):
    assert main(["decompose", "--dataset", "mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "missing train-images-idx3-ubyte(.gz)" in err and "{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]" in err
    assert "--data-dir DIR or set $PBRF_DATA" in err
