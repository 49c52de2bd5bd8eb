"""The package shows which code is the worker's and which is a local tool: nothing the
worker or an operator command runs imports ``destination.devtools``."""

from __future__ import annotations

import ast
from pathlib import Path

import destination

PACKAGE = Path(destination.__file__).parent


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_production_code_never_imports_the_devtools() -> None:
    production = [
        path
        for path in PACKAGE.rglob("*.py")
        if "devtools" not in path.relative_to(PACKAGE).parts and path.name != "cli.py"
    ]
    assert len(production) > 30, "the walk found the package"
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(
            name for name in _imports(path) if name.startswith("destination.devtools")
        )
        for path in production
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_the_cli_names_each_command_module_by_its_folder() -> None:
    from destination.cli import _COMMANDS

    tools = {"sandbox", "produce", "demo"}
    for name, (_, module) in _COMMANDS.items():
        folder = "destination.devtools." if name in tools else "destination.commands."
        assert module.startswith(folder), (name, module)


def test_production_code_bounds_waits_without_asyncio_wait_for() -> None:
    """``asyncio.wait_for`` on Python 3.11 loses a cancellation that arrives as the
    awaited call completes: a loop built on it outlives its stop (a worker's
    housekeeping did, model test seeds 32, 41, 56). ``asyncio.timeout`` has no such flaw
    (``pipeline.waiting``)."""
    users = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if (
                isinstance(node, ast.Attribute)
                and node.attr == "wait_for"
                and isinstance(node.value, ast.Name)
                and node.value.id == "asyncio"
            ):
                users.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert users == []


def test_production_code_never_swallows_cancelled_error_around_an_await() -> None:
    """``with suppress(CancelledError): await task`` swallows a cancellation of the
    waiter too (a stop that carries on past its own bound) and waits for ever on a task
    that ignores its cancellation: ``pipeline.waiting.cancel_and_wait`` instead."""
    users = []
    for path in PACKAGE.rglob("*.py"):
        if "devtools" in path.relative_to(PACKAGE).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "suppress"
                and any(
                    isinstance(arg, ast.Attribute) and arg.attr == "CancelledError"
                    for arg in node.args
                )
            ):
                users.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert users == []
