#!/usr/bin/env bash
# Prove that two revisions of bpdq quantize to the same bytes: build tiny random Llama/Qwen2/Qwen3 model
# directories once, run a matrix of strategies (rtn, gptq, bpdq; on llama also asymmetric calibration,
# tuning, target_bpw, offload to disk, an interrupted-then-resumed run and a 2-process torchrun) through
# each revision's own `python -m bpdq.cli quantize`, and compare every checkpoint file with `cmp`-like
# byte equality (the run report and summary, which hold timings, excepted; strategy.yaml with its output
# path masked). The resumed and the 2-process runs must also equal their plain runs within each revision.
#
#   bash scripts/compare_revisions.sh OLD_REV [NEW_REV]
#
# NEW_REV defaults to this repository's working tree (uncommitted changes included); a revision is exported
# with `git archive` into a temporary directory. Each side runs with its checkout first on PYTHONPATH (and
# as working directory) under the same interpreter: $PYTHON, else .venv/bin/python of this repository (or
# of its main worktree). One thread per process, HF_HUB_OFFLINE=1. JOBS (default 2) cases run at a time.
# Everything lives in a temporary directory removed at exit, unless KEEP=1.
# Prints one line per case, `identical` or `DIFFERENT (files...)`, and a total; exit 0 when all are
# identical, 1 when any differs or a run fails, 2 on usage errors (checked before any work). A note in
# brackets says where each interrupted run stopped, and where the run reports differ beyond their timings
# (proxy losses...; information only, not part of the verdict).
set -euo pipefail

usage() { echo "usage: bash scripts/compare_revisions.sh OLD_REV [NEW_REV]   (env: PYTHON, JOBS, KEEP=1)" >&2; }
die() { echo "compare_revisions: $*" >&2; exit 2; }

case "${1:-}" in -h|--help) usage; exit 0 ;; esac
[ $# -ge 1 ] && [ $# -le 2 ] || { usage; exit 2; }

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
HELPER="$HERE/compare_revisions.py"
REPO="$(git -C "$HERE" rev-parse --show-toplevel 2>/dev/null)" || die "$HERE is not in a git repository"

resolve() {  # a revision -> its commit id, or a usage error
  git -C "$REPO" rev-parse --verify --quiet "$1^{commit}" 2>/dev/null || die "not a revision of $REPO: $1"
}
OLD_REV="$1"; OLD_ID="$(resolve "$OLD_REV")"
NEW_REV="${2:-}"; NEW_ID=""
[ -z "$NEW_REV" ] || NEW_ID="$(resolve "$NEW_REV")"

if [ -z "${PYTHON:-}" ]; then
  PYTHON="$REPO/.venv/bin/python"
  if [ ! -x "$PYTHON" ]; then  # a linked worktree: the main worktree's environment
    common="$(git -C "$REPO" rev-parse --path-format=absolute --git-common-dir)"
    PYTHON="$(dirname "$common")/.venv/bin/python"
  fi
fi
command -v "$PYTHON" >/dev/null 2>&1 || die "no Python interpreter at ${PYTHON} (set PYTHON)"
JOBS="${JOBS:-2}"
[[ "$JOBS" =~ ^[1-9][0-9]*$ ]] || die "JOBS must be a positive integer, got '$JOBS'"

TMP="$(mktemp -d "${TMPDIR:-/tmp}/bpdq-compare.XXXXXX")"
cleanup() {
  if [ "${KEEP:-0}" = 1 ]; then echo "kept: $TMP" >&2; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
CHILD=""
# A signal ends the helper in work (it ends its runs) before the clean-up; `wait` lets the trap run at once.
trap 'if [ -n "$CHILD" ]; then kill -TERM "$CHILD" 2>/dev/null; wait "$CHILD"; fi; exit 130' INT TERM
helper() { "$PYTHON" "$HELPER" "$@" & CHILD=$!; local rc=0; wait "$CHILD" || rc=$?; CHILD=""; return $rc; }

export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$TMP/tmp"
export TMPDIR="$TMP/tmp"  # the runs' own temporary files (offloaded activations) stay inside too

checkout() {  # REV_ID DIR: the revision's files, not registered anywhere in git
  mkdir -p "$2"
  git -C "$REPO" archive --format=tar "$1" | tar -x -C "$2"
}
OLD_SRC="$TMP/old/src"; checkout "$OLD_ID" "$OLD_SRC"
if [ -n "$NEW_ID" ]; then
  NEW_SRC="$TMP/new/src"; checkout "$NEW_ID" "$NEW_SRC"; NEW_NAME="$NEW_REV ($NEW_ID)"
else
  NEW_SRC="$REPO"; NEW_NAME="working tree of $REPO"
fi

for src in "$OLD_SRC" "$NEW_SRC"; do  # each side must import its own bpdq, not the editable install
  got="$(cd "$src" && PYTHONPATH="$src${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -c 'import bpdq; print(bpdq.__file__)' 2>/dev/null | tail -n 1)" \
    || die "cannot import bpdq from $src with $PYTHON"
  [ "$(realpath "$got")" = "$(realpath "$src/bpdq/__init__.py")" ] || die "$PYTHON imports bpdq from $got, not from $src"
done

echo "old: $OLD_REV ($OLD_ID)"
echo "new: $NEW_NAME"
echo "python: $PYTHON; $JOBS job(s); one thread per process"
start=$SECONDS
helper models "$TMP/models" >"$TMP/models.log" 2>&1 || { cat "$TMP/models.log" >&2; echo "compare_revisions: could not build the models" >&2; exit 1; }
helper configs "$TMP/models" "$TMP/configs"
for side in old new; do
  src="$OLD_SRC"; [ "$side" = old ] || src="$NEW_SRC"
  echo "quantizing with $side ($src):"
  helper run "$src" "$TMP/configs" "$TMP/$side" --jobs "$JOBS" --python "$PYTHON"
done
echo "compared ($((SECONDS - start)) s):"
status=0
helper compare "$TMP/old" "$TMP/new" "$TMP/configs" || status=$?
[ $status -eq 0 ] || [ "${KEEP:-0}" = 1 ] || echo "(KEEP=1 keeps the checkpoints and logs of a rerun in its temporary directory)"
exit $status
