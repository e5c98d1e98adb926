"""The heartbeat watch and the join wait of torchrun-launched engines, without launching anything: a
``HashStore`` stands in for the rendezvous store and a hand-moved clock for time."""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import time

import pytest
import torch.distributed as dist
from tiny_models import tiny_hf_model

from minipaged import LLM
from minipaged.distributed import LivenessWatch, PeerLostError, request_stop, wait_for_peers
from minipaged.models import build_model_from_hf


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _watches(world: int, timeout_s: float = 10.0):
    store, clock = dist.HashStore(), Clock()
    lost: list[str] = []
    for rank in range(world):
        store.set(f"minipaged/beat/{rank}", "0")
    watches = [LivenessWatch(store, r, world, "here:1", timeout_s, lost.append, clock) for r in range(world)]
    return watches, clock


def test_a_rank_whose_heartbeat_stops_is_named_after_the_timeout():
    watches, clock = _watches(3)
    for _ in range(5):  # everyone beating: nothing to report, however much time passes
        clock.now += 8.0
        assert [w.check() for w in watches] == [None, None, None]
    # Rank 2 falls silent. Its last beat is first seen 4 s later (the others look every step), so
    # it is reported once that value has stood for more than the 10 s timeout: at +16 s, not before.
    for _ in range(3):
        clock.now += 4.0
        assert watches[0].check() is None and watches[1].check() is None
    clock.now += 4.0
    assert "rank 2 of 3 stopped answering: no heartbeat for 10 s in the store at here:1" in watches[0].check()
    assert "rank 2 of 3" in watches[1].check()


def test_a_rank_that_left_in_order_is_not_watched():
    watches, clock = _watches(2)
    watches[1].leave()
    for _ in range(5):
        clock.now += 8.0
        assert watches[0].check() is None


class DeadStore(dist.HashStore):
    def set(self, key, value):
        raise RuntimeError("Connection reset by peer")


def test_losing_the_store_is_losing_node_0():
    watch = LivenessWatch(DeadStore(), 1, 2, "10.0.0.1:29500", 10.0, lambda m: None)
    message = watch.check()
    assert "rank 1 lost the rendezvous store at 10.0.0.1:29500" in message and "Connection reset" in message


def test_a_stop_request_reaches_rank_0_once():
    store = dist.HashStore()
    stops: list[str] = []
    rank0 = LivenessWatch(store, 0, 2, "here:1", 10.0, lambda m: None, on_stop=stops.append)
    rank1 = LivenessWatch(store, 1, 2, "here:1", 10.0, lambda m: None)
    assert rank0.check_stop_request() is None and rank1.check_stop_request() is None
    request_stop(store, "rank 1 got SIGINT")
    assert rank1.check_stop_request() is None  # only rank 0 acts on it
    assert rank0.check_stop_request() == "rank 1 got SIGINT"
    assert rank0.check_stop_request() is None  # once: the shutdown it started is under way
    assert stops == ["rank 1 got SIGINT"]


RELAY_SCRIPT = """
import datetime, os, sys
import torch.distributed as dist
from minipaged.distributed import forward_stop_signals

store = dist.TCPStore("127.0.0.1", int(sys.argv[1]), is_master=False, timeout=datetime.timedelta(seconds=60))
forward_stop_signals(store, 1)
print("READY", flush=True)
os.read(os.pipe()[0], 1)  # blocked in C, as a rank waiting on a receive from rank 0: handlers cannot run
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_on_a_blocked_rank_becomes_a_stop_request(sig):
    """SIGINT / SIGTERM on a rank other than 0 asks rank 0 to stop, through the store, while the rank's main
    thread stays blocked; the rank itself goes on (rank 0's shutdown message ends it)."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=60))  # fmt: skip
    rank = subprocess.Popen(
        [sys.executable, "-c", RELAY_SCRIPT, str(store.port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert rank.stdout.readline().strip() == "READY", rank.communicate(timeout=30)[1]
        os.kill(rank.pid, sig)
        deadline = time.monotonic() + 60  # a hang guard
        while not store.check(["minipaged/stop"]):
            assert rank.poll() is None and time.monotonic() < deadline, rank.communicate(timeout=30)[1]
            time.sleep(0.05)
        assert store.get("minipaged/stop").decode() == f"rank 1 got {sig.name}"
        assert rank.poll() is None
    finally:
        rank.kill()
        _out, err = rank.communicate()
    assert f"minipaged: rank 1 got {sig.name}; asking rank 0 to shut the engine down" in err
    assert "Traceback" not in err


def test_wait_for_peers_names_the_missing_ranks():
    store = dist.HashStore()
    store.set("minipaged/beat/2", "0")
    with pytest.raises(PeerLostError, match=r"ranks \[1, 3\] of 4 did not join the rendezvous at host:29500"):
        wait_for_peers(store, 0, 4, "host:29500", 0.2)
    wait_for_peers(store, 1, 3, "host:29500", 0.2)  # ranks 0 (the failed call above), 1 and 2 are there


def test_a_node_that_never_joins_ends_the_engine_with_the_address(monkeypatch):
    # RANK etc. set by hand (no torchrun agent): rank 0 hosts the store and waits for rank 1, which never comes.
    from test_pipeline_multinode import _free_port

    port = _free_port()
    for name, value in dict(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    model = build_model_from_hf(tiny_hf_model("llama"))
    with pytest.raises(PeerLostError, match=rf"ranks \[1\] of 2 did not join the rendezvous at 127.0.0.1:{port}"):
        LLM(model, pipeline_parallel_size=2, num_kv_blocks=8, block_size=8, peer_timeout_s=1)
    assert not dist.is_initialized()
