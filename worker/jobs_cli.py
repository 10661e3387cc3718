"""`ias jobs`: submit, list, show, watch and cancel jobs from a shell or a script."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import IO, Any, TypeVar

import click
import grpc
from google.protobuf.json_format import MessageToDict
from ias.v1 import job_pb2
from ias.v1 import job_service_pb2 as jpb
from ias.v1 import job_service_pb2_grpc as jpb_grpc

from worker.cli import connection_options, fail
from worker.client import bearer, open_channel
from worker.submitter import StreamEnded, SubmitRefused, submitter

T = TypeVar("T")
_STATUSES = ["pending", "running", "done", "failed", "blocked", "cancelled"]
_TERMINAL = {job_pb2.JOB_STATUS_DONE, job_pb2.JOB_STATUS_FAILED, job_pb2.JOB_STATUS_CANCELLED}


def job_json(job: job_pb2.Job) -> dict[str, Any]:
    """A job as plain JSON: lower-case status, payload and result decoded."""
    data = MessageToDict(job, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    data["status"] = job_pb2.JobStatus.Name(job.status).removeprefix("JOB_STATUS_").lower()
    data["payload"] = json.loads(job.payload_json or "{}")
    del data["payload_json"]
    # JSON mapping of protobuf renders 64-bit integers as strings; a shell user wants numbers.
    data["lease_epoch"] = job.lease_epoch
    result = data.get("result")
    if result is not None:
        result["duration_ms"] = job.result.duration_ms
        result["counts"] = dict(job.result.counts)
    return data


def _run(
    control_plane: str, token: str | None, call: Callable[[jpb_grpc.JobServiceAsyncStub, Any], Awaitable[T]]
) -> T:
    if not token:
        fail("no token: pass --token or set IAS_TOKEN")

    async def go() -> T:
        async with open_channel(control_plane) as channel:
            return await call(jpb_grpc.JobServiceStub(channel), bearer(token or ""))

    try:
        return asyncio.run(go())
    except grpc.aio.AioRpcError as exc:
        hint = (
            " (is the control plane running? see IAS_CONTROL_PLANE)"
            if exc.code() == grpc.StatusCode.UNAVAILABLE
            else ""
        )
        fail(f"{exc.code().name.lower()}: {exc.details()}{hint}")


def _print(job: job_pb2.Job, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(job_json(job)))
    else:
        data = job_json(job)
        click.echo(
            f"{data['id']}  {data['type']:<18} {data['status']:<9} attempt {data['attempt']}"
            f"{'  ' + data['progress'] if data.get('progress') else ''}"
        )


async def _watch(
    stub: jpb_grpc.JobServiceAsyncStub,
    md: Any,
    job_id: str,
    on_change: Callable[[job_pb2.Job], None],
    deadline_s: float | None,
) -> job_pb2.Job:
    last = job_pb2.Job()
    async for reply in stub.WatchJob(jpb.WatchJobRequest(job_id=job_id), metadata=md, timeout=deadline_s):
        last = reply.job
        on_change(last)
    return last


@click.group()
def jobs() -> None:
    """Submit and follow jobs."""


@jobs.command("submit")
@connection_options
@click.option("--type", "job_type", required=True, help="Job type, e.g. noop.")
@click.option("--repo", default="", help="Repository identity the job needs.")
@click.option("--payload", default="{}", help="Payload as a JSON object, e.g. '{\"seconds\": 1}'.")
@click.option("--priority", type=click.IntRange(0, 1000), default=0, help="Lower runs first (default 50).")
@click.option("--max-attempts", type=click.IntRange(0, 100), default=0, help="Attempts allowed (default 3).")
@click.option("--idempotency-key", default="", help="Submitting the same key again returns the first job.")
@click.option("--wait", is_flag=True, help="Wait until the job finishes; exit 1 unless it is done.")
@click.option("--timeout-s", type=float, default=None, help="With --wait: give up after this long.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def submit(
    control_plane: str,
    token: str | None,
    job_type: str,
    repo: str,
    payload: str,
    priority: int,
    max_attempts: int,
    idempotency_key: str,
    wait: bool,
    timeout_s: float | None,
    as_json: bool,
) -> None:
    """Submit a job; it is pushed to an eligible worker at once."""
    try:
        if not isinstance(json.loads(payload), dict):
            fail("--payload must be a JSON object")
    except ValueError as exc:
        fail(f"--payload is not valid JSON: {exc}")

    async def call(stub: jpb_grpc.JobServiceAsyncStub, md: Any) -> job_pb2.Job:
        reply = await stub.SubmitJob(
            jpb.SubmitJobRequest(
                type=job_type,
                repo_id=repo,
                payload_json=payload,
                priority=priority,
                max_attempts=max_attempts,
                idempotency_key=idempotency_key,
            ),
            metadata=md,
        )
        if not wait:
            return reply.job
        return await _watch(stub, md, reply.job.id, lambda _j: None, timeout_s)

    job = _run(control_plane, token, call)
    _print(job, as_json)
    if wait and job.status != job_pb2.JOB_STATUS_DONE:
        raise SystemExit(1)


# A line's fields: each one's JSON type, as a Python type and by name.
_LINE_FIELDS: dict[str, tuple[type, str]] = {
    "type": (str, "string"),
    "payload": (dict, "object"),
    "repo": (str, "string"),
    "priority": (int, "integer"),
    "max_attempts": (int, "integer"),
    "idempotency_key": (str, "string"),
    "run_id": (str, "string"),
}


def parse_job_line(number: int, line: str) -> jpb.SubmitJobRequest:
    """One line of a `submit-many` file as a request; a `click.UsageError` names what is wrong."""
    try:
        data = json.loads(line)
    except ValueError as exc:
        raise click.UsageError(f"line {number}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise click.UsageError(f"line {number}: must be a JSON object")
    for key, value in data.items():
        if key not in _LINE_FIELDS:
            raise click.UsageError(f"line {number}: unknown field {key!r} (known: {', '.join(_LINE_FIELDS)})")
        kind, name = _LINE_FIELDS[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise click.UsageError(f"line {number}: {key} must be a JSON {name}")
    if not data.get("type"):
        raise click.UsageError(f"line {number}: type is required")
    return jpb.SubmitJobRequest(
        type=data["type"],
        repo_id=data.get("repo", ""),
        payload_json=json.dumps(data.get("payload", {}), separators=(",", ":")),
        priority=data.get("priority", 0),
        max_attempts=data.get("max_attempts", 0),
        idempotency_key=data.get("idempotency_key", ""),
        run_id=data.get("run_id", ""),
    )


@jobs.command("submit-many")
@connection_options
@click.argument("file", type=click.File("r"), default="-")
@click.option(
    "--in-flight",
    type=click.IntRange(1, 256),
    default=64,
    show_default=True,
    help="Submissions awaiting their commit at once.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
def submit_many(control_plane: str, token: str | None, file: IO[str], in_flight: int, as_json: bool) -> None:
    """Submit one job per line of FILE (JSON lines; - or nothing reads standard input).

    Each line is an object with "type" and optionally "payload", "repo", "priority",
    "max_attempts", "idempotency_key" and "run_id", as for `ias jobs submit`. Every line is checked
    before anything is sent. The jobs go over one stream, each committed on its own; one line per
    job is printed in the file's order, its id or why it was refused. Exits 1 if any was refused.
    """
    requests = [
        (number, parse_job_line(number, line)) for number, line in enumerate(file, start=1) if line.strip()
    ]
    outcomes: dict[int, job_pb2.Job | str] = {}

    async def call(stub: jpb_grpc.JobServiceAsyncStub, md: Any) -> None:
        todo = iter(requests)
        async with submitter(stub, md) as stream:

            async def submit_each() -> None:
                for number, request in todo:
                    try:
                        outcomes[number] = (await stream.submit(request)).job
                    except SubmitRefused as exc:
                        outcomes[number] = str(exc)

            await asyncio.gather(*(submit_each() for _ in range(min(in_flight, len(requests)) or 1)))

    began = time.perf_counter()
    try:
        _run(control_plane, token, call)
    except StreamEnded as exc:
        fail(f"{exc}; {len(outcomes)} of {len(requests)} line(s) were answered (see above)")
    finally:
        refused = _print_outcomes(requests, outcomes, as_json)
    took = time.perf_counter() - began
    click.echo(f"{len(requests) - refused} job(s) submitted, {refused} refused, in {took:.2f} s", err=True)
    if refused:
        raise SystemExit(1)


def _print_outcomes(
    requests: list[tuple[int, jpb.SubmitJobRequest]], outcomes: dict[int, job_pb2.Job | str], as_json: bool
) -> int:
    refused = 0
    for number, _ in requests:
        outcome = outcomes.get(number)
        if outcome is None:
            continue
        if isinstance(outcome, str):
            refused += 1
            click.echo(
                json.dumps({"line": number, "error": outcome}) if as_json else f"line {number}: {outcome}"
            )
        elif as_json:
            click.echo(json.dumps({"line": number, **job_json(outcome)}))
        else:
            click.echo(f"line {number}: {outcome.id}")
    return refused


@jobs.command("show")
@connection_options
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show(control_plane: str, token: str | None, job_id: str, as_json: bool) -> None:
    """Show one job."""

    async def call(stub: jpb_grpc.JobServiceAsyncStub, md: Any) -> job_pb2.Job:
        return (await stub.GetJob(jpb.GetJobRequest(job_id=job_id), metadata=md)).job

    job = _run(control_plane, token, call)
    if as_json:
        _print(job, True)
    else:
        click.echo(json.dumps(job_json(job), indent=2))


@jobs.command("list")
@connection_options
@click.option("--status", type=click.Choice(_STATUSES), default=None, help="Only jobs with this status.")
@click.option("--type", "job_type", default="", help="Only jobs of this type.")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
def list_jobs(
    control_plane: str, token: str | None, status: str | None, job_type: str, limit: int, as_json: bool
) -> None:
    """List jobs, newest first."""
    status_pb = (
        job_pb2.JobStatus.Value(f"JOB_STATUS_{status.upper()}") if status else job_pb2.JOB_STATUS_UNSPECIFIED
    )

    async def call(stub: jpb_grpc.JobServiceAsyncStub, md: Any) -> list[job_pb2.Job]:
        reply = await stub.ListJobs(
            jpb.ListJobsRequest(status=status_pb, type=job_type, limit=limit), metadata=md
        )
        return list(reply.jobs)

    for job in _run(control_plane, token, call):
        _print(job, as_json)


@jobs.command("watch")
@connection_options
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
def watch(control_plane: str, token: str | None, job_id: str, as_json: bool) -> None:
    """Print a job every time it changes until it finishes; exit 1 unless it is done."""

    async def call(stub: jpb_grpc.JobServiceAsyncStub, md: Any) -> job_pb2.Job:
        return await _watch(stub, md, job_id, lambda j: _print(j, as_json), None)

    job = _run(control_plane, token, call)
    if job.status != job_pb2.JOB_STATUS_DONE:
        raise SystemExit(1)


@jobs.command("cancel")
@connection_options
@click.argument("job_id")
@click.option("--reason", default="cancelled from the CLI")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def cancel(control_plane: str, token: str | None, job_id: str, reason: str, as_json: bool) -> None:
    """Cancel a job that has not finished."""

    async def call(stub: jpb_grpc.JobServiceAsyncStub, md: Any) -> job_pb2.Job:
        return (await stub.CancelJob(jpb.CancelJobRequest(job_id=job_id, reason=reason), metadata=md)).job

    _print(_run(control_plane, token, call), as_json)
