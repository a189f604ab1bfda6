"""The layout is a rule, not a habit: one import namespace (clipstream) over the owner's
folders, every package listed for setuptools, the SDK and the wire core importing nothing
of the server, and every module saying in its first line what it holds."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1].parent
FOLDERS = {
    "clipstream.streams": "streams",
    "clipstream.models": "models",
    "clipstream.selection": "selection",
}
#: what the thin client (the SDK and the wire core it builds on) may import of clipstream
THIN = ("clipstream.streams.wire",)
#: the SDK's modules: the wire core and each other
SDK = {"sdk.py": "clipstream.streams.sdk", "sdk_async.py": "clipstream.streams.sdk_async"}
#: the integrations for users' apps (Faust): built on the SDK and the wire core alone
INTEGRATIONS = ROOT / "streams" / "integrations"


def modules() -> list[Path]:
    return sorted(p for folder in FOLDERS.values() for p in (ROOT / folder).rglob("*.py"))


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_every_package_folder_is_listed_for_setuptools() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == FOLDERS
    on_disk = {
        name + "".join("." + part for part in init.parent.relative_to(ROOT / folder).parts)
        for name, folder in FOLDERS.items()
        for init in (ROOT / folder).rglob("__init__.py")
    }
    assert sorted(setuptools["packages"]) == sorted(on_disk)


def test_nothing_imports_a_generic_top_level_name() -> None:
    generic = {"streams", "models", "selection"}
    offenders = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in [*modules(), *sorted((ROOT / "tests").rglob("*.py"))]
        for name in imported(path)
        if name.partition(".")[0] in generic
    ]
    assert offenders == []


def test_the_sdk_and_the_wire_core_import_only_the_wire_core() -> None:
    wire = sorted((ROOT / "streams" / "wire").rglob("*.py"))
    offenders = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in [*(ROOT / "streams" / m for m in SDK), *wire]
        for name in imported(path)
        if name.startswith("clipstream")
        and not name.startswith(THIN)
        and not (path.parent.name == "streams" and name in SDK.values())
    ]
    assert offenders == []


def test_the_integrations_import_only_the_sdk_and_the_wire_core() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in sorted(INTEGRATIONS.rglob("*.py"))
        for name in imported(path)
        if name.startswith("clipstream") and not name.startswith(THIN) and name not in SDK.values()
    ]
    assert offenders == []


def test_every_module_says_what_it_holds_in_its_first_line() -> None:
    silent = []
    for path in modules():
        doc = ast.get_docstring(ast.parse(path.read_text()))
        if not doc or not doc.splitlines()[0].strip():
            silent.append(str(path.relative_to(ROOT)))
    assert silent == []
