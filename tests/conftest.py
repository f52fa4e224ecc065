"""Shared test set-up: loopback-only Ray, a real S3 endpoint (moto) on 127.0.0.1."""

from __future__ import annotations

import logging
import os
from pathlib import Path

# Must be set before anything imports ray: binds a local Ray to 127.0.0.1 only.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# One torch thread per process: on a shared 2-core box, 2 OpenMP threads spin-wait under load
# (a sampler test went from 0.7 s to 42 s). Ray workers inherit this too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
for _k, _v in {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}.items():
    os.environ[_k] = _v

import pytest  # noqa: E402

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Folder of copied reference fixtures (official-code tensors, key maps)."""
    return DATA


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 (random port); yields its endpoint 'http://127.0.0.1:PORT'."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    old = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    yield endpoint
    if old is None:
        os.environ.pop("AWS_ENDPOINT_URL", None)
    else:
        os.environ["AWS_ENDPOINT_URL"] = old
    server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket on the loopback S3 server; yields its name."""
    import uuid

    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


# -- one local Ray for the tests that can share it ---------------------------------------------
# Tests that ask for `shared_ray` run on one private Ray (address="local", loopback only) for
# the whole session: their modules run first, one after another (pytest_collection_modifyitems),
# and the Ray stops after the last of them, before any test that starts a Ray of its own (a
# fresh worker pool, a worker set-up hook, credentials in the workers' environment, a cluster,
# the CLI or a subprocess that starts one by design).

SHARED_RAY = {
    "address": "local",
    "num_cpus": 2,
    "num_gpus": 1,  # logical: lets test_pipeline exercise num_gpus without a GPU
    "include_dashboard": False,
    "object_store_memory": 300 * 2**20,
    "log_to_driver": False,
}
_STOP_SHARED_RAY = pytest.StashKey[bool]()
_shared_session: list[str] = []  # the session name of the Ray shared_ray started, while it runs


def _ray_up() -> bool:
    import sys

    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _stop_shared_ray() -> None:
    if _shared_session and _ray_up():
        import ray

        ray.shutdown()
    _shared_session.clear()


@pytest.fixture
def shared_ray(s3_server):
    """The session's shared local Ray (started on first use, after the S3 server so that its
    workers inherit AWS_ENDPOINT_URL); yields the `ray` module."""
    import ray

    if not ray.is_initialized():
        ray.init(**SHARED_RAY)
        _shared_session[:] = [ray.get_runtime_context().get_node_id()]
    elif _shared_session != [ray.get_runtime_context().get_node_id()]:
        raise RuntimeError("a Ray other than the shared one is running: a fixture left it up")
    return ray


def _module_path(item: pytest.Item) -> str:
    return item.nodeid.split("::", 1)[0]


@pytest.hookimpl(trylast=True)  # after -m/-k deselection: `items` is what runs
def pytest_collection_modifyitems(config, items):
    sharing = {_module_path(i) for i in items if "shared_ray" in getattr(i, "fixturenames", ())}
    if not sharing:
        return
    first = {}
    for n, item in enumerate(items):
        first.setdefault(_module_path(item), n)
    items.sort(key=lambda i: (_module_path(i) not in sharing, first[_module_path(i)]))
    last = max(n for n, i in enumerate(items) if _module_path(i) in sharing)
    items[last].stash[_STOP_SHARED_RAY] = True


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    try:
        return (yield)
    finally:
        if item.stash.get(_STOP_SHARED_RAY, False):
            _stop_shared_ray()


def pytest_sessionfinish(session, exitstatus):
    _stop_shared_ray()


_RAY_BEFORE = pytest.StashKey[bool]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    item.stash[_RAY_BEFORE] = _ray_up()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """A test not marked slow must not start Ray in this process (the inner loop has no Ray):
    one whose fixtures or body leave a Ray up that was not up before fails here. (A Ray in a
    subprocess, or one started and stopped inside the test, is not seen: mark those by hand.)"""
    result = yield
    if not item.stash[_RAY_BEFORE] and _ray_up() and item.get_closest_marker("slow") is None:
        pytest.fail("this test starts Ray: mark it @pytest.mark.slow", pytrace=False)
    return result
