#!/usr/bin/env bash
# Install the Debian packages the test suite drives: Chromium for the
# dashboard's browser test, PostgreSQL's server for the history store tests
# (they start throwaway clusters of their own). Needs root (CI runs as root)
# or sudo; prints what to install otherwise. Already-installed packages cost
# nothing.
set -euo pipefail

packages=()
command -v chromium >/dev/null 2>&1 || packages+=(chromium)
# Debian keeps initdb off the PATH, in /usr/lib/postgresql/<version>/bin.
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    packages+=(postgresql)
fi

if [ ${#packages[@]} -eq 0 ]; then
    exit 0
fi
echo "test-packages: installing ${packages[*]} from Debian's packages"
if [ "$(id -u)" -eq 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null
elif command -v sudo >/dev/null 2>&1; then
    sudo apt-get update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null
else
    echo "test-packages: run 'apt-get install ${packages[*]}' as root, then retry" >&2
    exit 1
fi
