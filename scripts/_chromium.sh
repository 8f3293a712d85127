# Sourced by scripts/_venv.sh for the test tools only (never by the demo): Debian's chromium,
# which the console's browser test drives through Playwright's executable_path (Playwright's
# own browser downloads are never used). Idempotent; without root or apt it says so, and the
# browser test skips with that reason.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "==> installing Debian's chromium (the console's browser test)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
      >/dev/null || echo "==> chromium could not be installed: the browser test will skip"
  else
    echo "==> no chromium and no root apt: the console's browser test will skip"
  fi
fi
