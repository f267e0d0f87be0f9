#!/usr/bin/env bash
# The one install procedure, shared by the Makefile (local installs, CI) and the
# Dockerfile, so that CI exercises the same steps the image is built with.
#
#   scripts/install.sh system        apt packages the driver needs at run time (root only)
#   scripts/install.sh system-test   apt packages the tests and benchmarks need  (root only)
#   scripts/install.sh venv DIR [EXTRAS]   a virtualenv in DIR with fusepath installed
#
# What it cannot install itself (README "Prerequisites"): make, git, and
# python3 >= 3.11. As root on Debian/Ubuntu it apt-installs everything else,
# python3-venv included; as another user it names what is missing and goes on
# (the privileged tests skip without root anyway).
#
# A venv is complete only when DIR/.installed exists: it is removed before
# pip runs and written when pip succeeded. A venv without it, or whose python
# or pip does not run, is half-made (an install that failed or was
# interrupted) and is deleted and made again.
set -euo pipefail

RUNTIME_PACKAGES=(fuse3 libfuse3-3 util-linux mount tar gzip zstd)
TEST_PACKAGES=(fio bindfs procps git python3)  # python3: /usr/bin/python3 for pods played by uid 1000
MIN_PYTHON=3.11

say() { echo "install.sh: $*" >&2; }

missing_packages() {
    local p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
    done
}

apt_install() {
    if ! command -v dpkg-query >/dev/null; then
        say "not a Debian/Ubuntu system: make sure these (or your distribution's equivalents) are installed: $*"
        return 0
    fi
    local missing
    mapfile -t missing < <(missing_packages "$@")
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" != 0 ]; then
        say "not root, so not installing: ${missing[*]} (as root: apt-get install ${missing[*]})"
        return 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

check_python() {
    if ! command -v python3 >/dev/null; then
        say "python3 is not installed; fusepath needs Python >= $MIN_PYTHON (Debian 12: apt-get install python3 python3-venv)"
        exit 1
    fi
    if ! python3 -c "import sys; sys.exit(sys.version_info < (${MIN_PYTHON/./, }))"; then
        say "fusepath needs Python >= $MIN_PYTHON; python3 is $(python3 -V 2>&1)"
        exit 1
    fi
    # Debian ships venv without ensurepip unless python3-venv is installed.
    if ! python3 -c "import ensurepip, venv" 2>/dev/null; then
        apt_install python3-venv
        if ! python3 -c "import ensurepip, venv" 2>/dev/null; then
            say "python3 cannot make a venv: install python3-venv (Debian 12: apt-get install python3-venv)"
            exit 1
        fi
    fi
}

venv_works() {
    local dir=$1
    [ -f "$dir/.installed" ] && "$dir/bin/python" -c "pass" 2>/dev/null && "$dir/bin/python" -m pip --version >/dev/null 2>&1
}

make_venv() {
    local dir=$1 extras=$2
    check_python
    if [ -e "$dir" ] && ! venv_works "$dir"; then
        say "$dir is half-made (an earlier install failed or was interrupted): making it again"
        rm -rf -- "$dir"
    fi
    [ -x "$dir/bin/python" ] || python3 -m venv "$dir"
    rm -f -- "$dir/.installed"
    "$dir/bin/python" -m pip install -q --upgrade pip >/dev/null
    if [ -n "$extras" ]; then
        "$dir/bin/python" -m pip install -q -e ".[$extras]"
    else
        "$dir/bin/python" -m pip install -q .
    fi
    touch "$dir/.installed"
}

case "${1:-}" in
    system) apt_install "${RUNTIME_PACKAGES[@]}" ;;
    system-test) apt_install "${RUNTIME_PACKAGES[@]}" "${TEST_PACKAGES[@]}" ;;
    venv) make_venv "${2:?venv directory}" "${3:-}" ;;
    *) echo "usage: $0 system|system-test|venv DIR [EXTRAS]" >&2; exit 2 ;;
esac
