#!/bin/sh
# Full-size variants of the walk tests (issue 8 items 1, 6, 7), for a person
# to run as root from the repository root; CI runs the bounded defaults.
#   tests/hostile/walk_full.sh
set -eu
PY=${PY:-.venv/bin/python}
# 100,000 levels and 1,000,000 entries straight through csi_driver.fdtree
"$PY" -m tests.hostile.walk_full --levels 100000 --entries 1000000
# the same sizes through a real driver (DeleteVolume, trash, clone, snapshot refusal),
# a 2 GiB zero-file bomb and 300,000 tiny entries against a 1 MiB volume,
# and a 60 s clone/snapshot race
FUSEPATH_DEEP_LEVELS=100000 FUSEPATH_WIDE_ENTRIES=1000000 \
FUSEPATH_BOMB_BYTES=$((2 << 30)) FUSEPATH_BOMB_ENTRIES=300000 FUSEPATH_RACE_SECONDS=60 \
    "$PY" -m pytest -q -s tests/hostile/test_walk_deep_trees.py tests/hostile/test_walk_restore_bounds.py \
    tests/hostile/test_walk_clone_race.py
