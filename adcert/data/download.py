"""Checksummed downloads of the official dataset archives (urllib, short timeout).

Every resource is ``(file name, [urls], md5)``: the file is fetched to ``<name>.part``, its md5 is
checked, and only then renamed into place, so a half-written or tampered file never looks complete.
Without a network the error names the files expected and where to put them (no socket traceback).
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from typing import Dict, List, Sequence, Tuple

Resource = Tuple[str, Sequence[str], str]  # (file name, mirror urls, md5 hex digest)

_MNIST_URLS = ["https://ossci-datasets.s3.amazonaws.com/mnist/",
               "http://yann.lecun.com/exdb/mnist/"]
_FASHION_URLS = ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"]


def _idx_resources(urls: List[str], md5s: Dict[str, str]) -> List[Resource]:
    return [(name, [u + name for u in urls], md5) for name, md5 in md5s.items()]


#: The official archives of each downloadable dataset, with their md5 checksums.
RESOURCES: Dict[str, List[Resource]] = {
    "mnist": _idx_resources(_MNIST_URLS, {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    }),
    "fashion-mnist": _idx_resources(_FASHION_URLS, {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    }),
    "cifar10": [("cifar-10-python.tar.gz",
                 ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"],
                 "c58f30108f718f92721af3b95e74349a")],
    "tinyimagenet": [("tiny-imagenet-200.zip",
                      ["http://cs231n.stanford.edu/tiny-imagenet-200.zip"],
                      "90528d7ca1a48142e341f4ef8d21d0de")],
}


class ChecksumError(ValueError):
    """A file's digest differs from the official one (the message names file, expected, got)."""


class DownloadError(OSError):
    """A dataset file could not be fetched (the message says which and where to put it by hand)."""


def file_digest(path: pathlib.Path, algorithm: str = "md5") -> str:
    """Hex digest (``md5``, ``sha256``, ...) of the file at ``path``, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_checksum(path: pathlib.Path, expected: str, algorithm: str = "md5") -> None:
    """Raise :class:`ChecksumError` unless ``path``'s ``algorithm`` digest equals ``expected``."""
    got = file_digest(path, algorithm)
    if got.lower() != expected.lower():
        raise ChecksumError(f"{path}: {algorithm} checksum mismatch: expected {expected}, got "
                            f"{got}; the file is corrupt or not the official one. Delete it and "
                            f"download again.")


def fetch(urls: Sequence[str], dest: pathlib.Path, md5: str, timeout: float = 10.0) -> pathlib.Path:
    """Download the first reachable of ``urls`` to ``dest`` and verify its md5.

    An existing ``dest`` with the right md5 is kept (no download). Raises :class:`ChecksumError`
    when the downloaded bytes have the wrong md5 (the partial file is removed) and
    :class:`DownloadError` when no url can be reached.
    """
    dest = pathlib.Path(dest)
    if dest.is_file():
        verify_checksum(dest, md5)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    failures = []
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp, open(part, "wb") as out:
                shutil.copyfileobj(resp, out, 1 << 20)
        except (urllib.error.URLError, OSError, ValueError) as err:
            failures.append(f"{url} ({getattr(err, 'reason', err)})")
            part.unlink(missing_ok=True)
            continue
        try:
            verify_checksum(part, md5)
        except ChecksumError:
            part.unlink(missing_ok=True)
            raise ChecksumError(f"{url}: downloaded file has the wrong md5 (expected {md5}); "
                                f"not saved as {dest}") from None
        os.replace(part, dest)
        return dest
    raise DownloadError(f"cannot download {dest.name} (md5 {md5}): " + "; ".join(failures)
                        + f". Download it by hand and put it at {dest}.")


def download_dataset(name: str, root: pathlib.Path, timeout: float = 10.0) -> None:
    """Fetch and verify ``name``'s official files into ``root`` in the layout the loaders read:
    ``root/mnist/*.gz``, ``root/fashion-mnist/*.gz``, ``root/cifar-10-batches-py/`` (extracted
    tarball), ``root/tiny-imagenet-200/`` (extracted zip). Archives are kept next to them."""
    if name not in RESOURCES:
        raise ValueError(f"dataset: {name!r} has no download; downloadable: "
                         f"{', '.join(RESOURCES)}")
    root = pathlib.Path(root)
    for fname, urls, md5 in RESOURCES[name]:
        if name in ("mnist", "fashion-mnist"):
            fetch(urls, root / name / fname, md5, timeout)
            continue
        archive = fetch(urls, root / fname, md5, timeout)
        if archive.name.endswith(".tar.gz"):
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            with tarfile.open(archive, "r:gz") as tar:
                tar.extractall(root, **safe)
        else:
            with zipfile.ZipFile(archive) as z:
                z.extractall(root)
