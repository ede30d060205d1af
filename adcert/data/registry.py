"""Dataset descriptions and :func:`load_dataset`."""
from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, Union

import torch

from adcert.data import download as _download
from adcert.data import readers

Tensor = torch.Tensor
PathLike = Union[str, os.PathLike]


class DatasetNotFound(FileNotFoundError):
    """The dataset's files are not where they were looked for (the message names them)."""


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts of a dataset: input shape ``(C, H, W)``, class count, per-channel mean/std of
    the training pixels in [0, 1] (for the model's Normalize layer), the papers' augmentation
    (``(pad, crop)`` for a random crop after zero padding, plus horizontal flip; ``None``: none)
    and the papers' standard L-inf radii ``eps`` (pixel space)."""
    name: str
    shape: Tuple[int, int, int]
    num_classes: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    augment: Optional[Tuple[int, int]]
    loader: Callable[[Optional[pathlib.Path], str], Tuple[Tensor, Tensor]]
    eps: Tuple[float, ...] = ()


def default_data_dir() -> pathlib.Path:
    """``$ADCERT_DATA`` if set, else ``~/.cache/adcert``."""
    env = os.environ.get("ADCERT_DATA")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "adcert"


def _idx_dataset(subdirs, prefix_train: str, prefix_test: str, what: str):
    def load(root: Optional[pathlib.Path], split: str) -> Tuple[Tensor, Tensor]:
        prefix = prefix_train if split == "train" else prefix_test
        names = [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
        candidates = [root / s for s in subdirs] if root is not None else []
        if what == "fashion-mnist":
            candidates.append(pathlib.Path("/usr/share/datasets/fashion-mnist"))
        for d in candidates:
            found = [readers.find_maybe_gz(d / n) for n in names]
            if all(found):
                images = readers.read_idx(found[0])
                labels = readers.read_idx(found[1])
                if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
                    raise ValueError(f"{found[0]}, {found[1]}: inconsistent idx files "
                                     f"(images {tuple(images.shape)}, labels {tuple(labels.shape)})")
                return images.unsqueeze(1).contiguous(), labels.long()
        looked = ", ".join(str(d) for d in candidates) or "(no directory)"
        raise DatasetNotFound(
            f"{what} ({split}): expected {names[0]}[.gz] and {names[1]}[.gz] in one of: {looked}. "
            f"Put the official idx files there, pass data_dir / set ADCERT_DATA, or use "
            f"download=True.")
    return load


def _cifar10(root: Optional[pathlib.Path], split: str) -> Tuple[Tensor, Tensor]:
    names = ([f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"])
    candidates = ([root / "cifar-10-batches-py", root / "cifar-10-subset" / "cifar-10-batches-py",
                   root / "cifar10" / "cifar-10-batches-py"] if root is not None else [])
    for d in candidates:
        if all((d / n).is_file() for n in names):
            return readers.read_cifar_batches([d / n for n in names])
    looked = ", ".join(str(d) for d in candidates) or "(no directory)"
    raise DatasetNotFound(
        f"cifar10 ({split}): expected the python pickles {', '.join(names)} in one of: {looked} "
        f"(the 'CIFAR-10 python version' archive, extracted). Pass data_dir / set ADCERT_DATA, or "
        f"use download=True.")


def _tinyimagenet(root: Optional[pathlib.Path], split: str) -> Tuple[Tensor, Tensor]:
    candidates = ([root / "tiny-imagenet-200", root / "tinyimagenet" / "tiny-imagenet-200",
                   root] if root is not None else [])
    sub = "train" if split == "train" else "val"
    needed = ["wnids.txt", "train/<wnid>/images/*.JPEG" if sub == "train" else
              "val/images/*.JPEG + val/val_annotations.txt"]
    for d in candidates:
        marker = d / "train" if sub == "train" else d / "val" / "val_annotations.txt"
        if (d / "wnids.txt").is_file() and marker.exists():
            return readers.read_tinyimagenet(d, sub)
    looked = ", ".join(str(d) for d in candidates) or "(no directory)"
    raise DatasetNotFound(
        f"tinyimagenet ({split} = {sub}/): expected {' and '.join(needed)} in one of: {looked} "
        f"(the tiny-imagenet-200.zip archive, extracted). Pass data_dir / set ADCERT_DATA, or use "
        f"download=True.")


def _digits(_root: Optional[pathlib.Path], split: str) -> Tuple[Tensor, Tensor]:
    return readers.read_digits(split)


DATASETS: Dict[str, DatasetInfo] = {
    "digits": DatasetInfo("digits", (1, 8, 8), 10, (0.3053,), (0.3762,), None, _digits,
                          (0.1,)),
    "mnist": DatasetInfo("mnist", (1, 28, 28), 10, (0.1307,), (0.3081,), None,
                         _idx_dataset(["mnist", "MNIST/raw", "."], "train", "t10k", "mnist"),
                         (0.1, 0.3)),
    "fashion-mnist": DatasetInfo("fashion-mnist", (1, 28, 28), 10, (0.2860,), (0.3530,), None,
                                 _idx_dataset(["fashion-mnist", "FashionMNIST/raw", "."], "train",
                                              "t10k", "fashion-mnist"), (0.1,)),
    "cifar10": DatasetInfo("cifar10", (3, 32, 32), 10, (0.4914, 0.4822, 0.4465),
                           (0.2023, 0.1994, 0.2010), (2, 32), _cifar10, (2 / 255, 8 / 255)),
    "tinyimagenet": DatasetInfo("tinyimagenet", (3, 64, 64), 200, (0.4802, 0.4481, 0.3975),
                                (0.2302, 0.2265, 0.2262), (4, 64), _tinyimagenet, (1 / 255,)),
}


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name`` (``KeyError`` naming the known ones)."""
    key = str(name).lower()
    if key not in DATASETS:
        raise KeyError(f"dataset: unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[key]


def load_dataset(name: str, split: str = "train", data_dir: Optional[PathLike] = None,
                 download: bool = False, timeout: float = 10.0) -> Tuple[Tensor, Tensor]:
    """The whole split in memory: ``x: uint8 [N, C, H, W]`` (``digits``: float in [0, 1]) and
    ``y: int64 [N]``. ``split``: ``"train"`` or ``"test"`` (TinyImageNet: its ``val`` folder, the
    papers' test set). With ``download``, files not found are fetched into ``data_dir`` from the
    official mirrors and md5-verified (``timeout`` seconds per connection)."""
    info = dataset_info(name)
    if split not in ("train", "test"):
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    root = pathlib.Path(data_dir) if data_dir is not None else default_data_dir()
    try:
        x, y = info.loader(root, split)
    except DatasetNotFound as err:
        if not download or info.name not in _download.RESOURCES:
            raise
        try:
            _download.download_dataset(info.name, root, timeout=timeout)
        except _download.DownloadError as derr:
            raise DatasetNotFound(f"{err}\nDownload failed: {derr}") from None
        x, y = info.loader(root, split)
    if tuple(x.shape[1:]) != info.shape:
        raise ValueError(f"{name} ({split}): images have shape {tuple(x.shape[1:])}, "
                         f"expected {info.shape}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= info.num_classes):
        raise ValueError(f"{name} ({split}): labels outside [0, {info.num_classes})")
    return x, y


def subset(x: Tensor, y: Tensor, n: Optional[int], seed: Optional[int] = None
           ) -> Tuple[Tensor, Tensor]:
    """The first ``n`` samples (``seed=None``) or ``n`` distinct samples drawn by a generator
    seeded with ``seed`` (kept in their original order). ``n=None`` or ``n >= N``: everything."""
    if n is None or n >= len(y):
        return x, y
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive int or None, got {n!r}")
    if seed is None:
        return x[:n], y[:n]
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return x[idx], y[idx]
