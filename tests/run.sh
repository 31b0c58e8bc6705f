#!/usr/bin/env bash
# Installs what is needed (MOPAC, venv with otfml) and runs the test suite with the real MOPAC.
set -euo pipefail
source "$(dirname "$0")/../.ci/install.sh"
ruff check otfml
python -m pytest -q -p no:cacheprovider tests "$@"
