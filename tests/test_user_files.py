"""The user's own files checked at the door (issue 32, item 3): checkpoints matched to the
model before any work (all of them), unreadable checkpoints and data files named, numpy
arrays in data.pt read, a .npy told how to save, the user's factory errors wrapped with the
function named, and --data refused for a built-in model. Every CLI case: one line, exit 2.
Loaders (item 1): a sampler's subset scored as that subset alone, other samplers refused by
name, and an example changed between a run and its rerun or resume refused by name. Disks
(item 2): too little space, a read-only folder, a full tmpfs (root only). Messages (item 4):
the split, the example and the user's own shapes."""
import contextlib
import gc
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from torch.utils.data import (BatchSampler, DataLoader, IterableDataset, RandomSampler, SequentialSampler,
                              SubsetRandomSampler, TensorDataset, WeightedRandomSampler)
from torch.utils.data.distributed import DistributedSampler

from pbrf_fast.cli import main
from pbrf_fast.errors import DataChangedError, InputError
from pbrf_fast.scale import ScoreArguments, ScorePipeline, ScoreTask, load_scores
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


# ---------------------------------------------------------------- loaders, samplers (issue 32, item 1)

def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()


def _points(n_train=40, n_test=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_test, 3, dtype=torch.float64, generator=g)
    y = torch.randint(3, (n_train + n_test,), generator=g)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def _run(out, train, test, **arguments):
    task = ScoreTask(_net(), "cross_entropy", train, test)
    arguments = dict(damping=1e-2, solver="direct", rank=4, batch_size=6, curvature_samples=15, self_influence=True) | arguments
    ScorePipeline(task, ScoreArguments(**arguments), out, progress=False).run()
    return load_scores(out)


@pytest.mark.parametrize("selected", [list(range(20)), [38, 3, 17, 0, 25, 11, 30, 7, 19, 22, 5, 14, 33, 9, 27, 1, 36,
                                                        12, 24, 31]])
def test_a_sampler_subset_is_scored_as_the_subset_alone(tmp_path, selected):
    """20 of 40 examples through SubsetRandomSampler score as a run on those 20 alone: rows,
    curvature sample and 1/N over the subset, rows named by dataset index."""
    x, y, xt, yt = _points()
    loader = DataLoader(TensorDataset(x, y), sampler=SubsetRandomSampler(selected), batch_size=7)
    got = _run(tmp_path / "sampler", loader, (xt, yt))
    chosen = sorted(selected)
    alone = _run(tmp_path / "alone", (x[chosen], y[chosen]), (xt, yt))
    assert got.scores.shape == (20, 5)
    np.testing.assert_allclose(np.asarray(got.scores), np.asarray(alone.scores), rtol=1e-6, atol=0)
    np.testing.assert_allclose(got.self_influence, alone.self_influence, rtol=1e-10, atol=0)
    np.testing.assert_array_equal(got.train_indices, chosen)
    assert alone.train_indices is None
    for j in map(str, range(5)):  # proponents named by dataset index, the same examples as the lone run
        assert [[chosen[i], s] for i, s in alone.topk[j]["proponents"]] == got.topk[j]["proponents"]
    tests = _run(tmp_path / "tests", loader, DataLoader(TensorDataset(xt, yt), sampler=SubsetRandomSampler([4, 1])))
    np.testing.assert_array_equal(np.asarray(tests.scores), np.asarray(got.scores)[:, [1, 4]])
    assert sorted(tests.topk) == ["1", "4"] and list(tests.test_indices) == [1, 4]


class _Stream(IterableDataset):
    def __iter__(self):
        yield from zip(torch.randn(4, 3), range(4))


class _EveryOther(torch.utils.data.Sampler):
    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter(range(0, self.n, 2))

    def __len__(self):
        return self.n // 2


