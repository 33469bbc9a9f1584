"""IDX reading, data sources, and downloads from a local HTTP server serving real files."""
import gzip
import hashlib
import http.server
import os
import shutil
import socket
import struct
import threading
from pathlib import Path

import numpy as np
import pytest

from mnistgan import data
from mnistgan.data import DataError, DownloadError, RemoteFile, RemoteSource

SAMPLE = data.PACKAGE_DATA / "mnist-sample"
IMAGES_GZ = SAMPLE / "train-images-idx3-ubyte.gz"
LABELS_GZ = SAMPLE / "train-labels-idx1-ubyte.gz"
FASHION = Path("/usr/share/datasets/fashion-mnist")


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# -- IDX ---------------------------------------------------------------------

def test_sample_is_real_mnist():
    images, labels = data.load_sample()
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))
    # The shared data README gives this digest of the decompressed payload.
    raw = gzip.decompress(IMAGES_GZ.read_bytes())
    assert hashlib.sha256(raw).hexdigest() == "2889698e6bc3614913e76901316712919d1998fc2b44512451bfe65bc1e668b1"
    assert labels[:8].tolist() == [5, 0, 4, 1, 9, 2, 1, 3]  # the famous first MNIST labels


def test_raw_and_gzip_read_the_same(tmp_path):
    raw = tmp_path / "train-images-idx3-ubyte"
    raw.write_bytes(gzip.decompress(IMAGES_GZ.read_bytes()))
    np.testing.assert_array_equal(data.read_idx_images(raw), data.read_idx_images(IMAGES_GZ))


def idx_bytes(magic, dims, payload_len=None):
    head = struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims)
    n = int(np.prod(dims)) if payload_len is None else payload_len
    return head + bytes(n)


@pytest.mark.parametrize("content,message", [
    (b"", "empty or shorter than an IDX header"),
    (idx_bytes(2049, (5, 28, 28)), "magic number 2049, expected 2051"),
    (idx_bytes(2051, (5, 28, 28), payload_len=100), "truncated: header promises 3920 bytes"),
    (idx_bytes(2051, (5, 28, 28), payload_len=4000), "data past the 3920 bytes"),
    (idx_bytes(2051, (1_000_000_000, 28, 28), payload_len=10), "too large"),
    (b"\x00\x00\x0d\x03" + bytes(20), "not an unsigned-byte IDX file"),
    (idx_bytes(2051, (5, 28, 28))[:10], "truncated header"),
])
def test_bad_idx_files_are_refused_clearly(tmp_path, content, message):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        data.read_idx_images(path)
    gz = tmp_path / "bad-idx3-ubyte.gz"
    gz.write_bytes(gzip.compress(content))
    with pytest.raises(DataError, match=message):
        data.read_idx_images(gz)


