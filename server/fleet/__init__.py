"""The fleet, server side: the mesh's objects (``meshserve.modelmesh.fleet``: membership,
routing, copies, hand-off) behind the fronts, and the transport they are handed.

Any pod accepts any request. A model this pod holds is served here; one held elsewhere
is forwarded to a holder with gRPC ModelInfer over a kept-alive channel (generate and
OpenAI requests as they came, over HTTP: server/rest/model_routes.py); the call carries the request
id, the remaining deadline and a marker so the receiving pod serves it itself.

``core`` (the Fleet the data plane holds: the fronts, the index), ``transport`` (gRPC
channels and HTTP connections to the other pods, typed errors), ``wire`` (markers, remote
errors, this pod's record), ``view`` (index rows, metrics). The composition root
(server/compose.py) builds them.
"""

from meshserve.modelmesh.fleet.routing import ROUTE
from meshserve.server.fleet.core import Fleet
from meshserve.server.fleet.wire import ERROR_KEY, MARKER, CopyGone, decode_infer_response, store_lease

__all__ = ["ERROR_KEY", "MARKER", "ROUTE", "CopyGone", "Fleet", "decode_infer_response", "store_lease"]
