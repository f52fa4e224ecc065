"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/decode_latents.py JOB.yaml`.

Thin: parse → config → pipeline.run. Exit code 0 when every sample is ok, 1 when some samples
ended as error rows (see summary.json), 2 on a config error (nothing was started).
"""

from __future__ import annotations

import argparse
import sys

from pid_batch import pipeline
from pid_batch.cli import _parse_set
from pid_batch.job import JobConfigError, load_job


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("job", help="job spec YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    try:
        job = load_job(args.job, _parse_set(args.set))
    except JobConfigError as e:
        print(f"decode_latents: config error: {e}", file=sys.stderr)
        return 2
    return pipeline.run(job).exit_code


if __name__ == "__main__":
    sys.exit(main())
