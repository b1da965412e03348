"""Datasets from their official files, minibatch index streams and sharding.

Every dataset is read from the files its authors publish (MNIST and Fashion-MNIST IDX
gz files, the CIFAR-10 *binary* tarball), each verified against its published md5. Where the
authors also publish the md5 of a file's decompressed contents (Fashion-MNIST), a recompressed
copy (Debian's package, for one) whose decompressed md5 matches is accepted too.
Files are looked for in a data directory chosen as: the explicit ``data_dir`` argument
(CLI ``--data-dir``), else ``$PSADV_DATA_DIR``, else ``$XDG_CACHE_HOME/psadv`` (or
``~/.cache/psadv``). Within a directory D, a dataset's files are looked for in
``D/<name>/`` first, then in D itself. Missing files are downloaded into ``D/<name>/``
unless ``download=False``. No pickle is used anywhere.

Your own data (``--dataset npz`` or ``hdf5``, the file given as ``data_dir``): one file holding
the arrays ``x_train``, ``y_train``, ``x_test``, ``y_test`` and optionally ``num_classes`` (a
scalar; default: the largest label + 1). Images are N×C×H×W (or N×H×W for one channel), uint8
in 0–255 or float in [0, 1]; labels are integers in [0, num_classes). Every array is validated
before training, and the file's md5 is recorded in the run's config (``data_md5``).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import tarfile
import tempfile
import urllib.request
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import h5py
import numpy as np

from psadv import untrusted
from psadv.errors import CheckpointError, ConfigError, DataError, io_error_text

DOWNLOAD_TIMEOUT_S = 20.0
SPLITS = ("train", "test")
MAX_CLASSES = untrusted.MAX_CLASSES
_SUPPLY_HINT = "pass --data-dir DIR (or set PSADV_DATA_DIR)"


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset's official files come from and what they must contain.

    ``files`` maps each file name to its md5; ``raw_md5s`` to the published md5 of its
    decompressed contents, where one is published; ``split_files`` names the files a split
    needs (for IDX: images then labels; for CIFAR-10: the tarball); ``mirrors`` are URL
    prefixes ending in ``/`` that the file name is appended to (any scheme urllib opens).
    """

    name: str
    format: Literal["idx", "cifar10-binary", "npz", "hdf5"]
    files: dict[str, str]
    split_files: dict[str, tuple[str, ...]]
    mirrors: tuple[str, ...]
    shape: tuple[int, int, int]
    num_classes: int
    train_size: int
    test_size: int
    raw_md5s: dict[str, str] = field(default_factory=dict)

    def size(self, split: str) -> int:
        """Number of examples in ``split``."""
        return self.train_size if split == "train" else self.test_size


_IDX_SPLITS = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _idx_files(*md5s: str) -> dict[str, str]:
    """Map the four standard IDX file names (train images/labels, test images/labels) to md5s."""
    names = _IDX_SPLITS["train"] + _IDX_SPLITS["test"]
    return dict(zip(names, md5s, strict=True))


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist", format="idx",
        files=_idx_files("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
                         "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"),
        split_files=_IDX_SPLITS,
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/",
                 "https://storage.googleapis.com/cvdf-datasets/mnist/",
                 "http://yann.lecun.com/exdb/mnist/"),
        shape=(1, 28, 28), num_classes=10, train_size=60000, test_size=10000),
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist", format="idx",
        files=_idx_files("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                         "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"),
        split_files=_IDX_SPLITS,
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        shape=(1, 28, 28), num_classes=10, train_size=60000, test_size=10000,
        # the raw md5s published with the data set (github.com/zalandoresearch/fashion-mnist)
        raw_md5s=_idx_files("f4a8712d7a061bf5bd6d2ca38dc4d50a", "9018921c3c673c538a1fc5bad174d6f9",
                            "8181f5470baa50b63fa0f6fddb340f0a", "15d484375f8d13e6eb1aabb0c3f46965")),
    "cifar10": DatasetSpec(
        name="cifar10", format="cifar10-binary",
        files={"cifar-10-binary.tar.gz": "c32a1d4ab5d03f1284b67883e8d87530"},
        split_files={"train": ("cifar-10-binary.tar.gz",), "test": ("cifar-10-binary.tar.gz",)},
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
        shape=(3, 32, 32), num_classes=10, train_size=50000, test_size=10000),
}

