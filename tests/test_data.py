"""Tests for psadv.data: dataset loading and verification, downloads, sharding, batch streams."""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import http.server
import io
import shutil
import socket
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from psadv import data
from psadv.data import DATASETS, BatchStream, load_dataset, shard_indices
from psadv.errors import CheckpointError, ConfigError, DataError

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
TEST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def closed_port_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens, so connecting fails at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


@pytest.fixture
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
def mnist_server(mnist_dir: Path, no_proxy: None) -> Iterator[str]:
    """Serve the real MNIST files over HTTP on 127.0.0.1 and yield the base URL."""

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    handler = functools.partial(QuietHandler, directory=str(mnist_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    thread.join()


def with_spec(monkeypatch: pytest.MonkeyPatch, name: str, **changes: object) -> None:
    monkeypatch.setitem(DATASETS, name, dataclasses.replace(DATASETS[name], **changes))


# --- MNIST from the shared offline copy -------------------------------------------------


def test_mnist_loads_with_official_counts(mnist_dir: Path) -> None:
    for split, size, counts in (("train", 60000, TRAIN_COUNTS), ("test", 10000, TEST_COUNTS)):
        ds = load_dataset("mnist", split, data_dir=mnist_dir, download=False)
        assert len(ds) == size and ds.name == "mnist" and ds.split == split
        assert ds.x.shape == (size, 1, 28, 28) and ds.x.dtype == np.float32
        assert ds.y.shape == (size,) and ds.y.dtype == np.int64
        assert ds.x.min() == 0.0 and ds.x.max() == 1.0
        assert np.bincount(ds.y, minlength=10).tolist() == counts


def test_a_format_without_a_decoder_is_refused_not_read_as_another(mnist_dir: Path, monkeypatch) -> None:
    monkeypatch.setattr(data, "_ARRAY_CACHE", {})  # decoded arrays are cached by their files, not their format
    with_spec(monkeypatch, "mnist", format="idx-v2")
    with pytest.raises(ValueError, match="format 'idx-v2', which psadv cannot decode; its formats: idx, "
                                         "cifar10-binary$"):
        load_dataset("mnist", "test", data_dir=mnist_dir, download=False)


def test_loaded_arrays_are_cached_and_read_only(mnist_dir: Path) -> None:
    first = load_dataset("mnist", "test", data_dir=mnist_dir, download=False)
    assert load_dataset("mnist", "test", data_dir=mnist_dir, download=False) is first
    with pytest.raises(ValueError):
        first.x[0, 0, 0, 0] = 0.5


def test_parent_directory_layout_and_env_var(mnist_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    direct = load_dataset("mnist", "test", data_dir=mnist_dir, download=False)
    via_parent = load_dataset("mnist", "test", data_dir=mnist_dir.parent, download=False)
    np.testing.assert_array_equal(via_parent.x, direct.x)
    monkeypatch.setenv("PSADV_DATA_DIR", str(mnist_dir.parent))
    via_env = load_dataset("mnist", "test", download=False)
    np.testing.assert_array_equal(via_env.y, direct.y)


def test_data_dir_resolution_order(tmp_path: Path, mnist_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PSADV_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert data.resolve_data_dir() == tmp_path / "psadv"
    monkeypatch.setenv("PSADV_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="PSADV_DATA_DIR"):
        data.resolve_data_dir()
    assert data.resolve_data_dir(mnist_dir) == mnist_dir
    with pytest.raises(DataError, match="nowhere-else"):
        data.resolve_data_dir(tmp_path / "nowhere-else")


def test_unknown_dataset_and_split() -> None:
    with pytest.raises(ConfigError, match="mnist, fashion-mnist, cifar10"):
        load_dataset("imagenet", "train")
    with pytest.raises(ConfigError, match="train, test"):
        load_dataset("mnist", "validation")
    info = data.dataset_info("cifar10")
    assert info.shape == (3, 32, 32) and info.num_classes == 10


# --- verification and downloads ----------------------------------------------------------


def test_md5_mismatch_names_file_and_expected_md5(tmp_path: Path, mnist_dir: Path) -> None:
    for name in TEST_FILES:
        shutil.copy(mnist_dir / name, tmp_path / name)
    corrupted = tmp_path / TEST_FILES[1]
    raw = bytearray(corrupted.read_bytes())
    raw[-1] ^= 0xFF
    corrupted.write_bytes(bytes(raw))
    with pytest.raises(DataError) as info:
        load_dataset("mnist", "test", data_dir=tmp_path)
    message = str(info.value)
    assert str(corrupted) in message and md5_of(corrupted) in message
    assert DATASETS["mnist"].files[TEST_FILES[1]] in message and "--data-dir" in message


def test_missing_file_without_download(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz not found.*download disabled"):
        load_dataset("mnist", "test", data_dir=tmp_path, download=False)
    assert listing(tmp_path) == []


def test_unreachable_mirror_fails_fast_and_leaves_nothing(
        tmp_path: Path, closed_port_url: str, no_proxy: None, monkeypatch: pytest.MonkeyPatch) -> None:
    with_spec(monkeypatch, "mnist", mirrors=(closed_port_url,))
    with pytest.raises(DataError, match="could not be downloaded.*--data-dir") as info:
        load_dataset("mnist", "test", data_dir=tmp_path)
    assert DATASETS["mnist"].files[TEST_FILES[0]] in str(info.value)
    assert listing(tmp_path) == []


def test_download_from_local_server(tmp_path: Path, mnist_dir: Path, mnist_server: str,
                                    closed_port_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with_spec(monkeypatch, "mnist", mirrors=(closed_port_url, mnist_server))
    ds = load_dataset("mnist", "test", data_dir=tmp_path)
    assert listing(tmp_path) == ["mnist", *(f"mnist/{name}" for name in sorted(TEST_FILES))]
    for name in TEST_FILES:
        assert md5_of(tmp_path / "mnist" / name) == DATASETS["mnist"].files[name]
    np.testing.assert_array_equal(ds.y, load_dataset("mnist", "test", data_dir=mnist_dir).y)


def test_download_with_wrong_content_is_rejected(tmp_path: Path, mnist_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    remote = tmp_path / "remote"
    remote.mkdir()
    for name in TEST_FILES:
        (remote / name).write_bytes((mnist_dir / name).read_bytes() + b"junk")
    with_spec(monkeypatch, "mnist", mirrors=(remote.as_uri() + "/",))
    local = tmp_path / "local"
    local.mkdir()
    with pytest.raises(DataError, match="md5 .* != 9fb629c4189551a2d022fa330f9573f3"):
        load_dataset("mnist", "test", data_dir=local)
    assert listing(local) == []


def write_idx(path: Path, header: bytes, payload: bytes) -> str:
    path.write_bytes(gzip.compress(header + payload))
    return md5_of(path)


@pytest.mark.parametrize("images_header, match", [
    (bytes((0, 0, 9, 3)) + np.array([2, 28, 28], ">u4").tobytes(), "bad IDX magic"),
    (bytes((0, 0, 8, 3)) + np.array([3, 28, 28], ">u4").tobytes(), "IDX size mismatch"),
])
def test_bad_idx_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, images_header: bytes,
                        match: str) -> None:
    images = tmp_path / TEST_FILES[0]
    labels = tmp_path / TEST_FILES[1]
    md5s = {TEST_FILES[0]: write_idx(images, images_header, bytes(2 * 28 * 28)),
            TEST_FILES[1]: write_idx(labels, bytes((0, 0, 8, 1)) + np.array([2], ">u4").tobytes(),
                                     bytes((3, 4)))}
    with_spec(monkeypatch, "mnist", files={**DATASETS["mnist"].files, **md5s}, test_size=2)
    with pytest.raises(DataError, match=f"{images.name}.*{match}"):
        load_dataset("mnist", "test", data_dir=tmp_path, download=False)


def test_an_unreadable_file_is_a_data_error_not_a_traceback(mnist_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import psadv.data

    def refused(path, *args, **kwargs):  # a mode-000 file, which root (the CI) would still read
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(psadv.data, "_MD5_CACHE", {})  # read the file again, not a remembered digest
    monkeypatch.setattr(psadv.data, "_ARRAY_CACHE", {})
    monkeypatch.setattr(psadv.data, "open", refused, raising=False)
    with pytest.raises(DataError, match=f"{TEST_FILES[0]}: cannot read it: Permission denied"):
        load_dataset("mnist", "test", data_dir=mnist_dir, download=False)


# --- CIFAR-10 binary release -------------------------------------------------------------


def cifar_tarball(path: Path, batches: dict[str, np.ndarray]) -> str:
    """Write a CIFAR-10-binary-style tar.gz whose members hold the given uint8 records."""
    with tarfile.open(path, "w:gz") as archive:
        members = {"batches.meta.txt": b"airplane\n", **{k: v.tobytes() for k, v in batches.items()}}
        for name, payload in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return md5_of(path)


def cifar_records(rng: np.random.Generator, count: int, labels: list[int]) -> np.ndarray:
    records = rng.integers(0, 256, size=(count, 3073), dtype=np.uint8)
    records[:, 0] = labels
    return records


def test_cifar10_binary_tarball(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    train = {f"data_batch_{i}.bin": cifar_records(rng, 2, [i, 9 - i]) for i in range(1, 6)}
    test = cifar_records(rng, 3, [0, 5, 9])
    tarball = tmp_path / "cifar-10-binary.tar.gz"
    md5 = cifar_tarball(tarball, {**train, "test_batch.bin": test})
    with_spec(monkeypatch, "cifar10", files={tarball.name: md5}, train_size=10, test_size=3)

    ds = load_dataset("cifar10", "test", data_dir=tmp_path, download=False)
    assert ds.x.shape == (3, 3, 32, 32) and ds.x.dtype == np.float32 and ds.y.tolist() == [0, 5, 9]
    red_first_row = test[1, 1:33].astype(np.float32) / 255
    np.testing.assert_array_equal(ds.x[1, 0, 0], red_first_row)
    np.testing.assert_array_equal(ds.x[2, 2, 31, 31], test[2, 3072] / np.float32(255))

    ds = load_dataset("cifar10", "train", data_dir=tmp_path, download=False)
    assert ds.y.tolist() == [1, 8, 2, 7, 3, 6, 4, 5, 5, 4]
    np.testing.assert_array_equal(ds.x[9].reshape(-1) * 255, train["data_batch_5.bin"][1, 1:])


def test_cifar10_bad_label_and_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    tarball = tmp_path / "cifar-10-binary.tar.gz"
    md5 = cifar_tarball(tarball, {"test_batch.bin": cifar_records(rng, 2, [3, 10])})
    with_spec(monkeypatch, "cifar10", files={tarball.name: md5}, test_size=2)
    with pytest.raises(DataError, match="labels reach 10"):
        load_dataset("cifar10", "test", data_dir=tmp_path, download=False)
    with_spec(monkeypatch, "cifar10", test_size=5)
    with pytest.raises(DataError, match="expected 5 records"):
        load_dataset("cifar10", "test", data_dir=tmp_path, download=False)
    with pytest.raises(DataError, match="lacks data_batch_1.bin"):
        load_dataset("cifar10", "train", data_dir=tmp_path, download=False)


# --- sharding and batch streams ------------------------------------------------------------


def test_shards_are_disjoint_covering_balanced_and_deterministic() -> None:
    n, count = 1003, 4
    shards = [shard_indices(n, 7, i, count) for i in range(count)]
    joined = np.concatenate(shards)
    assert sorted(joined.tolist()) == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert all(s.dtype == np.int64 for s in shards)
    np.testing.assert_array_equal(shard_indices(n, 7, 2, count), shards[2])
    assert not np.array_equal(shard_indices(n, 8, 2, count), shards[2])
    for bad_index, bad_count in ((4, 4), (-1, 4), (0, 0)):
        with pytest.raises(ConfigError):
            shard_indices(n, 7, bad_index, bad_count)


def take(stream: BatchStream, count: int) -> list[list[int]]:
    return [stream.next().tolist() for _ in range(count)]


def test_batch_stream_is_deterministic_and_reshuffles_each_epoch() -> None:
    indices = np.arange(100, 130)
    stream = BatchStream(indices, batch_size=10, seed=3)
    assert stream.batches_per_epoch == 3 and stream.epoch == 0
    batches = take(stream, 6)
    assert stream.epoch == 2 and stream.state() == {"epoch": 2, "position": 0}
    assert batches == take(BatchStream(indices, batch_size=10, seed=3), 6)
    epoch0, epoch1 = sum(batches[:3], []), sum(batches[3:], [])
    assert sorted(epoch0) == sorted(epoch1) == indices.tolist()
    assert epoch0 != epoch1
    assert take(BatchStream(indices, batch_size=10, seed=4), 3) != batches[:3]


def test_batch_stream_resumes_exactly() -> None:
    indices = shard_indices(1000, 0, 1, 3)
    original = BatchStream(indices, batch_size=64, seed=11)
    take(original, 7)
    saved = original.state()
    expected = take(original, 12)
    resumed = BatchStream(indices, batch_size=64, seed=11)
    resumed.restore(saved)
    assert resumed.epoch == saved["epoch"] and take(resumed, 12) == expected


def test_batch_stream_partial_last_batch_and_errors() -> None:
    stream = BatchStream(np.arange(25), batch_size=10, seed=0, drop_last=False)
    assert stream.batches_per_epoch == 3 and [len(b) for b in take(stream, 4)] == [10, 10, 5, 10]
    with pytest.raises(ConfigError, match="batch size 26"):
        BatchStream(np.arange(25), batch_size=26, seed=0)
    with pytest.raises(CheckpointError):
        stream.restore({"epoch": 0, "position": 3})
    with pytest.raises(CheckpointError):
        stream.restore({"epoch": 0})


# --- Fashion-MNIST: the published .gz md5 or the published md5 of the decompressed file --------


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    """The complete Fashion-MNIST copy in ``../shared/data/fashion-mnist`` (Debian's recompressed files)."""
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fashion-mnist"


def test_fashion_mnist_recompressed_files_load_by_their_raw_md5(fashion_dir: Path) -> None:
    spec = DATASETS["fashion-mnist"]
    for name in spec.files:  # the copy's .gz files are not the published ones
        assert md5_of(fashion_dir / name) != spec.files[name]
    test = load_dataset("fashion-mnist", "test", data_dir=fashion_dir)
    assert test.x.shape == (10000, 1, 28, 28) and np.bincount(test.y).tolist() == [1000] * 10
    assert len(load_dataset("fashion-mnist", "train", data_dir=fashion_dir)) == 60000


def gz_pair(tmp_path: Path, payload: bytes) -> tuple[Path, Path]:
    """The same payload compressed two ways: two .gz files whose md5s differ."""
    a, b = tmp_path / "a.gz", tmp_path / "b.gz"
    a.write_bytes(gzip.compress(payload, compresslevel=9, mtime=0))
    b.write_bytes(gzip.compress(payload, compresslevel=1, mtime=1))
    assert md5_of(a) != md5_of(b)
    return a, b


def test_md5_rule_accepts_the_gz_md5_or_the_raw_md5_and_names_both_when_neither_matches(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 40
    original, recompressed = gz_pair(tmp_path, payload)
    raw_md5 = hashlib.md5(payload, usedforsecurity=False).hexdigest()
    spec = dataclasses.replace(DATASETS["fashion-mnist"], files={"f.gz": md5_of(original)}, raw_md5s={"f.gz": raw_md5})
    assert data.md5_problem(spec, "f.gz", original, md5_of(original)) is None  # the .gz matches
    assert data.md5_problem(spec, "f.gz", recompressed, md5_of(recompressed)) is None  # the contents match
    changed = tmp_path / "c.gz"
    changed.write_bytes(gzip.compress(payload + b"!"))
    problem = data.md5_problem(spec, "f.gz", changed, md5_of(changed))
    assert f".gz md5 {md5_of(changed)}, expected {md5_of(original)}" in problem
    changed_raw = hashlib.md5(payload + b"!", usedforsecurity=False).hexdigest()
    assert f"decompressed md5 {changed_raw}, expected {raw_md5}" in problem
    junk = tmp_path / "junk.gz"
    junk.write_bytes(b"not gzip at all")
    assert "not readable gzip" in data.md5_problem(spec, "f.gz", junk, md5_of(junk))
    # without a published raw md5 (MNIST) only the .gz md5 counts
    mnist_like = dataclasses.replace(spec, raw_md5s={})
    assert data.md5_problem(mnist_like, "f.gz", recompressed, md5_of(recompressed)) == (
        f"has md5 {md5_of(recompressed)}, expected {md5_of(original)}")


def test_a_changed_fashion_mnist_file_fails_in_one_line_naming_both_md5s(tmp_path: Path, fashion_dir: Path) -> None:
    name = "t10k-labels-idx1-ubyte.gz"
    shutil.copy(fashion_dir / "t10k-images-idx3-ubyte.gz", tmp_path)
    labels = bytearray(gzip.decompress((fashion_dir / name).read_bytes()))
    labels[-1] = (labels[-1] + 1) % 10
    (tmp_path / name).write_bytes(gzip.compress(bytes(labels)))
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist", "test", data_dir=tmp_path)
    message = str(info.value)
    spec = DATASETS["fashion-mnist"]
    assert "\n" not in message and spec.files[name] in message and spec.raw_md5s[name] in message
    assert "matches neither published md5" in message
