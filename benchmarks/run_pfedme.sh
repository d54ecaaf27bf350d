#!/usr/bin/env bash
# All pFedMe-setting reproductions; tables to stdout. METAFED_DATA must point at shared/data for MNIST.
set -e
cd "$(dirname "$0")"
for setting in synthetic mnist; do
  for model in logistic mlp; do
    python pfedme_repro.py --setting "$setting" --model "$model" "$@"
  done
done
