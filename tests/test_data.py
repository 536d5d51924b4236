"""Dataset loading: good and corrupt IDX files, the three folder layouts, clear errors."""

import gzip

import numpy as np
import pytest

from synthprune.data import DataError, load_dataset, load_fashion_mnist, read_idx


def idx_bytes(magic: int, array: np.ndarray) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(path, magic, array, gz=False):
    data = idx_bytes(magic, array)
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data, compresslevel=1)
    path.write_bytes(data)
    return path


def write_fashion(folder, gz=True, train=60_000, test=10_000):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", train), ("t10k", test)):
        images = np.zeros((n, 28, 28), np.uint8)
        images[:, 0, :4] = rng.integers(0, 256, (n, 4))  # a little content, cheap to compress
        write_idx(folder / f"{prefix}-images-idx3-ubyte", 2051, images, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", 2049, rng.integers(0, 10, n), gz)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path, gz):
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4) % 256
    path = write_idx(tmp_path / "x-idx3-ubyte", 2051, array, gz)
    np.testing.assert_array_equal(read_idx(path, 2051, 2, (3, 4)), array)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: (1234).to_bytes(4, "big") + b[4:], "magic number 1234, expected 2051"),
        (lambda b: b[:-5], "truncated"),
        (lambda b: b[:6], "truncated header"),
        (lambda b: b + b"extra", "data bytes"),
    ],
)
def test_corrupt_idx_names_the_file(tmp_path, mutate, message):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(mutate(idx_bytes(2051, np.zeros((2, 3, 4)))))
    with pytest.raises(DataError, match=message) as info:
        read_idx(path, 2051, 2, (3, 4))
    assert str(path) in str(info.value) and "apt-get install dataset-fashion-mnist" in str(info.value)


def test_wrong_count_or_shape(tmp_path):
    path = write_idx(tmp_path / "labels", 2049, np.zeros(5))
    with pytest.raises(DataError, match=r"shape \(5,\), expected \(6,\)"):
        read_idx(path, 2049, 6)


def test_bad_gzip_names_the_file(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read"):
        read_idx(path, 2051, 2, (3, 4))


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_load_fashion_mnist_from_folder(tmp_path, layout):
    folder = tmp_path if layout == "flat" else tmp_path / "FashionMNIST" / "raw"
    write_fashion(folder, gz=layout == "flat")
    data = load_fashion_mnist(tmp_path)
    assert data.x_train.shape == (60_000, 784) and data.x_test.shape == (10_000, 784)
    assert data.y_train.dtype.is_floating_point is False and data.n_classes == 10
    assert abs(float(data.x_train.mean())) < 1e-4  # standardised with the training statistics


def test_wrong_number_of_images_is_refused(tmp_path):
    write_fashion(tmp_path, train=100)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: shape \(100, 28, 28\), expected \(60000"):
        load_fashion_mnist(tmp_path)


def test_missing_file_and_missing_folder(tmp_path):
    write_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\(\.gz\) is missing"):
        load_fashion_mnist(tmp_path)
    with pytest.raises(DataError, match=r"not found in .*apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "nowhere")


def test_digits_split_and_limit():
    data = load_dataset("digits", limit_train=100)
    assert data.x_train.shape == (100, 64) and data.x_test.shape == (360, 64)
    assert float(data.x_train.min()) >= 0 and float(data.x_train.max()) <= 1
    with pytest.raises(ValueError, match="unknown dataset 'cifar'; valid: fashion-mnist, digits"):
        load_dataset("cifar")
