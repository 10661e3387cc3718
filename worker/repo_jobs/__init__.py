"""Repository jobs: the worker's handlers that write the docs/ias/ scaffold and commit it."""

from __future__ import annotations

from worker.handlers import HandlerRegistry
from worker.repo_jobs import (
    apply_decision,
    context_architect,
    create_run,
    git_repair,
    install_ias,
    update_git_policy,
)

__all__ = ["register"]

_MODULES = (install_ias, create_run, context_architect, apply_decision, update_git_policy, git_repair)


def register(registry: HandlerRegistry) -> None:
    """Add the six repository job types."""
    for module in _MODULES:
        registry.add(module.JOB_TYPE, module.handle)
