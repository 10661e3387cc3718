"""Frameworks, package managers and build/test/lint commands inferred from a scan's manifests."""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from worker.repo_jobs.context_scan import TreeScan

PYTHON_FRAMEWORKS = {
    "django": "Django", "flask": "Flask", "fastapi": "FastAPI", "starlette": "Starlette",
    "pytest": "pytest", "sqlalchemy": "SQLAlchemy", "sqlmodel": "SQLModel", "grpcio": "gRPC",
    "click": "Click", "typer": "Typer", "pydantic": "Pydantic", "nicegui": "NiceGUI",
    "celery": "Celery", "numpy": "NumPy", "pandas": "pandas", "torch": "PyTorch",
}  # fmt: skip
NODE_FRAMEWORKS = {
    "react": "React", "next": "Next.js", "vue": "Vue", "svelte": "Svelte", "@angular/core": "Angular",
    "express": "Express", "@nestjs/core": "NestJS", "jest": "Jest", "vitest": "Vitest",
    "@playwright/test": "Playwright", "typescript": "TypeScript", "vite": "Vite",
}  # fmt: skip
TEXT_FRAMEWORKS = {  # manifest -> (substring, framework)
    "Cargo.toml": (("tokio", "Tokio"), ("axum", "Axum"), ("actix-web", "Actix Web")),
    "go.mod": (("gin-gonic/gin", "Gin"), ("labstack/echo", "Echo"), ("google.golang.org/grpc", "gRPC")),
    "pom.xml": (("spring-boot", "Spring Boot"), ("junit", "JUnit")),
    "Gemfile": (("rails", "Rails"), ("rspec", "RSpec")),
    "composer.json": (("laravel/framework", "Laravel"), ("symfony/", "Symfony")),
}
MAKE_TARGETS = {"build": "build", "all": "build", "test": "test", "check": "lint", "lint": "lint"}


@dataclass(slots=True)
class Stack:
    """Detected names and commands, in the order a newcomer would try them."""

    frameworks: list[str] = field(default_factory=list)
    package_managers: list[str] = field(default_factory=list)
    commands: dict[str, list[str]] = field(default_factory=lambda: {"build": [], "test": [], "lint": []})

    def add(self, kind: str, *commands: str) -> None:
        for command in commands:
            if command not in self.commands[kind]:
                self.commands[kind].append(command)

    def name(self, target: list[str], *names: str) -> None:
        target.extend(name for name in names if name not in target)


def detect_stack(scan: TreeScan) -> Stack:
    """Apply every manifest rule the scan has files for."""
    stack = Stack()
    _make(scan, stack)  # the project's own entry points come first
    _python(scan, stack)
    _node(scan, stack)
    _simple_manifests(scan, stack)
    for manifest, rules in TEXT_FRAMEWORKS.items():
        text = scan.manifests.get(manifest, "")
        stack.name(stack.frameworks, *(name for needle, name in rules if needle in text))
    if "Dockerfile" in scan.root_files:
        stack.name(stack.frameworks, "Docker")
    return stack


def _make(scan: TreeScan, stack: Stack) -> None:
    targets = re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", scan.manifests.get("Makefile", ""), re.MULTILINE)
    for target in dict.fromkeys(targets):
        if target in MAKE_TARGETS:
            stack.add(MAKE_TARGETS[target], f"make {target}")


def _python(scan: TreeScan, stack: Stack) -> None:
    pyproject = _toml(scan.manifests.get("pyproject.toml", ""))
    tool = pyproject.get("tool", {}) if isinstance(pyproject.get("tool"), dict) else {}
    if not pyproject and not scan.root_files & {"requirements.txt", "setup.py", "setup.cfg", "Pipfile"}:
        return
    manager = _python_manager(scan, tool)
    stack.name(stack.package_managers, manager)
    run = {"uv": "uv run ", "poetry": "poetry run ", "pdm": "pdm run "}.get(manager, "")
    deps = set(_python_deps(pyproject)) | set(_requirement_names(scan.manifests.get("requirements.txt", "")))
    stack.name(stack.frameworks, *(name for dep, name in PYTHON_FRAMEWORKS.items() if dep in deps))
    if "build-system" in pyproject:
        stack.add("build", "uv build" if manager == "uv" else "python -m build")
    if "pytest" in deps or "pytest" in tool:
        stack.add("test", f"{run}pytest")
    if "ruff" in tool:
        stack.add("lint", f"{run}ruff check .")
    if "mypy" in tool:
        stack.add("lint", f"{run}mypy")


