#!/usr/bin/env bash
# The main job: installs what is needed, then runs on-the-fly MD of ethanol (500 K,
# 2000 steps of 0.5 fs, MOPAC PM7 as reference), prints what happened and writes
# workflows/runs/md_langevin/report.html (figures and summary).
# Any key can be changed: bash examples/demo.sh --set driver.steps=5000
set -euo pipefail
source "$(dirname "$0")/../.ci/install.sh"
otfml run workflows/md_langevin.yaml "$@"
otfml info workflows/runs/md_langevin/otfml.h5
otfml report workflows/runs/md_langevin