def test_truncated_gzip_is_refused(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(IMAGES_GZ.read_bytes()[:50_000])
    with pytest.raises(DataError, match="truncated"):
        data.read_idx_images(path)


def test_labels_count_must_match(tmp_path):
    labels = tmp_path / "labels"
    labels.write_bytes(idx_bytes(2049, (9999,)))
    with pytest.raises(DataError, match="holds 10000 images but .* holds 9999 labels"):
        data.read_idx_pair(IMAGES_GZ, labels)


def test_directory_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        data.read_idx(tmp_path)
    with pytest.raises(DataError, match="no such file"):
        data.read_idx(tmp_path / "nope")


# -- sources -----------------------------------------------------------------

def test_folder_npz_and_file_sources(tmp_path):
    folder = tmp_path / "idx"
    folder.mkdir()
    shutil.copy(IMAGES_GZ, folder)
    shutil.copy(LABELS_GZ, folder)
    images, labels, _ = data.load(str(folder))
    assert images.shape == (10000, 28, 28) and labels is not None
    np.savez(tmp_path / "keras.npz", x_train=images[:30], y_train=labels[:30])
    np.testing.assert_array_equal(data.load(str(tmp_path / "keras.npz"))[0], images[:30])
    np.testing.assert_array_equal(data.load_images(str(IMAGES_GZ)), images)


def test_bad_sources(tmp_path):
    with pytest.raises(DataError, match="unknown data source 'nonsense'"):
        data.load("nonsense")
    with pytest.raises(DataError, match="no train-images-idx3-ubyte"):
        data.load(str(tmp_path))
    np.savez(tmp_path / "a.npz", x_test=np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(DataError, match="no 'x_train' array"):
        data.load(str(tmp_path / "a.npz"))
    np.savez(tmp_path / "b.npz", x_train=np.zeros((3, 28, 28), np.float32))
    with pytest.raises(DataError, match="dtype float32, expected uint8"):
        data.load(str(tmp_path / "b.npz"))
    (tmp_path / "c.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        data.load(str(tmp_path / "c.npz"))


def test_fashion_mnist_from_debian_package(monkeypatch, tmp_path):
    if not FASHION.is_dir():
        if os.environ.get("MNISTGAN_REQUIRE_FASHION"):
            pytest.fail("MNISTGAN_REQUIRE_FASHION is set but dataset-fashion-mnist is not installed")
        pytest.skip("dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
    monkeypatch.setenv("MNISTGAN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("MNISTGAN_FASHION_MNIST_MIRRORS", "http://127.0.0.1:9/")
    images, labels, description = data.load("fashion-mnist")
    assert images.shape == (60000, 28, 28) and labels.shape == (60000,)
    assert "fashion-mnist" in description


# -- downloads from a local server ---------------------------------------------

class Handler(http.server.BaseHTTPRequestHandler):
    """/good/F serves F; /corrupt/F serves F with one byte changed;
    /truncated/F promises F's length and hangs up halfway."""

    def do_GET(self):
        mode, _, name = self.path.strip("/").partition("/")
        path = SAMPLE / name
        if mode not in ("good", "corrupt", "truncated") or not path.is_file():
            self.send_error(404)
            return
        body = path.read_bytes()
        if mode == "corrupt":
            body = body[:100] + bytes([body[100] ^ 0xFF]) + body[101:]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if mode == "truncated":
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def dead_url():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return f"http://127.0.0.1:{port}/"


NAME = "train-labels-idx1-ubyte.gz"


def only_files(folder):
    return sorted(p.name for p in Path(folder).iterdir())


def test_download_good_file(server, tmp_path):
    dest = data.download([f"{server}/good/"], NAME, sha(LABELS_GZ), tmp_path / NAME, progress=False)
    assert dest.read_bytes() == LABELS_GZ.read_bytes()
    assert only_files(tmp_path) == [NAME]


@pytest.mark.parametrize("bad", ["corrupt", "truncated", "down"])
def test_bad_mirror_is_skipped_for_the_next(server, dead_url, tmp_path, bad):
    first = dead_url if bad == "down" else f"{server}/{bad}/"
    dest = data.download([first, f"{server}/good/"], NAME, sha(LABELS_GZ), tmp_path / NAME, progress=False)
    assert sha(dest) == sha(LABELS_GZ)
    assert only_files(tmp_path) == [NAME]  # no partial file left behind


def test_all_mirrors_failing_leaves_nothing(server, dead_url, tmp_path):
    mirrors = [f"{server}/corrupt/", f"{server}/truncated/", dead_url, f"{server}/missing/"]
    with pytest.raises(DownloadError) as e:
        data.download(mirrors, NAME, sha(LABELS_GZ), tmp_path / NAME, progress=False)
    text = str(e.value)
    assert "checksum mismatch" in text
    assert "cut short" in text or "IncompleteRead" in text
    assert "unreachable" in text and "404" in text
    assert only_files(tmp_path) == []


def test_remote_source_downloads_into_cache_then_reuses_it(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MNISTGAN_CACHE_DIR", str(tmp_path))
    source = RemoteSource(name="mini", files={"train": (RemoteFile(IMAGES_GZ.name, sha(IMAGES_GZ)),
                                                        RemoteFile(LABELS_GZ.name, sha(LABELS_GZ)))},
                          mirrors=(f"{server}/good/",), count={"train": 10000})
    images, labels = data.load_remote(source, progress=False)
    assert images.shape == (10000, 28, 28)
    assert only_files(tmp_path / "mini") == sorted([IMAGES_GZ.name, LABELS_GZ.name])
    # A damaged cached file is detected by its checksum and fetched again.
    cached = tmp_path / "mini" / LABELS_GZ.name
    cached.write_bytes(b"garbage")
    data.load_remote(source, progress=False)
    assert sha(cached) == sha(LABELS_GZ)
    # With the cache complete, no mirror is needed.
    offline = RemoteSource(**{**source.__dict__, "mirrors": ("http://127.0.0.1:9/",)})
    np.testing.assert_array_equal(data.load_remote(offline, progress=False)[0], images)


def test_mnist_falls_back_to_sample_without_network(tmp_path, monkeypatch, dead_url):
    monkeypatch.setenv("MNISTGAN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("MNISTGAN_MNIST_MIRRORS", dead_url)
    warnings = []
    images, _, description = data.load("mnist", progress=False, warn=warnings.append)
    assert images.shape == (10000, 28, 28) and "mnist-sample" in description
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "could not be downloaded" in warnings[0] and "--data" in warnings[0]
    assert not any((tmp_path / "mnist").iterdir())


def test_mnist_official_checksums_are_pinned():
    # The values published with the files (also used by torchvision and TFDS).
    assert data.MNIST.files["test"][0].sha256.startswith("8d422c7b0a1c")
    assert data.MNIST.files["train"][0].sha256.startswith("440fcabf73cc")
