#!/usr/bin/env bash
# Install the reference oracles and run the test suite (the README's test command).
#
# The parity tests compare minisd against diffusers, transformers, open_clip, k-diffusion and the original LDM code.
# open_clip, timm and k-diffusion import torchvision; the only torchvision build that imports on these machines is
# 0.29.1, which pins torch 2.14.1, so the test environment uses that pair (minisd itself needs no torchvision and
# runs on the CPU torch 2.13.0 wheel the README installs). All of these wheels are served from the local disk.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.14.1 torchvision==0.29.1
python -m pip install -q -e ".[test]"
python -m pip install -q --no-deps stable-diffusion-sdkit==2.1.5   # the original ldm.* code, without its pins
# tests/test_serve_page.py drives the system's chromium (Debian's package); where it is missing, one quiet try to
# install it, which may fail (no root, no network) without failing the run: the test then skips, saying why
command -v chromium >/dev/null || (apt-get install -y -q chromium >/dev/null 2>&1 || true)
# Two workers, each file on one of them (its module fixtures built once): the CI machines have 2 cores, and most
# tests run one thread (conftest.py's one_thread: the tiny model's tensors are too small for a second one), so one
# process leaves a core idle. conftest.py puts the tutorials, a third of the suite's time in one file, first.
exec python -m pytest -n 2 --dist loadfile "$@"
