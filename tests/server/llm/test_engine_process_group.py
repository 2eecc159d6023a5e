"""A signal to the server's whole process group (Ctrl-C in a terminal, ``kill -- -PGID``, the
docs runner's teardown) reaches the server only: the engine core has a group of its own and is
stopped by the server over its pipe, so the server neither logs a dead core nor restarts one
while it shuts down (which cost seconds)."""

from __future__ import annotations

import os
import signal

import pytest

from tests.server.llm.api_support import llm_server
from tests.server.llm.test_engine_process import children_of, engine_processes, wait_gone

pytestmark = pytest.mark.system  # a real server and its engine process


def test_a_signal_to_the_servers_group_leaves_the_core_to_the_server(tiny_llama, tmp_path):
    with llm_server(tmp_path, tiny_llama) as srv:
        cores = engine_processes(srv.proc.pid)
        assert len(cores) == 1, cores
        group = os.getpgid(srv.proc.pid)
        assert os.getpgid(cores[0]) != group
        # What a group signal does (the server shares pytest's group here: signal its members one by one).
        members = [srv.proc.pid] + [p for p in children_of(srv.proc.pid) if os.getpgid(p) == group]
        for pid in members:
            os.kill(pid, signal.SIGTERM)
        assert srv.proc.wait(30) == 0
    assert wait_gone(cores[0], 10), "the engine process outlived the server"
    log = srv.log()
    assert "stopped" in log and "died" not in log, log[-2000:]
