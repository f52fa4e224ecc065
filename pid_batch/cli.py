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
    return pipeline.run(job, force_takeover=args.force_takeover).exit_code


def cmd_demo(args: argparse.Namespace) -> int:
    from pid_batch import demo, pipeline

    job = demo.demo_job(args.output, random_weights=args.random_weights)
    if args.random_weights:
        demo.write_demo_shards(job.input, shards=args.shards, per_shard=args.per_shard)
        print(demo.RANDOM_WEIGHTS_NOTICE, file=sys.stderr)
    else:
        demo.write_bundled_samples(job.input)
        print(demo.DEMO_NOTICE, file=sys.stderr)
    result = pipeline.run(job, num_cpus=args.num_cpus)
    if not args.random_weights:
        demo.write_baselines(job)
        print("\n".join(demo.quality_lines()))
    print(
        f"images: {job.output}/images/  timing: {job.output}/timing/  summary: {job.output}/summary.json"
    )
    if not args.random_weights:
        print(
            f"baseline (the demo autoencoder's own decode, 4x smaller): {job.output}/baseline/  "
            f"side by side: pid-batch report {job.output}"
        )
    return result.exit_code


def cmd_summary(args: argparse.Namespace) -> int:
    from pid_batch.summary import format_summary, summarize_output

    s = summarize_output(args.output)  # shard by shard: memory ~28 B per sample, not the table
    print(json.dumps(s, indent=2) if args.json else format_summary(s))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pid_batch.report import write_report

    print(write_report(args.output, dest=args.dest, max_images=args.max_images))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from pid_batch.inspect_data import format_inspect, has_problems, inspect_dataset

    d = inspect_dataset(args.uri, limit=args.limit)
    print(json.dumps(d, indent=2, default=str) if args.json else format_inspect(d))
    return 1 if has_problems(d) else 0


def _pairs(text: str | None) -> dict[str, int] | None:
    if not text:
        return None
    out = {}
    for item in text.split(","):
        name, sep, count = item.partition("=")
        if not sep or not count.strip().isdigit():
            raise JobConfigError(f"expected NAME=COUNT[,NAME=COUNT...]; got {text!r}")
        out[name.strip()] = int(count)
    return out


