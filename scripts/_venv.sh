# Sourced by scripts/serve and scripts/test: create or update .venv from the pinned locks.
# Idempotent and fast when nothing changed: a stamp per lock file holds the hash it was installed from.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MUSICGEN_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3.11}"

ensure_venv() {  # ensure_venv LOCKFILE...: install each lock whose content changed
  # scripts/gpu_check prepares its own environment on a GPU box without a package index, and sets this.
  [ "${MUSICGEN_SKIP_INSTALL:-0}" = 1 ] && return 0
  if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV with $PYTHON" >&2
    "$PYTHON" -m venv "$VENV"
  fi
  local file stamp want
  for file in "$@"; do
    stamp="$VENV/.stamp-${file//\//_}"
    want="$(sha256sum < "$ROOT/$file")"
    [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && continue
    echo "installing $file into $VENV" >&2
    # --no-deps: the locks are complete, and audiocraft 1.3.0's stale pins would stop pip's resolver.
    "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps -r "$ROOT/$file"
    echo "$want" > "$stamp"
  done
}

ensure_debian_packages() {  # ensure_debian_packages PACKAGE...: install the missing ones (needs root + apt)
  local missing=() pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "warning: missing Debian packages ${missing[*]}; the tests that need them will be skipped" >&2
    return 0
  fi
  echo "installing Debian packages: ${missing[*]}" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