_CIFAR_MEMBERS = {
    "train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    "test": ("test_batch.bin",),
}


@dataclass
class Dataset:
    """One split of a dataset: ``x`` float32 N×C×H×W in [0, 1], ``y`` int64 labels.

    Loaded arrays are shared through an in-process cache and are therefore read-only;
    copy them (or index them, which copies) before modifying.
    """

    x: np.ndarray
    y: np.ndarray
    name: str
    split: str

    def __len__(self) -> int:
        return len(self.y)


def dataset_info(name: str, data_dir: str | os.PathLike[str] | None = None) -> DatasetSpec:
    """The registry entry (shape, num_classes, sizes, files) for ``name``; for ``npz``/``hdf5``,
    that of the file ``data_dir`` (read and validated)."""
    if name in FILE_DATASETS:
        return _load_file(name, data_dir)[0]
    try:
        return DATASETS[name]
    except KeyError:
        raise ConfigError(f"unknown dataset {name!r}; known datasets: "
                          f"{', '.join((*DATASETS, *FILE_DATASETS))}") from None


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data directory: ``data_dir``, else ``$PSADV_DATA_DIR``, else the user cache dir."""
    for value, origin in ((data_dir, "--data-dir"), (os.environ.get("PSADV_DATA_DIR"), "PSADV_DATA_DIR")):
        if value is not None and str(value) != "":
            path = Path(value).expanduser()
            if not path.is_dir():
                raise DataError(f"data directory {path} (from {origin}) does not exist or is not a directory")
            return path
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "psadv"


_MD5_CACHE: dict[tuple[str, int, int], str] = {}
_ARRAY_CACHE: dict[tuple[str, str, tuple[tuple[str, str], ...]], Dataset] = {}


def _md5(path: Path, decompressed: bool = False) -> str:
    """md5 hex digest of ``path`` (or of its gunzipped contents), remembered in-process by
    (path, size, mtime); "" for ``decompressed`` when the file is not readable gzip."""
    stat = path.stat()
    key = (str(path.resolve()) + ("|raw" if decompressed else ""), stat.st_size, stat.st_mtime_ns)
    if key not in _MD5_CACHE:
        digest = hashlib.md5(usedforsecurity=False)
        try:
            with (gzip.open if decompressed else open)(path, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
        except (EOFError, zlib.error, gzip.BadGzipFile):
            return ""
        except OSError as exc:  # unreadable (permissions, I/O): say so, on every rank alike
            raise DataError(f"{path}: cannot read it: {io_error_text(exc)}") from None
        _MD5_CACHE[key] = digest.hexdigest()
    return _MD5_CACHE[key]


def md5_problem(spec: DatasetSpec, filename: str, path: Path, gz_md5: str) -> str | None:
    """None if ``path`` (whose md5 is ``gz_md5``) is the official ``filename``: its md5 matches the
    published one, or its decompressed md5 matches the published raw md5; else what failed."""
    expected = spec.files[filename]
    if gz_md5 == expected:
        return None
    raw_expected = spec.raw_md5s.get(filename)
    if raw_expected is None:
        return f"has md5 {gz_md5}, expected {expected}"
    raw = _md5(path, decompressed=True)
    if raw == raw_expected:
        return None
    raw_text = f"decompressed md5 {raw}" if raw else "is not readable gzip, so no decompressed md5"
    return (f"matches neither published md5: .gz md5 {gz_md5}, expected {expected}; "
            f"{raw_text}, expected {raw_expected}")


def _download(spec: DatasetSpec, filename: str, target_dir: Path) -> Path:
    """Fetch ``filename`` from the spec's mirrors into ``target_dir``; md5-checked, atomic."""
    expected = spec.files[filename]
    created = not target_dir.exists()
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create {target_dir}: {exc.strerror}") from None
    reasons = []
    for mirror in spec.mirrors:
        url = mirror + filename
        tmp: Path | None = None
        try:
            fd, tmp_name = tempfile.mkstemp(dir=target_dir, prefix=f".{filename}.", suffix=".tmp")
            tmp = Path(tmp_name)
            digest = hashlib.md5(usedforsecurity=False)
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != expected and md5_problem(spec, filename, tmp, digest.hexdigest()):
                reasons.append(f"{url}: md5 {digest.hexdigest()} != {expected}")
                continue
            final = target_dir / filename
            tmp.chmod(0o644)
            os.replace(tmp, final)
            return final
        except (OSError, ValueError, http.client.HTTPException) as exc:
            reasons.append(f"{url}: {getattr(exc, 'reason', None) or exc}")
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
    if created and not any(target_dir.iterdir()):
        target_dir.rmdir()
    raise DataError("; ".join(reasons) or "no mirrors configured")