def cmd_plan(args: argparse.Namespace) -> int:
    from pid_batch import plan

    w, sep, h = args.size.lower().partition("x")
    if not sep or not (w.isdigit() and h.isdigit()):
        raise JobConfigError(
            f"size must be WIDTHxHEIGHT in output pixels, e.g. 2048x2048; got {args.size!r}"
        )
    cluster = _pairs(args.gpus) or args.cluster
    table = plan.load_latency_table(args.table) if args.table else None
    d = plan.plan(
        args.n,
        int(w),
        int(h),
        args.variant,
        cluster,
        table,
        nodes=_pairs(args.nodes),
        image_format=args.format,
        steps=args.steps,
    )
    print(json.dumps(d, indent=2) if args.json else plan.format_plan(d))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    """Validate locally, then hand the job to `ray job submit` with this checkout as working dir."""
    import shutil
    import subprocess
    from pathlib import Path

    from pid_batch.job import load_job

    load_job(args.job, _parse_set(args.set))  # config errors fail here, before submitting
    ray_bin = shutil.which("ray")
    if ray_bin is None:
        raise JobConfigError(
            "the `ray` command is not on PATH; install pid-batch in this environment"
        )
    root = Path(__file__).resolve().parent.parent
    job = Path(args.job).resolve()
    cmd = [ray_bin, "job", "submit", "--working-dir", str(root)]
    if args.address:
        cmd += ["--address", args.address]
    if args.no_wait:
        cmd.append("--no-wait")
    try:
        rel = job.relative_to(root)
    except ValueError:
        raise JobConfigError(
            f"the job spec must live inside the checkout {str(root)!r} to travel with it"
        ) from None
    cmd += ["--", "python", "jobs/decode_latents.py", str(rel)]
    for item in args.set:
        cmd += ["--set", item]
    print(" ".join(cmd), file=sys.stderr)
    return subprocess.call(cmd)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pid-batch", description=__doc__.splitlines()[0])
    p.add_argument("--verbose", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a YAML job spec (local Ray, or the cluster in RAY_ADDRESS)")
    r.add_argument("job", help="job spec YAML (see jobs/examples/)")
    r.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec key"
    )
    r.add_argument(
        "--force-takeover",
        action="store_true",
        help="take the output's lease from a driver you know is gone (see `pid-batch run` errors)",
    )
    r.set_defaults(fn=cmd_run)

    d = sub.add_parser(
        "demo", help="decode the bundled sample latents with the bundled CPU-trained demo decoder"
    )
    d.add_argument("--output", required=True, help="output folder (created)")
    d.add_argument(
        "--random-weights",
        action="store_true",
        help="smoke test instead: tiny preset with random weights on random latents",
    )
    d.add_argument("--shards", type=int, default=2, help="with --random-weights")
    d.add_argument("--per-shard", type=int, default=4, help="with --random-weights")
    d.add_argument(
        "--num-cpus", type=int, default=None, help="CPUs for the local Ray (default: all)"
    )
    d.set_defaults(fn=cmd_demo)

    s = sub.add_parser("summary", help="summarise a run's timing table")
    s.add_argument("output", help="the job's output prefix (local path or s3://)")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    s.set_defaults(fn=cmd_summary)

    sb = sub.add_parser("submit", help="validate a job spec, then `ray job submit` it to a cluster")
    sb.add_argument("job", help="job spec YAML inside this checkout")
    sb.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    sb.add_argument("--address", help="Ray dashboard address (default: RAY_ADDRESS)")
    sb.add_argument("--no-wait", action="store_true", help="return once submitted")
    sb.set_defaults(fn=cmd_submit)

    rp = sub.add_parser(
        "report", help="write a static HTML report (contact sheet, latency plots, errors)"
    )
    rp.add_argument("output", help="the job's output prefix")
    rp.add_argument("--dest", help="where to write it (default: OUTPUT/report/)")
    rp.add_argument("--max-images", type=int, default=24)
    rp.set_defaults(fn=cmd_report)

    i = sub.add_parser(
        "inspect", help="describe a shard or a dataset prefix and the problems in it"
    )
    i.add_argument("uri", help="shard file or dataset prefix (local or s3://)")
    i.add_argument("--limit", type=int, help="read at most this many shards")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_inspect)

    pl = sub.add_parser("plan", help="estimate wall time, GPU-hours and bytes for a job")
    pl.add_argument("n", type=int, help="number of latents")
    pl.add_argument("size", help="output size WIDTHxHEIGHT, e.g. 2048x2048")
    pl.add_argument("--variant", default="flux", help="variant or backbone name (default: flux)")
    pl.add_argument("--cluster", default="cluster.yaml", help="cluster launcher YAML")
    pl.add_argument(
        "--nodes", help="node counts per type, e.g. rtx=8,gb200=2 (default: max_workers)"
    )
    pl.add_argument(
        "--gpus", help="GPU counts per accelerator instead of a cluster file, e.g. gb200=8"
    )
    pl.add_argument("--table", help="latency table JSON, or a summary.json from your own run")
    pl.add_argument("--format", default="jpeg", choices=("jpeg", "png", "webp"))
    pl.add_argument("--steps", type=int, default=4)
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(fn=cmd_plan)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt as e:  # pipeline.Interrupted: SIGINT / SIGTERM
        done = getattr(e, "processed", 0)
        print(
            f"pid-batch: interrupted after {done} samples; rerun the same command to resume",
            file=sys.stderr,
        )
        return getattr(e, "exit_code", 130)
    except (JobConfigError, FileNotFoundError, ValueError, OSError) as e:
        if args.verbose:
            raise
        from pid_batch.storage import redact

        print(f"pid-batch: error: {redact(str(e))} (--verbose for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
