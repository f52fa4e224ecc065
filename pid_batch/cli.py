"""`pid-batch` command line: parse → config → run. Errors are one line; --verbose shows tracebacks."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

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
    return pipeline.run(
        job, force_takeover=args.force_takeover, started_at=args.started_at
    ).exit_code


def cmd_demo(args: argparse.Namespace) -> int:
    from pid_batch import demo, pipeline

    job = demo.demo_job(args.output, random_weights=args.random_weights)
    if args.random_weights:
        demo.write_demo_shards(job.input, shards=args.shards, per_shard=args.per_shard)
        print(demo.RANDOM_WEIGHTS_NOTICE, file=sys.stderr)
    else:
        demo.write_bundled_samples(job.input)
        print(demo.DEMO_NOTICE, file=sys.stderr)
    result = pipeline.run(job, num_cpus=args.num_cpus, started_at=args.started_at)
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


def _an_output(uri: str) -> None:
    """Refuse a URI that no run wrote (every run writes run.json first): a typo would otherwise
    read as an empty output, and `report` would write into it."""
    from pid_batch import storage

    if not storage.exists(storage.join(uri, "run.json")):
        raise FileNotFoundError(f"{uri!r} is not a pid-batch output (no run.json there)")


def cmd_summary(args: argparse.Namespace) -> int:
    from pid_batch.summary import format_summary, summarize_output

    _an_output(args.output)
    s = summarize_output(args.output)  # shard by shard: memory ~28 B per sample, not the table
    print(json.dumps(s, indent=2) if args.json else format_summary(s))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pid_batch.report import write_report

    _an_output(args.output)
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
        tiling=args.tiling,
    )
    print(json.dumps(d, indent=2) if args.json else plan.format_plan(d))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    """Validate locally, then run the spec on a Ray cluster with this directory as working dir."""
    from pid_batch.submit import submit

    return submit(
        args.job,
        args.set,
        _parse_set(args.set),
        working_dir=args.working_dir,
        address=args.address,
        wait=not args.no_wait,
    )


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

    sb = sub.add_parser(
        "submit", help="validate a job spec, then run it on a Ray cluster (Ray Jobs API)"
    )
    sb.add_argument("job", help="job spec YAML, inside the working directory")
    sb.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    sb.add_argument(
        "--working-dir",
        help="directory packaged for the job (default: the current directory)",
    )
    sb.add_argument(
        "--address", help="Ray dashboard address (default: RAY_ADDRESS, else 127.0.0.1:8265)"
    )
    sb.add_argument(
        "--no-wait", action="store_true", help="print the job id and return once submitted"
    )
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
    pl.add_argument(
        "--tiling",
        default="auto",
        choices=("auto", "always", "never"),
        help="as the job's sampling.tiling (default auto: tiles when the size fits no trained size)",
    )
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(fn=cmd_plan)
    return p


def main(argv: list[str] | None = None) -> int:
    started_at = time.time()  # a run's wall time counts from here (imports, Ray start-up)
    args = build_parser().parse_args(argv)
    args.started_at = started_at
    try:
        return args.fn(args)
    except KeyboardInterrupt as e:  # pipeline.Interrupted: SIGINT / SIGTERM
        done = getattr(e, "processed", 0)
        print(
            f"pid-batch: interrupted after {done} samples; rerun the same command to resume",
            file=sys.stderr,
        )
        return getattr(e, "exit_code", 130)
    except BrokenPipeError:  # `pid-batch inspect ... | head` closed stdout: not our error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
        return 0
    except (JobConfigError, FileNotFoundError, ValueError, OSError) as e:
        if args.verbose:
            raise
        from pid_batch.redaction import redact

        print(f"pid-batch: error: {redact(str(e))} (--verbose for the traceback)", file=sys.stderr)
        return 2


def entry() -> None:
    """The `pid-batch` console script: main(), then exit without the interpreter's teardown.

    The summary is a run's last word and its wall time is measured up to it; tearing down
    torch and Ray's modules afterwards took 2-5 s on a loaded 2-core machine (measured), which
    `time pid-batch run` would count as part of the run. Ray is shut down first.
    """
    code = main()
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
