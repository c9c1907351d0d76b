"""The wheel ships the product and nothing else.

The wheel is built from a copy of the source tree (setuptools builds in place, and a stale
``build/`` could hide or add files), offline, with the setuptools of this environment. Then:

- every module of ``store/``, ``plugin/`` and ``processfork_cli/`` (and the C source that
  ``plugin/native_pages.py`` compiles) is in it, under the name it is installed as, and
  nothing else is: not ``processfork_dev`` (the demo, the model builder, the
  test server), not ``tests/`` or ``bench/``;
- the ``pf`` console script and the two vLLM entry points are declared, and point at code the
  wheel holds;
- no shipped module imports ``openai``, ``transformers`` or ``tokenizers``: only the ``dev`` extra
  installs them, so a user of the package would get an ImportError.
"""

from __future__ import annotations

import ast
import configparser
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path, PurePosixPath

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
#: source folder -> the package it is installed as
SHIPPED = {"store": "processfork/store", "plugin": "processfork/plugin",
           "processfork_cli": "processfork_cli"}
DEV_ONLY = frozenset({"openai", "transformers", "tokenizers"})
ENTRY_POINTS = {
    "console_scripts": {"pf": "processfork_cli.main:main"},
    "vllm.general_plugins": {"processfork": "processfork.plugin.general:register"},
    "vllm.endpoint_plugins": {"processfork": "processfork.plugin.routes:ProcessForkEndpoints"},
}
NOT_SHIPPED_TOP = ("processfork_dev", "tests", "bench")
NOT_SHIPPED_MODULE = re.compile(r"^(demo.*|model_builder|live_server)\.py$")


class Wheel:
    """The file names of a built wheel, and the text of each."""

    def __init__(self, path: Path):
        with zipfile.ZipFile(path) as zf:
            self.names = zf.namelist()
            self._texts = {n: zf.read(n).decode() for n in self.names}

    def text(self, name: str) -> str:
        return self._texts[name]

    def dist_info(self, name: str) -> str:
        (found,) = [n for n in self.names if re.fullmatch(rf"[^/]+\.dist-info/{name}", n)]
        return self.text(found)

    def modules(self) -> dict[str, str]:
        return {n: self.text(n) for n in self.names if n.endswith(".py")}


def _copy_ignore(directory: str, names: list[str]) -> set[str]:
    ignored = {n for n in names if n == "__pycache__" or n.endswith((".pyc", ".egg-info"))}
    if Path(directory).resolve() == REPO_ROOT:  # the environment, caches, models, old builds
        ignored |= {n for n in names if n.startswith(".") or n in ("build", "dist")}
    return ignored


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Wheel:
    tmp = tmp_path_factory.mktemp("wheel")
    src, out = tmp / "src", tmp / "dist"
    shutil.copytree(REPO_ROOT, src, ignore=_copy_ignore)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-q", "-w", str(out), str(src)],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (path,) = out.glob("*.whl")
    return Wheel(path)


#: Files besides modules that the product needs at run time: C compiled on first use.
SHIPPED_DATA = ("*.c",)


def _source_modules(folder: str) -> set[str]:
    root = REPO_ROOT / folder
    return {f"{SHIPPED[folder]}/{p.relative_to(root).as_posix()}"
            for pattern in ("*.py", *SHIPPED_DATA) for p in root.rglob(pattern)
            if "__pycache__" not in p.parts}


@pytest.mark.parametrize("folder", sorted(SHIPPED))
def test_every_product_module_is_shipped(wheel: Wheel, folder: str):
    expected = _source_modules(folder)
    assert expected, f"no module found under {folder}/"
    shipped = {n for n in wheel.names if n.startswith(SHIPPED[folder] + "/")}
    assert sorted(expected - shipped) == [], "missing from the wheel"
    assert sorted(shipped - expected) == [], "in the wheel but not in the source tree"


def test_nothing_but_the_product_is_shipped(wheel: Wheel):
    tops = {PurePosixPath(n).parts[0] for n in wheel.names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"processfork", "processfork_cli"}
    for name in wheel.names:
        path = PurePosixPath(name)
        assert not any(part in NOT_SHIPPED_TOP for part in path.parts), name
        assert not NOT_SHIPPED_MODULE.match(path.name), name
    assert "processfork_dev" not in wheel.dist_info("top_level.txt")


def test_entry_points_are_declared_and_resolve(wheel: Wheel):
    parser = configparser.ConfigParser(delimiters=("=",))
    parser.optionxform = str  # keep names as written
    parser.read_string(wheel.dist_info("entry_points.txt"))
    modules = wheel.modules()
    for group, points in ENTRY_POINTS.items():
        assert group in parser, f"no [{group}] in entry_points.txt"
        declared = {k: v.strip() for k, v in parser[group].items()}
        assert declared == points, group
        for target in points.values():
            module, attr = target.split(":")
            path = module.replace(".", "/") + ".py"
            assert path in modules, f"{target}: {path} is not in the wheel"
            tree = ast.parse(modules[path])
            defined = {node.name for node in tree.body
                       if isinstance(node, ast.FunctionDef | ast.ClassDef)}
            assert attr in defined, f"{target}: {path} defines no {attr}"


def test_dev_only_packages_are_not_requirements(wheel: Wheel):
    """The premise of the import check: the wheel's unconditional requirements lack them."""
    required = set()
    for line in wheel.dist_info("METADATA").splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            required.add(re.split(r"[\s<>=!~;\[(]", line.split(":", 1)[1].strip())[0].lower())
    assert required, "no Requires-Dist in METADATA"
    assert not required & DEV_ONLY


# -- imports of the shipped modules ------------------------------------------------------------
_DYNAMIC_IMPORTERS = {"import_module", "__import__", "find_spec"}


def dev_only_imports(source: str, filename: str = "<source>") -> list[str]:
    """Lines of ``source`` that import a dev-only package, at any depth (functions included)."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            first = node.args[0]
            if (called in _DYNAMIC_IMPORTERS and isinstance(first, ast.Constant)
                    and isinstance(first.value, str)):
                names = [first.value]
        found += [f"{filename}:{node.lineno}: {name}" for name in names
                  if name.split(".")[0] in DEV_ONLY]
    return found


def test_the_import_check_finds_dev_imports():
    source = (
        "import os, transformers.models\n"
        "from openai import OpenAI\n"
        "def build():\n"
        "    from tokenizers import Tokenizer\n"
        "    return importlib.import_module('transformers')\n"
        "from vllm.entrypoints.openai import protocol\n"  # vLLM's module, not the openai package
        "from . import openai\n"  # a relative import
    )
    assert dev_only_imports(source) == [
        "<source>:1: transformers.models",
        "<source>:2: openai",
        "<source>:4: tokenizers",
        "<source>:5: transformers",
    ]


def test_shipped_modules_import_no_dev_only_package(wheel: Wheel):
    modules = wheel.modules()
    assert modules
    found = [hit for name, text in sorted(modules.items()) for hit in dev_only_imports(text, name)]
    assert found == []
