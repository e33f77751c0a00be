"""Random-access image sources (grain's RandomAccessDataSource protocol) and `load_dataset`.

Every source yields {"image": uint8 [H, W, C], "label": int32 scalar}, is picklable (grain workers get a
copy) and has a stable `repr`, which grain compares when an iterator state is restored. Splits are decided
here, once, deterministically from the seed, and each split carries a fingerprint so feature caches and run
records can tell whether the data changed.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
ACCEPTED_FORMS = "'digits', 'mnist', 'fashion_mnist', 'folder:<path>', 'tfds:<name>[:<version>]', 'vtab:<task>'"

IDX_CLASS_NAMES = {
    "mnist": [str(i) for i in range(10)],
    "fashion_mnist": [
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ],
}  # fmt: skip
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_SYSTEM_DATASETS = "/usr/share/datasets"  # where Debian's dataset-* packages install


class Source(Protocol):
    """What the pipeline needs: random access plus a cheap label lookup (for splits and few-shot)."""

    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> dict[str, np.ndarray]: ...
    def label(self, index: int) -> int: ...


@dataclass
class Dataset:
    """A dataset resolved into fixed train / val / test sources."""

    name: str  # e.g. "digits", "tfds:cifar10:3.0.2", "tfds:eurosat/rgb:2.0.0", "folder:/path"
    class_names: list[str]
    splits: dict[str, Source]  # always "train", "val", "test"
    fingerprint: dict[str, str]  # per split: sha256 of everything that defines its content

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# ---------------------------------------------------------------------------------------------------- sources


class ArraySource:
    """Images held in memory: uint8 [N, H, W, C] with int32 labels [N] (digits, IDX files)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, description: str):
        if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(labels):
            raise ValueError(f"expected uint8 [N, H, W, C] and N labels, got {images.shape} {images.dtype}")
        self.images = images
        self.labels = np.asarray(labels, np.int32)
        self.description = description

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"image": self.images[index], "label": self.labels[index]}

    def label(self, index: int) -> int:
        return int(self.labels[index])

    def __repr__(self) -> str:
        return f"ArraySource({self.description!r}, n={len(self)})"


class FolderSource:
    """Image files decoded lazily with PIL and converted to RGB; `paths` are relative to `root`.

    Nothing is decoded up front (a folder of millions of images lists in seconds), so a file that cannot be
    decoded is found when it is read: it comes back as a 1x1 placeholder with "readable" False (every record
    carries the flag), is logged once and recorded in `unreadable` (this process's indices). Evaluation
    masks such records out and training replaces them (`SkipUnreadable`); both rules depend only on the
    index, so every host and every resumed run treat the same files the same way. `known_bad` (indices a
    `verify_folder` pass found unreadable) are flagged without being opened.
    """

    def __init__(self, root: str, paths: list[str], labels: np.ndarray, known_bad: Iterable[int] = ()):
        self.root = root
        self.paths = paths
        self.labels = np.asarray(labels, np.int32)
        self.known_bad = frozenset(int(i) for i in known_bad)
        self.unreadable: set[int] = set()
        self._digest = _digest(paths)  # not of known_bad: a verify pass changes no record, only the work

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if index in self.known_bad:
            return self._placeholder(index)
        path = os.path.join(self.root, self.paths[index])
        try:
            image = decode_rgb(path)
        except DECODE_ERRORS as e:
            if index not in self.unreadable:
                log.warning("unreadable image skipped: %s (%s)", path, e)
                self.unreadable.add(index)
            return self._placeholder(index)
        return {"image": image, "label": self.labels[index], "readable": np.True_}

    def _placeholder(self, index: int) -> dict[str, np.ndarray]:
        return {"image": np.zeros((1, 1, 3), np.uint8), "label": self.labels[index], "readable": np.False_}

    def label(self, index: int) -> int:
        return int(self.labels[index])

    def __repr__(self) -> str:
        return f"FolderSource({self.root!r}, n={len(self)}, files={self._digest[:16]})"


