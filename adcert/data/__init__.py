"""Datasets in their standard on-disk formats, as in-memory tensors, and a resumable batch iterator.

    x, y = load_dataset("mnist", "train", data_dir)       # x: uint8 [N, C, H, W], y: int64 [N]
    batches = Batches(x, y, batch_size=128, augment=DATASETS["mnist"].augment, seed=0)
    for xb, yb in batches.epoch(epoch):                   # xb: float [B, C, H, W] in [0, 1]
        ...

    batches = make_loader("cifar10", "train", batch_size=128, seed=0)   # load + Batches
    for xb, yb in batches: ...                            # one epoch from the saved position
    state = batches.state_dict(); batches.load_state_dict(state)         # exact resume

Names: ``digits`` (scikit-learn's bundled 8x8 digits, no download), ``mnist`` and ``fashion-mnist``
(idx files, gzipped or not; Fashion-MNIST also from ``/usr/share/datasets/fashion-mnist``),
``cifar10`` (the python pickles; partial batches load too), ``tinyimagenet`` (the
``tiny-imagenet-200`` folder; JPEG decoding needs Pillow; ``test`` is its ``val`` folder).
:data:`DATASETS` holds each one's :class:`DatasetInfo`: input shape, classes, mean/std, the papers'
augmentation and eps values.

The data directory is the ``data_dir`` argument, else ``$ADCERT_DATA``, else ``~/.cache/adcert``.
Missing files raise :class:`DatasetNotFound` naming every expected file; ``download=True`` fetches
the official archives (md5-verified, :mod:`adcert.data.download`) where a network exists. Corrupt
files raise ``ValueError`` naming the file. Normalisation is NOT done here: it is the model's first layer
(:class:`adcert.models.Normalize`), so eps stays in pixel space.
"""
from adcert.data.batches import Batches, augment_batch, make_loader
from adcert.data.download import ChecksumError, DownloadError, verify_checksum
from adcert.data.registry import (
    DATASETS, DatasetInfo, DatasetNotFound, dataset_info, default_data_dir, load_dataset, subset,
)

__all__ = ["DATASETS", "DatasetInfo", "DatasetNotFound", "dataset_info", "default_data_dir",
           "load_dataset", "subset", "Batches", "augment_batch", "make_loader", "ChecksumError",
           "DownloadError", "verify_checksum"]
