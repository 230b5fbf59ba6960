#!/usr/bin/env bash
# LiteLLM's proxy in a virtualenv of its own (build/litellm-venv), for bench/gateway_overhead.py only:
# it is a comparison, not a dependency of Lamina.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv build/litellm-venv
build/litellm-venv/bin/pip install --quiet --upgrade pip
build/litellm-venv/bin/pip install --quiet "litellm[proxy]"
build/litellm-venv/bin/litellm --version
