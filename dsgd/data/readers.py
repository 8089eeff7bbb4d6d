"""Readers for the image datasets in their standard on-disk layouts.

Each returns a normalized `Dataset` (see dataset.py): images (N, C, H, W) float32 normalized per
channel with full-train-set statistics, labels (N,) int64. Nothing is downloaded.

- Fashion-MNIST: the four IDX files, gzipped or not (Debian's dataset-fashion-mnist package
  installs them in /usr/share/datasets/fashion-mnist). (N, 1, 28, 28), 10 classes.
- CIFAR-10 / CIFAR-100: "CIFAR-10 python version" pickles. (N, 3, 32, 32), 10 / 100 (fine)
  classes. The pickles are read by a restricted unpickler that builds only what the real files
  hold (dicts, lists, bytes, str, numbers and numpy arrays), so a crafted file cannot run code.
- Tiny ImageNet: the tiny-imagenet-200 image folder; val/ serves as the test set. (N, 3, 64, 64),
  200 classes, class index = position of the wnid in sorted order (torchvision ImageFolder's).
"""

from __future__ import annotations

import gzip
import io
import math
import os
import pickle
import zlib
from concurrent.futures import ThreadPoolExecutor
from struct import error as struct_error

import numpy as np

from dsgd.data.dataset import Dataset, first, from_uint8_images
from dsgd.errors import UserError

_IDX_MAGIC = {3: 2051, 1: 2049}  # ndim -> magic number of an unsigned-byte IDX file


def read_idx(path: str, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file (gzipped when the name ends in .gz).

    Returns a uint8 array of `ndim` dimensions, e.g. (N, 28, 28) for images, (N,) for labels.
    """
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise UserError(f"cannot read IDX file {path}: {e}; re-download it") from None
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if magic != _IDX_MAGIC[ndim]:
        raise UserError(
            f"{path} is not an IDX file of {ndim}-d unsigned bytes: magic number {magic}, "
            f"expected {_IDX_MAGIC[ndim]}; re-download it"
        )
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    size = math.prod(dims)  # a Python int: np.prod of four uint32 would wrap around in int64
    if len(raw) != header + size:
        raise UserError(
            f"{path} is truncated or padded: header says {dims} = {size} bytes of "
            f"data, file holds {max(len(raw) - header, 0)}; re-download it"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find(data_dir: str, stem: str) -> str | None:
    for name in (stem, stem + ".gz"):
        if os.path.isfile(os.path.join(data_dir, name)):
            return os.path.join(data_dir, name)
    return None


def read_fashion_mnist(
    data_dir: str,
    *,
    n_train: int | None = None,
    n_test: int | None = None,
    image_size: int | None = None,
) -> Dataset:
    """Fashion-MNIST from its four IDX files in `data_dir`.

    Returns x as (N, 1, 28, 28) float32 (or image_size x image_size), y as (N,) int64.
    """
    stems = [
        "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
    ]
    paths = [_find(data_dir, s) for s in stems]
    if None in paths:
        raise UserError(
            f"Fashion-MNIST not found in {data_dir}: expected {', '.join(stems)} "
            "(each optionally .gz); pass --set data.dir=PATH or run `make data`"
        )
    xtr, ytr, xte, yte = (read_idx(p, nd) for p, nd in zip(paths, (3, 1, 3, 1), strict=True))
    for x, y, split in ((xtr, ytr, "train"), (xte, yte, "t10k")):
        if len(x) != len(y):
            raise UserError(
                f"Fashion-MNIST in {data_dir}: {split} has {len(x)} images but {len(y)} labels; "
                "re-download it"
            )
    return from_uint8_images(
        "fashion-mnist", 10, xtr[:, None], ytr, xte[:, None], yte, n_train, n_test, image_size
    )


try:  # numpy 2 moved these; pickles written by numpy 1 name numpy.core, which numpy 2 aliases
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
    from numpy._core.numeric import _frombuffer as _np_frombuffer
except ImportError:  # numpy 1
    from numpy.core.multiarray import _reconstruct as _np_reconstruct
    from numpy.core.numeric import _frombuffer as _np_frombuffer

_ARRAY = object()  # stands in for numpy.ndarray: only _reconstruct may receive it, so a file
# cannot call ndarray(shape) directly (an allocation of the file's choosing)


def _reconstruct(subtype, shape, dtype):
    if subtype is not _ARRAY:
        raise pickle.UnpicklingError("numpy _reconstruct of something other than an ndarray")
    return _np_reconstruct(np.ndarray, shape, dtype)


def _latin1(text: str, encoding: str = "utf-8") -> bytes:
    # protocol-2 pickles written by Python 3 store bytes as latin-1 text; no other codec
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refused _codecs.encode with {encoding!r}")
    return text.encode("latin-1")


# The globals a CIFAR python-version pickle needs: numpy arrays as written by numpy 1 and 2
# (protocols 2-5) and the latin-1 bytes of a protocol-2 pickle written by Python 3. Each maps
# to a function that builds data and nothing else; every other global is refused, so a
# ``__reduce__`` payload (os.system, builtins.eval, ...) is never called.
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _np_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _np_frombuffer,
    ("numpy", "ndarray"): _ARRAY,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1,
}
_PICKLE_VALUES = (dict, list, tuple, bytes, bytearray, str, int, float, bool, type(None),
                  np.ndarray)


class _CifarUnpickler(pickle._Unpickler):
    """Admits only _PICKLE_GLOBALS (see there), and a numpy dtype only with its own canonical
    state: ``dtype.__setstate__`` given a damaged state can corrupt numpy's internals. (The
    pure-Python unpickler, whose BUILD opcode can be intercepted; a CIFAR file is a few large
    bytes objects, so it is not slower in practice.)"""

    dispatch = dict(pickle._Unpickler.dispatch)

    def load_build(self):
        state, inst = self.stack[-1], self.stack[-2]
        if isinstance(inst, np.dtype):
            # a Python 2 pickle read with encoding="bytes" holds the byte order as b"|"
            plain = (tuple(v.decode("latin-1") if isinstance(v, bytes) else v for v in state)
                     if isinstance(state, tuple) else state)
            if plain != inst.__reduce__()[2]:
                raise pickle.UnpicklingError(f"refused a damaged state for dtype {inst}")
            self.stack.pop()  # the state is the one the dtype already has
            return
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build

    def find_class(self, module: str, name: str):
        try:
            return _PICKLE_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise pickle.UnpicklingError(f"refused to load {module}.{name}") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused a persistent id")


def _load_pickle(path: str) -> dict:
    """A CIFAR pickle as a dict, or UserError naming the file (never runs code from it)."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        d = _CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            ImportError, IndexError, KeyError, OverflowError, MemoryError, RecursionError,
            UnicodeDecodeError, struct_error, SystemError) as e:
        # SystemError: numpy's dtype constructor, handed a corrupted argument by a damaged
        # file, can fail without setting an exception
        raise UserError(
            f"{path} is not a CIFAR python-version pickle ({type(e).__name__}: "
            f"{str(e)[:120]}); re-download it"
        ) from None
    if not isinstance(d, dict) or not all(isinstance(v, _PICKLE_VALUES) for v in d.values()):
        raise UserError(f"{path} does not hold a dict of arrays and lists, as a CIFAR "
                        "python-version pickle does; re-download it")
    return d


