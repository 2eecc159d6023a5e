"""Sizing a loaded model by what it holds (server/memory.py)."""

from __future__ import annotations

import sys
import types

import numpy as np
from meshserve.server.memory import reachable_bytes


def test_a_module_still_being_imported_by_another_load_is_skipped(monkeypatch):
    """Loads run on several threads: one may size its model while another is halfway
    through ``import torch`` (in sys.modules, without ``Tensor`` yet). Seen as
    "partially initialized module 'torch' has no attribute 'Tensor'" failing loads."""
    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))
    holder = types.SimpleNamespace(weights=np.zeros(1024, dtype=np.float64))
    assert reachable_bytes(holder) >= 8 * 1024


def test_views_of_one_buffer_count_once():
    base = np.zeros(4096, dtype=np.float32)
    one = reachable_bytes(types.SimpleNamespace(a=base))
    two = reachable_bytes(types.SimpleNamespace(a=base, b=base[:10], c=base.reshape(64, 64)))
    assert 4096 * 4 <= one and two - one < 4096
