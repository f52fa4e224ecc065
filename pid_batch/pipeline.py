"""The Ray Data graph — where Ray's API is used (besides jobs/ and one `ray.get` in
stages/reader.py, which waits for the duplicate-id scan inside a read task).

shard listing ─▶ read_shard (CPU tasks: a shard in, blocks of one actor batch out; they wait
             │   for the duplicate-id scan, plain Ray tasks started beside the job)
             ─▶ VaeActor (image inputs or baselines only: VAE encode / baseline decode)
             ─▶ DecodeActor (actor pool, warm Decoder, micro-batches per accelerator)
             ─▶ encode_write (CPU tasks: image objects, then timing parts)
             ─▶ driver: progress; per finished shard a finish_shard task (tars, timing
                compaction, done marker); summary.json

Torch-free at import: a Ray worker imports the module of the function or class it runs, so the
CPU tasks' functions come from stages.reader/resume/writer and the actors import `stages.decode`
(torch) only when they start.
"""

from __future__ import annotations

import _thread
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TextIO

# Bind a local Ray to 127.0.0.1 only; must precede `import ray` (otherwise it listens on all interfaces).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np  # noqa: E402
import ray  # noqa: E402

from pid_batch import lease, storage  # noqa: E402
from pid_batch.job import JobConfig, JobConfigError  # noqa: E402
from pid_batch.redaction import redact  # noqa: E402
from pid_batch.stages import reader, resume, writer  # noqa: E402
from pid_batch.summary import format_summary, summarize_output  # noqa: E402
from pid_batch.timing import error_reason  # noqa: E402

_FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "PID_BATCH_CACHE",
)


# Set for a Ray that run() starts itself (the raylet reads them from its environment; a user's
# own value wins). Ray keeps only as many idle worker processes as it has free CPUs and kills
# the rest after 1 s; decode actors hold CPUs while they wait on the accelerator, so on small
# machines read and encode workers were killed between tasks and later tasks paid for a new
# Python process and its imports (simulated N = 16 on 2 cores: encodes started up to 9 s after
# their batch was decoded; under 2 s with idle workers kept for 60 s). cluster.yaml sets the
# same on its nodes.
LOCAL_RAY_ENV = {"RAY_idle_worker_killing_time_threshold_ms": "60000"}

# A decode batch whose actor process died this many times (segfault, OOM kill) is not decoded
# again: its samples become error rows. Ray Data 2.60 retries such a batch forever
# (max_task_retries=-1) and offers no named parameter to bound it (`**ray_remote_args` is
# deprecated), so the run counts the starts itself (RunLedger).
DECODE_ATTEMPTS = 3
MAX_ERROR_IDS = 100  # failed sample ids a RunResult keeps as examples (the counts are exact)
READ_CPUS = 0.5  # reads are IO and parsing
# Without a terminal, one progress line every this many seconds (`ray job logs --follow`
# shows each as it comes); in a terminal, Ray Data's own progress bars.
PROGRESS_EVERY_S = float(os.environ.get("PID_BATCH_PROGRESS_S", "10"))
WATCH_EVERY_S = 1.0  # how often the driver asks the ledger whether an actor failed to start

# The node labels that name a node's accelerator class, first found wins: our own (cluster.yaml
# sets it per node type: `ray start --labels=pid-batch/accelerator=rtx`), then the one
# Ray sets itself from the GPU it detects (e.g. "GB200", "H100", "GeForce-RTX-5090"). A decode
# actor looks up its micro-batch (and a fake decoder its latency) by this class.
ACCELERATOR_LABELS = ("pid-batch/accelerator", "ray.io/accelerator-type")


def accelerator_class(labels: dict[str, str]) -> str | None:
    """A node's accelerator class from its Ray labels (None: neither label set)."""
    return next((labels[k] for k in ACCELERATOR_LABELS if labels.get(k)), None)


def unmatched_classes(job: JobConfig, node_labels: list[dict[str, str]]) -> list[str]:
    """Accelerator classes the job's per-class settings name that no node has (a misspelt class
    silently falls back to the defaults; an autoscaled node type may still join later)."""
    named = {
        k
        for setting in (job.resources.micro_batch, job.model.fake_latency_ms)
        if isinstance(setting, dict)
        for k in setting
    }
    return sorted(named - {accelerator_class(labels) for labels in node_labels})


