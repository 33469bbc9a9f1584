#!/usr/bin/env bash
# Install the built wheel (not the source tree) into a fresh virtual
# environment, with no compiler on PATH and pip forbidden to build anything,
# then run the test suite against it and train one epoch.
#
#   bash wheels/install_test.sh                                   # newest scipy pip finds
#   DEPS="scipy==1.11.4 numpy==1.26.4" bash wheels/install_test.sh   # the oldest supported
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEPS=${DEPS:-}
TESTS=${TESTS:-tests}
shopt -s nullglob
wheels=(wheels/dist/*manylinux*.whl)
[ ${#wheels[@]} -gt 0 ] || wheels=(wheels/dist/*.whl)
[ ${#wheels[@]} -eq 1 ] || { echo "install_test: expected one wheel in wheels/dist, found ${#wheels[@]}; run wheels/build.sh" >&2; exit 1; }
wheel=$(realpath "${wheels[0]}")

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PY" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install -q --disable-pip-version-check --only-binary=:all: $DEPS "$wheel" pytest hypothesis

# The tests run from a copy, far from src/, so only the installed package can be imported.
cp -r tests "$WORK/tests"
cd "$WORK"
clean_env=(env -i HOME="$HOME" PATH="$WORK/venv/bin" LANG=C.UTF-8 CI="${CI:-}" MNISTGAN_REQUIRE_FASHION="${MNISTGAN_REQUIRE_FASHION:-}" MNISTGAN_EXPECT_INSTALLED=1)
if command -v gcc >/dev/null && PATH="$WORK/venv/bin" command -v gcc >/dev/null; then
  echo "install_test: a compiler is still on PATH" >&2; exit 1
fi
"${clean_env[@]}" "$VPY" -c "import mnistgan, scipy, numpy; print('installed mnistgan', mnistgan.__version__, 'from', mnistgan.__file__, '| scipy', scipy.__version__, '| numpy', numpy.__version__)"
"${clean_env[@]}" "$VPY" -m pytest -q -p no:cacheprovider $TESTS
"${clean_env[@]}" "$VPY" -m mnistgan.train --data mnist-sample --epochs 1 --out "$WORK/run" --no-progress
test -s "$WORK/run/checkpoint.npz" && test -s "$WORK/run/samples.png"
echo "install_test: the wheel installs, passes the tests and trains one epoch"
