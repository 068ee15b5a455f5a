"""CIFAR-10 loader: official pickles, an image-folder tree, a .tar.gz of one
(all made tiny here), the cache, clear errors; the real offline copy if present."""
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch
import pytest

from pbrf_fast.paper.data.cifar import load_cifar10, load_cifar10_arrays

PIL = pytest.importorskip("PIL.Image")
CLASSES = ["airplane", "automobile", "bird"]


def fake_images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def write_pickles(root: Path):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        x = fake_images(4, k)
        batch = {b"data": x.transpose(0, 3, 1, 2).reshape(4, -1), b"labels": [k % 10] * 4}
        (folder / name).write_bytes(pickle.dumps(batch))
    return folder


def png_bytes(img):
    buf = io.BytesIO()
    PIL.fromarray(img).save(buf, format="PNG")  # lossless, so the round trip is exact
    return buf.getvalue()


def write_tree(root: Path):
    images = {}
    for split, n in (("train", 3), ("test", 2)):
        for c, cls in enumerate(CLASSES):
            (root / split / cls).mkdir(parents=True)
            for j, img in enumerate(fake_images(n, 10 * c + n)):
                (root / split / cls / f"{j:04d}.png").write_bytes(png_bytes(img))
                images[(split, cls, j)] = img
    return images


def test_pickles(tmp_path):
    write_pickles(tmp_path)
    x, y = load_cifar10_arrays(tmp_path, tmp_path / "cache", "train")
    assert x.shape == (20, 32, 32, 3) and x.dtype == np.uint8
    assert list(y[::4]) == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(x[:4], fake_images(4, 0))


def test_folder_tree_and_tarball_agree(tmp_path):
    images = write_tree(tmp_path / "tree")
    x, y = load_cifar10_arrays(tmp_path / "tree", tmp_path / "cache", "train")
    assert x.shape == (9, 32, 32, 3) and list(y) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    np.testing.assert_array_equal(x[3], images[("train", "automobile", 0)])
    (tmp_path / "tar").mkdir()
    with tarfile.open(tmp_path / "tar" / "cifar10-png.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "tree" / "train", arcname="train")
        tar.add(tmp_path / "tree" / "test", arcname="test")
    cache = tmp_path / "cache2"
    xt, yt = load_cifar10_arrays(tmp_path / "tar", cache, "test")
    x2, y2 = load_cifar10_arrays(tmp_path / "tar", cache, "train")
    np.testing.assert_array_equal(x2, x)
    assert xt.shape == (6, 32, 32, 3) and len(list(cache.glob("*.npy"))) == 4  # cached, read once
    x_tr, y_tr, x_te, _ = load_cifar10(tmp_path / "tar", cache)
    assert tuple(x_tr.shape) == (9, 3, 32, 32)
    assert abs(float(x_tr.mean((0, 2, 3)).abs().max())) < 1e-5  # normalised per channel


def test_missing_data_names_what_and_where(tmp_path, monkeypatch):
    monkeypatch.delenv("PBRF_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="PBRF_DATA"):
        load_cifar10_arrays(None)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_cifar10_arrays(tmp_path)
    folder = write_pickles(tmp_path)
    os.unlink(folder / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_cifar10_arrays(tmp_path, split="test")


REAL = Path(os.environ.get("PBRF_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.mark.slow
@pytest.mark.skipif(not (REAL / "cifar10-jpeg.tar.gz").exists(), reason="offline CIFAR-10 copy not present")
def test_real_cifar10_copy():
    # The user cache ($PBRF_CACHE or ~/.cache/pbrf_fast): decoded once per machine (~15 s).
    x, y = load_cifar10_arrays(REAL, None, "test")
    assert x.shape == (10000, 32, 32, 3) and np.bincount(y).tolist() == [1000] * 10


def test_subsets_of_a_class_sorted_copy_are_seeded_random_not_the_first_n(tmp_path):
    write_tree(tmp_path / "tree")  # stored class by class: the first 3 training images are all airplanes
    _, y_tr, _, y_te = load_cifar10(tmp_path / "tree", tmp_path / "cache", n_train=4, n_test=3, seed=1)
    assert len(y_tr) == 4 and len(y_te) == 3
    assert len(set(y_tr.tolist())) > 1 and len(set(y_te.tolist())) > 1
    again = load_cifar10(tmp_path / "tree", tmp_path / "cache", n_train=4, n_test=3, seed=1)
    assert torch.equal(again[1], y_tr) and torch.equal(again[3], y_te)  # the seed decides
    other = load_cifar10(tmp_path / "tree", tmp_path / "cache", n_train=4, n_test=3, seed=2)
    assert not (torch.equal(other[1], y_tr) and torch.equal(other[3], y_te))
