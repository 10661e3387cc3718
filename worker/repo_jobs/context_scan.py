"""A bounded walk of a committed tree: languages, manifests, layout, CI and size, never file contents."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import pygit2

MAX_BLOB_BYTES = 1 << 20  # manifests larger than this are not read
MAX_ENTRIES = 50_000  # the walk stops here; the result says it was truncated
SKIPPED_DIRS = frozenset({"node_modules", ".git"})
OWN_DIR = "docs/ias"  # IAS's own files are not the project's context, and change on every run

LANGUAGES = {
    ".py": "Python", ".pyi": "Python", ".ts": "TypeScript", ".tsx": "TypeScript",
    ".js": "JavaScript", ".jsx": "JavaScript", ".mjs": "JavaScript", ".cjs": "JavaScript",
    ".go": "Go", ".rs": "Rust", ".java": "Java", ".kt": "Kotlin", ".kts": "Kotlin",
    ".rb": "Ruby", ".php": "PHP", ".cs": "C#", ".c": "C", ".h": "C", ".cc": "C++",
    ".cpp": "C++", ".hpp": "C++", ".cxx": "C++", ".swift": "Swift", ".scala": "Scala",
    ".sh": "Shell", ".bash": "Shell", ".sql": "SQL", ".html": "HTML", ".css": "CSS",
    ".scss": "CSS", ".vue": "Vue", ".svelte": "Svelte", ".md": "Markdown", ".proto": "Protocol Buffers",
    ".tf": "Terraform", ".ex": "Elixir", ".exs": "Elixir", ".dart": "Dart", ".lua": "Lua",
}  # fmt: skip
MANIFESTS = frozenset(  # root files that name the stack; reported by name only
    {
        "pyproject.toml", "requirements.txt", "setup.py", "setup.cfg", "uv.lock", "poetry.lock",
        "Pipfile", "package.json", "package-lock.json", "yarn.lock", "pnpm-lock.yaml", "bun.lockb",
        "bun.lock", "Cargo.toml", "go.mod", "pom.xml", "build.gradle", "build.gradle.kts", "gradlew",
        "Gemfile", "composer.json", "Makefile", "Dockerfile", "docker-compose.yml", "compose.yaml",
    }
)  # fmt: skip
READ_MANIFESTS = frozenset(  # root files that name the stack; reported by name only
    {"pyproject.toml", "requirements.txt", "package.json", "Cargo.toml", "go.mod", "pom.xml", "Gemfile"}
    | {"composer.json", "Makefile", "build.gradle", "build.gradle.kts"}
)
CI_MARKERS = {
    ".github/workflows": "GitHub Actions",
    ".gitlab-ci.yml": "GitLab CI",
    ".ci": ".ci scripts",
    ".circleci": "CircleCI",
    "Jenkinsfile": "Jenkins",
    "azure-pipelines.yml": "Azure Pipelines",
    ".travis.yml": "Travis CI",
    ".buildkite": "Buildkite",
}


@dataclass(slots=True)
class TreeScan:
    """What a walk of one commit found; `manifests` holds root manifests' text for detection only."""

    files: int = 0
    bytes: int = 0
    skipped_large: int = 0
    truncated: bool = False
    languages: Counter[str] = field(default_factory=Counter)
    top_dirs: set[str] = field(default_factory=set)  # those holding project files
    root_files: set[str] = field(default_factory=set)
    manifests: dict[str, str] = field(default_factory=dict)
    ci: dict[str, int] = field(default_factory=dict)  # CI system -> files of its config


def scan_commit(repo: pygit2.Repository, commit: pygit2.Commit) -> TreeScan:
    """Walk `commit`'s tree breadth-first, bounded by MAX_ENTRIES."""
    scan = TreeScan()
    pending: list[tuple[str, pygit2.Tree]] = [("", commit.tree)]
    seen = 0
    while pending:
        prefix, tree = pending.pop(0)
        for entry in tree:
            seen += 1
            if seen > MAX_ENTRIES:
                scan.truncated = True
                return scan
            name = entry.name or ""
            path = f"{prefix}{name}"
            if entry.type_str == "tree":
                if name not in SKIPPED_DIRS and path != OWN_DIR:
                    subtree = repo[entry.id]
                    assert isinstance(subtree, pygit2.Tree)
                    pending.append((path + "/", subtree))
            elif entry.type_str == "blob":
                _count_blob(repo, scan, path, entry)
    return scan


def _count_blob(repo: pygit2.Repository, scan: TreeScan, path: str, entry: pygit2.Object) -> None:
    _, size = repo.odb.read_header(entry.id)  # the size without loading the blob
    scan.files += 1
    scan.bytes += size
    pure = PurePosixPath(path)
    language = LANGUAGES.get(pure.suffix.lower())
    if language:
        scan.languages[language] += 1
    for marker, system in CI_MARKERS.items():
        if path == marker or path.startswith(marker + "/"):
            scan.ci[system] = scan.ci.get(system, 0) + 1
    if len(pure.parts) != 1:
        scan.top_dirs.add(pure.parts[0])
        return
    scan.root_files.add(path)
    if path in READ_MANIFESTS:
        if size > MAX_BLOB_BYTES:
            scan.skipped_large += 1
            return
        blob = repo[entry.id]
        assert isinstance(blob, pygit2.Blob)
        scan.manifests[path] = blob.data.decode("utf-8", errors="replace")
