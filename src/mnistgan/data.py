"""Training images: the IDX reader, named data sources, and the downloader.

`load_images(spec)` turns what a user types after `--data` into a uint8
array of shape (N, 28, 28):

  mnist           the full MNIST set, from the cache directory; downloaded
                  on first use from the mirrors below, each file verified by
                  its SHA-256. With no network it falls back to mnist-sample,
                  with a one-line warning.
  fashion-mnist   the same for Fashion-MNIST; also found in Debian's
                  dataset-fashion-mnist package (/usr/share/datasets/).
  mnist-sample    the first 10,000 real MNIST training images, shipped in
                  the package (CC BY-SA 3.0, see datasets/mnist-sample/).
  a folder        holding IDX files (train-images-idx3-ubyte[.gz], ...)
  a .npz file     with an `x_train` array (the Keras layout)
  an IDX file     of images

The cache directory is ~/.cache/mnistgan, or $MNISTGAN_CACHE_DIR. The mirror
list of a remote set can be replaced with $MNISTGAN_MNIST_MIRRORS or
$MNISTGAN_FASHION_MNIST_MIRRORS (comma-separated base URLs).
"""
from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
import sys
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .fileio import remove_stale_temporaries

IMAGE_MAGIC = 2051
LABEL_MAGIC = 2049
# IDX type code 0x08: unsigned byte, the only one MNIST-style files use.
UBYTE = 0x08
# Refuse headers that claim more than this: 1e9 pixels is 30x full MNIST.
MAX_ELEMENTS = 10**9

PACKAGE_DATA = Path(__file__).parent / "datasets"


class DataError(ValueError):
    """A data file or data source is missing, damaged, or of the wrong kind."""


class DownloadError(DataError):
    """No mirror delivered a file with the expected checksum."""


# ---------------------------------------------------------------------------
# IDX files
# ---------------------------------------------------------------------------

