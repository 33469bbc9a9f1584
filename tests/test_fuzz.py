"""Fuzzing: data readers and kernels get an exception or a right answer, never a crash.

Hypothesis runs with a fixed seed (derandomize) and bounded example counts, so
the suite is repeatable and its time is bounded.
"""
import gzip
import io
import struct
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mnistgan import _kernels as K
from mnistgan import data
from mnistgan.data import DataError

FUZZ = settings(max_examples=1500, derandomize=True, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
KERNEL_FUZZ = settings(max_examples=400, derandomize=True, deadline=None,
                       suppress_health_check=[HealthCheck.too_slow])


def idx_like():
    """Bytes that are often almost a valid IDX file: a plausible header with
    random magic, ndim and dimensions (up to 2^32 - 1), then a random payload."""
    header = st.builds(
        lambda zero, code, dims, payload, cut: (
            struct.pack(">HBB", zero, code, len(dims)) + struct.pack(f">{len(dims)}I", *dims) + payload)[:cut],
        st.sampled_from([0, 0, 0, 1, 0xFFFF]),
        st.sampled_from([0x08, 0x08, 0x08, 0x09, 0x0D, 0]),
        st.lists(st.one_of(st.integers(0, 40), st.integers(0, 2**32 - 1)), min_size=0, max_size=5),
        st.binary(max_size=3000),
        st.integers(0, 4000),
    )
    return st.one_of(header, st.binary(max_size=200))


@FUZZ
@given(content=idx_like(), compress=st.booleans())
def test_idx_reader_never_crashes(tmp_path, content, compress):
    path = tmp_path / "f"
    path.write_bytes(gzip.compress(content) if compress else content)
    try:
        arr = data.read_idx(path)
    except DataError as e:
        assert str(path) in str(e)
        return
    # Accepted: then it must be exactly what the header describes.
    ndim = content[3]
    dims = struct.unpack(f">{ndim}I", content[4:4 + 4 * ndim])
    assert arr.shape == dims and arr.dtype == np.uint8
    assert arr.tobytes() == content[4 + 4 * ndim:]


@FUZZ
@given(content=st.binary(max_size=100), cut=st.integers(0, 600))
def test_gzip_damage_is_a_data_error(tmp_path, content, cut):
    good = gzip.compress(struct.pack(">I", 2051) + struct.pack(">3I", 2, 3, 3) + bytes(18))
    path = tmp_path / "g.gz"
    path.write_bytes(good[:cut] + content)
    try:
        data.read_idx(path)
    except DataError:
        pass


def npz_bytes(arrays: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@FUZZ
@given(
    key=st.sampled_from(["x_train", "x_train", "x_test", "images"]),
    dtype=st.sampled_from([np.uint8, np.uint8, np.float32, np.int64, np.bool_]),
    shape=st.lists(st.integers(0, 6), min_size=0, max_size=4),
    labels=st.one_of(st.none(), st.integers(0, 8)),
    damage=st.one_of(st.none(), st.tuples(st.integers(0, 2000), st.binary(max_size=20))),
)
def test_npz_loader_never_crashes(tmp_path, key, dtype, shape, labels, damage):
    arrays = {key: np.zeros(shape, dtype)}
    if labels is not None:
        arrays["y_train"] = np.zeros(labels, np.uint8)
    raw = npz_bytes(arrays)
    if damage is not None:
        at, junk = damage
        raw = raw[:at] + junk + raw[at + len(junk):]
    path = tmp_path / "d.npz"
    path.write_bytes(raw)
    try:
        images, labs = data.load_npz(path)
    except DataError as e:
        assert str(path) in str(e)
        return
    assert images.dtype == np.uint8 and images.ndim == 3
    assert labs is None or len(labs) == len(images)


def test_npz_with_pickled_object_is_refused(tmp_path):
    path = tmp_path / "p.npz"
    np.savez(path, x_train=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match="not a readable .npz|pickle"):
        data.load_npz(path)


def test_npz_that_is_a_zip_of_something_else(tmp_path):
    path = tmp_path / "z.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x_train.npy", b"not an npy header")
    with pytest.raises(DataError):
        data.load_npz(path)


# -- kernels with random shapes, dtypes, strides and aliasing ---------------------

DT = st.sampled_from([np.float32, np.float64, np.float16, np.int32])


@st.composite
def maybe_bad_array(draw, shape, dtype):
    """Usually a good array; sometimes the wrong dtype, shape or strides."""
    kind = draw(st.sampled_from(["good"] * 6 + ["dtype", "shape", "strided", "fortran", "readonly"]))
    shape = tuple(shape)
    if kind == "shape":
        shape = tuple(s + draw(st.integers(1, 2)) for s in shape) if shape else (2,)
    if kind == "dtype":
        dtype = draw(DT)
    if kind == "strided":
        big = np.ones(tuple(2 * s for s in shape) or (1,), dtype)
        arr = big[tuple(slice(None, None, 2) for _ in shape)] if shape else big[0]
    else:
        arr = np.ones(shape, dtype)
    if kind == "fortran" and arr.ndim == 2:
        arr = np.asfortranarray(arr)
    arr[...] = draw(st.floats(-3, 3, allow_nan=False)) if arr.size else 0
    if kind == "readonly":
        arr.flags.writeable = False
    return arr


OK_ERRORS = (TypeError, ValueError, IndexError)


@KERNEL_FUZZ
@given(st.data(), st.integers(1, 5), st.integers(1, 5), st.integers(1, 5), st.sampled_from([np.float32, np.float64]))
def test_dense_kernels_raise_or_are_right(d, n, i, o, dtype):
    X = d.draw(maybe_bad_array([n, i], dtype))
    W = d.draw(maybe_bad_array([i, o], dtype))
    b = d.draw(maybe_bad_array([o], dtype))
    Y = d.draw(maybe_bad_array([n, o], dtype))
    try:
        K.dense_forward(X, W, b, Y)
    except OK_ERRORS:
        return
    np.testing.assert_allclose(Y, X.astype(np.float64) @ W + b, rtol=1e-5)


@KERNEL_FUZZ
@given(st.data(), st.integers(1, 6), st.integers(1, 6), st.sampled_from(["relu", "tanh", "noise", "bce", "adam", "bn"]))
def test_elementwise_kernels_with_aliasing(d, n, m, which):
    """Outputs that are the input (allowed), overlap it partly (refused), or are separate."""
    dtype = d.draw(st.sampled_from([np.float32, np.float64]))
    buf = np.linspace(-2, 2, 4 * n * m).astype(dtype)
    x = buf[: n * m].reshape(n, m)
    shift = d.draw(st.sampled_from([0, 0, 1, m, n * m, 2 * n * m]))  # 0: in place; n*m+: disjoint
    out = buf[shift: shift + n * m].reshape(n, m)
    x_before = x.copy()
    partial = 0 < shift < n * m
    try:
        if which == "relu":
            K.relu_forward(x, out)
            expect = np.maximum(x_before, 0)
        elif which == "tanh":
            K.tanh_forward(x, out)
            expect = np.tanh(x_before.astype(np.float64))
        elif which == "noise":
            noise = np.ones_like(x)
            K.add_noise(x, noise, 0.5, out)
            expect = x_before + 0.5
        elif which == "bce":
            t = np.ones_like(x)
            p = np.empty_like(x)
            K.sigmoid_bce(x, t, p, out)
            expect = (1 / (1 + np.exp(-x_before.astype(np.float64))) - 1) / x.size
        elif which == "adam":
            m_, v_ = np.zeros_like(x), np.zeros_like(x)
            K.adam_step(x, out, m_, v_, lr=0.1, beta1=0.5, beta2=0.9, eps=1e-8, step=1)
            return  # reached only when out and x do not overlap; checked elsewhere
        else:
            if n < 2:
                with pytest.raises(ValueError):
                    K.batchnorm_forward(x, np.ones(m, dtype), np.zeros(m, dtype), np.zeros(m, dtype),
                                        np.ones(m, dtype), np.empty(m, dtype), np.empty(m, dtype), out)
                return
            K.batchnorm_forward(x, np.ones(m, dtype), np.zeros(m, dtype), np.zeros(m, dtype),
                                np.ones(m, dtype), np.empty(m, dtype), np.empty(m, dtype), out)
            xb = x_before.astype(np.float64)
            expect = (xb - xb.mean(0)) / np.sqrt(xb.var(0) + 1e-5)
    except ValueError as e:
        assert partial or which == "adam" and shift == 0, e
        assert "overlaps" in str(e)
        return
    assert not partial, "a partly overlapping output was accepted"
    np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-6)


@KERNEL_FUZZ
@given(st.data(), st.integers(0, 4), st.integers(0, 4), st.integers(0, 4), st.booleans(), st.booleans())
def test_gemm_any_shape_including_empty(d, m, k, n, ta, tb):
    dtype = d.draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(m * 100 + k * 10 + n)
    A = rng.standard_normal((k, m) if ta else (m, k)).astype(dtype)
    B = rng.standard_normal((n, k) if tb else (k, n)).astype(dtype)
    C = rng.standard_normal((m, n)).astype(dtype)
    C0 = C.copy()
    K.gemm(A, B, C, trans_a=ta, trans_b=tb, beta=1.0)
    expect = (A.T if ta else A).astype(np.float64) @ (B.T if tb else B) + C0
    np.testing.assert_allclose(C, expect, rtol=1e-5, atol=1e-5)
