"""The Dockerfiles in deploy/docker, checked statically (no Docker daemon runs on these machines).

hadolint (installed pinned by deploy/tools/install-tools.sh) must find nothing, and the files must keep the
promises their comments make: pinned base images, commented build args, dependencies installed before the source
is copied, a non-root final user, every source folder copied, the CPU image installing what deploy/install.sh
installs, and the GPU image's pins agreeing with pyproject.toml and the CPU lock.
"""

from __future__ import annotations

import ast
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.test_deploy_chart import tools_bin  # noqa: F401  (the pinned checkers, installed once)

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "deploy" / "docker"
DOCKERFILES = {"cpu": DOCKER / "cpu.Dockerfile", "gpu": DOCKER / "gpu.Dockerfile"}
CPU_LOCK = REPO / "deploy" / "requirements" / "cpu.lock"
GPU_REQUIREMENTS = DOCKER / "gpu-requirements.txt"
TORCHVISION_PTH_LINE = "import dvd_serve.common.torchvision_import_hook"


@pytest.fixture(scope="session")
def hadolint(tools_bin: Path) -> Path:
    return tools_bin / "hadolint"


def run_hadolint(hadolint: Path, dockerfile: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(hadolint), "--no-color", "--config", str(DOCKER / ".hadolint.yaml"), str(dockerfile)],
        capture_output=True, text=True, timeout=60,
    )


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for line in dockerfile.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip().removesuffix("\\") + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            result.append((word.upper(), " ".join(rest.split())))
            pending = ""
    return result


def stages(dockerfile: Path) -> list[list[tuple[str, str]]]:
    """Instructions grouped by build stage; the global ARGs before the first FROM are stage 0."""
    grouped: list[list[tuple[str, str]]] = [[]]
    for instruction in instructions(dockerfile):
        if instruction[0] == "FROM":
            grouped.append([])
        grouped[-1].append(instruction)
    return grouped


def arg_defaults(dockerfile: Path) -> dict[str, str]:
    return dict(
        arguments.split("=", 1) for word, arguments in instructions(dockerfile) if word == "ARG" and "=" in arguments
    )


def source_folders() -> list[str]:
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "SOURCE_FOLDERS":
            return list(ast.literal_eval(node.value))
    raise AssertionError("SOURCE_FOLDERS not found in setup.py")


def lock_versions() -> dict[str, str]:
    pins = {}
    for line in CPU_LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    return pins


def gpu_pins() -> dict[str, Requirement]:
    lines = [line for line in GPU_REQUIREMENTS.read_text().splitlines() if line and not line.startswith("#")]
    return {canonicalize_name(Requirement(line).name): Requirement(line) for line in lines}


def pinned_version(requirement: Requirement) -> Version:
    (specifier,) = requirement.specifier
    assert specifier.operator == "==", str(requirement)
    return Version(specifier.version)


@pytest.mark.parametrize("image", list(DOCKERFILES))
def test_hadolint_finds_nothing(hadolint, image) -> None:
    done = run_hadolint(hadolint, DOCKERFILES[image])
    assert done.returncode == 0 and done.stdout.strip() == "", done.stdout + done.stderr


def test_hadolint_is_live(hadolint, tmp_path) -> None:
    unpinned = tmp_path / "Dockerfile"
    unpinned.write_text("FROM python:latest\nRUN pip install requests\n")
    report = run_hadolint(hadolint, unpinned).stdout
    assert "DL3007" in report and "DL3013" in report


@pytest.mark.parametrize("image", list(DOCKERFILES))
def test_base_images_are_pinned_build_args(image) -> None:
    dockerfile = DOCKERFILES[image]
    defaults = arg_defaults(dockerfile)
    bases = [arguments.split()[0] for word, arguments in instructions(dockerfile) if word == "FROM"]
    assert bases and all(re.fullmatch(r"\$\{[A-Z_]+\}", base) for base in bases)
    for base in bases:
        reference = defaults[base.strip("${}")]
        _, _, tag = reference.partition(":")
        assert re.search(r"\d+\.\d+\.\d+", tag) and "latest" not in tag, reference


@pytest.mark.parametrize("image", list(DOCKERFILES))
def test_every_build_arg_is_commented(image) -> None:
    lines = DOCKERFILES[image].read_text().splitlines()
    uncommented = [
        line for index, line in enumerate(lines) if line.startswith("ARG ") and not lines[index - 1].startswith("#")
    ]
    assert uncommented == []


