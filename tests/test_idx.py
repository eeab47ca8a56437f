"""IDX reading (MNIST format), gzipped and plain."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from sslvision.idx import IdxError, read_idx

FMNIST = "/usr/share/datasets/fashion-mnist"


def idx_bytes(array: np.ndarray, code: int) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    return header + array.tobytes()


def test_real_labels_gz_and_plain(tmp_path):
    labels = read_idx(f"{FMNIST}/t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10000,) and labels.dtype == np.uint8
    assert (np.bincount(labels) == 1000).all()
    plain = tmp_path / "labels"
    plain.write_bytes(gzip.decompress(Path(f"{FMNIST}/t10k-labels-idx1-ubyte.gz").read_bytes()))
    assert np.array_equal(read_idx(plain), labels)


@pytest.mark.parametrize("dtype,code", [(np.uint8, 0x08), (">i4", 0x0C), (">f4", 0x0D)])
def test_types_and_shapes(tmp_path, dtype, code):
    array = np.arange(24).reshape(2, 3, 4).astype(dtype)
    path = tmp_path / "a.idx"
    path.write_bytes(idx_bytes(array, code))
    got = read_idx(path)
    assert got.shape == (2, 3, 4) and np.array_equal(got, array) and got.dtype.isnative


@pytest.mark.parametrize("content,problem", [
    (b"hello world", "not an IDX file"),
    (bytes([0, 0, 0x07, 1, 0, 0, 0, 1, 5]), "unknown IDX data type"),
    (bytes([0, 0, 0x08, 2, 0, 0, 0, 3]), "truncated header"),
    (bytes([0, 0, 0x08, 1, 0, 0, 0, 3, 1, 2]), "truncated"),
    (bytes([0, 0, 0x08, 1, 0, 0, 0, 1, 1, 2]), "trailing bytes"),
])
def test_bad_files_are_named(tmp_path, content, problem):
    path = tmp_path / "bad.idx"
    path.write_bytes(content)
    with pytest.raises(IdxError, match=problem) as err:
        read_idx(path)
    assert str(path) in str(err.value)
