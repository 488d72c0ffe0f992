"""A store's lease can never be held twice: of many processes breaking one stale lock exactly one wins, and a
writer whose lease was taken over stops with one line instead of writing on (issue 16). Local disk and a
real S3-compatible server on 127.0.0.1 (the same fixtures as tests/test_store_backends.py) alike."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from saepipe.harvest.lease import Lease, LeaseHeld, LeaseLost
from saepipe.harvest.store import StoreWriter, open_store

RACERS = 8

# One racer: import everything, say it is ready, wait for the go file, try to take the lease once. A winner
# holds it (heartbeat running) until the stop file appears, so a late racer cannot win a released lease.
_RACER = """
import sys, time
from pathlib import Path
from saepipe.harvest.lease import Lease, LeaseHeld
url, sync, i = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
lease = Lease(url, stale_after=60)
(sync / f"ready-{i}").touch()
while not (sync / "go").exists():
    time.sleep(0.001)
try:
    lease.acquire()
except LeaseHeld as held:
    print("HELD", held, flush=True)
    sys.exit(0)
print("WON", lease.owner, flush=True)
while not (sync / "stop").exists():
    time.sleep(0.01)
lease.release()
"""


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    return str(tmp_path) if request.param == "local" else request.getfixturevalue("s3_bucket")


def _put(url: str, body: dict) -> None:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    fs.pipe_file(path, json.dumps(body).encode())


def _stale(url: str) -> None:
    """The lock a writer killed an hour ago left behind (its host is not this one, so only age tells)."""
    _put(url, {"owner": "gone-host:1:dead", "heartbeat": time.time() - 3600})


def test_racing_takers_of_a_stale_lease_one_wins(root, tmp_path):
    url = f"{root}/store.lock"
    _stale(url)
    sync = tmp_path / "sync"
    sync.mkdir()
    procs = [
        subprocess.Popen([sys.executable, "-c", _RACER, url, str(sync), str(i)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for i in range(RACERS)
    ]  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while len(list(sync.glob("ready-*"))) < RACERS and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.05)
        (sync / "go").touch()
        while sum(p.poll() is not None for p in procs) < RACERS - 1 and time.monotonic() < deadline:
            time.sleep(0.05)  # the losers give up at once; a winner waits for the stop file
        holder = Lease(url).read()
    finally:
        (sync / "stop").touch()
        outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0] * RACERS, outs
    lines = [o[0].strip() for o in outs]
    winners = [line.split()[1] for line in lines if line.startswith("WON")]
    assert len(winners) == 1, lines
    assert sum(line.startswith("HELD") for line in lines) == RACERS - 1, lines
    assert (
        holder is not None and holder["owner"] == winners[0]
    )  # the stale lock was taken over, by the winner
    assert Lease(url).read() is None  # and released by it at the end


def test_a_stolen_lease_is_noticed_at_the_next_check(root):
    url = f"{root}/store.lock"
    victim = Lease(url, stale_after=600).__enter__()  # its heartbeat would come only every 150 s
    victim.check()  # held: no error
    time.sleep(0.2)
    thief = Lease(url, stale_after=0.1)  # judges the victim's 0.2 s old heartbeat stale
    thief.acquire()
    try:
        with pytest.raises(LeaseLost) as lost:
            victim.check()
        message = str(lost.value)
        assert thief.owner in message and "stopped before writing more" in message and "\n" not in message
        victim.release()  # must not remove the lock it lost
        assert Lease(url).read()["owner"] == thief.owner
        with pytest.raises(LeaseHeld, match=thief.owner):
            Lease(url, stale_after=600).acquire()
    finally:
        thief.release()


def test_the_heartbeat_notices_a_takeover_and_never_writes_over_it(root):
    url = f"{root}/store.lock"
    victim = Lease(url, stale_after=0.4).__enter__()  # beats every 0.1 s
    time.sleep(0.15)
    thief = Lease(url, stale_after=0.01)
    thief.acquire()
    try:
        deadline = time.monotonic() + 10
        while victim._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not victim._thread.is_alive(), "the victim's heartbeat kept beating after the takeover"
        assert Lease(url).read()["owner"] == thief.owner  # no heartbeat wrote over the new owner
        with pytest.raises(LeaseLost, match=thief.owner):
            victim.check()
        victim.release()
    finally:
        thief.release()


def _settings(d_model: int = 8) -> dict:
    return {
        "model": {"name": "hand", "fingerprint": "x", "d_model": d_model, "n_layers": 1, "dtype": "float32"},
        "hooks": ["h"], "context_size": 4, "prepend_bos": False, "dtype": "float32", "compression": "none",
        "contexts_per_chunk": 2, "chunks_per_shard": 1, "n_contexts_target": 8,
    }  # fmt: skip


def test_a_writer_whose_lease_was_stolen_stops_before_writing(root):
    out = f"{root}/store"
    rows = np.arange(8 * 4 * 8, dtype=np.float32).reshape(8, 4, 8)
    victim = Lease(out + ".lock", stale_after=600).__enter__()
    writer = StoreWriter(out, _settings(), lease=victim)
    writer.write_shard(0, np.zeros((2, 4), np.int32), {"h": rows[:2]}, 0)
    time.sleep(0.2)
    thief = Lease(out + ".lock", stale_after=0.1)
    thief.acquire()
    try:
        with pytest.raises(LeaseLost, match="lost the lease"):
            writer.write_shard(2, np.zeros((2, 4), np.int32), {"h": rows[2:4]}, 0)
        with pytest.raises(LeaseLost):
            writer.finish()
        store = open_store(out, allow_incomplete=True)
        assert store.n_contexts == 2 and not store.complete  # nothing committed after the takeover
        np.testing.assert_array_equal(store.activations("h"), rows[:2])
        victim.release()
    finally:
        thief.release()


def test_harvest_whose_lease_is_stolen_exits_with_one_line(tmp_path, tiny_model_dir, small_corpus):
    """A real `saepipe harvest`: its lease is taken over after its first commit; it exits 2 with one line and
    commits nothing more."""
    out = tmp_path / "store"
    argv = [sys.executable, "-m", "saepipe", "harvest", "--model", str(tiny_model_dir), "--dataset",
            str(small_corpus), "--hook", "blocks.1.hook_resid_post", "--tokens", str(1024 * 32), "--context-size",
            "32", "--batch-size", "4", "--contexts-per-chunk", "4", "--chunks-per-shard", "2", "--dtype",
            "float32", "--lock-stale-after", "600", "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    meta = out / "zarr.json"
    deadline = time.monotonic() + 300

    def committed() -> int:
        try:
            return json.loads(meta.read_text())["attributes"]["saepipe"]["n_contexts"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return 0

    while committed() == 0 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    thief = Lease(str(out) + ".lock", stale_after=0.05)
    while True:  # the victim's one heartbeat so far is at most a moment old
        try:
            thief.acquire()
            break
        except LeaseHeld:
            time.sleep(0.01)
    at_theft = committed()
    try:
        _, stderr = proc.communicate(timeout=300)
        assert 0 < at_theft < 1024, (
            "the harvest ended before its lease could be taken: the test would be vacuous"
        )
        assert proc.returncode == 2 and "Traceback" not in stderr, stderr
        # one line (the progress bar's frames around it are \r-separated, on stderr as always)
        (error,) = [line for line in stderr.split("\n") if "error:" in line]
        error = error[error.index("saepipe harvest: error: ") :]
        assert "lost the lease" in error and thief.owner in error and error.endswith("use its result"), stderr
        # at most the commit that had already passed its check when the lease was taken
        assert (
            committed() <= at_theft + 8
            and not json.loads(meta.read_text())["attributes"]["saepipe"]["complete"]
        )
        assert Path(str(out) + ".lock").exists() and Lease(str(out) + ".lock").read()["owner"] == thief.owner
    finally:
        thief.release()
