#!/usr/bin/env bash
# Installs what otfml needs into ./.venv (sourced by examples/demo.sh and tests/run.sh).
#  - MOPAC from Debian's package `mopac` when no MOPAC is configured or on PATH and we are root
#  - a virtual environment with otfml and its Python dependencies (pip)
# Set OTFML_EXTRAS (e.g. "test,mpi") to choose the pip extras.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"

if [ -z "${ASE_MOPAC_COMMAND:-}" ] && ! command -v mopac >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "otfml: installing MOPAC (Debian package mopac)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mopac >/dev/null
  else
    echo "otfml: MOPAC not found. Install it (apt-get install mopac, as root) or set" >&2
    echo "       ASE_MOPAC_COMMAND='/path/to/mopac PREFIX.mop'" >&2
  fi
fi

py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  if ! "$py" -m venv .venv 2>/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
      rm -rf .venv
      "$py" -m venv .venv
    else
      echo "otfml: '$py -m venv' failed; install python3-venv" >&2
      exit 1
    fi
  fi
fi
extras="${OTFML_EXTRAS:-test,mpi}"
stamp=".venv/.otfml-installed-$(cat setup.cfg pyproject.toml | cksum | cut -d' ' -f1)-$extras"
if [ ! -e "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e ".[$extras]"
  touch "$stamp"
fi
export PATH="$here/.venv/bin:$PATH"
