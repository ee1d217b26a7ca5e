# Sourced by scripts/serve and scripts/test: create or update .venv from the pinned locks.
# Idempotent and fast when nothing changed: a stamp holds the hash of the lock files it was built from.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MUSICGEN_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3.11}"

ensure_venv() {  # ensure_venv LOCKFILE...
  local stamp="$VENV/.musicgen-stamp" want
  want="$(cd "$ROOT" && cat "$@" setup.py | sha256sum | cut -d' ' -f1)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV with $PYTHON" >&2
    "$PYTHON" -m venv "$VENV"
  fi
  echo "installing $* into $VENV (several GB on a fresh machine)" >&2
  local lock
  for lock in "$@"; do
    # --no-deps: the locks are complete, and audiocraft 1.3.0's stale pins would stop pip's resolver.
    "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps -r "$ROOT/$lock"
  done
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e "$ROOT"
  echo "$want" > "$stamp"
}
