#!/bin/sh
# Installs raygen and its dependencies into a virtual environment, the one way every raygen
# environment is made: `make install` (.venv, editable, with the test tools, on every CI
# run), and the container images (cluster/images/Dockerfile, cluster/images/Dockerfile.cuda).
#
#   cluster/images/install.sh VENV [PIP_ARGS...]     # PIP_ARGS default: .  (this checkout)
#
# torch comes first, as TORCH_SPEC says (default: the CPU build this project pins for CPU
# machines), so that nothing that depends on it pulls another build.
set -eu
venv=$1
shift
[ $# -gt 0 ] || set -- .
torch_spec=${TORCH_SPEC:-torch==2.13.0}
test -x "$venv/bin/python" || python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
# shellcheck disable=SC2086  # TORCH_SPEC may carry pip options (an index URL)
"$venv/bin/python" -c "import torch" 2>/dev/null || "$venv/bin/pip" install -q $torch_spec
"$venv/bin/pip" install -q "$@"
"$venv/bin/raygen" --version
