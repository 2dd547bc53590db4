"""The Helm chart (deploy/helm/dvd-serve), rendered for real and read back as Kubernetes, Ray and dvd-serve read it.

Rendering uses Helm's own Go SDK (helm-python-sdk, installed with the other checkers by
deploy/tools/install-tools.sh into .cache/deploy-tools). Three renderings: the defaults, the two-pool GPU example
(2 vision + 6 language GPUs) and the CPU trial. Every rendered core object, and every pod template inside the
RayCluster, is validated strictly against the bundled Kubernetes JSON schemas of the oldest and the newest supported
Kubernetes. The RayCluster and ServiceMonitor custom resources have no schema on any reachable registry, so their
specific fields are checked here instead: Ray's own KubeRay parser reads the worker groups, and the gateway's
command line is run in bash against stand-ins for `ray` and `dvd-serve`, then parsed by the real `dvd-serve` CLI.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "deploy" / "helm" / "dvd-serve"
EXAMPLES = REPO / "deploy" / "helm" / "examples"
RENDER_SCRIPT = REPO / "deploy" / "helm" / "render_chart.py"
DASHBOARD = REPO / "deploy" / "grafana" / "dvd-serve.json"
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")  # Chart.yaml's kubeVersion floor, and the newest schema bundled
CUSTOM_KINDS = {("ray.io/v1", "RayCluster"), ("monitoring.coreos.com/v1", "ServiceMonitor")}
RENDERINGS = {
    "defaults": (),
    "gpu-2vision-6lm": (EXAMPLES / "gpu-2vision-6lm.yaml",),
    "cpu-trial": (EXAMPLES / "cpu-trial.yaml",),
}
GPU = "nvidia.com/gpu"
RELEASE = "dvd-serve"
NAMESPACE = "inference"


@pytest.fixture(scope="session")
def tools_bin() -> Path:
    """bin/ of the checkers' virtualenv (installed once, pinned, by deploy/tools/install-tools.sh)."""
    done = subprocess.run(
        ["bash", str(REPO / "deploy" / "tools" / "install-tools.sh")], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.strip().splitlines()[-1]) / "venv" / "bin"


