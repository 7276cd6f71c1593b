#!/usr/bin/env bash
# A headless browser for the HTML report test: Debian's Chromium (Playwright drives it with
# executable_path; its own browser download would need the internet). Installs the package when
# no chromium is on PATH. Prints the browser's path on stdout; exit 1 when it cannot.
set -euo pipefail
if ! command -v chromium >/dev/null 2>&1; then
  echo "chromium.sh: installing Debian's chromium (one time)" >&2
  if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y -q chromium >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q chromium >/dev/null 2>&1; } \
    || { echo "chromium.sh: could not install chromium" >&2; exit 1; }
fi
command -v chromium