class DecoderStartError(JobConfigError):
    """A decode (or VAE) actor could not load its model: the actor's own error, in one line."""


class RunLedger:
    """Ray actor owned by the driver: decode batch starts, and actors that failed to start."""

    def __init__(self):
        self.starts: dict[str, int] = defaultdict(int)
        self.failure: str | None = None

    def start(self, key: str) -> int:
        self.starts[key] += 1
        return self.starts[key]

    def failed(self, message: str) -> None:
        self.failure = self.failure or message

    def failed_start(self) -> str | None:
        return self.failure


class _StageActor:
    """A thin Ray adapter around a stages.decode.*Stage. A constructor that raises does not kill the
    actor (Ray would print pages of tracebacks and retry it): the error goes to the run's
    ledger, the driver ends the run with it in one line, and this actor's calls wait till then."""

    stage_name = ""

    def __init__(self, job: JobConfig, ledger: Any = None):
        from pid_batch.stages import decode  # torch: in actor processes only

        self.ledger, self.stage = ledger, None
        try:
            self.stage = getattr(decode, self.stage_name)(job, *self._where(decode))
        except Exception as e:
            if ledger is None:
                raise
            message = " ".join(f"{type(e).__name__}: {redact(str(e))}".split())
            ray.get(ledger.failed.remote(message[:2000]))

    def _where(self, decode) -> tuple:
        """Extra constructor arguments of the stage (where it runs)."""
        return ()

    def _wait_if_broken(self) -> None:
        while self.stage is None:  # the driver ends the run within WATCH_EVERY_S
            time.sleep(60)

    def __call__(self, batch):
        self._wait_if_broken()
        return self.stage(batch)


class DecodeProbe(Protocol):
    """What run(probe=...) hands every decode actor (pickled): a benchmark's view into them.

    started: once the stage is loaded (began: epoch s at which the actor's __init__ began);
    called: after each call, with its batch, its start (epoch s) and the actor thread's CPU s.
    """

    def started(self, stage: Any, began: float) -> None: ...

    def called(self, stage: Any, batch: dict, began: float, cpu_s: float) -> None: ...


class DecodeActor(_StageActor):
    """Ray actor: stages.decode.DecodeStage (loads once, maps batches). A batch whose actor died
    DECODE_ATTEMPTS times on it becomes error rows instead of a fourth try."""

    stage_name = "DecodeStage"

    def __init__(self, job: JobConfig, ledger: Any = None, probe: DecodeProbe | None = None):
        began = time.time()
        super().__init__(job, ledger)
        self.probe = probe
        if probe is not None and self.stage is not None:
            probe.started(self.stage, began)

    def _where(self, decode) -> tuple:
        ctx = ray.get_runtime_context()
        labels = ctx.get_node_labels()
        return (
            decode.Placement(
                node_id=ctx.get_node_id(), accelerator_class=accelerator_class(labels)
            ),
        )

    def __call__(self, batch):
        self._wait_if_broken()
        began, cpu0 = time.time(), time.thread_time()
        if self.ledger is not None:
            key = f"{batch['shard'][0]}[{int(batch['index'][0])}]+{len(batch['id'])}"
            if ray.get(self.ledger.start.remote(key)) > DECODE_ATTEMPTS:
                return self.stage(batch, fail=LOST_IN_DECODER)
        rows = self.stage(batch)
        if self.probe is not None:
            self.probe.called(self.stage, batch, began, time.thread_time() - cpu0)
        return rows


class VaeActor(_StageActor):
    """Ray actor: stages.decode.VaeStage (image encode, baseline decode)."""

    stage_name = "VaeStage"


LOST_IN_DECODER = (
    f"lost in the decoder: its process died {DECODE_ATTEMPTS} times on this sample's batch "
    "(a crash or an out-of-memory kill); rerun to retry it"
)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run; `processed` samples had come back by then."""

    def __init__(self, signum: int, processed: int = 0):
        super().__init__(signum, processed)
        self.signum, self.processed = signum, processed

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # 130 for SIGINT, 143 for SIGTERM, as shells report them


def _on_signal(signum: int, _frame: Any) -> None:
    raise Interrupted(signum)


def _catch_signals() -> None:
    """SIGINT/SIGTERM raise Interrupted in the driver (installed after ray.init, whose own
    SIGTERM handler exits the process mid-write with a native stack dump)."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _on_signal)