def _open(path: Path):
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def read_idx(path, expect_magic: int | None = None) -> np.ndarray:
    """Read an IDX file (gzip or raw) into a uint8 array of the header's shape.

    Checks the magic number, that the header's size is sane, and that the
    payload holds exactly the bytes the header promises; raises DataError
    naming the file otherwise.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected an IDX file")
    if not path.exists():
        raise DataError(f"{path}: no such file")
    try:
        with _open(path) as f:
            head = f.read(4)
            if len(head) < 4:
                raise DataError(f"{path}: file is empty or shorter than an IDX header")
            zero, code, ndim = struct.unpack(">HBB", head)
            magic = struct.unpack(">I", head)[0]
            if zero != 0 or code != UBYTE or not 1 <= ndim <= 4:
                raise DataError(f"{path}: not an unsigned-byte IDX file (magic {magic:#010x})")
            if expect_magic is not None and magic != expect_magic:
                raise DataError(f"{path}: magic number {magic}, expected {expect_magic}")
            raw_dims = f.read(4 * ndim)
            if len(raw_dims) < 4 * ndim:
                raise DataError(f"{path}: truncated header")
            dims = struct.unpack(f">{ndim}I", raw_dims)
            total = math.prod(dims)
            if total > MAX_ELEMENTS:
                raise DataError(f"{path}: header claims shape {dims}, {total} bytes: too large")
            # Read straight into the array: one copy of the pixels in memory,
            # and np.empty's pages are only committed as they are filled, so a
            # header that lies about its size costs nothing before we notice.
            out = np.empty(total, np.uint8)
            got = 0
            view = memoryview(out)
            while got < total:
                n = f.readinto(view[got:got + (1 << 20)])  # small chunks: small temporaries
                if not n:
                    break
                got += n
            extra = len(f.read(1))
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: unreadable or truncated ({e})") from None
    if got < total:
        raise DataError(f"{path}: truncated: header promises {total} bytes of data, file holds {got}")
    if extra:
        raise DataError(f"{path}: has data past the {total} bytes its header promises")
    return out.reshape(dims)


def read_idx_images(path) -> np.ndarray:
    images = read_idx(path, IMAGE_MAGIC)
    if images.ndim != 3:
        raise DataError(f"{path}: images must have 3 dimensions, header gives {images.shape}")
    return images


def read_idx_pair(images_path, labels_path=None):
    """Images (N, H, W) uint8 and, if a labels file is given, labels (N,) uint8."""
    images = read_idx_images(images_path)
    if labels_path is None:
        return images, None
    labels = read_idx(labels_path, LABEL_MAGIC)
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: labels must have 1 dimension, header gives {labels.shape}")
    if len(labels) != len(images):
        raise DataError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels")
    return images, labels


# ---------------------------------------------------------------------------
# Named sources
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class RemoteFile:
    name: str
    sha256: str


@dataclass(frozen=True)
class RemoteSource:
    """A data set published as IDX files on mirrors, with known checksums."""

    name: str
    files: dict  # split -> (images RemoteFile, labels RemoteFile)
    mirrors: tuple
    count: dict  # split -> number of images
    system_dirs: tuple = field(default=())

    def mirror_list(self) -> list[str]:
        env = os.environ.get(f"MNISTGAN_{self.name.upper().replace('-', '_')}_MIRRORS")
        if env:
            return [m.strip() for m in env.split(",") if m.strip()]
        return list(self.mirrors)


MNIST = RemoteSource(
    name="mnist",
    files={
        "train": (RemoteFile("train-images-idx3-ubyte.gz",
                             "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
                  RemoteFile("train-labels-idx1-ubyte.gz",
                             "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c")),
        "test": (RemoteFile("t10k-images-idx3-ubyte.gz",
                            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
                 RemoteFile("t10k-labels-idx1-ubyte.gz",
                            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6")),
    },
    mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/",
             "https://storage.googleapis.com/cvdf-datasets/mnist/",
             "http://yann.lecun.com/exdb/mnist/"),
    count={"train": 60000, "test": 10000},
)

FASHION_MNIST = RemoteSource(
    name="fashion-mnist",
    files={
        "train": (RemoteFile("train-images-idx3-ubyte.gz",
                             "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
                  RemoteFile("train-labels-idx1-ubyte.gz",
                             "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845")),
        "test": (RemoteFile("t10k-images-idx3-ubyte.gz",
                            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
                 RemoteFile("t10k-labels-idx1-ubyte.gz",
                            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5")),
    },
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
             "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/"),
    count={"train": 60000, "test": 10000},
    # Debian repacks the same IDX content with other gzip headers, so these
    # files are checked by structure and count, not by the mirrors' SHA-256.
    system_dirs=("/usr/share/datasets/fashion-mnist",),
)

REMOTE = {s.name: s for s in (MNIST, FASHION_MNIST)}
SAMPLE = "mnist-sample"


def cache_dir() -> Path:
    env = os.environ.get("MNISTGAN_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mnistgan"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(mirrors, filename: str, sha256: str, dest: Path, *, progress: bool = True,
             timeout: float = 30.0) -> Path:
    """Fetch `filename` from the first mirror that serves it with the right SHA-256.

    Streams into a temporary file beside `dest`, hashing as it goes; only a
    verified file is renamed to `dest`, so the cache never holds a partial or
    corrupt file. Raises DownloadError listing what each mirror did.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(dest.parent)  # a download killed mid-transfer
    failures = []
    for base in mirrors:
        url = base.rstrip("/") + "/" + filename
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
        try:
            h = hashlib.sha256()
            got = 0
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
                length = response.headers.get("Content-Length")
                expected = int(length) if length and length.isdigit() else None
                bar = _progress_bar(expected, f"{filename}", progress)
                try:
                    while True:
                        chunk = response.read(1 << 16)
                        if not chunk:
                            break
                        out.write(chunk)
                        h.update(chunk)
                        got += len(chunk)
                        bar.update(len(chunk))
                finally:
                    bar.close()
                out.flush()
                os.fsync(out.fileno())
            if expected is not None and got != expected:
                raise DownloadError(f"transfer cut short: {got} of {expected} bytes")
            digest = h.hexdigest()
            if digest != sha256:
                raise DownloadError(f"checksum mismatch: got sha256 {digest[:12]}..., expected {sha256[:12]}...")
            os.replace(tmp, dest)
            return dest
        except Exception as e:
            # Unreachable host, HTTP error, a transfer cut short (http.client's
            # IncompleteRead), a bad checksum: each means "try the next mirror".
            failures.append(f"{url}: {_reason(e)}")
        finally:
            if tmp.exists():
                tmp.unlink()
    raise DownloadError(f"could not download {filename}:\n  " + "\n  ".join(failures))


def _reason(e: Exception) -> str:
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        return f"unreachable ({e.reason})"
    return str(e) or type(e).__name__


def _progress_bar(total, desc, enabled):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not enabled, leave=False, file=sys.stderr)


def _find_pair(folder: Path, split: str):
    """The images and labels files of `split` in a folder of IDX files, or None."""
    prefix = "train" if split == "train" else "t10k"
    for suffix in (".gz", ""):
        img = folder / f"{prefix}-images-idx3-ubyte{suffix}"
        if img.is_file():
            for lsuffix in (".gz", ""):
                lab = folder / f"{prefix}-labels-idx1-ubyte{lsuffix}"
                if lab.is_file():
                    return img, lab
            return img, None
    return None


