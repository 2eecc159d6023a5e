"""The mesh across pods: routing, placement, copies and leaving, over a coordination store.

Any pod accepts any request. A model this pod holds is served here (the hot path reads
one dict entry, no store round trip). A model held elsewhere is forwarded to a holder
with gRPC ModelInfer over a kept-alive channel; the call carries the request id, the
remaining deadline and a marker so the receiving pod serves it itself. A model held
nowhere is claimed (an etcd transaction: one pod wins a race) for the best pod in
ModelMesh's order and loaded there; a failed load is recorded and the next pod tried.
A pod that does not answer is skipped until its lease lapses, and the request is
retried on another holder or loads elsewhere.

The package, by feature: ``core`` (the Fleet and its state), ``routing`` (where a request
goes, forwarding, the two fronts), ``copies`` (the periodic pod record and extra copies),
``lifecycle`` (join, hand-off on leaving, close; the store's records), ``pods`` (liveness,
channels), ``view`` (index rows, metrics) and ``wire`` (markers, remote errors, codec).
"""

from meshserve.server.fleet.core import Fleet
from meshserve.server.fleet.wire import ERROR_KEY, MARKER, ROUTE, CopyGone, decode_infer_response, store_lease

__all__ = ["ERROR_KEY", "MARKER", "ROUTE", "CopyGone", "Fleet", "decode_infer_response", "store_lease"]
