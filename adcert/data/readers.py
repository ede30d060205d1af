"""Readers of the standard on-disk formats (idx, CIFAR python pickles, sklearn digits)."""
from __future__ import annotations

import gzip
import pathlib
import pickle
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

Tensor = torch.Tensor

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def find_maybe_gz(path: pathlib.Path) -> Optional[pathlib.Path]:
    """``path`` if it exists, else ``path.gz`` if that exists, else ``None``."""
    if path.is_file():
        return path
    gz = path.with_name(path.name + ".gz")
    return gz if gz.is_file() else None


def read_idx(path: pathlib.Path) -> Tensor:
    """An idx file (optionally gzipped) as a tensor of its shape and dtype."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"{path}: cannot read the idx file ({err})") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an idx file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated idx header")
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    count = int(np.prod(shape)) if shape else 1
    if len(data) - header != count * dtype.itemsize:
        raise ValueError(f"{path}: idx payload has {len(data) - header} bytes, the header "
                         f"promises {count * dtype.itemsize} (shape {shape}); the file is corrupt")
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=True))


def read_cifar_batches(paths: Sequence[pathlib.Path]) -> Tuple[Tensor, Tensor]:
    """CIFAR-10 python pickles (each ``{'data': uint8 [n, 3072], 'labels': [n]}``, partial batches
    allowed) concatenated: ``x: uint8 [N, 3, 32, 32]``, ``y: int64 [N]``."""
    xs: List[np.ndarray] = []
    ys: List[np.ndarray] = []
    for p in paths:
        try:
            with open(p, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
        except Exception as err:  # pickle raises many types on corrupt input
            raise ValueError(f"{p}: cannot unpickle the CIFAR-10 batch ({type(err).__name__}: "
                             f"{err})") from err
        if not isinstance(batch, dict):
            raise ValueError(f"{p}: expected a dict, got {type(batch).__name__}")
        batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
        if "data" not in batch or "labels" not in batch:
            raise ValueError(f"{p}: missing key 'data' or 'labels' (has {sorted(batch)})")
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch["labels"], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
            raise ValueError(f"{p}: expected data [n, 3072] and n labels, got data "
                             f"{data.shape} and {labels.shape} labels")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels)
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def read_digits(split: str, test_fraction: float = 0.2) -> Tuple[Tensor, Tensor]:
    """scikit-learn's 8x8 digits as floats in [0, 1] ``[N, 1, 8, 8]`` and int64 labels, with a
    fixed train/test split (seed 1234, 20 % test)."""
    from adcert._deps import require

    data = require("sklearn.datasets", "scikit-learn", "dataset 'digits'").load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    n_test = int(round(test_fraction * len(y)))
    idx = perm[:n_test] if split == "test" else perm[n_test:]
    return x[idx], y[idx]


def _open_rgb(path: pathlib.Path) -> np.ndarray:
    from adcert._deps import require

    Image = require("PIL.Image", "Pillow", "dataset 'tinyimagenet' (JPEG decoding)")
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except Exception as err:  # PIL raises many types on corrupt images
        raise ValueError(f"{path}: cannot decode the image ({type(err).__name__}: {err})") from err
    if arr.shape != (64, 64, 3):
        raise ValueError(f"{path}: expected a 64x64 image, got {arr.shape[1]}x{arr.shape[0]}")
    return arr


def read_tinyimagenet(root: pathlib.Path, split: str) -> Tuple[Tensor, Tensor]:
    """TinyImageNet-200 from its folder layout under ``root`` (``wnids.txt``,
    ``train/<wnid>/images/*.JPEG``, ``val/images/*.JPEG`` + ``val/val_annotations.txt``).
    ``split``: ``"train"`` or ``"val"``. Labels index the sorted wnids (the ImageFolder order).
    Returns ``x: uint8 [N, 3, 64, 64]`` and ``y: int64 [N]``, in sorted file order."""
    wnids = sorted(w.strip() for w in (root / "wnids.txt").read_text().split() if w.strip())
    label = {w: i for i, w in enumerate(wnids)}
    items: List[Tuple[pathlib.Path, int]] = []
    if split == "train":
        for w in wnids:
            files = sorted((root / "train" / w / "images").glob("*.JPEG"))
            if not files:
                raise ValueError(f"{root / 'train' / w / 'images'}: no *.JPEG images for class {w}")
            items += [(f, label[w]) for f in files]
    else:
        ann = root / "val" / "val_annotations.txt"
        for lineno, line in enumerate(ann.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < 2 or parts[1] not in label:
                raise ValueError(f"{ann}:{lineno}: expected '<file>\\t<wnid>...' with a wnid "
                                 f"from wnids.txt, got {line!r}")
            items.append((root / "val" / "images" / parts[0], label[parts[1]]))
        items.sort(key=lambda it: it[0].name)
    x = np.empty((len(items), 64, 64, 3), dtype=np.uint8)
    for i, (path, _) in enumerate(items):
        x[i] = _open_rgb(path)
    y = np.array([lab for _, lab in items], dtype=np.int64)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y)
