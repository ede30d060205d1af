"""A deterministic, resumable, shardable batch iterator over in-memory tensors.

Every random choice is a function of ``(seed, epoch, batch index)``: the permutation of epoch ``e``
comes from a generator seeded with ``(seed, e)``, the augmentation of batch ``i`` from one seeded with
``(seed, e, i)``. So an epoch can be replayed from any batch (exact resume after a kill) and every
rank of a distributed run sees the same permutation and takes a disjoint slice of it.

Two ways to drive it: ``for xb, yb in batches.epoch(e, start=i)`` (the caller keeps the position),
or plain ``for xb, yb in batches`` (one epoch from the current position; the position after the
last yielded batch is in :meth:`Batches.state_dict`, restored by :meth:`Batches.load_state_dict`).
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch

Tensor = torch.Tensor


def _generator(*keys: int) -> torch.Generator:
    seed = 0x9E3779B97F4A7C15
    for k in keys:
        seed = (seed * 6364136223846793005 + int(k) + 1442695040888963407) % (2 ** 63)
    return torch.Generator().manual_seed(seed)


def augment_batch(x: Tensor, pad: int, crop: int, generator: torch.Generator) -> Tensor:
    """Random crop of size ``crop`` after zero padding by ``pad``, then a random horizontal flip,
    independently per image. ``x: [B, C, H, W]`` -> ``[B, C, crop, crop]``."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    top = torch.randint(0, h + 2 * pad - crop + 1, (b,), generator=generator)
    left = torch.randint(0, w + 2 * pad - crop + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    rows = (top[:, None] + torch.arange(crop)[None, :]).to(x.device)           # [B, crop]
    cols = (left[:, None] + torch.arange(crop)[None, :])
    cols = torch.where(flip[:, None], cols.flip(1), cols).to(x.device)         # [B, crop]
    bidx = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[bidx, rows[:, :, None], cols[:, None, :]]  # [B, crop, crop, C]
    return out.permute(0, 3, 1, 2).contiguous()


class Batches:
    """Batches of ``(x, y)`` for one epoch at a time.

    Args:
        x: ``[N, C, H, W]`` uint8 (scaled by 1/255) or float in [0, 1]; ``y``: int64 ``[N]``.
        batch_size: samples per batch (per rank when distributed).
        shuffle: a fresh permutation per epoch (from ``seed`` and the epoch).
        augment: ``(pad, crop)`` random crop + flip, or ``None``.
        drop_last: drop a final incomplete batch (batches of one sample break training BN).
        rank, world_size: this process's disjoint shard of each epoch's permutation; every rank
            gets the same number of samples (the permutation is truncated to a multiple of
            ``world_size``).
        dtype, device: of the yielded ``x``.
    """

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, shuffle: bool = True,
                 augment: Optional[Tuple[int, int]] = None, seed: int = 0,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1,
                 dtype: torch.dtype = torch.float32, device="cpu"):
        if len(x) != len(y):
            raise ValueError(f"x, y: different lengths {len(x)} and {len(y)}")
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank}")
        self.x, self.y = x, y
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.seed, self.drop_last = seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.dtype, self.device = dtype, torch.device(device)
        self._epoch, self._next = 0, 0   # the position of the next batch __iter__ yields

    def indices(self, epoch: int) -> Tensor:
        """This rank's sample indices for ``epoch``, in order."""
        n = len(self.y)
        order = (torch.randperm(n, generator=_generator(self.seed, epoch)) if self.shuffle
                 else torch.arange(n))
        per_rank = n // self.world_size
        return order[: per_rank * self.world_size][self.rank::self.world_size]

    def __len__(self) -> int:
        n = len(self.y) // self.world_size
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _to_float(self, x: Tensor) -> Tensor:
        x = x.to(self.device)
        if x.dtype == torch.uint8:
            return x.to(self.dtype) / 255.0
        return x.to(self.dtype)

    def epoch(self, epoch: int, start: int = 0,
              with_index: bool = False) -> Iterator[Tuple[Tensor, ...]]:
        """The batches of ``epoch`` from batch index ``start`` on (for resuming mid-epoch);
        ``with_index``: yield ``(xb, yb, idx)`` with ``idx: [b]`` int64 dataset indices (on
        ``device``)."""
        if start < 0:
            raise ValueError(f"start: expected a batch index >= 0, got {start}")
        idx = self.indices(epoch)
        for i in range(start, len(self)):
            sel = idx[i * self.batch_size:(i + 1) * self.batch_size]
            xb = self._to_float(self.x[sel])
            if self.augment is not None:
                pad, crop = self.augment
                xb = augment_batch(xb, pad, crop, _generator(self.seed, epoch, i, 1))
            self._epoch, self._next = epoch, i + 1
            if with_index:
                yield xb, self.y[sel].to(self.device), sel.to(self.device)
            else:
                yield xb, self.y[sel].to(self.device)
        self._epoch, self._next = epoch + 1, 0

    def __iter__(self) -> Iterator[Tuple[Tensor, Tensor]]:
        """The rest of the current epoch (all of it after a completed one), then the position
        moves to the next epoch."""
        if self._next >= len(self):
            self._epoch, self._next = self._epoch + 1, 0
        return self.epoch(self._epoch, self._next)

    def state_dict(self) -> dict:
        """The position (epoch, next batch) and what fixes the sample order; plain ints."""
        return {"epoch": self._epoch, "batch": self._next, "seed": self.seed,
                "num_samples": len(self.y), "batch_size": self.batch_size,
                "world_size": self.world_size, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state``'s position. The order-defining settings must match this loader's
        (else the replayed batches would differ): a mismatch raises naming the key."""
        for key in ("seed", "num_samples", "batch_size", "world_size", "shuffle"):
            mine = self.state_dict()[key]
            if key in state and state[key] != mine:
                raise ValueError(f"state[{key!r}]: the saved loader had {state[key]!r}, this one "
                                 f"has {mine!r}; the batches would not replay")
        for key in ("epoch", "batch"):
            if key not in state or not isinstance(state[key], int) or state[key] < 0:
                raise ValueError(f"state[{key!r}]: expected an int >= 0, got {state.get(key)!r}")
        self._epoch, self._next = state["epoch"], state["batch"]


def make_loader(name: str, split: str = "train", batch_size: int = 128,
                data_dir=None, download: bool = False, augment: Optional[bool] = None,
                shuffle: Optional[bool] = None, seed: int = 0, drop_last: Optional[bool] = None,
                subset: Optional[int] = None, subset_seed: Optional[int] = None,
                rank: int = 0, world_size: int = 1, dtype: torch.dtype = torch.float32,
                device="cpu") -> Batches:
    """:class:`Batches` over dataset ``name``'s ``split`` loaded with
    :func:`adcert.data.load_dataset`. Defaults follow the split: training shuffles, augments with
    the dataset's standard augmentation and drops the last incomplete batch; test does none.
    ``subset``: keep only ``subset`` samples (the first ones, or a random choice seeded by
    ``subset_seed``), see :func:`adcert.data.subset`."""
    from adcert.data.registry import dataset_info, load_dataset, subset as take

    info = dataset_info(name)
    train = split == "train"
    x, y = load_dataset(name, split, data_dir=data_dir, download=download)
    x, y = take(x, y, subset, subset_seed)
    aug = info.augment if (train if augment is None else augment) else None
    return Batches(x, y, batch_size, shuffle=train if shuffle is None else shuffle, augment=aug,
                   seed=seed, drop_last=train if drop_last is None else drop_last, rank=rank,
                   world_size=world_size, dtype=dtype, device=device)
