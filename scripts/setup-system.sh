#!/usr/bin/env bash
# Installs the one system package the Makefile may need on a bare Debian/Ubuntu:
# python3-venv (Debian splits venv's pip bootstrap out of python3).
set -euo pipefail
if ! command -v apt-get >/dev/null; then
    echo "python3 -m venv failed and this is not a Debian/Ubuntu system:" >&2
    echo "install your distribution's Python venv package, then run make again." >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
version=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
$SUDO apt-get update -q
$SUDO apt-get install -y -q "python${version}-venv" || $SUDO apt-get install -y -q python3-venv
