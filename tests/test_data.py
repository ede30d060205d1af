"""adcert.data: readers of the standard formats, checksums, the batch iterator (augmentation,
sharding, resume). Real data from ../shared/data (skipped when absent); Fashion-MNIST and
TinyImageNet readers on tiny synthetic files written in their real formats."""
from __future__ import annotations

import gzip
import hashlib
import itertools
import pickle
import struct

import numpy as np
import pytest
import torch

from adcert import data
from adcert.data import download as dl
from adcert.data.batches import Batches, augment_batch, make_loader

MNIST_MD5 = {  # /work/shared/data/PROVENANCE.md (the official md5s)
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}


def write_idx(path, array: np.ndarray, compress: bool = False) -> None:
    """An idx file (unsigned bytes) of ``array``, as the MNIST/Fashion-MNIST files are."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        payload = gzip.compress(payload)
    path.write_bytes(payload)


# --------------------------------------------------------------------------------- real data
def test_mnist_shapes_and_known_facts(shared_data):
    x, y = data.load_dataset("mnist", "train", shared_data)
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (60000,) and y.dtype == torch.int64
    assert int(y[0]) == 5 and int(y.min()) == 0 and int(y.max()) == 9
    assert int(x.max()) == 255 and int(x.min()) == 0
    xt, yt = data.load_dataset("mnist", "test", shared_data)
    assert xt.shape == (10000, 1, 28, 28) and yt.shape == (10000,)
    assert int(yt[0]) == 7  # the first MNIST test digit is a 7
    assert torch.bincount(y, minlength=10).tolist()[1] == 6742  # the "1"s of the training set


def test_mnist_files_match_official_md5(shared_data):
    for name, md5 in MNIST_MD5.items():
        data.verify_checksum(shared_data / "mnist" / name, md5)
    assert dl.RESOURCES["mnist"] == [(n, dl.RESOURCES["mnist"][i][1], m)
                                     for i, (n, m) in enumerate(MNIST_MD5.items())]


def test_cifar10_subset_matches_canonical_labels(shared_data):
    x, y = data.load_dataset("cifar10", "train", shared_data)
    xt, yt = data.load_dataset("cifar10", "test", shared_data)
    assert x.shape == (5085, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert xt.shape == (1017, 3, 32, 32) and yt.shape == (1017,)
    canon = np.load(shared_data / "cifar-10-subset" / "cifar10_canonical_labels.npz")
    train_idx = np.concatenate([np.arange(1017) + 10000 * b for b in range(5)])
    np.testing.assert_array_equal(y.numpy(), canon["train_labels"][train_idx])
    np.testing.assert_array_equal(yt.numpy(), canon["test_labels"][:1017])
    # the row-major [3072] rows become [3, 32, 32] planes: channel 0 is the red plane
    with open(shared_data / "cifar-10-subset" / "cifar-10-batches-py" / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"]
    np.testing.assert_array_equal(xt[3, 1].numpy(), raw[3, 1024:2048].reshape(32, 32))


def test_make_loader_on_cifar_subset(shared_data):
    train = make_loader("cifar10", "train", batch_size=100, data_dir=shared_data, subset=300)
    test = make_loader("cifar10", "test", batch_size=100, data_dir=shared_data, subset=250)
    assert train.augment == (2, 32) and train.shuffle and train.drop_last
    assert test.augment is None and not test.shuffle and not test.drop_last
    assert len(train) == 3 and len(test) == 3
    xb, yb = next(iter(train))
    assert xb.shape == (100, 3, 32, 32) and xb.dtype == torch.float32
    assert 0.0 <= float(xb.min()) and float(xb.max()) <= 1.0
    sizes = [len(yb) for _, yb in test]
    assert sizes == [100, 100, 50]


# ------------------------------------------------------------------------------ digits, info
def test_digits_loads_anywhere_with_fixed_split():
    from adcert.demo import load_digits_split

    x, y = data.load_dataset("digits", "train")
    xt, yt = data.load_dataset("digits", "test")
    assert x.shape[1:] == (1, 8, 8) and len(x) + len(xt) == 1797 and len(xt) == 359
    assert x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
    assert set(y.tolist()) == set(range(10)) and yt.dtype == torch.int64
    dx, dy, dxt, dyt = load_digits_split()   # the demo and the trainer see the same split
    assert torch.equal(dx, x) and torch.equal(dy, y) and torch.equal(dxt, xt)


def test_digits_without_scikit_learn_names_the_package(monkeypatch):
    import sys

    from adcert._deps import MissingDependency

    for name in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")]:
        monkeypatch.setitem(sys.modules, name, None)  # None makes the import fail
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(MissingDependency, match=r"^dataset 'digits' needs scikit-learn, which is "
                                                r"not installed: pip install scikit-learn$"):
        data.load_dataset("digits", "test")
    assert issubclass(MissingDependency, ImportError)


def test_dataset_info_and_errors():
    assert set(data.DATASETS) == {"mnist", "fashion-mnist", "cifar10", "tinyimagenet", "digits"}
    for name, info in data.DATASETS.items():
        assert len(info.mean) == len(info.std) == info.shape[0], name
        assert all(0 < s < 1 for s in info.std) and info.eps and info.num_classes >= 10
    assert data.DATASETS["cifar10"].eps == (2 / 255, 8 / 255)
    assert data.DATASETS["tinyimagenet"].augment == (4, 64)
    with pytest.raises(KeyError, match="unknown dataset 'svhn'.*mnist"):
        data.load_dataset("svhn")
    with pytest.raises(ValueError, match="split: expected 'train' or 'test'"):
        data.load_dataset("digits", "val")


def test_default_data_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ADCERT_DATA", str(tmp_path))
    assert data.default_data_dir() == tmp_path
    with pytest.raises(data.DatasetNotFound, match=str(tmp_path)):
        data.load_dataset("mnist")


# ------------------------------------------------------------------------- missing / corrupt
@pytest.mark.parametrize("name, expected", [
    ("mnist", ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"]),
    ("cifar10", ["data_batch_1", "data_batch_5", "cifar-10-batches-py"]),
    ("tinyimagenet", ["wnids.txt", "train/<wnid>/images/*.JPEG"]),
])
def test_missing_dataset_names_expected_files(tmp_path, name, expected):
    with pytest.raises(data.DatasetNotFound) as err:
        data.load_dataset(name, "train", tmp_path)
    for piece in expected + [str(tmp_path), "download=True"]:
        assert piece in str(err.value), (piece, str(err.value))


def test_download_failure_is_a_clear_error(tmp_path, monkeypatch):
    # an unreachable mirror (nothing listens on port 9 of localhost): no socket traceback
    monkeypatch.setitem(dl.RESOURCES, "cifar10",
                        [("cifar-10-python.tar.gz", ["http://127.0.0.1:9/cifar.tgz"], "0" * 32)])
    with pytest.raises(data.DatasetNotFound) as err:
        data.load_dataset("cifar10", "test", tmp_path, download=True, timeout=2)
    msg = str(err.value)
    assert "test_batch" in msg and "cannot download cifar-10-python.tar.gz" in msg
    assert str(tmp_path / "cifar-10-python.tar.gz") in msg
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_checksum_mismatch_detected(tmp_path):
    f = tmp_path / "blob.bin"
    f.write_bytes(b"adcert" * 100)
    good = hashlib.md5(f.read_bytes()).hexdigest()
    data.verify_checksum(f, good)
    data.verify_checksum(f, hashlib.sha256(f.read_bytes()).hexdigest(), "sha256")
    with pytest.raises(data.ChecksumError, match=f"blob.bin.*expected {'0' * 32}, got {good}"):
        data.verify_checksum(f, "0" * 32)


def test_fetch_verifies_before_saving(tmp_path):
    src = tmp_path / "src.gz"
    src.write_bytes(b"official bytes")
    md5 = hashlib.md5(b"official bytes").hexdigest()
    dest = tmp_path / "out" / "file.gz"
    with pytest.raises(data.ChecksumError, match="wrong md5"):
        dl.fetch([src.as_uri()], dest, "f" * 32)
    assert not dest.exists() and not dest.with_name("file.gz.part").exists()
    assert dl.fetch(["http://127.0.0.1:9/nothing", src.as_uri()], dest, md5) == dest
    assert dest.read_bytes() == b"official bytes"
    dest.write_bytes(b"tampered")          # an existing file is verified, not trusted
    with pytest.raises(data.ChecksumError, match="file.gz"):
        dl.fetch([src.as_uri()], dest, md5)


def test_corrupt_idx_errors_name_the_file(tmp_path):
    d = tmp_path / "mnist"
    d.mkdir()
    write_idx(d / "t10k-labels-idx1-ubyte", np.arange(4) % 10)
    bad = d / "t10k-images-idx3-ubyte"
    bad.write_bytes(b"\x01\x02\x03\x04garbage")
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.*bad magic"):
        data.load_dataset("mnist", "test", tmp_path)
    write_idx(bad, np.zeros((4, 28, 28)))
    bad.write_bytes(bad.read_bytes()[:-10])                # truncated payload
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.*corrupt"):
        data.load_dataset("mnist", "test", tmp_path)
    bad.unlink()
    gz = d / "t10k-images-idx3-ubyte.gz"
    write_idx(gz, np.zeros((4, 28, 28)), compress=True)
    gz.write_bytes(gz.read_bytes()[:40])                   # truncated gzip stream
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz"):
        data.load_dataset("mnist", "test", tmp_path)
    write_idx(gz, np.zeros((5, 28, 28)), compress=True)    # 5 images, 4 labels
    with pytest.raises(ValueError, match="inconsistent idx files"):
        data.load_dataset("mnist", "test", tmp_path)


def test_corrupt_and_partial_cifar_pickles(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 256, (7, 3072), dtype=np.uint8)
    with open(d / "test_batch", "wb") as f:                # partial batch, bytes keys
        pickle.dump({b"data": rows, b"labels": [1, 2, 3, 4, 5, 6, 9]}, f)
    x, y = data.load_dataset("cifar10", "test", tmp_path)
    assert x.shape == (7, 3, 32, 32) and y.tolist() == [1, 2, 3, 4, 5, 6, 9]
    assert torch.equal(x[2, 2].flatten(), torch.from_numpy(rows[2, 2048:]))
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": rows, b"labels": [1, 2]}, f)
    with pytest.raises(ValueError, match="test_batch.*7 labels|test_batch.*expected data"):
        data.load_dataset("cifar10", "test", tmp_path)
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": rows, b"labels": [10] * 7}, f)
    with pytest.raises(ValueError, match=r"labels outside \[0, 10\)"):
        data.load_dataset("cifar10", "test", tmp_path)
    (d / "test_batch").write_bytes(pickle.dumps({b"data": rows})[:50])
    with pytest.raises(ValueError, match="test_batch: cannot unpickle"):
        data.load_dataset("cifar10", "test", tmp_path)


# ------------------------------------------------------------------- synthetic real formats
@pytest.mark.parametrize("compress", [False, True])
def test_fashion_mnist_reader(tmp_path, compress):
    d = tmp_path / "fashion-mnist"
    d.mkdir()
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    labels = np.array([9, 0, 3, 3, 1, 7], dtype=np.uint8)
    suffix = ".gz" if compress else ""
    write_idx(d / f"train-images-idx3-ubyte{suffix}", imgs, compress)
    write_idx(d / f"train-labels-idx1-ubyte{suffix}", labels, compress)
    x, y = data.load_dataset("fashion-mnist", "train", tmp_path)
    assert x.shape == (6, 1, 28, 28) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert torch.equal(x[:, 0], torch.from_numpy(imgs)) and y.tolist() == labels.tolist()


def _write_tinyimagenet(root, Image):
    wnids = ["n02", "n01"]                                 # not sorted on purpose
    colors = {"n01": (200, 10, 10), "n02": (10, 10, 200)}
    (root / "wnids.txt").parent.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for w in wnids:
        img_dir = root / "train" / w / "images"
        img_dir.mkdir(parents=True)
        (root / "train" / w / f"{w}_boxes.txt").write_text("")
        for k in range(2):
            Image.new("RGB", (64, 64), colors[w]).save(img_dir / f"{w}_{k}.JPEG", quality=95)
    (root / "val" / "images").mkdir(parents=True)
    Image.new("L", (64, 64), 128).save(root / "val" / "images" / "val_1.JPEG")  # grayscale
    Image.new("RGB", (64, 64), colors["n01"]).save(root / "val" / "images" / "val_0.JPEG")
    (root / "val" / "val_annotations.txt").write_text(
        "val_1.JPEG\tn02\t0\t0\t63\t63\nval_0.JPEG\tn01\t1\t2\t30\t40\n")


def test_tinyimagenet_reader(tmp_path):
    Image = pytest.importorskip("PIL.Image", reason="Pillow is needed to write JPEG files")
    root = tmp_path / "tiny-imagenet-200"
    _write_tinyimagenet(root, Image)
    x, y = data.load_dataset("tinyimagenet", "train", tmp_path)
    assert x.shape == (4, 3, 64, 64) and x.dtype == torch.uint8
    assert y.tolist() == [0, 0, 1, 1]                      # sorted wnids: n01 -> 0, n02 -> 1
    red = x[0].float().mean(dim=(1, 2))
    assert torch.allclose(red, torch.tensor([200.0, 10.0, 10.0]), atol=4)
    xt, yt = data.load_dataset("tinyimagenet", "test", tmp_path)
    assert xt.shape == (2, 3, 64, 64) and yt.tolist() == [0, 1]   # val_0 (n01), val_1 (n02)
    assert (xt[1].float() - 128).abs().max() <= 2          # grayscale replicated to RGB
    (root / "val" / "images" / "val_0.JPEG").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(ValueError, match="val_0.JPEG: cannot decode"):
        data.load_dataset("tinyimagenet", "test", tmp_path)
    Image.new("RGB", (32, 32)).save(root / "val" / "images" / "val_0.JPEG")
    with pytest.raises(ValueError, match="val_0.JPEG: expected a 64x64 image"):
        data.load_dataset("tinyimagenet", "test", tmp_path)
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99\n")
    with pytest.raises(ValueError, match="val_annotations.txt:1"):
        data.load_dataset("tinyimagenet", "test", tmp_path)


# ----------------------------------------------------------------------------- augmentation
def _all_crops(img, pad, crop):
    """Every (top, left, flip) -> view of ``img`` [C, H, W], by hand: zero padding + slicing."""
    c, h, w = img.shape
    padded = torch.zeros(c, h + 2 * pad, w + 2 * pad, dtype=img.dtype)
    padded[:, pad:pad + h, pad:pad + w] = img
    out = {}
    for top, left in itertools.product(range(h + 2 * pad - crop + 1), repeat=2):
        view = padded[:, top:top + crop, left:left + crop]
        out[(top, left, False)] = view
        out[(top, left, True)] = view[:, :, torch.arange(crop - 1, -1, -1)]
    return out


def test_augment_is_pad_crop_flip_and_deterministic():
    x = torch.rand(64, 3, 8, 8) * 0.9 + 0.05               # no zeros: padding is recognisable
    a = augment_batch(x, 2, 8, torch.Generator().manual_seed(3))
    b = augment_batch(x, 2, 8, torch.Generator().manual_seed(3))
    c = augment_batch(x, 2, 8, torch.Generator().manual_seed(4))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    seen = []
    for i in range(len(x)):
        matches = [k for k, v in _all_crops(x[i], 2, 8).items() if torch.equal(v, a[i])]
        assert len(matches) == 1, f"image {i} is not exactly one pad+crop(+flip) of its input"
        seen.append(matches[0])
    flips = sum(k[2] for k in seen)
    assert 16 <= flips <= 48                              # ~half flipped
    assert {k[0] for k in seen} == set(range(5)) and {k[1] for k in seen} == set(range(5))


def test_augment_crop_smaller_than_input():
    x = torch.rand(5, 1, 6, 6)
    out = augment_batch(x, 0, 4, torch.Generator().manual_seed(0))
    assert out.shape == (5, 1, 4, 4)
    for i in range(5):
        assert any(torch.equal(v, out[i]) for v in _all_crops(x[i], 0, 4).values())


# ----------------------------------------------------------------------- batches: order etc.
def _toy(n=50):
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    return x, torch.arange(n) % 10


def test_batches_convert_and_cover_epoch():
    x, y = _toy(50)
    b = Batches(x, y, batch_size=16, seed=0)
    got = list(b.epoch(0))
    assert [len(yb) for _, yb in got] == [16, 16, 16, 2] and len(b) == 4
    xb = torch.cat([g[0] for g in got])
    assert xb.dtype == torch.float32 and float(xb.max()) <= 1
    ids = torch.round(xb[:, 0, 0, 0] * 255).long()
    assert sorted(ids.tolist()) == list(range(50)) and ids.tolist() != list(range(50))
    assert torch.equal(torch.cat([g[1] for g in got]), ids % 10)   # labels follow images
    assert [len(yb) for _, yb in Batches(x, y, 16, drop_last=True).epoch(0)] == [16, 16, 16]
    assert not torch.equal(b.indices(0), b.indices(1))             # a new order per epoch
    assert torch.equal(Batches(x, y, 16, shuffle=False).indices(3), torch.arange(50))


@pytest.mark.parametrize("n, world", [(50, 3), (48, 4), (7, 2)])
def test_sharding_covers_every_sample_once(n, world):
    x, y = _toy(n)
    shards = [Batches(x, y, batch_size=4, seed=5, rank=r, world_size=world) for r in range(world)]
    for epoch in (0, 1):
        per_rank = [s.indices(epoch) for s in shards]
        assert len({len(p) for p in per_rank}) == 1          # same length on every rank
        allidx = torch.cat(per_rank)
        assert len(set(allidx.tolist())) == len(allidx) == n - n % world  # disjoint, all but rem
        seen = torch.cat([yb for s in shards for _, yb in s.epoch(epoch)])
        assert len(seen) == len(allidx)
    with pytest.raises(ValueError, match="rank"):
        Batches(x, y, 4, rank=world, world_size=world)


def test_resume_reproduces_batches():
    x, y = _toy(40)
    ref = Batches(x, y, batch_size=6, seed=7, augment=(1, 4))
    full = [xb for _, (xb, _) in zip(range(12), itertools.chain(ref, ref))]   # 2 epochs of 7

    a = Batches(x, y, batch_size=6, seed=7, augment=(1, 4))
    first = [xb for _, (xb, _) in zip(range(9), itertools.chain(a, a))]    # stop mid-epoch 1
    state = a.state_dict()
    assert state["epoch"] == 1 and state["batch"] == 2
    b = Batches(x, y, batch_size=6, seed=7, augment=(1, 4))
    b.load_state_dict(state)
    rest = [xb for xb, _ in b]
    assert len(rest) == 5
    for got, want in zip(first + rest[:3], full):
        assert torch.equal(got, want)
    assert b.state_dict()["epoch"] == 2 and b.state_dict()["batch"] == 0
    with pytest.raises(ValueError, match="state\\['batch_size'\\].*6"):
        Batches(x, y, batch_size=5, seed=7).load_state_dict(state)
    with pytest.raises(ValueError, match="state\\['epoch'\\]"):
        b.load_state_dict({"batch": 0})


def test_subset_first_and_seeded():
    x, y = _toy(30)
    xs, ys = data.subset(x, y, 5)
    assert torch.equal(ys, y[:5]) and torch.equal(xs, x[:5])
    xr, yr = data.subset(x, y, 5, seed=1)
    ids = torch.round(xr[:, 0, 0, 0].float()).long()
    assert len(set(ids.tolist())) == 5 and ids.tolist() == sorted(ids.tolist())
    assert ids.tolist() != list(range(5))
    assert torch.equal(data.subset(x, y, 5, seed=1)[1], yr)
    assert data.subset(x, y, None)[0] is x and len(data.subset(x, y, 100)[1]) == 30
    with pytest.raises(ValueError, match="n: expected a positive int"):
        data.subset(x, y, 0)
