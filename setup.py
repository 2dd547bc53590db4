"""Maps the repository's top-level folders onto the single `dvd_serve` import namespace.

`server/` installs as `dvd_serve.server`, `router/` as `dvd_serve.router`, and so on; sub-packages are found
automatically so a new folder with an `__init__.py` needs no edit here. Everything else lives in pyproject.toml.
"""

from setuptools import find_packages, setup

NAMESPACE = "dvd_serve"
SOURCE_FOLDERS = ("common", "server", "vision_worker", "lm_worker", "router", "proto", "loadtests")

package_dir: dict[str, str] = {}
packages: list[str] = []
for folder in SOURCE_FOLDERS:
    package_dir[f"{NAMESPACE}.{folder}"] = folder
    packages.append(f"{NAMESPACE}.{folder}")
    packages.extend(f"{NAMESPACE}.{folder}.{sub}" for sub in find_packages(folder))

setup(packages=packages, package_dir=package_dir)