def _locate(spec: DatasetSpec, filename: str, base: Path, download: bool) -> Path:
    """Path of a verified copy of ``filename`` in ``base/<name>/`` or ``base``, downloading if allowed."""
    candidates = (base / spec.name, base)
    found = next((d / filename for d in candidates if (d / filename).is_file()), None)
    expected = spec.files[filename]
    if found is None:
        looked = ", ".join(str(d) for d in candidates)
        advice = f"download it (md5 {expected}) into {candidates[0]}, or {_SUPPLY_HINT}"
        if not download:
            raise DataError(f"{spec.name}: {filename} not found in {looked} (download disabled); {advice}")
        try:
            return _download(spec, filename, candidates[0])
        except DataError as exc:
            raise DataError(f"{spec.name}: {filename} not found in {looked} and could not be "
                            f"downloaded ({exc}); {advice}") from None
    problem = md5_problem(spec, filename, found, _md5(found))
    if problem:
        raise DataError(f"{spec.name}: {found} {problem}; replace it with the official file, or {_SUPPLY_HINT} "
                        "to use a verified copy")
    return found


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse a gzipped IDX file of unsigned bytes with ``ndim`` dimensions."""
    try:
        with gzip.open(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: not a readable gzip file ({exc}); replace it with the official file") from None
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:4] != bytes((0, 0, 0x08, ndim)):
        raise DataError(f"{path}: bad IDX magic {raw[:4].hex()}, expected 000008{ndim:02x} (unsigned bytes, "
                        f"{ndim} dims); replace it with the official file")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    if len(raw) != header + int(np.prod(dims)):
        raise DataError(f"{path}: IDX size mismatch: header says {dims} ({header + int(np.prod(dims))} bytes), "
                        f"file has {len(raw)} bytes; replace it with the official file")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _decode_idx(spec: DatasetSpec, split: str, images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, C, H, W) and labels of an IDX split, checked against the spec's sizes."""
    images, labels = _read_idx(images_path, 3), _read_idx(labels_path, 1)
    expected = (spec.size(split), *spec.shape[1:])
    if images.shape != expected or labels.shape != expected[:1]:
        raise DataError(f"{spec.name}: {images_path.name} has shape {images.shape} and {labels_path.name} "
                        f"{labels.shape}, expected {expected} and {expected[:1]}")
    return images.reshape(-1, *spec.shape), labels


