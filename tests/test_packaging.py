"""merlin-mllm as a user installs it into the Merlin environment they already have (issue 25).

- pyproject.toml declares ranges, never exact pins; constraints/*.txt hold the exact stacks and
  lie inside those ranges.
- `python -m build` makes an sdist and, from it, a wheel that hold the whole package: the
  operators (which live at the repo root), the Triton model files and the package data.
- Installing the wheel into an environment that already has another supported torch and a 4.x
  transformers keeps both (pip's own dry-run report says what it would install).
"""
from __future__ import annotations

import configparser
import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / "constraints"

# What a user's environment already holds in the dry-run test: a torch other than the dev stack's
# (a CUDA build; its wheel lies on this machine's disk, where pip's config finds it) and the
# transformers 4.x that merlin-models[transformers] allows (<5).
USERS_TORCH = "2.14.1"
USERS_TRANSFORMERS = "4.57.6"


def declared_requirements() -> dict[str, list[Requirement]]:
    """pyproject.toml's requirements: "dependencies" and each extra by name."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    groups = {"dependencies": project["dependencies"], **project["optional-dependencies"]}
    return {group: [Requirement(line) for line in lines] for group, lines in groups.items()}


def pinned_versions(path: Path) -> dict[str, Version]:
    """The `name==version` pins of a constraints file, by canonical name."""
    pins = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and version, f"{path.name} line {number} is not an exact pin: {raw!r}"
        pins[canonicalize_name(name)] = Version(version)
    return pins


def run(*args: object) -> subprocess.CompletedProcess:
    """Run a command; on failure, fail the test with its output."""
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    done = subprocess.run([str(a) for a in args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} exited {done.returncode}:\n{done.stdout[-4000:]}\n"
                    f"{done.stderr[-4000:]}")
    return done


def test_pyproject_declares_ranges_not_pins():
    for group, requirements in declared_requirements().items():
        for requirement in requirements:
            operators = {spec.operator for spec in requirement.specifier}
            assert not operators & {"==", "==="}, f"{group}: {requirement} pins an exact version"
            assert ">=" in operators or "~=" in operators, f"{group}: {requirement} has no lower bound"
            assert all("+" not in spec.version for spec in requirement.specifier), (
                f"{group}: {requirement} names a build (local version)")
    transformers = next(r for r in declared_requirements()["dependencies"] if r.name == "transformers")
    lower = next(Version(s.version) for s in transformers.specifier if s.operator == ">=")
    # merlin-models[transformers] declares transformers<5,>=4.23: the plugin must install beside it.
    assert lower.major == 4 and transformers.specifier.contains(lower), transformers


@pytest.mark.parametrize("stack", ["dev.txt", "min.txt"])
def test_constraints_pin_every_dependency_inside_its_range(stack):
    path = CONSTRAINTS / stack
    if not path.exists():
        pytest.skip(f"constraints/{stack} does not exist yet")
    pins = pinned_versions(path)
    groups = declared_requirements()
    # min.txt moves only the oldest releases; dev.txt is the whole development stack.
    checked = groups["dependencies"] + (groups["test"] + groups["notebooks"] if stack == "dev.txt" else [])
    for requirement in checked:
        name = canonicalize_name(requirement.name)
        if name not in pins:
            assert stack == "min.txt", f"constraints/{stack} does not pin {requirement.name}"
            continue
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints/{stack} pins {requirement.name}=={pins[name]}, outside pyproject's {requirement}")
        if stack == "min.txt":
            # The lower bound is the oldest release tested: the one min.txt pins.
            lower = [Version(s.version) for s in requirement.specifier if s.operator in (">=", "~=")]
            assert lower == [pins[name]], (
                f"pyproject's {requirement} should have the lower bound constraints/min.txt tests: {pins[name]}")


README_SECTION = "## Add it to an existing Merlin environment"


def readme_ranges() -> dict[str, str]:
    """The README's table of supported ranges: package name -> the range it states."""
    text = (REPO / "README.md").read_text()
    assert README_SECTION in text, f"README.md lacks the section {README_SECTION!r}"
    section = text.split(README_SECTION, 1)[1].split("\n## ", 1)[0]
    ranges = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`"):
            continue
        packages = cells[0].split(" (extra", 1)[0]
        for name in re.findall(r"`([^`]+)`", packages):
            ranges[canonicalize_name(Requirement(name).name)] = cells[1].strip("`")
    return ranges


def test_readme_states_the_declared_ranges():
    stated = readme_ranges()
    declared = {canonicalize_name(r.name): r for group in declared_requirements().values() for r in group}
    for name, spec in stated.items():
        assert name in declared, f"README.md states a range for {name}, which pyproject.toml does not declare"
        assert SpecifierSet(spec) == declared[name].specifier, (
            f"README.md says {name} {spec}; pyproject.toml declares {declared[name]}")
    # Every upper bound is a known break a user must hear about; torch and transformers are the
    # ones a Merlin environment already has.
    capped = {name for name, r in declared.items() if any(s.operator in ("<", "<=", "~=") for s in r.specifier)}
    missing = sorted((capped | {"torch", "transformers"}) - set(stated))
    assert not missing, f"README.md's table of ranges lacks {missing}"


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    """The sdist and the wheel `python -m build` makes (the wheel is built from the sdist)."""
    if importlib.util.find_spec("build") is None:
        pytest.fail("the `build` package (test extra) is not installed: rerun `make env`")
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: the dev environment's setuptools builds it, without reaching an index.
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, REPO)
    wheels, sdists = sorted(out.glob("*.whl")), sorted(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in out.iterdir())
    return {"wheel": wheels[0], "sdist": sdists[0]}


def source_files(folder: str, pattern: str) -> list[str]:
    """File names in a folder of the checkout, relative to it (at least one must exist)."""
    names = sorted(p.name for p in (REPO / folder).glob(pattern))
    assert names, f"{folder}/{pattern} matches nothing in the checkout"
    return names


@pytest.mark.slow
def test_wheel_holds_the_package_its_data_and_the_cli(dists):
    with zipfile.ZipFile(dists["wheel"]) as wheel:
        names = set(wheel.namelist())
        entry_points_file = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        entry_points = configparser.ConfigParser()
        entry_points.read_string(wheel.read(entry_points_file).decode())
    expected = (
        [f"merlin_mllm/operators/{n}" for n in source_files("operators", "*.py")]
        + [f"merlin_mllm/serving/triton_models/{n}"
           for n in source_files("merlin_mllm/serving/triton_models", "*.py")]
        + [f"merlin_mllm/models/{n}" for n in source_files("merlin_mllm/models", "*.txt")]
        # every module of the package: a subpackage missing from pyproject's list would be absent
        + [p.relative_to(REPO).as_posix() for p in (REPO / "merlin_mllm").rglob("*.py")
           if "__pycache__" not in p.parts]
    )
    missing = sorted(set(expected) - names)
    assert not missing, f"the wheel lacks {missing}"
    assert not any(n.startswith(("operators/", "tests/")) for n in names), "the wheel ships repo folders"
    assert entry_points["console_scripts"]["merlin-mllm"] == "merlin_mllm.cli:app"


@pytest.mark.slow
def test_sdist_holds_what_the_wheel_is_built_from(dists):
    with tarfile.open(dists["sdist"]) as sdist:
        root, *_ = sdist.getnames()[0].split("/")
        names = {n.removeprefix(f"{root}/") for n in sdist.getnames()}
    expected = (
        ["pyproject.toml", "README.md"]
        + [f"operators/{n}" for n in source_files("operators", "*.py")]
        + [f"merlin_mllm/serving/triton_models/{n}"
           for n in source_files("merlin_mllm/serving/triton_models", "*.py")]
        + [f"merlin_mllm/models/{n}" for n in source_files("merlin_mllm/models", "*.txt")]
    )
    missing = sorted(set(expected) - names)
    assert not missing, f"the sdist lacks {missing}"


@pytest.mark.slow
def test_install_keeps_the_torch_and_transformers_the_user_has(dists, tmp_path):
    declared = {r.name: r for r in declared_requirements()["dependencies"]}
    assert Version(USERS_TORCH) != pinned_versions(CONSTRAINTS / "dev.txt")["torch"], "the user's torch is ours"
    for name, version in (("torch", USERS_TORCH), ("transformers", USERS_TRANSFORMERS)):
        assert declared[name].specifier.contains(version), f"{name} {version} is outside {declared[name]}"

    # The user's environment: a venv holding that torch and transformers. Installed with this
    # environment's pip (--python), without their dependencies: pip's report only has to show
    # whether it would replace them.
    users_env = tmp_path / "users-env"
    run(sys.executable, "-m", "venv", "--without-pip", users_env)
    users_python = users_env / "bin" / "python"
    pip = (sys.executable, "-m", "pip", "--python", users_python)
    # --no-compile: nothing runs there, so byte-compiling torch's thousands of modules would be wasted.
    run(*pip, "install", "--quiet", "--no-deps", "--no-compile", f"torch=={USERS_TORCH}",
        f"transformers=={USERS_TRANSFORMERS}")

    report_path = tmp_path / "report.json"
    run(*pip, "install", "--dry-run", "--quiet", "--report", report_path, dists["wheel"])
    report = json.loads(report_path.read_text())
    to_install = {canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
                  for item in report["install"]}

    assert "merlin-mllm" in to_install and "merlin-core" in to_install, sorted(to_install)
    assert "torch" not in to_install, f"pip would replace the user's torch {USERS_TORCH} with {to_install['torch']}"
    assert "transformers" not in to_install, (
        f"pip would replace the user's transformers {USERS_TRANSFORMERS} with {to_install['transformers']}")