def _python_manager(scan: TreeScan, tool: dict[str, Any]) -> str:
    if "uv.lock" in scan.root_files or "uv" in tool:
        return "uv"
    if "poetry.lock" in scan.root_files or "poetry" in tool:
        return "poetry"
    if "pdm" in tool:
        return "pdm"
    return "pipenv" if "Pipfile" in scan.root_files else "pip"


def _python_deps(pyproject: dict[str, Any]) -> Iterable[str]:
    project = pyproject.get("project", {})
    if not isinstance(project, dict):
        return []
    specs = list(project.get("dependencies", []) or [])
    for extra in (project.get("optional-dependencies", {}) or {}).values():
        specs.extend(extra or [])
    groups = pyproject.get("dependency-groups", {})
    for group in groups.values() if isinstance(groups, dict) else []:
        specs.extend(item for item in group or [] if isinstance(item, str))
    return _requirement_names("\n".join(spec for spec in specs if isinstance(spec, str)))


def _requirement_names(text: str) -> list[str]:
    names = (re.split(r"[\s<>=!~;\[@(]", line.strip(), maxsplit=1)[0] for line in text.splitlines())
    return [name.lower().replace("_", "-") for name in names if name and not name.startswith(("#", "-"))]


def _node(scan: TreeScan, stack: Stack) -> None:
    if "package.json" not in scan.root_files:
        return
    lockfiles = {"pnpm-lock.yaml": "pnpm", "yarn.lock": "yarn", "bun.lockb": "bun", "bun.lock": "bun"}
    manager = next((pm for lock, pm in lockfiles.items() if lock in scan.root_files), "npm")
    stack.name(stack.package_managers, manager)
    try:
        package = json.loads(scan.manifests.get("package.json", "") or "{}")
    except ValueError:
        package = {}
    if not isinstance(package, dict):
        return
    deps = {**(package.get("dependencies") or {}), **(package.get("devDependencies") or {})}
    stack.name(stack.frameworks, *(name for dep, name in NODE_FRAMEWORKS.items() if dep in deps))
    scripts = package.get("scripts") or {}
    for kind in ("build", "test", "lint"):
        if kind in scripts:
            stack.add(kind, f"{manager} test" if kind == "test" else f"{manager} run {kind}")


def _simple_manifests(scan: TreeScan, stack: Stack) -> None:
    files = scan.root_files
    if "Cargo.toml" in files:
        stack.name(stack.package_managers, "cargo")
        stack.add("build", "cargo build")
        stack.add("test", "cargo test")
        stack.add("lint", "cargo clippy")
    if "go.mod" in files:
        stack.name(stack.package_managers, "go modules")
        stack.add("build", "go build ./...")
        stack.add("test", "go test ./...")
        stack.add("lint", "go vet ./...")
    if "pom.xml" in files:
        stack.name(stack.package_managers, "maven")
        stack.add("build", "mvn -B package")
        stack.add("test", "mvn -B test")
    if files & {"build.gradle", "build.gradle.kts"}:
        gradle = "./gradlew" if "gradlew" in files else "gradle"
        stack.name(stack.package_managers, "gradle")
        stack.add("build", f"{gradle} build")
        stack.add("test", f"{gradle} test")
    if "Gemfile" in files:
        stack.name(stack.package_managers, "bundler")
        rspec = "rspec" in scan.manifests.get("Gemfile", "")
        stack.add("test", "bundle exec rspec" if rspec else "bundle exec rake test")
    if "composer.json" in files:
        stack.name(stack.package_managers, "composer")


def _toml(text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text) if text else {}
    except tomllib.TOMLDecodeError:
        return {}