class TfdsSource:
    """One split of a prepared TFDS dataset read through array_record (`tfds.data_source`), no TensorFlow.

    The reader is opened lazily in each process, so pickling to grain workers sends only names. `split` may be
    a TFDS slice ("train[:90%]"); `label_key` names the ClassLabel feature read as the label.
    """

    def __init__(self, name: str, split: str, data_dir: str | None, length: int, label_key: str = "label"):
        self.name = name  # "cifar10", "cifar10:3.0.2" or "eurosat/rgb:2.0.0"
        self.split = split
        self.data_dir = data_dir
        self.label_key = label_key
        self._length = length
        self._reader: Any = None
        self._label_reader: Any = None

    def _open(self, skip_image: bool) -> Any:
        import tensorflow_datasets as tfds

        builder = tfds.builder(self.name, data_dir=self.data_dir)
        decoders = {"image": tfds.decode.SkipDecoding()} if skip_image else None
        return builder.as_data_source(self.split, decoders=decoders)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if self._reader is None:
            self._reader = self._open(skip_image=False)
        example = self._reader[int(index)]
        return {"image": np.asarray(example["image"], np.uint8), "label": np.int32(example[self.label_key])}

    def label(self, index: int) -> int:
        # Parses the record but skips the image decode: cheap enough to scan for few-shot selection.
        if self._label_reader is None:
            self._label_reader = self._open(skip_image=True)
        return int(self._label_reader[int(index)][self.label_key])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_reader": None, "_label_reader": None}

    def __repr__(self) -> str:
        label = "" if self.label_key == "label" else f", label={self.label_key!r}"
        return f"TfdsSource({self.name!r}, split={self.split!r}, n={len(self)}{label})"


class Subset:
    """A fixed selection of a parent source's examples (carved splits, few-shot)."""

    def __init__(self, parent: Source, indices: np.ndarray):
        self.parent = parent
        self.indices = np.asarray(indices, np.int64)
        self._digest = _digest(self.indices.tobytes())

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self.parent[int(self.indices[index])]

    def label(self, index: int) -> int:
        return self.parent.label(int(self.indices[index]))

    def __repr__(self) -> str:
        return f"Subset({self.parent!r}, n={len(self)}, indices={self._digest[:16]})"


class SkipUnreadable:
    """A training view of a source: an unreadable record (flag "readable" False) is replaced by the next
    readable record of the same class after it, cyclically. The replacement is a function of the index
    alone, so training streams stay identical across hosts and resumes, and class balance is kept."""

    def __init__(self, source: Source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        record = self.source[index]
        if record.get("readable", True):
            return record
        n, label = len(self.source), self.source.label(int(index))
        for step in range(1, n):
            j = (int(index) + step) % n
            if self.source.label(j) == label:
                record = self.source[j]
                if record.get("readable", True):
                    return record
        raise ValueError(
            f"every training image of class {label} is unreadable (e.g. record {index} of {self.source!r}); "
            "run `python -m launch.verify --folder <path>` to list them"
        )

    def label(self, index: int) -> int:
        return self.source.label(index)

    def __repr__(self) -> str:
        return f"SkipUnreadable({self.source!r})"


def decode_rgb(path: str) -> np.ndarray:
    """Any PIL-readable file → uint8 [H, W, 3]; palette, grey and alpha images are converted."""
    with Image.open(path) as image:
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")  # PIL warns when a transparent palette goes straight to RGB
        return np.asarray(image.convert("RGB"))


DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)  # what PIL raises on bad files


def _is_readable(path: str) -> bool:
    # A real (reduced-scale for JPEG) decode: Image.verify() misses truncated JPEGs.
    try:
        with Image.open(path) as image:
            image.draft("RGB", (64, 64))
            image.load()
        return True
    except DECODE_ERRORS:
        return False


