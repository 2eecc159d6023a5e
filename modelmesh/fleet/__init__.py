"""The mesh across pods, as plain objects over a coordination store and a transport.

``Membership`` (who is alive, who holds a model), ``Router`` (serve here, forward to a
holder or place the model, with retries and the fleet-wide wait for room), ``Copies``
(this pod's record, second and extra copies), ``Lifecycle`` (join, records, hand-off on
leaving). The server hands in the :class:`Transport` (gRPC, HTTP) and the registration
codec; nothing here knows a wire format. Tests build them with an in-process store and
a stand-in transport.
"""

from meshserve.modelmesh.fleet.config import FleetConfig
from meshserve.modelmesh.fleet.copies import Copies
from meshserve.modelmesh.fleet.lifecycle import Lifecycle
from meshserve.modelmesh.fleet.membership import Membership
from meshserve.modelmesh.fleet.routing import ROUTE, Router
from meshserve.modelmesh.fleet.transport import CopyGone, DeadlineExceeded, Forward, Transport, Unreachable

__all__ = [
    "ROUTE", "Copies", "CopyGone", "DeadlineExceeded", "FleetConfig", "Forward", "Lifecycle", "Membership",
    "Router", "Transport", "Unreachable",
]  # fmt: skip
