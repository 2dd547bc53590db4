"""`helm template` and `helm lint` for machines without the helm binary, on Helm's own Go SDK.

Runs under the tools virtualenv that `deploy/tools/install-tools.sh` makes (it holds `helm-python-sdk`):

    .cache/deploy-tools/venv/bin/python deploy/helm/render_chart.py deploy/helm/dvd-serve -f my-values.yaml
    .cache/deploy-tools/venv/bin/python deploy/helm/render_chart.py deploy/helm/dvd-serve --lint

Rendering does what `helm template` does: values files are merged in order (later files win, maps merge key by key),
the merged values are checked against the chart's values.schema.json, and every template is rendered offline. The
output is one YAML stream, each document preceded by `# Source: <template>`, NOTES.txt left out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import helm_python as helm


def merge_values(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` on top of `base`: nested maps merge, anything else is replaced."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_values(merged[key], value)
        else:
            merged[key] = value
    return merged


def user_values(values_files: list[Path]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for path in values_files:
        values = merge_values(values, helm.values_from_yaml(path.read_text()) or {})
    return values


def render(chart_dir: Path, values: dict[str, Any], release: str, namespace: str) -> str:
    chart = helm.Chart.load(chart_dir)
    chart.validate_schema(chart.merge_values(values))
    manifests = chart.render(values, name=release, namespace=namespace, is_install=True)
    documents = []
    for template, text in sorted(manifests.items()):
        if template.endswith("NOTES.txt") or not text.strip():
            continue
        documents.append(f"# Source: {template}\n{text.strip()}\n")
    return "---\n" + "---\n".join(documents)


def lint(chart_dir: Path, values: dict[str, Any]) -> int:
    report = helm.lint(chart_dir, values, strict=True)
    print(json.dumps(report, indent=2))
    return 1 if report.get("errors") else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("chart", type=Path, help="chart folder")
    parser.add_argument("-f", "--values", type=Path, action="append", default=[], help="values file (repeatable)")
    parser.add_argument("--release", default="dvd-serve", help="release name (default: dvd-serve)")
    parser.add_argument("--namespace", default="default", help="release namespace (default: default)")
    parser.add_argument("--lint", action="store_true", help="lint strictly instead of rendering; JSON report")
    args = parser.parse_args(argv)
    values = user_values(args.values)
    if args.lint:
        return lint(args.chart, values)
    try:
        sys.stdout.write(render(args.chart, values, args.release, args.namespace))
    except helm.HelmError as error:
        print(f"render_chart: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
