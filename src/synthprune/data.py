"""Datasets as in-memory tensors: Fashion-MNIST from IDX files, scikit-learn's digits.

Nothing downloads. Fashion-MNIST is read from (first match wins) the folder given, its
``FashionMNIST/raw/`` sub-folder (torchvision's layout), or Debian's package
``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/``). Files may be gzipped or not.
Every file is checked (magic number, shape, count, length) and a bad one raises
:class:`DataError` naming the file and how to get a good one.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["DATASETS", "DEBIAN_FASHION_MNIST", "DataError", "Dataset", "load_dataset", "read_idx"]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
HOW_TO_GET = (
    "install Debian's package (apt-get install dataset-fashion-mnist, into "
    f"{DEBIAN_FASHION_MNIST}) or pass --data-dir with the four IDX files "
    "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
    "t10k-labels-idx1-ubyte; .gz or not)"
)
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049


class DataError(ValueError):
    """A dataset file is missing, truncated or corrupt."""


@dataclass
class Dataset:
    """Train and test splits. ``x_*``: ``[N, features]`` float32; ``y_*``: ``[N]`` int64 in
    ``[0, n_classes)``.

    ``n_classes`` is the dataset's, never inferred from the labels at hand (a limited or odd
    training set must not change the network's outputs). ``image_shape`` is ``(height, width)``
    when features are pixels (for figures)."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    image_shape: tuple[int, int] | None
    n_classes: int = 10

    @property
    def n_features(self) -> int:
        return self.x_train.shape[1]


def read_idx(path: Path, magic: int, count: int | None = None, item_shape: tuple[int, ...] = ()) -> np.ndarray:
    """Read one IDX file of unsigned bytes (gzipped or not) as ``[count, *item_shape]``.

    Raises :class:`DataError` naming the file when the magic number, count, shape or length is
    not what is expected."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot read ({exc}); {HOW_TO_GET}") from exc
    ndim = len(item_shape) + 1
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated header ({len(raw)} bytes); {HOW_TO_GET}")
    found_magic = int.from_bytes(raw[:4], "big")
    if found_magic != magic:
        raise DataError(f"{path}: magic number {found_magic}, expected {magic} (not this IDX file); {HOW_TO_GET}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if (count is not None and dims[0] != count) or dims[1:] != item_shape:
        expected = (count if count is not None else "N", *item_shape)
        raise DataError(f"{path}: shape {dims}, expected {expected}; {HOW_TO_GET}")
    n_bytes = int(np.prod(dims))
    if len(raw) - header != n_bytes:
        raise DataError(f"{path}: {len(raw) - header} data bytes, expected {n_bytes} (truncated?); {HOW_TO_GET}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def fashion_mnist_folder(data_dir: str | Path | None) -> Path:
    """The folder that holds the Fashion-MNIST files (see the module docstring)."""
    roots = [Path(data_dir)] if data_dir else [DEBIAN_FASHION_MNIST]
    searched = []
    for root in roots:
        for folder in (root, root / "FashionMNIST" / "raw"):
            searched.append(str(folder))
            if _find(folder, "train-images-idx3-ubyte"):
                return folder
    raise DataError(f"Fashion-MNIST not found in {', '.join(searched)}; {HOW_TO_GET}")


def load_fashion_mnist(data_dir: str | Path | None = None, scaling: str = "global") -> Dataset:
    """Fashion-MNIST (60,000 train / 10,000 test, 28×28), pixels scaled to [0, 1] then, by
    default, standardised with the training set's one mean and std (:func:`scale_inputs`)."""
    folder = fashion_mnist_folder(data_dir)
    arrays = {}
    for split, prefix, count in (("train", "train", 60_000), ("test", "t10k", 10_000)):
        for kind, magic, shape in (("images", IMAGES_MAGIC, (28, 28)), ("labels", LABELS_MAGIC, ())):
            stem = f"{prefix}-{kind}-idx{len(shape) + 1}-ubyte"
            path = _find(folder, stem)
            if path is None:
                raise DataError(f"{folder / stem}(.gz) is missing; {HOW_TO_GET}")
            arrays[split, kind] = read_idx(path, magic, count, shape)
    x_train = torch.from_numpy(arrays["train", "images"].reshape(60_000, -1).astype(np.float32) / 255.0)
    x_test = torch.from_numpy(arrays["test", "images"].reshape(10_000, -1).astype(np.float32) / 255.0)
    for name in ("train", "test"):
        labels = arrays[name, "labels"]
        if labels.max() > 9:
            raise DataError(f"{folder}: {name} labels contain {labels.max()}, expected 0..9; {HOW_TO_GET}")
    x_train, x_test = scale_inputs(x_train, x_test, scaling)
    return Dataset(
        "fashion-mnist",
        x_train,
        torch.from_numpy(arrays["train", "labels"].astype(np.int64)),
        x_test,
        torch.from_numpy(arrays["test", "labels"].astype(np.int64)),
        (28, 28),
    )


