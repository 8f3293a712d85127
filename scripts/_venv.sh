# Sourced by scripts/demo and scripts/test: create .venv once and install what the project needs.
# The demo sets LORAPLEX_EXTRAS=demo (the package and the client its apps use), scripts/test
# LORAPLEX_EXTRAS=test (the test tools too, a superset, and Debian's chromium,
# scripts/_chromium.sh). Idempotent: a stamp of pyproject.toml's hash per install kind skips pip
# when nothing changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
extras="${LORAPLEX_EXTRAS:-}"
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  python3 -m venv .venv
fi
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
stamp=".venv/.loraplex-installed-${extras:-package}"
test_stamp=".venv/.loraplex-installed-test"  # the test tools hold every other kind's packages
stamped() { [ -f "$1" ] && [ "$(cat "$1")" = "$want" ]; }
if ! stamped "$stamp" && ! stamped "$test_stamp"; then
  echo "==> installing loraplex${extras:+ and its $extras tools} into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  # The CPU build of torch first: a bare range would pull a multi-GB CUDA build.
  .venv/bin/python -m pip install -q "torch==2.13.0" || .venv/bin/python -m pip install -q "torch>=2.4"
  .venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
  echo "$want" > "$stamp"
fi
if [ "$extras" = test ]; then
  source "$root/scripts/_chromium.sh"
fi
export PATH="$root/.venv/bin:$PATH"
