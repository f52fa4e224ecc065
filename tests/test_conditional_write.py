"""storage.version / create_exclusive / replace_if: one winner among concurrent writers."""

from __future__ import annotations

import threading

import pytest

from pid_batch import storage


@pytest.fixture(params=["local", "s3"])
def base(request, tmp_path):
    if request.param == "local":
        return str(tmp_path)
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/p"


def test_create_exclusive_once(base):
    uri = storage.join(base, "lease.json")
    assert storage.version(uri) is None
    assert storage.create_exclusive(uri, b"first")
    v1 = storage.version(uri)
    assert v1 is not None
    assert not storage.create_exclusive(uri, b"second")
    assert storage.read_bytes(uri) == b"first"
    assert storage.version(uri) == v1


def test_replace_if_compares_versions(base):
    uri = storage.join(base, "t.tar")
    assert storage.replace_if(uri, b"a", None)
    assert not storage.replace_if(uri, b"b", None)  # exists now
    v1 = storage.version(uri)
    assert storage.replace_if(uri, b"bb", v1)
    v2 = storage.version(uri)
    assert v2 != v1
    assert not storage.replace_if(uri, b"stale", v1)  # lost the race
    assert storage.read_bytes(uri) == b"bb"
    assert storage.replace_if(uri, b"ccc", v2)
    assert storage.read_bytes(uri) == b"ccc"
    assert not storage.replace_if(storage.join(base, "absent"), b"x", v2)
    assert not storage.exists(storage.join(base, "absent"))


@pytest.mark.timeout(60)
def test_race_exactly_one_wins(base):
    uri = storage.join(base, "race.json")
    storage.create_exclusive(uri, b"0")
    start = storage.version(uri)
    n = 8
    barrier = threading.Barrier(n)
    creates, swaps = [], []

    def worker(i: int) -> None:
        barrier.wait()
        creates.append(storage.create_exclusive(storage.join(base, "new.json"), f"{i}".encode()))
        swaps.append((i, storage.replace_if(uri, f"w{i}".encode(), start)))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert creates.count(True) == 1
    winners = [i for i, ok in swaps if ok]
    assert len(winners) == 1
    assert storage.read_bytes(uri) == f"w{winners[0]}".encode()


@pytest.mark.timeout(60)
def test_a_put_that_landed_but_lost_its_answer_still_wins(s3_bucket, monkeypatch):
    """The first PutObject lands but the client sees a reset; the retry finds the condition
    spent (412). The write is ours — same bytes — so it won, and a rival with other bytes lost."""
    real = storage._s3_client

    class LosesFirstAnswer:
        def __init__(self):
            self.client, self.lost = real(), 0

        def put_object(self, **kw):
            self.client.put_object(**kw)
            if self.lost == 0:
                self.lost += 1
                raise ConnectionResetError("connection reset by peer")
            return self.client.put_object(**kw)

        def __getattr__(self, name):
            return getattr(self.client, name)

    flaky = LosesFirstAnswer()
    monkeypatch.setattr(storage, "_s3_client", lambda: flaky)
    uri = f"s3://{s3_bucket}/p/lease.json"
    assert storage.create_exclusive(uri, b"mine")
    assert flaky.lost == 1 and storage.read_bytes(uri) == b"mine"
    assert not storage.create_exclusive(uri, b"theirs")  # a rival's bytes: it really lost
    version = storage.version(uri)
    flaky.lost = 0
    assert storage.replace_if(uri, b"mine, renewed", version)
    assert storage.read_bytes(uri) == b"mine, renewed"
