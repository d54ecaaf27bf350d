#!/usr/bin/env bash
# W1 speed, metafed beside the peers (shared/peers), in one run so ratios are comparable.
#   PEERS_PY=/tmp/peers/bin/python bash benchmarks/run_w1.sh > w1.jsonl
# PEERS_PY: a Python with torch==2.13.0, numpy, psutil and flwr[simulation] (see shared/peers/README.md).
set -u
here=$(cd "$(dirname "$0")" && pwd)
peers_src=${PEERS_SRC:-$here/../../shared/peers}
peers_py=${PEERS_PY:-}
work=$(mktemp -d)          # the peers append to raw_results.jsonl beside themselves: run a copy
cp "$peers_src"/*.py "$work"/
mf() { python "$here/w1_speed.py" "$@" 2>/dev/null | tail -1; }
peer() { [ -n "$peers_py" ] && (cd "$work" && "$peers_py" "$@" 2>/dev/null | grep '^{' | tail -1); }
for c in 10 100; do
  mf --n 1000 --c $c --backend loop --rounds 3
  mf --n 1000 --c $c --rounds 5
  mf --n 1000 --c $c --rounds 5 --no-native
  mf --n 1000 --c $c --rounds 5 --compile
  peer fedavg_seq.py --n 1000 --c $c --rounds 3
  peer fedavg_flower.py --n 1000 --c $c --rounds 3
done
mf --n 1000 --c 1000 --rounds 5
mf --n 1000 --c 1000 --rounds 3 --no-native
mf --n 1000 --c 1000 --rounds 5 --compile
peer fedavg_seq.py --n 1000 --c 1000 --rounds 2
peer fedavg_flower.py --n 1000 --c 1000 --rounds 2
rm -rf "$work"
