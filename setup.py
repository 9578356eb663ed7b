"""Package discovery for the deployment layout (metadata lives in pyproject.toml).

The top-level folders are the deployment; each is mapped into one `secdfd` namespace so imports
never clash with other packages (`common/` is `secdfd.common`, and so on). Every folder below them
is found by namespace discovery, never listed by hand: a missing entry would ship a broken wheel.
"""

from setuptools import find_namespace_packages, setup

ROOTS = ("common", "dealer", "server_a", "server_b", "client")

packages: list[str] = []
package_dir: dict[str, str] = {}
for root in ROOTS:
    package_dir[f"secdfd.{root}"] = root
    packages.append(f"secdfd.{root}")
    packages += [f"secdfd.{root}.{sub}" for sub in find_namespace_packages(root, exclude=["*__pycache__*"])]

setup(packages=packages, package_dir=package_dir)
