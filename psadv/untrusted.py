"""Reading files that psadv did not write itself: checked before anything is allocated.

Checkpoints, exported ``.safetensors`` models and ``npz``/HDF5 data sets travel between people
and clusters; psadv reads them as data, and a crafted one must not read other files, allocate
without bound or steer where psadv writes (docs/design/security.md). The checks here run on a
file's *declarations* (links, layouts, shapes, dtypes, sizes), never on its values, so refusing a
74.5 GiB shape costs nothing:

* HDF5: every link psadv follows is a hard link inside the file (no external or soft links); no
  dataset has external storage (bytes from another file on the machine) or is virtual (a view of
  other files); every attribute psadv reads is one scalar of the expected kind; every dataset is
  numeric, and its declared bytes are bounded before it is read.
* npz: each array's ``.npy`` header (dtype and shape) is read and bounded before its data, and no
  array psadv does not need is read at all.
* Bounds: a checkpoint's datasets are stored the way psadv writes them (contiguous, unfiltered),
  so together they cannot declare more bytes than the file holds; a data set may be compressed, so
  its arrays may decode to :data:`DATA_EXPANSION` times the file's size (plus
  :data:`DATA_FLOOR`), and never to more than the machine's memory.

Every refusal is the caller's one-line error (``fail(text)`` returns the exception to raise).
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np

Fail = Callable[[str], Exception]

# Real image data compresses 2-10x (MNIST's IDX files 4.7x): an array that declares 100 times its
# file's size is a decompression bomb, not a data set. A small file may always declare 64 MiB.
DATA_EXPANSION = 100
DATA_FLOOR = 64 << 20
# psadv's own files hold a few hundred objects; a file of millions is built to exhaust memory.
MAX_OBJECTS = 100_000
NUMERIC_KINDS = "biuf"
# The most classes a data set (and so a model's last layer) may have: ImageNet-21k has 21,841.
MAX_CLASSES = 100_000
# The most input channels of a registry model (images have 1 or 3; a few more for other sensors).
MAX_CHANNELS = 64


def gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


def physical_memory() -> int:
    """Bytes of memory of this machine (0 when the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def declared_bytes(shape: tuple[int, ...] | None, itemsize: int) -> int:
    """Bytes an array of ``shape`` takes (Python integers: no overflow for crafted shapes)."""
    return 0 if shape is None else math.prod(int(d) for d in shape) * int(itemsize)


# --- HDF5 -------------------------------------------------------------------------------------

def hard_member(group: h5py.Group, name: str, fail: Fail, what: str):
    """``group[name]`` if it is reached by a hard link inside the file, None if there is no such
    link; an external link (another file) or a soft link is refused before it is followed."""
    try:
        link = group.get(name, getlink=True)
    except (KeyError, ValueError, OSError, RuntimeError):
        return None
    if link is None:
        return None
    if not isinstance(link, h5py.HardLink):
        kind = "an external link (to another file)" if isinstance(link, h5py.ExternalLink) else "a soft link"
        raise fail(f"{what}: {group.name.rstrip('/')}/{name} is {kind}; psadv reads only objects stored in the file")
    return group[name]


def check_dataset(ds: h5py.Dataset, fail: Fail, what: str, *, kinds: str = NUMERIC_KINDS,
                  stored_as_written: bool = False) -> int:
    """Refuse a dataset psadv must not read (virtual, external storage, not numeric; with
    ``stored_as_written``, also chunked or filtered or declaring more bytes than it stores, which
    a checkpoint psadv wrote never is); returns its declared bytes."""
    name = ds.name
    if ds.is_virtual:
        raise fail(f"{what}: dataset {name} is virtual (a view of other files); psadv reads only data stored in the file")
    dcpl = ds.id.get_create_plist()
    if dcpl.get_external_count() or ds.external:
        raise fail(f"{what}: dataset {name} keeps its bytes in another file (external storage); psadv reads only "
                   "data stored in the file")
    dtype = ds.dtype
    if dtype.kind not in kinds or dtype.fields is not None or dtype.subdtype is not None \
            or h5py.check_vlen_dtype(dtype) is not None:
        raise fail(f"{what}: dataset {name} has dtype {dtype}, not a plain number type")
    size = declared_bytes(ds.shape, dtype.itemsize)
    if stored_as_written:
        if dcpl.get_layout() not in (h5py.h5d.CONTIGUOUS, h5py.h5d.COMPACT) or dcpl.get_nfilters():
            raise fail(f"{what}: dataset {name} is chunked or compressed, which psadv never writes")
        if ds.shape is not None and ds.id.get_storage_size() < size:
            raise fail(f"{what}: dataset {name} declares shape {ds.shape} ({gib(size)}) but stores "
                       f"{gib(ds.id.get_storage_size())}")
    return size


def check_attribute(obj, name: str, fail: Fail, what: str, kind: str) -> None:
    """Refuse attribute ``name`` of ``obj`` unless it is one scalar of ``kind`` (``str`` or
    ``int``), before its value is read (a crafted shape would be allocated by the read)."""
    try:
        attr = h5py.h5a.open(obj.id, name.encode())
    except (KeyError, OSError, RuntimeError, ValueError):
        raise fail(f"{what}: attribute {name!r} of {obj.name} is missing or unreadable") from None
    shape, dtype = attr.shape, attr.dtype
    ok = h5py.check_string_dtype(dtype) is not None if kind == "str" else dtype.kind in "iu"
    if shape != () or not ok:
        raise fail(f"{what}: attribute {name!r} of {obj.name} is not one {kind} (shape {shape}, dtype {dtype})")


def check_structure(f: h5py.File, fail: Fail, what: str, *, byte_budget: int | None,
                    stored_as_written: bool) -> int:
    """Walk every link of ``f`` without following any out of the file: refuse external and soft
    links, datasets :func:`check_dataset` refuses, attributes that are not scalar strings or
    integers, more than :data:`MAX_OBJECTS` links, and datasets that together declare more than
    ``byte_budget`` bytes. Returns the declared bytes."""
    total = 0
    count = 0

    def visit(name: str, link) -> None:
        nonlocal total, count
        count += 1
        if count > MAX_OBJECTS:
            raise fail(f"{what}: more than {MAX_OBJECTS} objects")
        if not isinstance(link, h5py.HardLink):
            kind = "an external link (to another file)" if isinstance(link, h5py.ExternalLink) else "a soft link"
            raise fail(f"{what}: /{name} is {kind}; psadv reads only objects stored in the file")
        obj = f[name]
        for attr in obj.attrs.keys():
            attr_id = h5py.h5a.open(obj.id, attr.encode())
            if attr_id.shape not in ((), None) or not (h5py.check_string_dtype(attr_id.dtype) is not None
                                                       or attr_id.dtype.kind in "iu"):
                raise fail(f"{what}: attribute {attr!r} of /{name} is not one string or integer")
        if isinstance(obj, h5py.Dataset):
            total += check_dataset(obj, fail, what, stored_as_written=stored_as_written)
            if byte_budget is not None and total > byte_budget:
                raise fail(f"{what}: its datasets declare {gib(total)} or more, more than its {gib(byte_budget)} "
                           "allow; refused before reading")

    for attr in f.attrs.keys():
        attr_id = h5py.h5a.open(f.id, attr.encode())
        if attr_id.shape not in ((), None):
            raise fail(f"{what}: root attribute {attr!r} is not one value (shape {attr_id.shape})")
    # Names first, checks after: an exception raised inside h5py's visit callback does not come
    # back out cleanly (a SystemError); a non-None return stops the walk.
    names: list[str] = []
    f.visit_links(lambda name: names.append(name) or (True if len(names) > MAX_OBJECTS else None))
    for name in names:
        visit(name, f.get(name, getlink=True))
    return total


# --- data sets (npz and HDF5 files of the user's own data) -------------------------------------

def data_budget(path: Path) -> int:
    """Bytes a data file's arrays may decode to (see the module docstring)."""
    return max(DATA_FLOOR, DATA_EXPANSION * path.stat().st_size)


def check_data_bytes(total: int, path: Path, fail: Fail, what: str) -> None:
    """Refuse arrays that would decode to more than :func:`data_budget` or the machine's memory."""
    budget = data_budget(path)
    if total > budget:
        raise fail(f"{what}: its arrays declare {gib(total)}, more than {DATA_EXPANSION}x the file's size "
                   f"({gib(path.stat().st_size)}): corrupted or crafted; refused before reading")
    memory = physical_memory()
    if memory and total > memory:
        raise fail(f"{what}: its arrays need {gib(total)}, more than this machine's {gib(memory)} of memory")


def npz_headers(path: Path, keys: tuple[str, ...], fail: Fail, what: str) -> dict[str, tuple[np.dtype, tuple]]:
    """The dtype and shape of each of ``keys`` present in the npz at ``path``, from the ``.npy``
    headers only (no array data is read); object arrays (which need pickle) are refused."""
    out = {}
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            for key in keys:
                member = f"{key}.npy"
                if member not in names:
                    continue
                with archive.open(member) as handle:
                    version = np.lib.format.read_magic(handle)
                    if version == (1, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
                    elif version in ((2, 0), (3, 0)):
                        shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
                    else:
                        raise ValueError(f"unsupported .npy version {version}")
                if dtype.hasobject:
                    raise fail(f"{what}: {key} is an object array, which psadv cannot read without pickle; "
                               "store numeric arrays")
                if dtype.kind not in NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype is not None:
                    raise fail(f"{what}: {key} has dtype {dtype}, not a plain number type")
                out[key] = (dtype, tuple(int(d) for d in shape))
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        text = str(exc).strip().splitlines()
        raise fail(f"{what} is unreadable (truncated or corrupted?): {text[0] if text else type(exc).__name__}") \
            from None
    return out
