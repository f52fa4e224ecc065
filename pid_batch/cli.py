"""`pid-batch` command line: parse → config → run. Errors are one line; --verbose shows tracebacks."""

from __future__ import annotations

import argparse
import json
import sys

from pid_batch.job import JobConfigError


def _parse_set(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise JobConfigError(
                f"--set expects KEY=VALUE (e.g. model.checkpoint=s3://...); got {item!r}"
            )
        out[key] = yaml.safe_load(value)
    return out


def cmd_run(args: argparse.Namespace) -> int:
    from pid_batch import pipeline
    from pid_batch.job import load_job

    job = load_job(args.job, _parse_set(args.set))
    return pipeline.run(job).exit_code


def cmd_demo(args: argparse.Namespace) -> int:
    from pid_batch import demo, pipeline

    job = demo.demo_job(args.output)
    demo.write_demo_shards(job.input, shards=args.shards, per_shard=args.per_shard)
    print(demo.RANDOM_WEIGHTS_NOTICE, file=sys.stderr)
    result = pipeline.run(job, num_cpus=args.num_cpus)
    print(
        f"images: {job.output}/images/  timing: {job.output}/timing/  summary: {job.output}/summary.json"
    )
    return result.exit_code


def cmd_summary(args: argparse.Namespace) -> int:
    from pid_batch.summary import format_summary, read_timing, summarize

    s = summarize(read_timing(args.output))
    print(json.dumps(s, indent=2) if args.json else format_summary(s))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pid-batch", description=__doc__.splitlines()[0])
    p.add_argument("--verbose", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a YAML job spec (local Ray, or the cluster in RAY_ADDRESS)")
    r.add_argument("job", help="job spec YAML (see jobs/examples/)")
    r.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec key"
    )
    r.set_defaults(fn=cmd_run)

    d = sub.add_parser(
        "demo", help="write sample latents and decode them with a tiny random-weight preset"
    )
    d.add_argument("--output", required=True, help="output folder (created)")
    d.add_argument("--shards", type=int, default=2)
    d.add_argument("--per-shard", type=int, default=4)
    d.add_argument(
        "--num-cpus", type=int, default=None, help="CPUs for the local Ray (default: all)"
    )
    d.set_defaults(fn=cmd_demo)

    s = sub.add_parser("summary", help="summarise a run's timing table")
    s.add_argument("output", help="the job's output prefix (local path or s3://)")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    s.set_defaults(fn=cmd_summary)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (JobConfigError, FileNotFoundError, ValueError) as e:
        if args.verbose:
            raise
        print(f"pid-batch: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