# ---------------------------------------------------------------------------------------------------- helpers


def _digest(obj: Any) -> str:
    """sha256 of bytes, or of the canonical JSON of anything JSON-able."""
    data = obj if isinstance(obj, bytes) else json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(data).hexdigest()


def split_labels(source: Source) -> np.ndarray:
    """Every label of a source, in order (int32), read without decoding images."""
    return np.fromiter((source.label(i) for i in range(len(source))), np.int32, count=len(source))


def _split_counts(n: int, fractions: dict[str, float]) -> dict[str, int]:
    return {name: round(n * f) for name, f in fractions.items()}


def stratified_split(labels: np.ndarray, fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """Per class, a seeded permutation; `fractions` of each class go to the named splits, the rest to "train".

    Stratifying keeps small classes present in every split, which matters for tiny folders and few classes.
    Each split's indices come back sorted, so evaluation reads in dataset order.
    """
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in ("train", *fractions)}
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        start = 0
        for name, count in _split_counts(len(members), fractions).items():
            parts[name].append(members[start : start + count])
            start += count
        parts["train"].append(members[start:])
    return {name: np.sort(np.concatenate(p)).astype(np.int64) for name, p in parts.items()}


def random_split(n: int, fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """Like `stratified_split` without labels: for sources where a label costs reading the whole record."""
    order = np.random.default_rng(seed).permutation(n)
    out, start = {}, 0
    for name, count in _split_counts(n, fractions).items():
        out[name] = np.sort(order[start : start + count])
        start += count
    out["train"] = np.sort(order[start:])
    return out


def few_shot_indices(source: Source, class_names: list[str], k: int, seed: int) -> np.ndarray:
    """k examples per class: the first k of each class met along a seeded permutation (stops when full)."""
    counts = np.zeros(len(class_names), np.int64)
    chosen = []
    for i in np.random.default_rng(seed).permutation(len(source)):
        label = source.label(int(i))
        if counts[label] < k:
            counts[label] += 1
            chosen.append(int(i))
            if len(chosen) == k * len(class_names):
                break
    short = np.flatnonzero(counts < k)
    if len(short):
        name = class_names[short[0]]
        raise ValueError(
            f"few_shot_k={k} but class {name!r} has only {counts[short[0]]} training example(s)"
            + (f" ({len(short)} classes are short)" if len(short) > 1 else "")
        )
    return np.sort(np.asarray(chosen, np.int64))


@dataclass
class _Resolved:
    """A loader's result before few-shot selection: sources plus what identifies each split's content."""

    name: str
    class_names: list[str]
    splits: dict[str, Source]
    identity: dict[str, dict]


def _carve(
    base: Source, identity: dict, fractions: dict[str, float], seed: int, stratified: bool = True
) -> tuple[dict[str, Source], dict[str, dict]]:
    """Split one source into "train" plus the named fractions; identities record the rule and the outcome."""
    if stratified:
        parts = stratified_split(split_labels(base), fractions, seed)
    else:
        parts = random_split(len(base), fractions, seed)
    rule = {"stratified": stratified, "fractions": fractions, "seed": seed}
    splits = {name: Subset(base, idx) for name, idx in parts.items()}
    ids = {
        name: {**identity, "carve": {**rule, "part": name, "indices": _digest(idx.tobytes())}}
        for name, idx in parts.items()
    }
    return splits, ids


# ---------------------------------------------------------------------------------------------------- digits


def _load_digits(val_fraction: float, test_fraction: float, seed: int) -> _Resolved:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are 0..16; scale to the 0..255 range every PreprocessSpec assumes.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # [1797, 8, 8, 1]
    labels = digits.target.astype(np.int32)
    base = ArraySource(images, labels, "digits")
    identity = {"source": "digits", "content": _digest(images.tobytes() + labels.tobytes())}
    splits, ids = _carve(base, identity, {"val": val_fraction, "test": test_fraction}, seed)
    return _Resolved("digits", [str(i) for i in range(10)], splits, ids)


# ---------------------------------------------------------------------------------------------------- IDX


def read_idx(path: str) -> np.ndarray:
    """An IDX file (raw or .gz) of unsigned bytes → uint8 array with the shape its header declares."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (header {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {body.size} values")
    return body.reshape(shape)


def _idx_dirs(name: str, data_dir: str | None) -> list[str]:
    if data_dir is not None:
        return [data_dir, os.path.join(data_dir, name)]
    dirs = []
    if os.environ.get("FXJAX_DATA_DIR"):
        dirs.append(os.path.join(os.environ["FXJAX_DATA_DIR"], name))
    dirs.append(os.path.join(_SYSTEM_DATASETS, name.replace("_", "-")))
    return dirs


def _first_file(directory: str, stem: str) -> str | None:
    candidates = (os.path.join(directory, stem + ext) for ext in ("", ".gz"))
    return next((p for p in candidates if os.path.isfile(p)), None)


def _find_idx_files(name: str, data_dir: str | None) -> dict[str, tuple[str, str]]:
    """{split: (images path, labels path)} from the first directory holding all four files."""
    for directory in _idx_dirs(name, data_dir):
        found = {}
        for split, stems in _IDX_FILES.items():
            paths = [_first_file(directory, stem) for stem in stems]
            if None in paths:
                break
            found[split] = (paths[0], paths[1])
        else:
            return found
    hint = "`apt-get install dataset-fashion-mnist` provides them, or put" if name == "fashion_mnist" else "put"
    raise FileNotFoundError(
        f"{name}: IDX files not found in {', '.join(_idx_dirs(name, data_dir))}; {hint} "
        "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte "
        f"(optionally .gz) in data_dir or $FXJAX_DATA_DIR/{name}"
    )


def _load_idx(name: str, data_dir: str | None, val_fraction: float, seed: int) -> _Resolved:
    splits: dict[str, Source] = {}
    identity: dict[str, dict] = {}
    for split, (image_path, label_path) in _find_idx_files(name, data_dir).items():
        images = read_idx(image_path)[..., None]  # [N, 28, 28, 1]
        labels = read_idx(label_path).astype(np.int32)
        base = ArraySource(images, labels, f"{name}:{split}")
        content = {"source": name, "content": _digest(images.tobytes() + labels.tobytes())}
        if split == "test":
            splits["test"], identity["test"] = base, content
        else:
            carved, ids = _carve(base, content, {"val": val_fraction}, seed)
            splits.update(carved)
            identity.update(ids)
    return _Resolved(name, IDX_CLASS_NAMES[name], splits, identity)


# ---------------------------------------------------------------------------------------------------- folders


def _visible(entries: Iterable[str]) -> list[str]:
    return sorted(e for e in entries if not e.startswith("."))


def _subdirs(path: str) -> list[str]:
    with os.scandir(path) as it:
        return _visible(e.name for e in it if e.is_dir())


@dataclass
class _Listing:
    """A split's image files, found by `os.scandir` alone: names, labels, (size, mtime_ns); nothing decoded."""

    paths: list[str]  # relative to the root
    labels: list[int]
    stats: list[tuple[int, int]]


def _scan_split(root: str, split_dir: str, class_names: list[str]) -> _Listing:
    """The images under root/split_dir/<class>/, in sorted order; one scandir per class, one stat per file."""
    listing = _Listing([], [], [])
    for label, cls in enumerate(class_names):
        cls_dir = os.path.join(root, split_dir, cls)
        if not os.path.isdir(cls_dir):
            continue
        with os.scandir(cls_dir) as it:
            entries = sorted(
                (
                    e
                    for e in it
                    if not e.name.startswith(".")
                    and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
                    and e.is_file()
                ),
                key=lambda e: e.name,
            )
        for entry in entries:
            st = entry.stat()
            listing.paths.append(os.path.join(split_dir, cls, entry.name))
            listing.labels.append(label)
            listing.stats.append((st.st_size, st.st_mtime_ns))
    return listing


def _list_folder(root: str) -> tuple[list[str], str, dict[str, _Listing]]:
    """(class names, class folder, {split dir: listing}) of a folder dataset; split dir "" when it has none."""
    if os.path.isfile(root):
        raise NotADirectoryError(f"folder dataset {root} is a file, not a folder of class subfolders")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"folder dataset {root} does not exist")
    top = _subdirs(root)
    has_split_dirs = "train" in top and set(top) <= set(SPLITS)
    present = [s for s in SPLITS if s in top] if has_split_dirs else [""]
    class_dir = os.path.join(root, "train") if has_split_dirs else root
    class_names = _subdirs(class_dir)
    if len(class_names) < 2:
        raise ValueError(f"{class_dir}: need at least 2 classes (one subfolder each), found {class_names}")
    for split in present[1:]:
        extra = sorted(set(_subdirs(os.path.join(root, split))) - set(class_names))
        if extra:
            raise ValueError(f"{os.path.join(root, split)} has classes missing from train/: {extra}")
    return class_names, class_dir, {split: _scan_split(root, split, class_names) for split in present}


