#!/usr/bin/env bash
# W1 speed, metafed (through `metafed run`'s path, benchmarks/w1_speed.py) beside the peers (shared/peers),
# in one run so ratios are comparable.
#   PEERS_PY=/tmp/peers/bin/python bash benchmarks/run_w1.sh > w1.jsonl
# PEERS_PY: a Python with torch==2.13.0, numpy, psutil and flwr[simulation] (see shared/peers/README.md).
set -u
here=$(cd "$(dirname "$0")" && pwd)
peers_src=${PEERS_SRC:-$here/../../shared/peers}
peers_py=${PEERS_PY:-}
work=$(mktemp -d)          # the peers append to raw_results.jsonl beside themselves: run a copy
cp "$peers_src"/*.py "$work"/
errors=$(realpath -m "${W1_ERRORS:-w1-errors.log}")   # every command's stderr, kept: a failed run says so here and on stderr
: > "$errors"
# run one command, print its last JSON line; on failure a JSON line naming it and the log
run() {
  local out rc
  out=$("$@" 2>>"$errors"); rc=$?
  if [ $rc -ne 0 ] || ! grep -q '^{' <<<"$out"; then
    echo "{\"failed\": \"$*\", \"exit\": $rc, \"stderr\": \"$errors\"}"; echo "failed (exit $rc): $*" >&2
  else
    grep '^{' <<<"$out" | tail -1
  fi
}
mf() { run python "$here/w1_speed.py" "$@"; }
peer() { [ -n "$peers_py" ] && (cd "$work" && run "$peers_py" "$@"); }
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