def _unpickle(path: str, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR pickle -> images (N, 3, 32, 32) uint8 and labels (N,) int64."""
    try:
        d = _load_pickle(path)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e}") from None
    data, labels = d.get(b"data"), d.get(label_key)
    if data is None or labels is None:
        raise UserError(
            f"{path} is not a CIFAR python-version pickle with keys b'data' and {label_key!r} "
            f"(it has {sorted(map(repr, d))[:6]}); re-download it"
        )
    ints = isinstance(labels, list) and all(type(v) is int for v in labels)
    if isinstance(labels, np.ndarray) and labels.ndim == 1 and labels.dtype.kind in "iu":
        ints, labels = True, labels.tolist()
    if not isinstance(data, np.ndarray) or not ints:
        raise UserError(
            f"{path}: expected b'data' as a uint8 array and {label_key!r} as a list of ints, "
            f"got {type(data).__name__} and {type(labels).__name__}; re-download it"
        )
    if data.dtype != np.uint8 or data.shape[1:] != (3072,) or len(labels) != len(data):
        raise UserError(
            f"{path}: expected b'data' as (N, 3072) uint8 and N labels, got {data.dtype} "
            f"{data.shape} and {len(labels)} labels; re-download it"
        )
    labels = np.asarray(labels, dtype=np.int64) if len(labels) else np.zeros(0, np.int64)
    # Each row is the red plane, then green, then blue, each 32x32 row-major: exactly CHW.
    return data.reshape(-1, 3, 32, 32), labels


def _read_cifar(
    data_dir: str, subdir: str, train: list[str], test: str, label_key: bytes, name: str,
    num_classes: int, n_train: int | None, n_test: int | None, image_size: int | None,
) -> Dataset:
    root = os.path.join(data_dir, subdir)
    root = root if os.path.isdir(root) else data_dir
    missing = [f for f in [*train, test] if not os.path.isfile(os.path.join(root, f))]
    if missing:
        raise UserError(
            f"{name} not found in {data_dir}: expected {', '.join(train)} and {test} (the python "
            f"version of {name}, directly or under {subdir}/); pass --set data.dir=PATH"
        )
    parts = [_unpickle(os.path.join(root, f), label_key) for f in train]
    xte, yte = _unpickle(os.path.join(root, test), label_key)
    xtr = np.concatenate([p[0] for p in parts])
    ytr = np.concatenate([p[1] for p in parts])
    return from_uint8_images(name, num_classes, xtr, ytr, xte, yte, n_train, n_test, image_size)


def read_cifar10(
    data_dir: str,
    *,
    n_train: int | None = None,
    n_test: int | None = None,
    image_size: int | None = None,
) -> Dataset:
    """CIFAR-10 (python version): data_batch_1..5 and test_batch in `data_dir` or in
    `data_dir/cifar-10-batches-py`. Returns x as (N, 3, 32, 32) float32, y as (N,) int64."""
    train = [f"data_batch_{i}" for i in range(1, 6)]
    return _read_cifar(
        data_dir, "cifar-10-batches-py", train, "test_batch", b"labels", "CIFAR-10", 10,
        n_train, n_test, image_size,
    )


def read_cifar100(
    data_dir: str,
    *,
    n_train: int | None = None,
    n_test: int | None = None,
    image_size: int | None = None,
) -> Dataset:
    """CIFAR-100 (python version, fine labels): train and test in `data_dir` or in
    `data_dir/cifar-100-python`. Returns x as (N, 3, 32, 32) float32, y as (N,) int64."""
    return _read_cifar(
        data_dir, "cifar-100-python", ["train"], "test", b"fine_labels", "CIFAR-100", 100,
        n_train, n_test, image_size,
    )


_IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")


def _decode(paths: list[str]) -> np.ndarray:
    """Decode image files to one (N, 3, H, W) uint8 array; all must share one size."""
    from PIL import Image

    def load(path: str) -> np.ndarray:
        with Image.open(path) as im:  # Tiny ImageNet holds some grayscale JPEGs
            return np.asarray(im.convert("RGB"))

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # Pillow drops the GIL
        arrays = list(pool.map(load, paths))
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        raise UserError(f"images differ in size ({sorted(sizes)[:3]}...); expected one size")
    if not arrays:
        return np.zeros((0, 3, 64, 64), dtype=np.uint8)
    return np.stack(arrays).transpose(0, 3, 1, 2)


def _images_in(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(_IMAGE_EXTENSIONS))
    return [os.path.join(folder, n) for n in names]


def read_tiny_imagenet(
    data_dir: str,
    *,
    n_train: int | None = None,
    n_test: int | None = None,
    image_size: int | None = None,
) -> Dataset:
    """Tiny ImageNet from its image folder (`data_dir` or `data_dir/tiny-imagenet-200`):
    wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG with val/val_annotations.txt.

    The validation split is the test set. Only the first n_train / n_test images are decoded
    (train ordered round-robin over classes, val in annotation order). Returns x as
    (N, 3, 64, 64) float32 (or image_size x image_size), y as (N,) int64; channel statistics
    are from the decoded train images.
    """
    sub = os.path.join(data_dir, "tiny-imagenet-200")
    root = sub if os.path.isdir(sub) else data_dir
    wnids_file = os.path.join(root, "wnids.txt")
    annotations = os.path.join(root, "val", "val_annotations.txt")
    if not (os.path.isfile(wnids_file) and os.path.isfile(annotations)):
        raise UserError(
            f"Tiny ImageNet not found in {data_dir}: expected wnids.txt, train/<wnid>/images/ and "
            "val/images/ with val/val_annotations.txt (directly or under tiny-imagenet-200/); "
            "pass --set data.dir=PATH"
        )
    with open(wnids_file) as f:
        wnids = sorted({line.strip() for line in f if line.strip()})
    index = {w: i for i, w in enumerate(wnids)}


    # Round-robin over classes (file 0 of every class, then file 1, ...), so that the first
    # n_train images of a quick run cover all classes.
    per_class = [_images_in(os.path.join(root, "train", w, "images")) for w in wnids]
    ranked = sorted(
        (rank, label, path)
        for label, files in enumerate(per_class)
        for rank, path in enumerate(files)
    )
    train_paths = [path for _, _, path in ranked]
    train_labels = [label for _, label, _ in ranked]
    val_paths, val_labels = [], []
    with open(annotations) as f:
        for line in f:
            fields = line.split("\t")
            if len(fields) < 2:
                continue
            if fields[1] not in index:
                raise UserError(f"{annotations}: wnid {fields[1]} is not in wnids.txt; re-download")
            val_paths.append(os.path.join(root, "val", "images", fields[0]))
            val_labels.append(index[fields[1]])
    if not train_paths or not val_paths:
        raise UserError(f"Tiny ImageNet in {root} has no train or no val images; re-download it")

    k_train = first(n_train, "n_train", len(train_paths))
    k_test = first(n_test, "n_test", len(val_paths))
    try:
        xtr, xte = _decode(train_paths[:k_train]), _decode(val_paths[:k_test])
    except OSError as e:
        raise UserError(f"cannot decode an image in {root}: {e}; re-download it") from None
    return from_uint8_images(
        "tiny-imagenet", len(wnids), xtr, np.array(train_labels[:k_train]), xte,
        np.array(val_labels[:k_test]), image_size=image_size,
    )