# ------------------------------------------------------------------------------- verified index (launch/verify)

INDEX_FORMAT = 1


def folder_index_path(root: str, cache_dir: str | None = None) -> str:
    """Where `verify_folder` keeps a folder's index: <cache root>/folders/<sha256 of the path>.json.

    The cache root follows the feature cache's rule (config.cache_dir, else $FXJAX_CACHE_DIR, else
    $XDG_CACHE_HOME/fxjax, else ~/.cache/fxjax), so the index sits beside the features of the same data.
    """
    if cache_dir:
        base = os.path.expanduser(cache_dir)
    elif os.environ.get("FXJAX_CACHE_DIR"):
        base = os.path.expanduser(os.environ["FXJAX_CACHE_DIR"])
    else:
        base = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fxjax")
    return os.path.join(base, "folders", _digest(os.path.abspath(root))[:32] + ".json")


def verify_folder(root: str, cache_dir: str | None = None, workers: int | None = None) -> dict[str, Any]:
    """Decode every image of a folder dataset once, in a thread pool (PIL decodes outside the GIL), and store
    the unreadable ones with their (size, mtime_ns) in `folder_index_path`; later loads flag them without
    opening them. Returns {"root", "index", "files", "unreadable": [relative paths]}."""
    root = os.path.abspath(os.path.expanduser(root))
    _, _, listings = _list_folder(root)
    paths = [p for listing in listings.values() for p in listing.paths]
    stats = [st for listing in listings.values() for st in listing.stats]
    with ThreadPoolExecutor(max_workers=workers or min(32, 4 * (os.cpu_count() or 1))) as pool:
        readable = list(pool.map(lambda p: _is_readable(os.path.join(root, p)), paths, chunksize=256))
    bad = {p: list(st) for p, st, ok in zip(paths, stats, readable, strict=True) if not ok}
    index = {"format": INDEX_FORMAT, "root": root, "files": len(paths), "unreadable": bad}
    path = folder_index_path(root, cache_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(index, f, sort_keys=True)
    os.replace(tmp, path)  # readers see the old index or the new one, never half of one
    return {"root": root, "index": path, "files": len(paths), "unreadable": sorted(bad)}


def _known_bad(root: str, cache_dir: str | None) -> dict[str, tuple[int, int]]:
    """Unreadable files from a verify pass, {relative path: (size, mtime_ns)}; {} when there is none."""
    path = folder_index_path(root, cache_dir)
    try:
        with open(path) as f:
            index = json.load(f)
    except FileNotFoundError:
        return {}
    if index.get("format") != INDEX_FORMAT or index.get("root") != root:
        log.warning("ignoring %s: written for another folder or format; rerun launch.verify", path)
        return {}
    return {p: tuple(st) for p, st in index["unreadable"].items()}


def _load_folder(
    root: str, val_fraction: float, test_fraction: float, seed: int, cache_dir: str | None = None
) -> _Resolved:
    root = os.path.abspath(os.path.expanduser(root))
    class_names, class_dir, listings = _list_folder(root)
    present = list(listings)
    counts = np.bincount(np.asarray(listings[present[0]].labels, np.int64), minlength=len(class_names))
    if (counts == 0).any():
        empty = [os.path.join(class_dir, class_names[i]) for i in np.flatnonzero(counts == 0)]
        raise ValueError(f"class folder(s) with no images: {', '.join(empty)}")
    bad = _known_bad(root, cache_dir)  # a file changed since verify (size or mtime) is read again

    def source(split: str) -> tuple[FolderSource, dict]:
        listing = listings[split]
        files = [(p, *st) for p, st in zip(listing.paths, listing.stats, strict=True)]
        identity = {"source": "folder", "content": _digest(files)}  # (path, size, mtime_ns) of every file
        known = [i for i, (p, st) in enumerate(zip(listing.paths, listing.stats, strict=True)) if bad.get(p) == st]
        return FolderSource(root, listing.paths, np.asarray(listing.labels), known), identity

    base, identity = source(present[0])
    if bad:
        good = np.bincount(np.delete(base.labels, sorted(base.known_bad)), minlength=len(class_names))
        if (good == 0).any():
            empty = [os.path.join(class_dir, class_names[i]) for i in np.flatnonzero(good == 0)]
            raise ValueError(f"class folder(s) with no readable images (launch.verify): {', '.join(empty)}")
    to_carve = {name: f for name, f in (("val", val_fraction), ("test", test_fraction)) if name not in present}
    splits, ids = _carve(base, identity, to_carve, seed)
    for split in present[1:]:
        splits[split], ids[split] = source(split)
    return _Resolved(f"folder:{root}", class_names, splits, ids)


# ---------------------------------------------------------------------------------------------------- TFDS


def open_tfds_builder(full: str, data_dir: str | None) -> Any:
    """The builder of a prepared array_record TFDS dataset ("name[/config][:version]"); errors say how to prepare."""
    import tensorflow_datasets as tfds

    root = data_dir or tfds.core.constants.DATA_DIR
    prepare = (
        "prepare it once with `pip install tensorflow tensorflow-datasets && "
        f"tfds build {full} --data_dir {root} --file_format array_record` "
        "(TensorFlow is only needed for that step; reading needs no TensorFlow)"
    )
    try:
        builder = tfds.builder(full, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(f"TFDS dataset {full!r} is neither registered nor prepared in {root}") from None
    if not builder.is_prepared():
        raise FileNotFoundError(f"TFDS dataset {full!r} is not prepared in {root}: {prepare}")
    try:
        builder.as_data_source(next(iter(builder.info.splits)))
    except NotImplementedError:
        raise FileNotFoundError(f"TFDS dataset {full!r} in {root} is not in array_record format: {prepare}") from None
    return builder


def pinned_tfds_name(info: Any) -> str:
    """The exact "name[/config]:version" a TFDS `info` describes. The builder config must stay: without it TFDS
    opens the default config, so "eurosat:2.0.0" reads eurosat/rgb even for a run of eurosat/all."""
    return f"{info.full_name.rpartition('/')[0]}:{info.version}"  # full_name is "name[/config]/version"


def _load_tfds(spec: str, data_dir: str | None, val_fraction: float, test_fraction: float, seed: int) -> _Resolved:
    name, _, version = spec.partition(":")
    full = f"{name}:{version}" if version else name
    builder = open_tfds_builder(full, data_dir)
    info = builder.info
    if "image" not in info.features or "label" not in info.features:
        raise ValueError(f"TFDS dataset {full!r} needs 'image' and 'label' features, has {list(info.features)}")
    available = set(info.splits)
    if "train" not in available:
        raise ValueError(f"TFDS dataset {full!r} has no 'train' split (splits: {sorted(available)})")

    pinned = pinned_tfds_name(info)  # resume and fingerprints refer to this exact config and version

    def source(split: str) -> tuple[TfdsSource, dict]:
        n = info.splits[split].num_examples
        identity = {"source": "tfds", "dataset": info.full_name, "split": split, "n": n}
        return TfdsSource(pinned, split, data_dir, n), identity

    base, identity = source("train")
    own = {"val": "validation", "test": "test"}
    to_carve = {name: f for name, f in (("val", val_fraction), ("test", test_fraction)) if own[name] not in available}
    # Unstratified: labels of a large TFDS split could only be had by parsing every record.
    splits, ids = _carve(base, identity, to_carve, seed, stratified=False)
    for ours, theirs in own.items():
        if theirs in available:
            splits[ours], ids[ours] = source(theirs)
    return _Resolved(f"tfds:{pinned}", list(info.features["label"].names), splits, ids)


# ---------------------------------------------------------------------------------------------------- entry


def load_dataset(
    source: str,
    *,
    data_dir: str | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    few_shot_k: int | None = None,
    few_shot_seed: int = 0,
    cache_dir: str | None = None,
) -> Dataset:
    """Resolve `source` into train / val / test sources, split deterministically where the data has none.

    `test_fraction` applies only where the data has no test split of its own, `val_fraction` where it has no
    validation split. `few_shot_k` keeps k training examples per class; val and test are untouched.
    `cache_dir` (config.cache_dir) is where a folder's verified index is looked up (`folder_index_path`).
    `vtab:<task>` takes the fractions from no one: VTAB-1k fixes its splits (fxjax.data.vtab).
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"need 0 <= val_fraction, test_fraction and a sum < 1, got {val_fraction}, {test_fraction}")
    loaders: dict[str, Callable[[], _Resolved]] = {
        "digits": lambda: _load_digits(val_fraction, test_fraction, seed),
        "mnist": lambda: _load_idx("mnist", data_dir, val_fraction, seed),
        "fashion_mnist": lambda: _load_idx("fashion_mnist", data_dir, val_fraction, seed),
    }
    if source in loaders:
        resolved = loaders[source]()
    elif source.startswith("folder:"):
        resolved = _load_folder(source.removeprefix("folder:"), val_fraction, test_fraction, seed, cache_dir)
    elif source.startswith("tfds:") and len(source) > len("tfds:"):
        resolved = _load_tfds(source.removeprefix("tfds:"), data_dir, val_fraction, test_fraction, seed)
    elif source.startswith("vtab:"):
        from fxjax.data.vtab import load_vtab  # vtab builds on this module's sources

        resolved = load_vtab(source.removeprefix("vtab:"), data_dir)
    else:
        raise ValueError(f"unknown data source {source!r}; accepted forms: {ACCEPTED_FORMS}")

    splits, identity = dict(resolved.splits), dict(resolved.identity)
    if few_shot_k is not None:
        if few_shot_k <= 0:
            raise ValueError(f"few_shot_k must be positive, got {few_shot_k}")
        chosen = few_shot_indices(splits["train"], resolved.class_names, few_shot_k, few_shot_seed)
        splits["train"] = Subset(splits["train"], chosen)
        identity["train"] = {
            **identity["train"],
            "few_shot": {"k": few_shot_k, "seed": few_shot_seed, "indices": _digest(chosen.tobytes())},
        }
    fingerprint = {split: _digest(identity[split]) for split in SPLITS}
    log.info("loaded %s: %s", resolved.name, {s: len(splits[s]) for s in SPLITS})
    return Dataset(resolved.name, resolved.class_names, {s: splits[s] for s in SPLITS}, fingerprint)