def render(tools_bin: Path, values_files: tuple[Path, ...]) -> subprocess.CompletedProcess:
    command = [str(tools_bin / "python"), str(RENDER_SCRIPT), str(CHART), "--release", RELEASE]
    command += ["--namespace", NAMESPACE]
    for path in values_files:
        command += ["-f", str(path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def render_documents(tools_bin: Path, values_files: tuple[Path, ...]) -> list[dict[str, Any]]:
    done = render(tools_bin, values_files)
    assert done.returncode == 0, done.stderr
    return [document for document in yaml.safe_load_all(done.stdout) if document]


def render_failure(tools_bin: Path, tmp_path: Path, values: dict[str, Any]) -> str:
    """stderr of a rendering with `values` on top of the defaults, which must fail."""
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    done = render(tools_bin, (values_file,))
    assert done.returncode != 0, "rendering should have failed"
    return done.stderr


@pytest.fixture(scope="session")
def rendered(tools_bin: Path) -> dict[str, list[dict[str, Any]]]:
    return {name: render_documents(tools_bin, files) for name, files in RENDERINGS.items()}


@pytest.fixture(scope="session")
def example_values() -> dict[str, dict[str, Any]]:
    """The merged values of each rendering (defaults, then the example file; examples only set maps and scalars)."""
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    merged = {}
    for name, files in RENDERINGS.items():
        values = defaults
        for path in files:
            values = _merge(values, yaml.safe_load(path.read_text()))
        merged[name] = values
    return merged


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    result = dict(base)
    for key, value in override.items():
        both_maps = isinstance(value, dict) and isinstance(result.get(key), dict)
        result[key] = _merge(result[key], value) if both_maps else value
    return result


def only(documents: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    matches = [document for document in documents if document["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, found {len(matches)}"
    return matches[0]


def ray_cluster_groups(documents: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """'head' and each worker group name -> its group spec."""
    spec = only(documents, "RayCluster")["spec"]
    groups = {"head": spec["headGroupSpec"]}
    groups.update({group["groupName"]: group for group in spec["workerGroupSpecs"]})
    return groups


def all_containers(documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    containers = []
    for group in ray_cluster_groups(documents).values():
        pod = group["template"]["spec"]
        containers += pod["containers"] + pod.get("initContainers", [])
    return containers


# --- Rendering and Kubernetes schemas --------------------------------------------------------------------------


def test_chart_lints_without_warnings(tools_bin: Path) -> None:
    done = subprocess.run(
        [str(tools_bin / "python"), str(RENDER_SCRIPT), str(CHART), "--lint"], capture_output=True, text=True
    )
    report = json.loads(done.stdout)
    assert report["errors"] == [] and done.returncode == 0
    assert [message for message in report["messages"] if message["severity"] >= 2] == []


@pytest.mark.parametrize(
    ("rendering", "kinds"),
    [
        ("defaults", ["PersistentVolumeClaim", "RayCluster", "Service"]),
        ("gpu-2vision-6lm", ["ConfigMap", "Ingress", "RayCluster", "Service", "ServiceMonitor"]),
        ("cpu-trial", ["RayCluster", "Secret", "Service"]),
    ],
)
def test_each_rendering_holds_the_expected_objects(rendered, rendering: str, kinds: list[str]) -> None:
    assert sorted(document["kind"] for document in rendered[rendering]) == kinds


def _as_pod_templates(documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each RayCluster group's pod template as a core `v1 PodTemplate`, so the core schemas check it."""
    return [
        {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": f"raycluster-{name}"},
            "template": group["template"],
        }
        for name, group in ray_cluster_groups(documents).items()
    ]


def _validate(tools_bin: Path, documents: list[dict[str, Any]], version: str, tmp_path: Path) -> tuple[int, str]:
    manifest = tmp_path / f"manifests-{version}.yaml"
    manifest.write_text(yaml.safe_dump_all(documents))
    done = subprocess.run(
        [str(tools_bin / "kubernetes-validate"), "--strict", "--kubernetes-version", version, str(manifest)],
        capture_output=True, text=True, timeout=120,
    )
    return done.returncode, done.stdout + done.stderr


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_validate_strictly_against_kubernetes_schemas(rendered, tools_bin, tmp_path, version) -> None:
    documents = []
    for rendering in rendered.values():
        custom = [doc for doc in rendering if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS]
        documents += [doc for doc in rendering if doc not in custom] + _as_pod_templates(rendering)
    returncode, report = _validate(tools_bin, documents, version, tmp_path)
    assert returncode == 0, report
    assert report.count(" passed for resource ") == len(documents), report
    assert "WARN" not in report and "ERROR" not in report, report


def test_the_schema_check_rejects_an_unknown_pod_field(rendered, tools_bin, tmp_path) -> None:
    template = _as_pod_templates(rendered["defaults"])[1]
    template["template"]["spec"]["containers"][0]["gpus"] = 1
    returncode, report = _validate(tools_bin, [template], KUBERNETES_VERSIONS[0], tmp_path)
    assert returncode != 0 and "gpus" in report


def test_only_known_custom_kinds_skip_the_core_schemas(rendered) -> None:
    kinds = {(doc["apiVersion"], doc["kind"]) for rendering in rendered.values() for doc in rendering}
    # Core groups are "v1" or dotted *.k8s.io; anything else is a custom resource the core schemas do not know.
    custom = {kind for kind in kinds if "/" in kind[0] and not kind[0].split("/")[0].endswith(".k8s.io")}
    assert custom == CUSTOM_KINDS


# --- GPUs, Ray resources and the serve command -------------------------------------------------------------------


@pytest.mark.parametrize("rendering", list(RENDERINGS))
def test_requests_equal_limits_in_every_container(rendered, rendering: str) -> None:
    for container in all_containers(rendered[rendering]):
        resources = container["resources"]
        assert resources["requests"] == resources["limits"], container["name"]
        assert {"cpu", "memory"} <= set(resources["limits"]), container["name"]


def test_gpu_counts_follow_the_values(rendered, example_values) -> None:
    for rendering, documents in rendered.items():
        values = example_values[rendering]
        groups = ray_cluster_groups(documents)
        assert GPU not in groups["head"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        for group_name in ("vision", "language"):
            expected = values[group_name]["gpusPerPod"]
            limits = groups[group_name]["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert int(limits.get(GPU, 0)) == expected, (rendering, group_name)
    two_pool = ray_cluster_groups(rendered["gpu-2vision-6lm"])
    total = {name: group["replicas"] * int(group["template"]["spec"]["containers"][0]["resources"]["limits"][GPU])
             for name, group in two_pool.items() if name != "head"}
    assert total == {"vision": 2, "language": 6}


@pytest.fixture(scope="session")
def ray_group_resources():
    """Ray's reading of a RayCluster group: what its autoscaler believes each pod declares to Ray."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _get_ray_resources_from_group_spec

    return _get_ray_resources_from_group_spec


@pytest.mark.parametrize("rendering", list(RENDERINGS))
def test_ray_resources_agree_with_kubernetes(rendered, example_values, ray_group_resources, rendering) -> None:
    values = example_values[rendering]
    groups = ray_cluster_groups(rendered[rendering])
    head = ray_group_resources(groups["head"], True)
    assert (head["CPU"], head["GPU"]) == (0, 0)
    assert not set(head) & {values["vision"]["rayResource"], values["language"]["rayResource"]}
    for group_name in ("vision", "language"):
        pool = values[group_name]
        group = groups[group_name]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        declared = ray_group_resources(group, False)
        assert declared["CPU"] == int(limits["cpu"]) == pool["cpu"]
        assert declared.get("GPU", 0) == int(limits.get(GPU, 0))
        custom = {key: value for key, value in declared.items() if key not in ("CPU", "GPU", "memory")}
        assert custom == {pool["rayResource"]: pool["replicasPerPod"]}
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == pool["pods"]


RECORDING_STUB = '#!/bin/bash\nprintf "%s\\0" "$@" > "$STUB_LOG/$(basename "$0").args"\n'


def kuberay_start_command(group: dict[str, Any], head: bool) -> str:
    """`ray start` as the KubeRay operator builds it from rayStartParams (read from its pod.go: "true"/"false" make
    bare flags except for include-dashboard and log-color, --block is forced, workers get --address)."""
    params = dict(group["rayStartParams"], block="true")
    if not head:
        params["address"] = f"{RELEASE}-head-svc.{NAMESPACE}.svc.cluster.local:6379"
    words = ["ray", "start"] + (["--head"] if head else [])
    for key, value in params.items():
        if value.lower() in ("true", "false") and key not in ("include-dashboard", "log-color"):
            words += [f"--{key}"] if value.lower() == "true" else []
        else:
            words.append(f"--{key}={value}")
    return " ".join(words)


@dataclasses.dataclass
class ScriptRun:
    returncode: int
    argv: dict[str, list[str]]  # "ray" / "dvd-serve" -> the arguments that stand-in was called with


def run_container_script(container: dict[str, Any], start_command: str | None, tmp_path: Path) -> ScriptRun:
    """Runs the container's command in bash with stand-ins for `ray` and `dvd-serve` that record their arguments."""
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    for name in ("ray", "dvd-serve"):
        (stubs / name).write_text(RECORDING_STUB)
        (stubs / name).chmod(0o755)
        (tmp_path / f"{name}.args").unlink(missing_ok=True)
    env = {"PATH": f"{stubs}:{os.environ['PATH']}", "STUB_LOG": str(tmp_path), "DVD_SERVE_API_KEY": "key-from-secret"}
    if start_command is not None:
        env["KUBERAY_GEN_RAY_START_CMD"] = start_command
    done = subprocess.run(container["command"] + container["args"], env=env, capture_output=True, text=True, timeout=30)
    logs = {name: tmp_path / f"{name}.args" for name in ("ray", "dvd-serve")}
    argv = {name: log.read_text().split("\0")[:-1] for name, log in logs.items() if log.exists()}
    return ScriptRun(done.returncode, argv)


@pytest.mark.parametrize("rendering", list(RENDERINGS))
def test_worker_pods_start_ray_with_their_resources(rendered, example_values, rendering, tmp_path) -> None:
    for group_name, group in ray_cluster_groups(rendered[rendering]).items():
        if group_name == "head":
            continue
        pool = example_values[rendering][group_name]
        container = group["template"]["spec"]["containers"][0]
        ray_args = run_container_script(container, kuberay_start_command(group, head=False), tmp_path).argv["ray"]
        assert ray_args[:1] == ["start"] and "--block" in ray_args
        resources = [arg.removeprefix("--resources=") for arg in ray_args if arg.startswith("--resources=")]
        assert [json.loads(value) for value in resources] == [{pool["rayResource"]: pool["replicasPerPod"]}]
        assert f"--num-gpus={pool['gpusPerPod']}" in ray_args and f"--num-cpus={pool['cpu']}" in ray_args


@pytest.fixture(scope="session")
def parse_serve_command():
    """argv of `dvd-serve` -> the ServeConfig the real CLI builds from it."""
    from dvd_serve.server.cli import build_parser
    from dvd_serve.server.serve import config_from_args

    return lambda argv: config_from_args(build_parser().parse_args(argv))


@pytest.mark.parametrize("rendering", list(RENDERINGS))
def test_gateway_command_asks_for_what_the_worker_groups_provide(
    rendered, example_values, parse_serve_command, rendering, tmp_path
) -> None:
    values = example_values[rendering]
    groups = ray_cluster_groups(rendered[rendering])
    head_container = groups["head"]["template"]["spec"]["containers"][0]
    run = run_container_script(head_container, kuberay_start_command(groups["head"], head=True), tmp_path)
    argv = run.argv
    assert run.returncode == 0
    assert argv["ray"][:2] == ["start", "--head"] and "--block" not in argv["ray"]
    assert argv["dvd-serve"][0] == "serve"
    config = parse_serve_command(argv["dvd-serve"])
    assert config.model == values["model"]["path"] and config.ray_address == "auto"
    assert config.gateway.port == values["gateway"]["port"]
    assert config.startup_timeout_s == values["serve"]["modelLoadTimeoutSeconds"]
    for pool_config, group_name in ((config.vision_pool, "vision"), (config.language_pool, "language")):
        group = groups[group_name]
        declared = {"CPU": int(group["rayStartParams"]["num-cpus"]), "GPU": int(group["rayStartParams"]["num-gpus"])}
        pool = values[group_name]
        replicas = group["replicas"] * pool["replicasPerPod"]
        assert pool_config.replicas == replicas
        assert pool_config.num_gpus * replicas == declared["GPU"] * group["replicas"]
        assert pool_config.num_cpus * pool["replicasPerPod"] <= declared["CPU"]
        assert pool_config.resources == {pool["rayResource"]: 1.0}
    expects_key = rendering != "defaults"
    assert [key.get_secret_value() for key in config.gateway.api_keys] == (["key-from-secret"] if expects_key else [])


def test_gateway_refuses_to_start_outside_kuberay(rendered, tmp_path) -> None:
    head_container = ray_cluster_groups(rendered["defaults"])["head"]["template"]["spec"]["containers"][0]
    run = run_container_script(head_container, None, tmp_path)
    assert run.returncode != 0 and run.argv == {}


def test_coupled_topology_has_no_vision_group(tools_bin, tmp_path) -> None:
    values_file = tmp_path / "coupled.yaml"
    values_file.write_text(yaml.safe_dump({"serve": {"topology": "coupled"}}))
    groups = ray_cluster_groups(render_documents(tools_bin, (values_file,)))
    assert sorted(groups) == ["head", "language"]
    head_args = groups["head"]["template"]["spec"]["containers"][0]["args"][0]
    pool_flags = [flag for flag in head_args.split() if flag.startswith("--vision-") and flag != "--vision-cache-mib"]
    assert "--topology coupled" in head_args and pool_flags == []  # the cache flag holds for coupled replicas too


# --- Probes, images, values ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("rendering", list(RENDERINGS))
def test_probes_cover_every_ray_container(rendered, example_values, rendering) -> None:
    values = example_values[rendering]
    groups = ray_cluster_groups(rendered[rendering])
    head = groups["head"]["template"]["spec"]["containers"][0]
    paths = {probe: head[probe]["httpGet"]["path"] for probe in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert paths == {"startupProbe": "/health", "readinessProbe": "/ready", "livenessProbe": "/health"}
    startup = head["startupProbe"]
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    wanted = values["serve"]["modelLoadTimeoutSeconds"] + values["gateway"]["startupProbe"]["extraSeconds"]
    assert wanted <= budget < wanted + startup["periodSeconds"]
    grace = groups["head"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > values["serve"]["drainTimeoutSeconds"]
    for group_name in ("vision", "language"):
        worker = groups[group_name]["template"]["spec"]["containers"][0]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert worker[probe]["tcpSocket"]["port"] == values["ray"]["nodeManagerPort"]
        assert groups[group_name]["rayStartParams"]["node-manager-port"] == str(values["ray"]["nodeManagerPort"])


@pytest.mark.parametrize("rendering", list(RENDERINGS))
def test_images_are_pinned(rendered, rendering) -> None:
    for container in all_containers(rendered[rendering]):
        repository, _, tag = container["image"].split("@")[0].rpartition(":")
        assert repository and re.fullmatch(r"[0-9][A-Za-z0-9_.-]*", tag), container["image"]
        assert container["imagePullPolicy"] == "IfNotPresent"


def test_containers_run_as_the_non_root_image_user(rendered) -> None:
    for rendering in rendered.values():
        for group in ray_cluster_groups(rendering).values():
            pod = group["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
            assert all(c["securityContext"]["allowPrivilegeEscalation"] is False for c in pod["containers"])


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"image": {"tag": "latest"}}, "/image/tag"),
        ({"image": {"pullPolicy": "Always"}}, "/image/pullPolicy"),
        ({"vision": {"gpus": 1}}, "additional properties 'gpus'"),
        ({"language": {"replicasPerPod": 2, "cpusPerReplica": 1}}, "replicasPerPod must equal gpusPerPod"),
        ({"vision": {"gpusPerPod": 2, "replicasPerPod": 3, "cpusPerReplica": 1}}, "multiple of gpusPerPod"),
        ({"vision": {"replicasPerPod": 4}}, "exceeds cpu"),
        ({"model": {"path": "/elsewhere/model"}}, "must lie under model.mountPath"),
        ({"apiKey": {"create": True}}, "apiKey.create needs apiKey.value"),
    ],
)
def test_inconsistent_values_are_refused(tools_bin, tmp_path, values, message) -> None:
    assert message in render_failure(tools_bin, tmp_path, values)


def test_every_value_is_documented_and_typed() -> None:
    """Each key of values.yaml has a `# --` comment block above it, except section headers (maps of documented keys)
    and keys inside a value documented as a whole (e.g. podSecurityContext)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    inside_documented = None  # indentation of a key documented as a whole
    for index, line in enumerate(lines):
        key = re.match(r"^( *)([A-Za-z][A-Za-z0-9_]*):( *)(.*)$", line)
        if not key:
            continue
        depth = len(key.group(1))
        if inside_documented is not None and depth > inside_documented:
            continue
        inside_documented = None
        comments = list(itertools.takewhile(lambda text: text.strip().startswith("#"), reversed(lines[:index])))
        if any(comment.strip().startswith("# --") for comment in comments):
            inside_documented = depth
        elif key.group(4) or lines[index + 1].strip().startswith("-"):
            undocumented.append(line.strip())
    assert undocumented == []
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert _undescribed(schema) == []


def _undescribed(schema: dict[str, Any], path: str = "") -> list[str]:
    missing = []
    for name, node in schema.get("properties", {}).items():
        if "description" not in node:
            missing.append(f"{path}/{name}")
        missing += _undescribed(node, f"{path}/{name}")
    for name, node in schema.get("definitions", {}).items():
        missing += _undescribed(node, f"#{name}")
    return missing


# --- Services, monitoring, dashboard -----------------------------------------------------------------------------


def test_service_ingress_and_monitor_point_at_the_gateway(rendered) -> None:
    documents = rendered["gpu-2vision-6lm"]
    service = only(documents, "Service")
    head_labels = ray_cluster_groups(documents)["head"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= head_labels.items()
    head_container = ray_cluster_groups(documents)["head"]["template"]["spec"]["containers"][0]
    head_ports = {port["name"] for port in head_container["ports"]}
    assert service["spec"]["ports"][0]["targetPort"] in head_ports
    backend = only(documents, "Ingress")["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": service["metadata"]["name"], "port": {"name": "http"}}
    monitor = only(documents, "ServiceMonitor")["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["namespaceSelector"]["matchNames"] == [NAMESPACE]
    endpoint = monitor["endpoints"][0]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    api_key_env = next(env for env in head_container["env"] if env["name"] == "DVD_SERVE_API_KEY")
    key_ref = api_key_env["valueFrom"]["secretKeyRef"]
    assert endpoint["authorization"]["credentials"] == key_ref


def test_model_sources(rendered) -> None:
    from dvd_serve.server.cli import build_parser

    cpu_pod = ray_cluster_groups(rendered["cpu-trial"])["vision"]["template"]["spec"]
    init = cpu_pod["initContainers"][0]
    assert init["command"][:2] == ["dvd-serve", "make-checkpoint"]
    args = build_parser().parse_args(init["command"][1:])
    assert (args.out, args.fmt, args.flash, args.shape) == ("/models/tiny-flash", "chat", True, "tiny")
    assert "emptyDir" in _model_volume(cpu_pod)
    default_pod = ray_cluster_groups(rendered["defaults"])["language"]["template"]["spec"]
    claim_name = only(rendered["defaults"], "PersistentVolumeClaim")["metadata"]["name"]
    assert _model_volume(default_pod)["persistentVolumeClaim"] == {"claimName": claim_name, "readOnly": True}
    two_pool = ray_cluster_groups(rendered["gpu-2vision-6lm"])["vision"]["template"]["spec"]
    assert _model_volume(two_pool)["persistentVolumeClaim"]["claimName"] == "internvl-models"


def _model_volume(pod: dict[str, Any]) -> dict[str, Any]:
    return next(volume for volume in pod["volumes"] if volume["name"] == "model")


def _metric_series_names() -> dict[str, set[str]]:
    """Each dvd_* metric -> the series names Prometheus stores for it."""
    from dvd_serve.server.metrics import ServingMetrics

    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    return {
        family.name: {family.name + suffix for suffix in suffixes[family.type]}
        for family in ServingMetrics().registry.collect()
        if family.name.startswith("dvd_")  # the vllm:* series are for vLLM's own dashboards
    }


def test_dashboard_charts_every_metric_and_nothing_else(rendered) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = " ".join(
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    )
    used = set(re.findall(r"\bdvd_[a-z0-9_]+", expressions))
    series = _metric_series_names()
    known = set().union(*series.values())
    assert used - known == set()
    assert [name for name, names in series.items() if not names & used] == []
    panel_ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(panel_ids) == len(set(panel_ids))
    config_map = only(rendered["gpu-2vision-6lm"], "ConfigMap")
    assert json.loads(config_map["data"]["dvd-serve.json"]) == dashboard
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"


PROMQL_CHECK = """
import json, sys
import promql_parser
for expression in json.load(sys.stdin):
    try:
        promql_parser.parse(expression)
    except Exception as error:
        print(f"{expression}: {error}")
"""


def test_dashboard_queries_are_valid_promql(tools_bin) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    # Grafana substitutes its variables before Prometheus sees a query; stand in a typical value for each.
    expressions = [
        target["expr"].replace("$__rate_interval", "5m")
        for panel in dashboard["panels"] for target in panel.get("targets", [])
    ]
    expressions.append("sum(rate(dvd_http_requests_total[5m])")  # a broken one proves the parser is live
    done = subprocess.run(
        [str(tools_bin / "python"), "-c", PROMQL_CHECK], input=json.dumps(expressions), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == [f"{expressions[-1]}: unclosed left parenthesis"]