def load_remote(source: RemoteSource, split: str = "train", *, progress: bool = True):
    """Images and labels of a remote source: cache, then system folders, then mirrors."""
    if split not in source.files:
        raise DataError(f"{source.name} has no split {split!r}; choose from {sorted(source.files)}")
    folder = cache_dir() / source.name
    img_file, lab_file = source.files[split]
    paths = []
    for rf in (img_file, lab_file):
        path = folder / rf.name
        if path.is_file() and _sha256(path) != rf.sha256:
            path.unlink()  # damaged or stale: fetch it again
        paths.append(path)
    if not all(p.is_file() for p in paths):
        for d in source.system_dirs:
            pair = _find_pair(Path(d), split)
            if pair and pair[1] is not None:
                images, labels = read_idx_pair(*pair)
                if len(images) != source.count[split]:
                    raise DataError(f"{pair[0]}: {len(images)} images, expected {source.count[split]}")
                return images, labels
        for rf, path in zip((img_file, lab_file), paths):
            if not path.is_file():
                download(source.mirror_list(), rf.name, rf.sha256, path, progress=progress)
    return read_idx_pair(*paths)


def load_sample(split: str = "train"):
    if split != "train":
        raise DataError("mnist-sample holds only the training split")
    folder = PACKAGE_DATA / SAMPLE
    return read_idx_pair(folder / "train-images-idx3-ubyte.gz", folder / "train-labels-idx1-ubyte.gz")


def load_npz(path: Path, split: str = "train"):
    key = "x_train" if split == "train" else "x_test"
    try:
        with np.load(path, allow_pickle=False) as z:
            if key not in z.files:
                raise DataError(f"{path}: no {key!r} array (found: {', '.join(z.files) or 'none'})")
            images = z[key]
            lkey = "y" + key[1:]
            labels = z[lkey] if lkey in z.files else None
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: not a readable .npz file ({e})") from None
    # numpy hands back raw bytes for a member that is not a valid .npy.
    for name, arr in ((key, images), ("y" + key[1:], labels)):
        if arr is not None and not isinstance(arr, np.ndarray):
            raise DataError(f"{path}: {name} is not a numpy array in .npy format")
    if images.dtype != np.uint8:
        raise DataError(f"{path}: {key} has dtype {images.dtype}, expected uint8 pixels 0..255")
    if images.ndim != 3:
        raise DataError(f"{path}: {key} has shape {images.shape}, expected (N, height, width)")
    if labels is not None and len(labels) != len(images):
        raise DataError(f"{path}: {len(images)} images but {len(labels)} labels")
    return images, labels


def load(spec: str = "mnist", split: str = "train", *, progress: bool = True, warn=None):
    """(images uint8 (N, H, W), labels uint8 (N,) or None, description) for a --data spec.

    `warn(message)` is called for the mnist -> mnist-sample fallback
    (default: print to stderr).
    """
    if spec in REMOTE:
        try:
            images, labels = load_remote(REMOTE[spec], split, progress=progress)
            return images, labels, f"{spec} ({split}, {len(images)} images)"
        except DownloadError as e:
            if spec != "mnist" or split != "train":
                raise
            first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
            (warn or _stderr)(
                f"warning: full MNIST is not in {cache_dir() / 'mnist'} and could not be downloaded "
                f"({first}); training on the bundled mnist-sample (10,000 real MNIST images) instead. "
                f"To use the full set, put the four MNIST .gz files in that folder or pass --data FOLDER.")
            spec = SAMPLE
    if spec == SAMPLE:
        images, labels = load_sample(split)
        return images, labels, f"mnist-sample ({len(images)} real MNIST images)"
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"unknown data source {spec!r}: give mnist, fashion-mnist, mnist-sample, "
                        f"a folder of IDX files, a .npz file or an IDX file")
    if path.is_dir():
        pair = _find_pair(path, split)
        if pair is None:
            prefix = "train" if split == "train" else "t10k"
            raise DataError(f"{path}: no {prefix}-images-idx3-ubyte[.gz] file in this folder")
        images, labels = read_idx_pair(*pair)
    elif path.suffix == ".npz":
        images, labels = load_npz(path, split)
    else:
        images, labels = read_idx_pair(path)
    return images, labels, f"{path} ({len(images)} images)"


def load_images(spec: str = "mnist", **kw) -> np.ndarray:
    """Just the images (N, H, W) uint8 of a --data spec."""
    return load(spec, **kw)[0]


def _stderr(message: str):
    print(message, file=sys.stderr)
