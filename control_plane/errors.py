"""Errors raised by the control plane, and nothing else.

The tree::

    IasError                      base of every error the control plane raises on purpose
    ├── InvalidArgument           a request field is malformed (carries the field name)
    ├── NotFound                  a job, worker or workspace does not exist (in the caller's workspace)
    ├── FailedPrecondition        the request is well formed but the state forbids it
    │   ├── StaleLease            a frame carries a lease epoch that is no longer current
    │   └── InvalidTransition     the job's status does not allow the change
    ├── Unauthenticated           no credential, or one that does not verify
    ├── PermissionDenied          a valid credential without the needed role
    └── Unavailable               a dependency (the database) cannot be reached right now

This module is pure (no gRPC, no I/O); ``api.status`` maps each class to a gRPC status code in one
table, so the boundary is the only place that knows about gRPC.
"""

from __future__ import annotations


class IasError(Exception):
    """Something went wrong in the control plane."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self.args[0])


class InvalidArgument(IasError):
    """A request field is invalid."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFound(IasError):
    """The requested object does not exist."""


class FailedPrecondition(IasError):
    """The object's state does not allow this request."""


class StaleLease(FailedPrecondition):
    """The lease epoch is stale: the job was re-assigned or finished since."""


class InvalidTransition(FailedPrecondition):
    """The job's status does not allow this change."""


class Unauthenticated(IasError):
    """Missing or invalid credential."""


class PermissionDenied(IasError):
    """The credential does not allow this call."""


class Unavailable(IasError):
    """A dependency of the control plane is unavailable; try again."""
