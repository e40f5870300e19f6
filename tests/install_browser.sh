#!/bin/sh
# Installs Debian's chromium and chromium-driver for tests/test_browser.py. Idempotent and quiet;
# `make test` calls it. It never fails the build: without a browser that test skips and says why.
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser: no apt-get here; tests/test_browser.py will skip" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "install_browser: not root; install chromium chromium-driver to run tests/test_browser.py" >&2
        exit 0
    fi
fi
export DEBIAN_FRONTEND=noninteractive
if ! { $SUDO apt-get update -qq && \
       $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver; } >/dev/null 2>&1; then
    echo "install_browser: apt-get could not install chromium; tests/test_browser.py will skip" >&2
fi
exit 0
