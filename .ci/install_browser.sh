#!/usr/bin/env bash
# Install what tests/test_report.py's headless-browser test needs: Chromium and its driver from the system's
# packages (Debian/Ubuntu: chromium + chromium-driver), and selenium into the virtualenv given as $1.
# Idempotent: what is already there is kept. Usage: bash .ci/install_browser.sh .venv
set -euo pipefail
VENV="${1:?usage: $0 VENV (the virtualenv that runs the tests)}"
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    # Debian names them chromium / chromium-driver (Ubuntu's chromium-browser is a snap stub: use Debian's)
    $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi
if ! "$VENV/bin/python" -c "import selenium" >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip install -q "selenium>=4.10"
fi
echo "browser test: $(chromium --version 2>/dev/null | head -1), $(chromedriver --version | head -1 | cut -d' ' -f1-2)," \
     "selenium $("$VENV/bin/python" -c 'import selenium; print(selenium.__version__)')"