def test_samplers_without_one_fixed_subset_are_refused_by_name():
    x, y, xt, yt = _points()
    ds = TensorDataset(x, y)
    refused = {
        "RandomSampler draws 10 of 40 examples, a different set": DataLoader(ds, sampler=RandomSampler(ds, num_samples=10)),
        "RandomSampler draws 40 of 40 examples with replacement": DataLoader(ds, sampler=RandomSampler(ds, True)),
        "sampler WeightedRandomSampler is not supported": DataLoader(ds, sampler=WeightedRandomSampler([1.0] * 40, 20)),
        "sampler _EveryOther is not supported": DataLoader(ds, sampler=_EveryOther(40)),
        "sampler DistributedSampler is not supported: the pipeline shards the data across ranks itself":
            DataLoader(ds, sampler=DistributedSampler(ds, num_replicas=2, rank=0)),
        "batch_sampler list is not supported": DataLoader(ds, batch_sampler=[[0, 1], [2, 3]]),
        "SubsetRandomSampler indices repeat an example": DataLoader(ds, sampler=SubsetRandomSampler([1, 2, 2])),
        r"SubsetRandomSampler indices must lie in \[0, 40\); got range \[0, 40\]":
            DataLoader(ds, sampler=SubsetRandomSampler([0, 40])),
    }
    for message, loader in refused.items():
        with pytest.raises(InputError, match=f"train: .*{message}"):
            ScoreTask(_net(), "cross_entropy", loader, (xt, yt))
    for whole in (DataLoader(ds, shuffle=True, batch_size=5), DataLoader(ds, batch_size=None),
                  DataLoader(ds, batch_sampler=BatchSampler(SequentialSampler(ds), 4, False))):
        task = ScoreTask(_net(), "cross_entropy", whole, (xt, yt))
        assert len(task.train) == 40 and task.train.indices is None
    # an IterableDataset has no sampler to honour: it is streamed in the order it yields (issue 31;
    # tests/test_scale_batches.py scores streams against map-style data)
    streamed = ScoreTask(_net(), "cross_entropy", DataLoader(_Stream(), batch_size=2), (xt, yt))
    assert len(streamed.train) == 4 and streamed.train.indices is None


# ---------------------------------------------------------------- changed data on resume (issue 32, item 1)

class _Crash(Exception):
    pass


@pytest.mark.parametrize("as_dataset", [False, True])
def test_one_changed_example_in_the_middle_is_refused_on_rerun_and_resume(tmp_path, as_dataset):
    """200 examples (more than a first/last-64 probe covers), the curvature sample 15 of them:
    example 100 changed is refused by name both on a rerun of the finished folder and on a
    resume after a crash; --overwrite starts fresh; unchanged data reruns to the same numbers."""
    x, y, xt, yt = _points(n_train=200)
    wrap = (lambda a, b: TensorDataset(a, b)) if as_dataset else (lambda a, b: (a, b))
    first = _run(tmp_path / "run", wrap(x, y), (xt, yt), query_chunk=2)
    scores = np.array(first.scores)
    again = _run(tmp_path / "run", wrap(x, y), (xt, yt), query_chunk=2)  # unchanged: resumes, same numbers
    np.testing.assert_array_equal(np.asarray(again.scores), scores)

    changed = x.clone()
    changed[100, 1] += 1e-6
    with pytest.raises(DataChangedError, match=r"training example 100 \(dataset index 100\) is not the one the "
                                               r"results in .*run were computed from .*--overwrite"):
        _run(tmp_path / "run", wrap(changed, y), (xt, yt), query_chunk=2)

    def crash(c):
        if c == 0:
            raise _Crash

    task = ScoreTask(_net(), "cross_entropy", wrap(x, y), (xt, yt))
    arguments = ScoreArguments(damping=1e-2, solver="direct", rank=4, batch_size=6, curvature_samples=15, query_chunk=2)
    with pytest.raises(_Crash):
        ScorePipeline(task, arguments, tmp_path / "crashed", progress=False, on_chunk_done=crash).run()
    task = ScoreTask(_net(), "cross_entropy", wrap(changed, y), (xt, yt))
    with pytest.raises(DataChangedError, match="training example 100 "):
        ScorePipeline(task, arguments, tmp_path / "crashed", progress=False).run()

    ScorePipeline(task, arguments, tmp_path / "run", progress=False, overwrite=True).run()  # starts afresh
    elsewhere = _run(tmp_path / "new", wrap(changed, y), (xt, yt), query_chunk=2)
    np.testing.assert_array_equal(np.asarray(load_scores(tmp_path / "run").scores), np.asarray(elsewhere.scores))
    assert not np.array_equal(np.asarray(elsewhere.scores), scores)


def test_a_changed_test_point_is_refused_by_name(tmp_path):
    x, y, xt, yt = _points()
    _run(tmp_path / "run", (x, y), TensorDataset(xt, yt))
    yt = yt.clone()
    yt[3] = (yt[3] + 1) % 3
    with pytest.raises(DataChangedError, match=r"test example 3 \(dataset index 3\)"):
        _run(tmp_path / "run", (x, y), TensorDataset(xt, yt))