@pytest.mark.parametrize("image", list(DOCKERFILES))
def test_final_stage_runs_as_the_chart_user(image) -> None:
    final = stages(DOCKERFILES[image])[-1]
    users = [arguments for word, arguments in final if word == "USER"]
    assert users == ["${APP_UID}:${APP_UID}"]
    assert arg_defaults(DOCKERFILES[image])["APP_UID"] == "10001"  # podSecurityContext.runAsUser of the chart
    assert final[-2:] == [("ENTRYPOINT", '["dvd-serve"]'), ("CMD", '["--help"]')]


@pytest.mark.parametrize("image", list(DOCKERFILES))
def test_every_source_folder_is_copied_after_the_dependencies(image) -> None:
    folders = source_folders()
    for stage in stages(DOCKERFILES[image])[1:]:
        copied = [arguments.split()[0].rstrip("/") for word, arguments in stage if word == "COPY"]
        if "common" not in copied:
            continue
        assert sorted(set(copied) & set(folders)) == sorted(folders)
        first_source = next(i for i, (word, args) in enumerate(stage) if word == "COPY" and args.startswith("common/"))
        installs = [i for i, (word, args) in enumerate(stage) if word == "RUN" and "pip install" in args]
        assert installs and installs[0] < first_source  # deps (cpu) or the build backend (gpu wheel stage) first
        return
    raise AssertionError("no stage copies the source")


def test_gpu_runtime_installs_requirements_before_the_wheel() -> None:
    final = stages(DOCKERFILES["gpu"])[-1]
    requirements = next(i for i, (word, args) in enumerate(final) if word == "RUN" and "gpu-requirements.txt" in args)
    wheel = next(i for i, (word, args) in enumerate(final) if word == "COPY" and args.startswith("--from=wheel"))
    assert requirements < wheel


def test_cpu_image_installs_what_install_sh_installs() -> None:
    install_sh = (REPO / "deploy" / "install.sh").read_text()
    assert "--no-deps -r deploy/requirements/cpu.lock" in install_sh
    assert f'echo "{TORCHVISION_PTH_LINE}" > "$SITE/dvd_serve_torchvision.pth"' in install_sh
    runs = [args for word, args in instructions(DOCKERFILES["cpu"]) if word == "RUN"]
    assert any("--no-deps" in run and "-r deploy/requirements/cpu.lock" in run for run in runs)
    assert any(f'echo "{TORCHVISION_PTH_LINE}" > "${{SITE}}/dvd_serve_torchvision.pth"' in run for run in runs)
    python_tag = arg_defaults(DOCKERFILES["cpu"])["PYTHON_IMAGE"].partition(":")[2]
    assert python_tag.startswith("3.11.") and "Python 3.11" in CPU_LOCK.read_text().splitlines()[0]


def test_gpu_pins_agree_with_pyproject_the_base_image_and_the_cpu_lock() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = gpu_pins()
    locked = lock_versions()
    (vllm_extra,) = [Requirement(r) for r in pyproject["optional-dependencies"]["gpu"]]
    base_tag = arg_defaults(DOCKERFILES["gpu"])["VLLM_IMAGE"].split(":v", 1)[1].split("@")[0]
    assert pinned_version(pins["vllm"]) == Version(base_tag) and vllm_extra.specifier.contains(base_tag)
    dependencies = [Requirement(r) for r in pyproject["dependencies"]]
    for dependency in dependencies:
        name = canonicalize_name(dependency.name)
        version = pinned_version(pins[name])
        assert dependency.specifier.contains(version), str(dependency)
        assert version == Version(locked[name]), f"{name}: GPU pin {version} != cpu.lock {locked[name]}"
        assert pins[name].extras == dependency.extras
    assert set(pins) == {canonicalize_name(d.name) for d in dependencies} | {"vllm", "torch"}


@pytest.mark.parametrize("image", list(DOCKERFILES))
def test_build_context_keeps_what_the_dockerfile_copies(image) -> None:
    dockerfile = DOCKERFILES[image]
    ignore = Path(f"{dockerfile}.dockerignore").read_text().splitlines()
    assert "*" in ignore  # everything is left out unless listed with "!"
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    sources = [
        path.rstrip("/")
        for word, arguments in instructions(dockerfile)
        if word == "COPY" and not arguments.startswith("--from")
        for path in arguments.split()[:-1]
    ]
    assert sources and set(sources) <= kept
