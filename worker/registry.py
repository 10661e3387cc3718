"""Every job type a worker daemon can run: the built-in ``noop`` and the repository jobs."""

from __future__ import annotations

from worker import repo_jobs
from worker.handlers import HandlerRegistry, default_registry


def full_registry() -> HandlerRegistry:
    """The registry `ias worker start` runs with."""
    registry = default_registry()
    repo_jobs.register(registry)
    return registry