def test_the_cli_refuses_a_changed_data_file_in_one_line(files, capsys):
    tmp, data = files
    assert _scores(tmp) == 0
    data["x_train"][6, 0] += 1.0
    torch.save(data, tmp / "data.pt")
    capsys.readouterr()
    assert _scores(tmp) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "training example 6 (dataset index 6) is not the one" in err
    assert _scores(tmp, "--overwrite") == 0


# ---------------------------------------------------------------- full and read-only disks (issue 32, item 2)

@pytest.fixture
def big_files(files):
    """The model file with 2,000 training points: scores.npy for 50 test points is 400,128 bytes."""
    tmp, _ = files
    g = torch.Generator().manual_seed(1)
    torch.save({"x_train": torch.randn(2000, 3, generator=g), "y_train": torch.randint(2, (2000,), generator=g),
                "x_test": torch.randn(50, 3, generator=g), "y_test": torch.randint(2, (50,), generator=g)},
               tmp / "big.pt")
    return tmp


def _big(tmp, out):
    return _scores(tmp, "--test-points", "50", data="big.pt", out=out)


def _leftovers(folder):
    """Temporary files left behind, and final-named .npy files shorter than their header says."""
    bad = [p for p in folder.rglob(".*.tmp")]
    for path in folder.rglob("*.npy"):
        try:
            np.load(path, mmap_mode="r")
        except ValueError:  # a file shorter than its shape
            bad.append(path)
    return bad


def _one_line(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_too_little_free_space_is_refused_before_the_memmap_and_a_resume_finishes(big_files, monkeypatch, capsys):
    tmp = big_files
    assert _big(tmp, "reference") == 0
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=100_000))
    assert _big(tmp, "run") == 2
    err = _one_line(capsys)
    assert f"no space left in {tmp / 'run'} for scores.npy: it needs 400128 bytes (390.8 KiB), 100000 bytes " \
           "(97.7 KiB) free; free space there (or choose another --out) and rerun the same command" in err
    assert not (tmp / "run" / "scores.npy").exists() and not _leftovers(tmp / "run")
    monkeypatch.undo()
    assert _big(tmp, "run") == 0  # space freed: the same command resumes and finishes
    np.testing.assert_array_equal(np.load(tmp / "run" / "scores.npy"), np.load(tmp / "reference" / "scores.npy"))


def test_a_memmap_is_created_at_full_size_with_its_blocks_allocated(tmp_path):
    from pbrf_fast.atomic_io import open_memmap

    mm = open_memmap(tmp_path / "sub" / "m.npy", (500, 400), np.float32, create=True)
    assert mm.shape == (500, 400) and not mm.any()
    assert (tmp_path / "sub" / "m.npy").stat().st_blocks * 512 >= 500 * 400 * 4  # not a sparse file
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["m.npy"]


def test_a_read_only_out_folder_is_one_line_naming_it(big_files, capsys):
    tmp = big_files
    folder = tmp / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("chmod does not stop this user writing (root): the read-only tmpfs test covers it")
        assert _big(tmp, "locked") == 2
        err = _one_line(capsys)
        assert f"cannot write arguments.json in {folder}: Permission denied" in err and "--out" in err
    finally:
        folder.chmod(0o755)


@contextlib.contextmanager
def _tmpfs(path, options):
    """A small tmpfs at ``path`` (root only; skipped where mount fails), always unmounted."""
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)]).returncode != 0:  # a memmap still open: drop it, then detach
            gc.collect()
            subprocess.run(["umount", "-l", str(path)], check=True)


def test_a_read_only_disk_is_one_line_naming_the_folder(big_files, capsys):
    tmp = big_files
    with _tmpfs(tmp / "ro", "ro,size=1m") as disk:
        assert _big(tmp, disk / "run") == 2
        err = _one_line(capsys)
        assert f"cannot make the folder run in {disk}: Read-only file system (a read-only folder" in err
        assert _big(tmp, disk) == 2  # the mount point itself exists: the first file is refused
        assert f"cannot write arguments.json in {disk}: Read-only file system" in _one_line(capsys)


