#!/usr/bin/env bash
# The one install procedure, shared by the Makefile (local installs, CI) and the
# Dockerfile, so that CI exercises the same steps the image is built with.
#
#   scripts/install.sh system        apt packages the driver needs at run time (root only)
#   scripts/install.sh system-test   apt packages the tests and benchmarks need  (root only)
#   scripts/install.sh venv DIR [EXTRAS]   a virtualenv in DIR with fusepath installed
set -euo pipefail

RUNTIME_PACKAGES=(fuse3 libfuse3-3 util-linux mount tar gzip zstd)
TEST_PACKAGES=(fio bindfs procps python3)  # python3: /usr/bin/python3 for pods played by uid 1000

apt_install() {
    if [ "$(id -u)" != 0 ]; then
        echo "install.sh: not root, skipping apt packages: $*" >&2
        return 0
    fi
    missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

case "${1:-}" in
    system) apt_install "${RUNTIME_PACKAGES[@]}" ;;
    system-test) apt_install "${RUNTIME_PACKAGES[@]}" "${TEST_PACKAGES[@]}" ;;
    venv)
        dir=${2:?venv directory}
        extras=${3:-}
        [ -x "$dir/bin/python" ] || python3 -m venv "$dir"
        "$dir/bin/pip" install -q --upgrade pip >/dev/null
        if [ -n "$extras" ]; then
            "$dir/bin/pip" install -q -e ".[$extras]"
        else
            "$dir/bin/pip" install -q .
        fi
        ;;
    *) echo "usage: $0 system|system-test|venv DIR [EXTRAS]" >&2; exit 2 ;;
esac
