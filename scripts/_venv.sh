# Sourced by scripts/demo and scripts/test: create .venv once and install what the project needs.
# Idempotent: a stamp of pyproject.toml's hash skips pip when nothing changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  python3 -m venv .venv
fi
stamp=".venv/.loraplex-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "==> installing loraplex and its test tools into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  # The CPU build of torch first: a bare range would pull a multi-GB CUDA build.
  .venv/bin/python -m pip install -q "torch==2.13.0" || .venv/bin/python -m pip install -q "torch>=2.4"
  .venv/bin/python -m pip install -q -e ".[test]"
  echo "$want" > "$stamp"
fi
export PATH="$root/.venv/bin:$PATH"