def test_a_full_tmpfs_stops_with_one_line_leaves_no_partial_file_and_resumes_to_the_same_numbers(
        big_files, monkeypatch, capsys):
    tmp = big_files
    assert _big(tmp, "reference") == 0
    reference = np.load(tmp / "reference" / "scores.npy")
    with _tmpfs(tmp / "disk", "size=2m") as disk:
        filler = disk / "filler"
        filler.write_bytes(b"\0" * (shutil.disk_usage(disk).free - 150_000))  # 150 kB left: less than scores.npy
        capsys.readouterr()
        assert _big(tmp, disk / "run") == 2  # refused by the free-space check
        assert "for scores.npy: it needs 400128 bytes" in _one_line(capsys)
        real = shutil.disk_usage  # a disk that claims space it does not have: the allocation itself fails
        monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=10 ** 12))
        assert _big(tmp, disk / "run") == 2
        assert f"no space left in {disk / 'run'} for scores.npy" in _one_line(capsys)
        assert not (disk / "run" / "scores.npy").exists() and not _leftovers(disk / "run")
        monkeypatch.undo()
        filler.unlink()
        assert _big(tmp, disk / "run") == 0
        scores_file = disk / "run" / "scores.npy"
        np.testing.assert_array_equal(np.load(scores_file), reference)
        assert scores_file.stat().st_blocks * 512 >= reference.nbytes  # allocated, not a sparse file


# ---------------------------------------------------------------- messages name the split and the user's shapes (item 4)
def _task(train, test):
    return ScorePipeline(ScoreTask(_net(), "cross_entropy", train, test),
                         ScoreArguments(damping=1e-2, solver="direct", curvature_samples=5, batch_size=8,
                                        self_influence=False), "unused", progress=False)


def test_nan_in_a_training_row_outside_the_curvature_sample_names_the_training_split_and_row(tmp_path):
    x, y, xt, yt = _points()
    sample = set(torch.randperm(40, generator=torch.Generator().manual_seed(0))[:5].tolist())
    row = next(i for i in range(39, 0, -1) if i not in sample)  # a row only the score pass reads
    x = x.clone()
    x[row, 1] = float("nan")
    with pytest.raises(InputError, match=rf"^training inputs contain NaN or Inf: example {row} "
                                         rf"\(dataset index {row}\)$"):
        _task((x, y), (xt, yt))
    # a Dataset is read as it is scored: the same message from the score pass, by dataset index
    loader = DataLoader(TensorDataset(x, y), sampler=SubsetRandomSampler(range(10, 40)))
    task = ScoreTask(_net(), "cross_entropy", loader, (xt, yt))
    arguments = ScoreArguments(damping=1e-2, solver="direct", curvature_samples=3, self_influence=False)
    with pytest.raises(InputError, match=rf"^training inputs contain NaN or Inf: example {row - 10} "
                                         rf"\(dataset index {row}\)$"):
        ScorePipeline(task, arguments, tmp_path / "run", progress=False).run()


def test_target_errors_quote_the_users_array_not_a_one_row_probe():
    x, y, xt, yt = _points()
    soft = torch.full((40, 2), 0.5, dtype=torch.float64)
    with pytest.raises(InputError, match=r"^training targets: cross_entropy soft targets must have shape \(n, 3\); "
                                         r"got \(40, 2\)$"):
        _task((x, soft), (xt, yt))
    yt = yt.clone()
    yt[3] = 7  # not the first row: a one-row probe would not see it
    with pytest.raises(InputError, match=r"^test targets: cross_entropy class targets must lie in \[0, 3\); "
                                         r"got range \[0, 7\]$"):
        _task((x, y), (xt, yt))


def test_test_inputs_of_another_feature_count_name_the_split_and_both_shapes(files, capsys):
    x, y, xt, yt = _points()
    with pytest.raises(InputError, match=r"^test inputs have per-example shape \(4,\) but training inputs \(3,\): "
                                         r"test inputs of shape \(5, 4\), targets \(5,\); training inputs of shape "
                                         r"\(40, 3\), targets \(40,\)$"):
        _task((x, y), (torch.randn(5, 4, dtype=torch.float64), yt))
    tmp, data = files
    data["x_test"] = torch.randn(3, 5)
    torch.save(data, tmp / "wide.pt")
    assert _scores(tmp, data="wide.pt") == 2
    err = _one_line(capsys)
    assert "test inputs have per-example shape (5,) but training inputs (3,): test inputs of shape (3, 5)" in err


def test_influence_names_the_first_non_finite_test_row():
    import pbrf_fast

    x, y, xt, yt = _points()
    xt = xt.clone()
    xt[2, 0] = float("inf")
    influence = pbrf_fast.Influence(pbrf_fast.Problem(_net(), "cross_entropy", x, y), damping=0.1, solver="direct")
    with pytest.raises(InputError, match=r"^test inputs contain NaN or Inf \(row 2 of shape \(5, 3\)\)$"):
        influence.scores(xt, yt)