def scale_inputs(x_train: torch.Tensor, x_test: torch.Tensor, scaling: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs in [0, 1] scaled by statistics of the training set: ``global`` (one mean and std:
    the reference preset's; an always-black border becomes a constant non-zero input),
    ``pixel`` (each feature its own mean and std; a constant feature becomes 0) or ``unit``
    (left in [0, 1])."""
    if scaling == "unit":
        return x_train, x_test
    if scaling == "global":
        mean, std = x_train.mean(), x_train.std()
    elif scaling == "pixel":
        mean, std = x_train.mean(0), x_train.std(0)
        std = torch.where(std > 0, std, torch.ones_like(std))
    else:
        raise ValueError(f"unknown input scaling {scaling!r}; valid: {', '.join(INPUT_SCALINGS)}")
    return (x_train - mean) / std, (x_test - mean) / std


def load_digits(scaling: str = "unit") -> Dataset:
    """scikit-learn's 8×8 digits (1,797 images, shipped with the package): a fixed shuffled
    split of 1,437 train / 360 test, pixels scaled to [0, 1] (by default; :func:`scale_inputs`)."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is a dependency
        raise DataError("the digits dataset needs scikit-learn: pip install scikit-learn") from exc
    bunch = sklearn_digits()
    x = torch.from_numpy(bunch.data.astype(np.float32) / 16.0)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:1437], order[1437:]
    x_train, x_test = scale_inputs(x[train], x[test], scaling)
    return Dataset("digits", x_train, y[train], x_test, y[test], (8, 8))


DATASETS = ("fashion-mnist", "digits")
INPUT_SCALINGS = ("global", "pixel", "unit")
DEFAULT_SCALING = {"fashion-mnist": "global", "digits": "unit"}


def load_dataset(name: str, data_dir: str | Path | None = None, limit_train: int | None = None,
                 scaling: str | None = None) -> Dataset:
    """Load a dataset by name; ``limit_train`` keeps the first N training examples (statistics
    for scaling come from the whole training set); ``scaling`` defaults to the dataset's own
    (:data:`DEFAULT_SCALING`)."""
    scaling = scaling or DEFAULT_SCALING.get(name, "unit")
    if name == "fashion-mnist":
        data = load_fashion_mnist(data_dir, scaling)
    elif name == "digits":
        data = load_digits(scaling)
    else:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    if limit_train is not None:
        data.x_train, data.y_train = data.x_train[:limit_train], data.y_train[:limit_train]
    present = torch.unique(data.y_train).tolist()
    if len(present) < 2:
        where = f"the first {limit_train} training examples" if limit_train is not None else "the training labels"
        raise DataError(f"{where} of {name} hold only class {present}: a classifier needs at least two classes"
                        + ("; raise --limit-train" if limit_train is not None else f"; {HOW_TO_GET}"))
    return data