@dataclass
class RunResult:
    """What a run did: its summary (whole output, all runs) and this run's own counts."""

    summary: dict[str, Any]
    processed: int = 0
    errors: int = 0
    shards_skipped: int = 0
    shards_done: int = 0
    shards_unfinished: int = 0  # shards whose finishing (tars, compaction, marker) failed
    wall_s: float = 0.0
    error_ids: list[str] = field(default_factory=list)  # the first MAX_ERROR_IDS failed ids
    reasons: dict[str, int] = field(default_factory=dict)  # this run's errors (20 reasons at most)
    first_decode_at: float | None = None  # epoch s: the first decode call of this run began
    last_row_at: float | None = None  # epoch s: the last row came back to the driver

    def note_batch(self, decode_started_at: np.ndarray) -> None:
        """A batch of rows came back: extend the decode window."""
        started = decode_started_at[decode_started_at > 0]
        if started.size:
            first = float(started.min())
            self.first_decode_at = min(self.first_decode_at or first, first)
        self.last_row_at = time.time()

    @property
    def exit_code(self) -> int:
        # This run's own errors count too: rows a full disk kept from being written are not in
        # the summary's table.
        return 1 if self.summary.get("error", 0) or self.errors or self.shards_unfinished else 0

    def note_reason(self, message: str | None) -> None:
        """Count one of this run's errors under its timing.error_reason (20 reasons at most)."""
        reason = error_reason(message)
        if reason in self.reasons or len(self.reasons) < 20:
            self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def failed(self, ids: list[str]) -> None:
        """Count failed samples; keep their ids while fewer than MAX_ERROR_IDS are kept."""
        self.errors += len(ids)
        self.error_ids += ids[: max(0, MAX_ERROR_IDS - len(self.error_ids))]


def check_output(job: JobConfig) -> None:
    """Refuse to mix runs with different model/sampling settings under one output prefix."""
    uri = storage.join(job.output, "run.json")
    want = job.manifest()
    if storage.exists(uri):
        have = storage.read_json(uri)
        diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
        if diff:
            raise JobConfigError(
                f"output {job.output!r} was produced with different settings {diff} "
                "(existing, requested); use a new output prefix"
            )
    else:
        storage.write_json_atomic(uri, want)


