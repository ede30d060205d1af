"""Datasets in their standard on-disk formats, as in-memory tensors, and a resumable batch iterator.

    x, y = load_dataset("mnist", "train", data_dir)       # x: uint8 [N, C, H, W], y: int64 [N]
    batches = Batches(x, y, batch_size=128, augment=DATASETS["mnist"].augment, seed=0)
    for xb, yb in batches.epoch(epoch):                   # xb: float [B, C, H, W] in [0, 1]
        ...

Names: ``digits`` (scikit-learn's bundled 8x8 digits, no download), ``mnist`` and ``fashion-mnist``
(idx files, gzipped or not), ``cifar10`` (the python pickles; partial batches load too). The data
directory is the ``data_dir`` argument, else ``$ADCERT_DATA``, else ``~/.cache/adcert``. Missing files
raise :class:`DatasetNotFound` naming every expected file. Normalisation is NOT done here: it is the
model's first layer (:class:`adcert.models.Normalize`), so eps stays in pixel space.
"""
from adcert.data.batches import Batches, augment_batch
from adcert.data.registry import (
    DATASETS, DatasetInfo, DatasetNotFound, dataset_info, default_data_dir, load_dataset,
)

__all__ = ["DATASETS", "DatasetInfo", "DatasetNotFound", "dataset_info", "default_data_dir",
           "load_dataset", "Batches", "augment_batch"]