def _decode_cifar10(spec: DatasetSpec, split: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read the split's ``*.bin`` members straight out of the tarball (records: label + 3072 CHW bytes)."""
    wanted = _CIFAR_MEMBERS[split]
    chunks: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r|gz") as archive:
            for member in archive:
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in wanted:
                    chunks[base] = archive.extractfile(member).read()
    except (OSError, EOFError, zlib.error, tarfile.TarError) as exc:
        raise DataError(f"{path}: unreadable tar.gz ({exc}); replace it with the official file") from None
    missing = [name for name in wanted if name not in chunks]
    if missing:
        raise DataError(f"{path}: archive lacks {', '.join(missing)}; replace it with the official file")
    record = 1 + int(np.prod(spec.shape))
    raw = b"".join(chunks[name] for name in wanted)
    if len(raw) != spec.size(split) * record:
        raise DataError(f"{path}: {split} batches hold {len(raw)} bytes, expected {spec.size(split)} "
                        f"records of {record} bytes")
    records = np.frombuffer(raw, np.uint8).reshape(-1, record)
    return records[:, 1:].reshape(-1, *spec.shape), records[:, 0]


# How the split files of each official format decode (your own npz/HDF5 file: _FILE_READERS).
_DECODERS = {"idx": _decode_idx, "cifar10-binary": _decode_cifar10}


def _decoder(spec: DatasetSpec):
    """The decoder of ``spec``'s format; a format without one is psadv's own mistake, said as such
    (not read as another format's files)."""
    if spec.format not in _DECODERS:
        raise ValueError(f"dataset {spec.name!r} has format {spec.format!r}, which psadv cannot decode; "
                         f"its formats: {', '.join(_DECODERS)}")
    return _DECODERS[spec.format]


def load_dataset(name: str, split: str, data_dir: str | os.PathLike[str] | None = None,
                 download: bool = True) -> Dataset:
    """Load one split of a dataset, verifying md5s; decoded arrays are cached in-process."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; expected one of: {', '.join(SPLITS)}")
    if name in FILE_DATASETS:
        return _load_file(name, data_dir)[1][split]
    spec = dataset_info(name)
    base = resolve_data_dir(data_dir)
    paths = [_locate(spec, filename, base, download) for filename in spec.split_files[split]]
    key = (name, split, tuple((str(p.resolve()), _md5(p)) for p in paths))
    if key not in _ARRAY_CACHE:
        images, labels = _decoder(spec)(spec, split, *paths)
        if labels.size and int(labels.max()) >= spec.num_classes:
            raise DataError(f"{spec.name}: {split} labels reach {int(labels.max())}, "
                            f"expected 0..{spec.num_classes - 1}; replace the files with the official ones")
        x = images.astype(np.float32)
        x /= 255.0
        y = labels.astype(np.int64)
        x.flags.writeable = False
        y.flags.writeable = False
        _ARRAY_CACHE[key] = Dataset(x=x, y=y, name=name, split=split)
    return _ARRAY_CACHE[key]


# --- your own data: one npz or HDF5 file ------------------------------------------------------

FILE_KEYS = ("x_train", "y_train", "x_test", "y_test")
_FILE_CACHE: dict[tuple[str, str], tuple[DatasetSpec, dict[str, Dataset]]] = {}


def data_file(name: str, data_dir: str | os.PathLike[str] | None) -> Path:
    """The file ``--dataset npz``/``hdf5`` reads: ``data_dir`` itself, which must be a file."""
    if data_dir is None or str(data_dir) == "":
        raise DataError(f"--dataset {name} reads your own file: pass --data-dir FILE")
    path = Path(data_dir).expanduser()
    if path.is_dir():
        raise DataError(f"--dataset {name}: {path} is a directory; pass the {name} file itself as --data-dir")
    if not path.is_file():
        raise DataError(f"--dataset {name}: file {path} does not exist")
    return path


def verify_data_file(name: str, data_dir: str | os.PathLike[str] | None, expected_md5: str) -> str:
    """The md5 of the ``npz``/``hdf5`` file; DataError if ``expected_md5`` is given and differs."""
    path = data_file(name, data_dir)
    actual = _md5(path)
    if expected_md5 and actual != expected_md5:
        raise DataError(f"{name} file {path} has md5 {actual}, but the run expects {expected_md5} (the file it "
                        f"was trained on); restore that file, or pass --data-md5 {actual} to go on with this one")
    return actual


def changed_data_warning(name: str, data_dir: str | os.PathLike[str] | None, trained_on: str) -> str | None:
    """A warning when the ``npz``/``hdf5`` file differs from the one a run trained on (md5
    ``trained_on``): evaluating on another file may be meant, so it is said, not refused."""
    if name not in FILE_DATASETS or not trained_on:
        return None
    actual = verify_data_file(name, data_dir, "")
    if actual == trained_on:
        return None
    return (f"psadv: warning: {name} file {data_file(name, data_dir)} has md5 {actual}, not {trained_on} (the file "
            "the run trained on): its test split may differ from the one the run was measured on")


_READ_KEYS = (*FILE_KEYS, "num_classes")


def _check_declared(declared: dict[str, tuple[np.dtype, tuple]], path: Path, source: str) -> None:
    """Bound what reading and converting the arrays will allocate, from their declared dtypes and
    shapes alone (:mod:`psadv.untrusted`): a small file must not declare gigabytes."""
    for key, (_, shape) in declared.items():
        if key == "num_classes" and shape != ():
            raise DataError(f"{source}: num_classes must be one integer >= 2, got an array of shape {shape}")
        if key.startswith("x_") and len(shape) not in (3, 4):
            raise DataError(f"{source}: {key} has shape {shape}; images must be N x C x H x W (or N x H x W)")
        if key.startswith("y_") and len(shape) != 1:
            raise DataError(f"{source}: {key} has shape {shape}; labels must be one integer per image")
    total = 0
    for key, (dtype, shape) in declared.items():
        converted = 4 if key.startswith("x_") else 8  # float32 images, int64 labels
        total += untrusted.declared_bytes(shape, dtype.itemsize) + untrusted.declared_bytes(shape, converted)
    untrusted.check_data_bytes(total, path, DataError, source)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not zipfile.is_zipfile(path):
        raise DataError(f"npz file {path} is not an npz archive (np.savez writes one)")
    source = f"npz file {path}"
    declared = untrusted.npz_headers(path, _READ_KEYS, DataError, source)
    _check_declared(declared, path, source)
    try:
        with np.load(path, allow_pickle=False) as archive:  # only the arrays psadv uses are read
            return {key: archive[key] for key in declared}
    except ValueError as exc:  # object arrays: they would need pickle
        raise DataError(f"npz file {path} holds an array psadv cannot read without pickle ({exc}); store "
                        "numeric arrays") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(f"npz file {path} is unreadable (truncated or corrupted?): {exc}") from None


def _read_hdf5(path: Path) -> dict[str, np.ndarray]:
    source = f"hdf5 file {path}"
    try:
        with h5py.File(path, "r") as f:
            datasets = {}
            for key in _READ_KEYS:
                obj = untrusted.hard_member(f, key, DataError, source)
                if obj is None:
                    continue
                if not isinstance(obj, h5py.Dataset):
                    raise DataError(f"hdf5 file {path}: {key!r} is a group, not a dataset")
                untrusted.check_dataset(obj, DataError, source)
                if obj.shape is None:
                    raise DataError(f"{source}: {key} is an empty dataset (no shape)")
                datasets[key] = obj
            _check_declared({key: (ds.dtype, tuple(ds.shape)) for key, ds in datasets.items()}, path, source)
            return {key: np.asarray(ds[()]) for key, ds in datasets.items()}
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"hdf5 file {path} is not a readable HDF5 file (truncated or corrupted?): {first}") from None


# The formats of your own file, each with its reader (a --dataset of one of these names is that file)
_FILE_READERS = {"npz": _read_npz, "hdf5": _read_hdf5}
FILE_DATASETS = tuple(_FILE_READERS)


def _check_images(x: np.ndarray, key: str, source: str) -> np.ndarray:
    """Images as float32 N×C×H×W in [0, 1], or DataError."""
    if x.dtype != np.uint8 and x.dtype.kind != "f":
        raise DataError(f"{source}: {key} has dtype {x.dtype}; images must be uint8 (0-255) or float in [0, 1]")
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise DataError(f"{source}: {key} has shape {x.shape}; images must be N x C x H x W (or N x H x W)")
    if x.shape[3] in (1, 3) and x.shape[1] not in (1, 3):
        raise DataError(f"{source}: {key} has shape {x.shape}, which looks channels-last (N x H x W x C); "
                        "store N x C x H x W, e.g. x.transpose(0, 3, 1, 2)")
    if len(x) == 0:
        raise DataError(f"{source}: {key} holds no images")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(255.0)
    x = x.astype(np.float32)
    bad = int(np.count_nonzero(~np.isfinite(x)))
    if bad:
        raise DataError(f"{source}: {key} holds {bad} NaN or infinite values")
    low, high = float(x.min()), float(x.max())
    if low < 0.0 or high > 1.0:
        raise DataError(f"{source}: {key} has values from {low:g} to {high:g}; float images must lie in [0, 1] "
                        "(or store uint8 0-255)")
    return x


def _check_labels(y: np.ndarray, key: str, count: int, source: str) -> np.ndarray:
    if y.dtype.kind not in "iu":
        raise DataError(f"{source}: {key} has dtype {y.dtype}; labels must be integers")
    if y.ndim != 1:
        raise DataError(f"{source}: {key} has shape {y.shape}; labels must be one integer per image")
    if len(y) != count:
        raise DataError(f"{source}: {key} has {len(y)} labels for {count} images")
    if y.min() < 0:
        raise DataError(f"{source}: {key} has a negative label ({int(y.min())})")
    return y.astype(np.int64)


def check_arrays(arrays: Mapping[str, np.ndarray], source: str) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], int]:
    """Validate a file's arrays: {split: (x float32 N×C×H×W in [0, 1], y int64)} and num_classes.

    Every problem is a one-line DataError naming ``source`` and the array.
    """
    missing = [key for key in FILE_KEYS if key not in arrays]
    if missing:
        raise DataError(f"{source} lacks {', '.join(repr(k) for k in missing)}; it needs the arrays "
                        f"{', '.join(FILE_KEYS)} (and optionally num_classes)")
    splits = {}
    for split in SPLITS:
        x = _check_images(np.asarray(arrays[f"x_{split}"]), f"x_{split}", source)
        splits[split] = (x, _check_labels(np.asarray(arrays[f"y_{split}"]), f"y_{split}", len(x), source))
    if splits["train"][0].shape[1:] != splits["test"][0].shape[1:]:
        raise DataError(f"{source}: train images are {splits['train'][0].shape[1:]} but test images "
                        f"{splits['test'][0].shape[1:]} (C x H x W)")
    top = max(int(y.max()) for _, y in splits.values())
    if top >= MAX_CLASSES:  # the model's last layer grows with it: a crafted label must not allocate gigabytes
        raise DataError(f"{source}: labels reach {top}; psadv takes at most {MAX_CLASSES} classes")
    if "num_classes" in arrays:
        given = np.asarray(arrays["num_classes"])
        if given.shape != () or given.dtype.kind not in "iu" or not 2 <= int(given) <= MAX_CLASSES:
            raise DataError(f"{source}: num_classes must be one integer from 2 to {MAX_CLASSES}, got {given!r}")
        num_classes = int(given)
        if top >= num_classes:
            raise DataError(f"{source}: labels reach {top}, but num_classes is {num_classes} (labels 0.."
                            f"{num_classes - 1})")
    else:
        num_classes = max(top + 1, 2)
    return splits, num_classes


def _load_file(name: str, data_dir: str | os.PathLike[str] | None) -> tuple[DatasetSpec, dict[str, Dataset]]:
    """Read, validate and cache the ``npz``/``hdf5`` file: its spec and both splits (read-only)."""
    path = data_file(name, data_dir)
    key = (str(path.resolve()), _md5(path))
    if key not in _FILE_CACHE:
        arrays = _FILE_READERS[name](path)
        splits, num_classes = check_arrays(arrays, f"{name} file {path}")
        datasets = {}
        for split, (x, y) in splits.items():
            x.flags.writeable = False
            y.flags.writeable = False
            datasets[split] = Dataset(x=x, y=y, name=name, split=split)
        spec = DatasetSpec(name=name, format=name, files={path.name: key[1]},
                           split_files={split: (path.name,) for split in SPLITS}, mirrors=(),
                           shape=tuple(int(d) for d in datasets["train"].x.shape[1:]), num_classes=num_classes,
                           train_size=len(datasets["train"]), test_size=len(datasets["test"]))
        _FILE_CACHE[key] = (spec, datasets)
    return _FILE_CACHE[key]


def shard_indices(n: int, seed: int, shard_index: int, shard_count: int) -> np.ndarray:
    """Indices of shard ``shard_index`` of ``shard_count`` disjoint shards covering ``range(n)``.

    A seeded permutation is cut into contiguous pieces whose sizes differ by at most one.
    """
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ConfigError(f"shard index {shard_index} out of range for {shard_count} shards "
                          f"(need 0 <= index < count)")
    if n < 0:
        raise ConfigError(f"cannot shard a negative number of examples ({n})")
    permutation = np.random.default_rng(seed).permutation(n)
    return np.array_split(permutation, shard_count)[shard_index].astype(np.int64)


class BatchStream:
    """Endless, deterministic, resumable stream of minibatch index arrays over ``indices``.

    Epoch ``e`` uses the order ``default_rng([seed, e]).permutation``, so the position
    ``{"epoch", "position"}`` alone is enough to resume the exact same sequence.
    """

    def __init__(self, indices: np.ndarray, batch_size: int, seed: int, drop_last: bool = True) -> None:
        self._indices = np.array(indices, dtype=np.int64).reshape(-1)
        if not 1 <= batch_size <= len(self._indices):
            raise ConfigError(f"batch size {batch_size} must be between 1 and the number of "
                              f"examples available ({len(self._indices)})")
        if seed < 0:
            raise ConfigError(f"seed must be non-negative, got {seed}")
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        full, rest = divmod(len(self._indices), batch_size)
        self.batches_per_epoch = full + (1 if rest and not drop_last else 0)
        self._epoch = 0
        self._position = 0
        self._order = self._epoch_order(0)

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from."""
        return self._epoch

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return self._indices[np.random.default_rng([self.seed, epoch]).permutation(len(self._indices))]

    def next(self) -> np.ndarray:
        """The next batch of indices (int64); the last batch of an epoch may be short if not drop_last."""
        start = self._position * self.batch_size
        batch = self._order[start:start + self.batch_size]
        self._position += 1
        if self._position == self.batches_per_epoch:
            self._epoch, self._position = self._epoch + 1, 0
            self._order = self._epoch_order(self._epoch)
        return batch

    __next__ = next

    def __iter__(self) -> BatchStream:
        return self

    def state(self) -> dict[str, int]:
        """Position of the next batch, to store in a checkpoint."""
        return {"epoch": self._epoch, "position": self._position}

    def restore(self, state: dict[str, int]) -> None:
        """Continue from a position returned by :meth:`state` (same indices, batch size and seed)."""
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"batch stream state {state!r} lacks integer 'epoch' and 'position'") from None
        if epoch < 0 or not 0 <= position < self.batches_per_epoch:
            raise CheckpointError(f"batch stream state {state!r} does not fit this stream "
                                  f"({self.batches_per_epoch} batches per epoch)")
        self._epoch, self._position = epoch, position
        self._order = self._epoch_order(epoch)