def build_dataset(
    job: JobConfig,
    todo: list[dict[str, Any]],
    dups: ray.ObjectRef | None = None,
    ledger: Any = None,
    probe: DecodeProbe | None = None,
) -> ray.data.Dataset:
    """The streaming graph over the shards still to do (dups: start_duplicate_scan's ref;
    ledger: the run's RunLedger actor, None to let actors fail and retry as Ray does; probe:
    handed to every decode actor, see DecodeProbe)."""
    res = job.resources
    ctx = ray.data.DataContext.get_current()
    # Per-operator reservation on (Ray's default, set in case the process turned it off): it
    # is what gives each operator a CPU and object-store budget (half the store in all). With
    # it off (done here before, so the pool could grow on 2 CPUs) nothing bounded an
    # operator's output: a decoder faster than the encoders filled the store and spilled
    # (scale_bench.py run, 100k samples: 1.67 GB; 30k at batch 32: 453 MiB;
    # test_decoder_faster_than_encoders_does_not_spill: 1.3 GB) and Ray Data queued every
    # encode task at once (343 on 2 CPUs). The pool still grows on 2 CPUs
    # (test_actor_pool_grows_under_load): its budget is its reservation plus a share of the rest.
    ctx.op_resource_reservation_enabled = True
    # Decode tasks are one batch each (seconds). Ray Data's actor autoscaler grows a pool at
    # utilisation = tasks in flight / pool size >= 1.75 by default: with a second block queued
    # per actor it grew only once actor 1 held two, the queue had drained into that busy actor,
    # and the starting actor was dropped before it ran (measured, 2 cores, a 1→2 pool over 3
    # blocks of 3 s: 2 of 2 runs). Growing at 1.0 asks for the next actor as soon as every
    # actor is busy. How many batches wait on a busy actor is resources.prefetch_batches (VAE
    # pool: none, it is never the bottleneck).
    ctx.autoscaling_config = replace(
        ctx.autoscaling_config, actor_pool_util_upscaling_threshold=1.0
    )
    # A block that fails after its retries must not abort the whole job: run() turns the
    # samples it carried into error rows (resume.record_lost).
    ctx.max_errored_blocks = -1
    # One block per shard: small shard files otherwise get packed into a few blocks and most
    # actors idle (measured: 64-128 small shards landed in 2-6 blocks).
    ds = ray.data.from_items(todo, override_num_blocks=max(1, len(todo)))
    read = reader.read_images if job.input_kind == "images" else reader.read_shard
    # Reads at READ_CPUS: the request differs from the decode actor's, which keeps Ray Data from
    # fusing the read into the actor, so the decoder never waits on storage...
    read_kwargs = {"job": job} if job.input_kind == "images" else {"job": job, "duplicates": dups}
    ds = ds.map_batches(read, batch_size=1, fn_kwargs=read_kwargs, num_cpus=READ_CPUS)
    # ...and is cut into blocks of one actor batch (fused into the read task). A decode task is
    # then one call, so at the end of a job no actor sits on a queue of a whole shard while
    # others idle, and the encode stage receives rows as each call ends, not per shard.
    # (Measured, simulated N = 16 on 2 cores, shards of 64 = 4 calls: the last actor finished
    # its last shard 6-8 s after the first ran dry, and 16 shards of images reached the
    # encoders in one burst.)
    ds = _split_blocks(ds, rows=res.batch_size, num_cpus=READ_CPUS)
    if job.input_kind == "images" or job.images.baseline:
        ds = ds.map_batches(
            VaeActor,
            batch_size=res.batch_size,
            compute=ray.data.ActorPoolStrategy(
                min_size=1, max_size=res.max_actors, max_tasks_in_flight_per_actor=1
            ),
            fn_constructor_kwargs={"job": job, "ledger": ledger},
            # The VAE is small next to PiD: it shares a GPU (and a CPU) with a decode actor.
            num_gpus=res.gpus_per_actor / 4 if res.gpus_per_actor else 0,
            num_cpus=res.cpus_per_actor / 4,
        )
    ds = ds.map_batches(
        DecodeActor,
        batch_size=res.batch_size,
        compute=ray.data.ActorPoolStrategy(
            min_size=res.min_actors,
            max_size=res.max_actors,
            max_tasks_in_flight_per_actor=1 + res.prefetch_batches,
        ),
        fn_constructor_kwargs={"job": job, "ledger": ledger, "probe": probe},
        num_gpus=res.gpus_per_actor,
        num_cpus=res.cpus_per_actor,
        resources={f"accel_{res.accelerator}": 1} if res.accelerator else None,
        # Actors restart and their batches are retried without limit (Ray Data's defaults:
        # preemption, node loss); DecodeActor itself gives up on a batch after DECODE_ATTEMPTS.
    )
    ds = ds.map_batches(
        writer.encode_write,
        batch_size=res.encode_batch_size,
        # One id per run: a retried encode task names its parts as its first try did.
        fn_kwargs={"job": job, "run_id": uuid.uuid4().hex},
        num_cpus=res.encode_cpus,
    )
    return ds


def _split_blocks(ds: ray.data.Dataset, rows: int, num_cpus: float) -> ray.data.Dataset:
    """ds.repartition(target_num_rows_per_block=rows), fused into the task that made ds.

    Ray 2.60's repartition takes no resource arguments and the planner fuses it only into an
    upstream map with equal ones; without this it runs as a separate 1-CPU task that copies
    every shard once more (tests/test_pipeline.py checks the fused plan).
    """
    ds = ds.repartition(target_num_rows_per_block=rows)
    object.__setattr__(ds._logical_plan.dag, "ray_remote_args", {"num_cpus": num_cpus})
    return ds


