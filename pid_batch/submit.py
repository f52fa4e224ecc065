"""`pid-batch submit`: run a job spec on a Ray cluster through its Jobs API.

The job's working directory is the user's (the current directory, or --working-dir), not the
checkout pid-batch was installed from; pid_batch itself travels with it as a Ray `py_modules`
entry unless the directory already holds it (a checkout). The spec is validated here first.
"""

from __future__ import annotations

import asyncio
import shlex
import sys
from pathlib import Path
from typing import TextIO

import pid_batch
from pid_batch.job import JobConfigError, load_job


def entrypoint(spec: str, sets: list[str]) -> str:
    """The command the cluster runs: `pid-batch run` on the spec, inside the working dir."""
    args = ["python", "-m", "pid_batch.cli", "run", spec]
    for item in sets:
        args += ["--set", item]
    return shlex.join(args)


def runtime_env(working_dir: Path) -> dict:
    """The packaged directory, plus this pid_batch when the directory does not hold one."""
    env: dict = {"working_dir": str(working_dir)}
    if not (working_dir / "pid_batch" / "__init__.py").is_file():
        env["py_modules"] = [str(Path(pid_batch.__file__).resolve().parent)]
    return env


def submit(
    spec: str,
    sets: list[str],
    overrides: dict,
    working_dir: str | None,
    address: str | None,
    wait: bool,
    out: TextIO = sys.stdout,
    log: TextIO = sys.stderr,
) -> int:
    """Validate the spec, submit it, print the job id (stdout) and how to follow it (stderr);
    with `wait`, stream its logs and return its exit code (2 config error, 1 failed samples)."""
    load_job(spec, overrides)  # config errors: one line here, nothing submitted
    wd = Path(working_dir or ".").resolve()
    if not wd.is_dir():
        raise JobConfigError(f"--working-dir {str(wd)!r} is not a directory")
    try:
        rel = Path(spec).resolve().relative_to(wd)
    except ValueError:
        raise JobConfigError(
            f"the job spec {spec!r} is outside the working directory {str(wd)!r}, which is "
            "what travels to the cluster; run from its folder or pass --working-dir"
        ) from None
    from ray.job_submission import JobStatus, JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
    except (ConnectionError, RuntimeError) as e:
        where = address or "RAY_ADDRESS / http://127.0.0.1:8265"
        raise JobConfigError(f"cannot reach a Ray dashboard at {where}: {e}") from None
    job_id = client.submit_job(
        entrypoint=entrypoint(rel.as_posix(), sets), runtime_env=runtime_env(wd)
    )
    print(job_id, file=out, flush=True)
    follow = shlex.join(
        ["ray", "job", "logs", "--follow", "--address", client.get_address(), job_id]
    )
    print(f"pid-batch: submitted {job_id}; follow its logs: {follow}", file=log, flush=True)
    if not wait:
        return 0

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())
    info = client.get_job_info(job_id)
    if info.status == JobStatus.SUCCEEDED:
        return 0
    code = getattr(info, "driver_exit_code", None)
    return code if code else 1
