"""Offline MNIST: materialised from the pinned package, verified, loaded, batched."""

import shutil

import pytest
import torch

from experiment.data import (
    RAW_FILES,
    DataError,
    batch_order,
    batches,
    load_mnist,
    materialise_mnist,
    md5_of,
    num_batches,
)


def test_materialised_files_have_the_known_md5(mnist_root):
    raw = mnist_root / "MNIST" / "raw"
    for name, (_, _, md5) in RAW_FILES.items():
        assert md5_of(raw / name) == md5


def test_missing_file_is_rebuilt_others_kept(tmp_path, mnist_root):
    raw = materialise_mnist(tmp_path)
    (raw / "t10k-labels-idx1-ubyte").unlink()
    before = (raw / "train-images-idx3-ubyte").stat().st_mtime_ns
    materialise_mnist(tmp_path)
    assert (raw / "t10k-labels-idx1-ubyte").exists()
    assert (raw / "train-images-idx3-ubyte").stat().st_mtime_ns == before


@pytest.fixture
def raw_copy(tmp_path, mnist_root):
    raw = tmp_path / "MNIST" / "raw"
    shutil.copytree(mnist_root / "MNIST" / "raw", raw)
    return raw


def test_flipped_byte_is_detected_by_name_and_not_overwritten(raw_copy):
    path = raw_copy / "train-images-idx3-ubyte"
    data = bytearray(path.read_bytes())
    data[5000] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="train-images-idx3-ubyte is corrupt.*delete it"):
        materialise_mnist(raw_copy.parent.parent)
    assert path.read_bytes() == bytes(data)


def test_truncated_file_is_detected(raw_copy):
    path = raw_copy / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        materialise_mnist(raw_copy.parent.parent)


def test_load_shapes_normalisation_and_subset(mnist_root):
    data = load_mnist(mnist_root, "cpu", train_size=1000)
    assert data.train_x.shape == (1000, 1, 28, 28) and data.train_y.shape == (1000,)
    assert data.test_x.shape == (10000, 1, 28, 28) and data.train_y.dtype == torch.int64
    assert abs(data.train_x.mean().item()) < 0.1 and 0.8 < data.train_x.std().item() < 1.2
    assert set(data.test_y.tolist()) == set(range(10))


def test_train_size_out_of_range(mnist_root):
    with pytest.raises(Exception, match="train-size"):
        load_mnist(mnist_root, "cpu", train_size=60001)


def test_batches_cover_a_permutation_and_drop_a_single_leftover():
    x = torch.arange(21).float().unsqueeze(1)
    y = torch.arange(21)
    order = batch_order(21, torch.Generator().manual_seed(0), torch.device("cpu"))
    got = list(batches(x, y, 10, order))
    assert [len(b[1]) for b in got] == [10, 10] == [10] * num_batches(21, 10)
    seen = torch.cat([b[1] for b in got])
    assert len(set(seen.tolist())) == 20
    assert all(torch.equal(bx.squeeze(1).long(), by) for bx, by in got)
    assert [len(b[1]) for b in batches(x, y, 10)] == [10, 10, 1]  # evaluation keeps everything
    assert num_batches(22, 10) == 3