def start_duplicate_scan(shards: list[resume.Shard]) -> ray.ObjectRef | None:
    """Start finding ids that occur in more than one shard (done shards included); every
    occurrence after the first becomes an error row. Returns a ref to resume.duplicate_reasons'
    {shard key: (indices, reasons)}, None for fewer than two shards.

    Plain Ray tasks (one per 16 shards, safetensors headers only) that run while the decode
    actors boot; the read tasks wait for the result. The combining task holds one Arrow row per
    sample (~30 B): fine to ~1e8 samples. (A Ray Data pass before the job cost ~5 s of start-up
    on every run, measured on 2 cores.)
    """
    if len(shards) < 2:
        return None  # repeats inside one shard are already error rows
    keys = [s.key for s in shards]
    chunks = np.array_split(np.arange(len(shards)), max(1, min(len(shards) // 16, 1024)))
    list_ids = ray.remote(num_cpus=0.25)(resume.list_ids)
    parts = [
        list_ids.remote(
            {"order": c, "shard": [shards[i].uri for i in c], "key": [keys[i] for i in c]}
        )
        for c in chunks
    ]
    return ray.remote(num_cpus=0.25)(resume.duplicates_in_parts).remote(keys, *parts)


def preflight(job: JobConfig) -> None:
    """Weights exist, match their pin and fit the network: checked before Ray and run.json."""
    m = job.model
    if m.checkpoint is None and m.text_encoder is None and m.vae is None:
        return  # random weights: nothing to check (and no torch import on the driver)
    from pid_batch.checkpoint import preflight as check_weights  # torch: the driver only

    check_weights(job)


def ensure_ray(job: JobConfig, **init_kwargs: Any) -> bool:
    """Connect to the job's cluster (ray_address / RAY_ADDRESS) or start a private local Ray;
    True when this call did (the caller disconnects), False when Ray was already initialised.

    Without an address Ray's own default attaches to any cluster a `ray start` left on the
    machine; "local" always starts a Ray of this job's own. `ray_address: auto` joins the
    machine's cluster on purpose.
    """
    if ray.is_initialized():
        return False
    address = job.ray_address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        for k, v in LOCAL_RAY_ENV.items():
            os.environ.setdefault(k, v)
    # Workers on other nodes do not share the driver's environment: pass the S3 endpoint and
    # region (never credentials: nodes use their own AWS chain) to every worker of this job.
    env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    env |= {k: v for k, v in storage.s3_settings_env().items() if k not in env}  # profile's
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "runtime_env": {"env_vars": env} if env else None,
    }
    kwargs.update(init_kwargs)
    ray.init(address=address, **kwargs)
    return True


def run(
    job: JobConfig,
    *,
    log: TextIO | None = sys.stderr,
    out: TextIO | None = sys.stdout,
    force_takeover: bool = False,
    started_at: float | None = None,
    probe: DecodeProbe | None = None,
    **init_kwargs: Any,
) -> RunResult:
    """Run a decode job to completion; resumable: rerunning skips what is already done.

    log: diagnostics and progress lines; out: the summary (None: quiet). started_at: when the
    command began (time.time()), so that the wall time covers start-up too. probe: handed to
    every decode actor (benchmarks measure through it; see DecodeProbe).
    One driver per output: the output's lease (pid_batch.lease) refuses a second one while the
    first lives; force_takeover takes it from a driver known to be gone.
    """
    t0 = time.time() if started_at is None else started_at
    preflight(job)  # the checkpoint and encoders, before Ray starts and anything is written
    plan = resume.plan_shards(job)  # reads only: refuses empty input, colliding or changed shards
    with lease.hold(job.output, force=force_takeover):
        return _run(job, plan, t0, log, out, init_kwargs, probe)


def _run(
    job: JobConfig,
    plan: resume.Plan,
    t0: float,
    log: TextIO | None,
    out: TextIO | None,
    init_kwargs: dict,
    probe: DecodeProbe | None = None,
) -> RunResult:
    check_output(job)
    result = RunResult(summary={}, shards_skipped=plan.skipped)
    if not plan.todo:  # a rerun with nothing left: no Ray, no actors, nothing written
        _say(log, f"nothing to do: all {plan.skipped} shards are done in {job.output}")
        return _summarize(job, plan, result, t0, out, write=False)
    resume.supersede(job, plan.changed)
    _say(
        log,
        f"{len(plan.todo)} shards to decode ({plan.skipped} already done); "
        "starting Ray and the decode actors",
    )
    started = ensure_ray(job, **init_kwargs)
    _catch_signals()
    nodes = [n.get("Labels") or {} for n in ray.nodes() if n.get("Alive")]
    if missing := unmatched_classes(job, nodes):
        have = sorted({c for c in map(accelerator_class, nodes) if c})
        _say(
            log,
            f"note: the job sets micro_batch/fake_latency_ms for accelerator class(es) {missing}, "
            f"which no node has now (classes: {have}); they apply once such a node joins "
            "(check the spelling)",
        )
    try:
        _decode(job, plan, result, log, probe)
    except KeyboardInterrupt as e:  # Ctrl-C before our handler, or Interrupted
        raise Interrupted(getattr(e, "signum", signal.SIGINT), result.processed) from None
    return _summarize(job, plan, result, t0, out, shutdown=started)


def _say(log: TextIO | None, message: str) -> None:
    if log is not None:
        print(f"[pid-batch] {message}", file=log, flush=True)


def _terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty() and sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def _decode(
    job: JobConfig,
    plan: resume.Plan,
    result: RunResult,
    log: TextIO | None,
    probe: DecodeProbe | None = None,
) -> None:
    """Stream the dataset over the plan's todo shards; fills result's counts as rows return."""
    todo = plan.todo
    # On the driver's node: a 0-CPU actor may land on any node, and with it on a worker node
    # that is lost mid-job every later decode call's ledger lookup raised ActorDiedError, which
    # Ray Data does not retry (test_multinode's node-loss run: 2 of 4 runs lost 192-256 of 384
    # samples). The driver's node going down ends the job anyway.
    here = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=False
    )
    ledger = ray.remote(num_cpus=0)(RunLedger).options(scheduling_strategy=here).remote()
    dups = start_duplicate_scan(plan.shards) if job.input_kind != "images" else None
    ds = build_dataset(job, todo, dups, ledger, probe)
    # Ray Data's progress bars in a terminal; elsewhere (a file, `ray job logs`) its fallback
    # prints a 10-line block every 10 s, so pid-batch's own progress lines stand in for it.
    bars = log is not None and _terminal(log)
    ray.data.DataContext.get_current().enable_progress_bars = bars
    if not bars:  # its notice that the bars are off is a warning of our own making
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    seen: dict[str, int] = defaultdict(int)
    seen_ids: dict[str, set[str]] = defaultdict(set)  # shards still open only
    finished: set[str] = set()
    failed: dict[str, int] = defaultdict(int)
    finish = ray.remote(num_cpus=0.5, max_retries=3)(writer.finish_shard)
    fps = {item["key"]: item["fingerprint"] for item in todo}
    finishing = []
    with _Watch(ledger, result, len(todo), None if bars else log) as watch:
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                result.note_batch(batch["decode_started_at"])
                for sid, key, pending, status, error in zip(
                    batch["id"],
                    batch["shard"],
                    batch["shard_pending"],
                    batch["status"],
                    batch["error"],
                ):
                    seen[key] += 1
                    watch.pending.setdefault(key, int(pending))
                    seen_ids[key].add(str(sid))
                    result.processed += 1
                    if status != "ok":
                        failed[key] += 1
                        result.failed([str(sid)])
                        result.note_reason(error if isinstance(error, str) else None)
                    if seen[key] == int(pending):
                        result.shards_done += 1
                        finished.add(key)
                        seen_ids.pop(key, None)
                        finishing.append(finish.remote(job, key, fps[key], not failed[key]))
        except KeyboardInterrupt:
            if watch.failure is not None:  # the watcher stopped the run: an actor cannot start
                raise DecoderStartError(
                    f"a decode actor could not start: {watch.failure}"
                ) from None
            raise
    # Batches that failed for good were skipped by Ray Data; their samples become error rows
    # instead of vanishing.
    for item in todo:
        if item["key"] not in finished:
            lost = resume.record_lost(job, item, seen_ids.get(item["key"], set()))
            result.processed += len(lost)
            result.failed(lost)
            finishing.append(finish.remote(job, item["key"], item["fingerprint"], False))
    # Tar merges, timing compaction and done markers: off the driver, awaited before the
    # summary. One that fails for good (e.g. a full disk) leaves its shard without a marker:
    # the run says so and exits non-zero, and a rerun finishes the shard.
    for ref in finishing:
        try:
            ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if e.cause is not None else e
            result.shards_unfinished += 1
            result.note_reason(
                f"finishing a shard failed: {type(cause).__name__}: {redact(str(cause))[:300]}"
            )
    watch.line(final=True)


def _summarize(
    job: JobConfig,
    plan: resume.Plan,
    result: RunResult,
    t0: float,
    out: TextIO | None,
    write: bool = True,
    shutdown: bool = False,
) -> RunResult:
    """Summary of the whole output plus this run's own numbers; summary.json unless `write`
    is False (a rerun with nothing to do writes nothing). With Ray up the aggregation (~28 B per
    sample, and Arrow's first-use ~100 MB) runs in a worker, so the driver ends with the memory
    the run needed; a Ray this run started (`shutdown`) is then stopped inside the wall time."""
    this_run: dict[str, Any] = {
        "processed": result.processed,
        "errors": result.errors,
        "shards_skipped": result.shards_skipped,
        "shards_todo": len(plan.todo),
        "nothing_to_do": not plan.todo,
        "shards_changed": len(plan.changed),
        "shards_unfinished": result.shards_unfinished,
        "errors_by_reason": result.reasons,
    }
    if result.first_decode_at is not None and result.last_row_at is not None:
        this_run["startup_s"] = round(max(0.0, result.first_decode_at - t0), 3)
        this_run["decode_window_s"] = round(result.last_row_at - result.first_decode_at, 3)
    run = {**job.manifest(), "this_run": this_run}
    if ray.is_initialized():
        task = ray.remote(num_cpus=0.5)(summarize_output)
        result.summary = ray.get(task.remote(job.output, plan.current, run))
    else:
        result.summary = summarize_output(job.output, plan.current, run)
    if shutdown:
        ray.shutdown()  # the command ends when its summary is printed
    result.wall_s = time.time() - t0
    result.summary["run"]["this_run"]["wall_s"] = round(result.wall_s, 3)
    if write:
        try:
            storage.write_json_atomic(storage.join(job.output, "summary.json"), result.summary)
        except OSError as e:  # e.g. a full disk: the summary still reaches the user
            result.summary["summary_not_written"] = redact(str(e))
    if out is not None:
        print(format_summary(result.summary), file=out, flush=True)
    return result


class _Watch:
    """A driver thread for the length of the decode loop: ends the run (interrupting the main
    thread) when the ledger reports an actor that cannot start, and writes a progress line
    every PROGRESS_EVERY_S to `stream` (samples, shards, images/s, errors, ETA)."""

    def __init__(self, ledger: Any, result: RunResult, shards: int, stream: TextIO | None):
        self.ledger, self.result, self.shards, self.stream = ledger, result, shards, stream
        self.pending: dict[str, int] = {}  # shard key → samples to do, as rows arrive
        self.failure: str | None = None
        self.t0 = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pid-batch-watch", daemon=True)

    def __enter__(self) -> _Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        next_line = self.t0 + PROGRESS_EVERY_S
        while not self._stop.wait(WATCH_EVERY_S):
            try:
                failure = ray.get(self.ledger.failed_start.remote(), timeout=30)
            except Exception:  # Ray going down under us: the main thread will say why
                failure = None
            if failure and not self._stop.is_set():
                self.failure = failure
                _thread.interrupt_main()
                return
            if time.time() >= next_line:
                next_line += PROGRESS_EVERY_S
                self.line()

    def line(self, final: bool = False) -> None:
        """One progress line (no-op without a stream)."""
        if self.stream is None:
            return
        r, now = self.result, time.time()
        parts = [f"{r.processed} samples", f"{r.shards_done}/{self.shards} shards"]
        if r.first_decode_at is None:
            parts.append(f"start-up {now - self.t0:.0f} s (Ray, actors, model load)")
        else:
            rate = (r.processed - r.errors) / max(1e-6, now - r.first_decode_at)
            parts.append(f"{rate:.2f} images/s")
        parts.append(f"{r.errors} errors")
        if not final and self.pending and r.first_decode_at is not None and r.processed:
            mean = sum(self.pending.values()) / len(self.pending)
            total = sum(self.pending.values()) + mean * (self.shards - len(self.pending))
            done_rate = r.processed / max(1e-6, now - r.first_decode_at)
            eta = max(0.0, total - r.processed) / done_rate
            parts.append(f"ETA {eta:.0f} s")
        if final:
            parts.append(f"done in {now - self.t0:.1f} s")
        print("[pid-batch] " + ", ".join(parts), file=self.stream, flush=True)
