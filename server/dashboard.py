"""The dashboard's JSON feed: one cheap summary per refresh of what the server already knows.

``GET /v2/dashboard/state`` returns the cache's figures, one page of the model table
(filtered, sorted and paged here, so a browser showing 10,000 models receives ~100
rows as compact arrays), the fleet's pods and LLM engines. Counters are cumulative:
the page plots their differences between refreshes. Nothing secret goes out: no URIs,
and failure reasons pass through :func:`redact` like the repository index.

With ``--workers N`` each worker answers for the models it owns (``own=1``, already
filtered and cut to the first ``offset + limit`` rows in the requested order); the
worker that got the request merges them (:func:`merge_states`) and cuts the page.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meshserve.protocol.errors import InvalidInput
from meshserve.server.security import redact

if TYPE_CHECKING:
    from meshserve.server.dataplane import DataPlane

COLUMNS = (
    "name", "version", "state", "size_bytes", "last_used", "requests", "hits", "failed_requests", "pinned",
    "copies", "reason",
)  # fmt: skip
SORT_KEYS = {"name": 0, "state": 2, "size": 3, "last_used": 4, "requests": 5, "hit_ratio": -1}
MAX_LIMIT = 500
MAX_QUERY = 256
TOTALS = ("used_bytes", "capacity_bytes", "resident", "hits", "misses", "loads", "load_failures", "evictions")


@dataclass(frozen=True)
class Query:
    """Which page of the model table: a name substring, a state, a sort key and order."""

    q: str = ""
    state: str = ""
    sort: str = "name"
    desc: bool = False
    offset: int = 0
    limit: int = 100

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> Query:
        def number(key: str, default: int, top: int) -> int:
            raw = params.get(key)
            if raw is None or raw == "":
                return default
            if not raw.isdigit() or int(raw) > top:
                raise InvalidInput(f"'{key}' must be an integer from 0 to {top}")
            return int(raw)

        q = params.get("q", "")
        if len(q) > MAX_QUERY:
            raise InvalidInput(f"'q' must be at most {MAX_QUERY} characters")
        sort = params.get("sort", "name") or "name"
        if sort not in SORT_KEYS:
            raise InvalidInput(f"'sort' must be one of {', '.join(SORT_KEYS)}")
        order = params.get("order", "asc") or "asc"
        if order not in ("asc", "desc"):
            raise InvalidInput("'order' must be asc or desc")
        state = (params.get("state", "") or "").upper()
        if len(state) > 32:
            raise InvalidInput("'state' is not a model state")
        return cls(q.lower(), state, sort, order == "desc", number("offset", 0, 10**9), number("limit", 100, MAX_LIMIT))

    def peer_params(self) -> str:
        """The query string for a peer worker: the same query, answered with its first
        ``offset + limit`` rows (``own=1``), so the merged page is exact."""
        from urllib.parse import urlencode

        order = "desc" if self.desc else "asc"
        doc = {"q": self.q, "state": self.state, "sort": self.sort, "order": order}
        return urlencode({**doc, "offset": self.offset, "limit": self.limit, "own": "1"})


def _hit_ratio(row: list[Any]) -> float:
    return row[6] / row[5] if row[5] else -1.0


def _order(rows: list[list[Any]], query: Query) -> None:
    """Sort in place by the query's key; ties by name and version, ascending either way
    (Python's sort is stable, reversed too)."""
    rows.sort(key=lambda r: (r[0], r[1]))
    index = SORT_KEYS[query.sort]
    if index == -1:
        rows.sort(key=_hit_ratio, reverse=query.desc)
    elif index in (0, 2):
        rows.sort(key=lambda r: r[index], reverse=query.desc)
    else:
        rows.sort(key=lambda r: r[index] or 0, reverse=query.desc)


def select(rows: list[list[Any]], query: Query, cut: int) -> tuple[int, list[list[Any]]]:
    """(rows matching, the first ``cut`` of them in the query's order)."""
    if query.q:
        rows = [r for r in rows if query.q in r[0].lower()]
    if query.state:
        rows = [r for r in rows if r[2] == query.state]
    _order(rows, query)
    return len(rows), rows[:cut]


def model_rows(dp: DataPlane) -> list[list[Any]]:
    """Every model this process serves, one compact array each (``COLUMNS``)."""
    fleet = dp.fleet
    rows = []
    for entry in dp.cache.entries():
        spec = entry.spec
        if not dp.owns(spec.name):
            continue
        state = entry.state.value
        copies: list[str] = []
        last_used = entry.last_used_wall()
        if fleet is not None:
            copies = sorted(p for p in fleet.view.holders_of(entry.key) if p in fleet.view.pods)
            if state != "READY" and copies:
                state = "READY_ELSEWHERE" if fleet.id not in copies else state
            last_used = last_used or fleet.view.last_used.get(entry.key)
        rows.append(
            [
                spec.name,
                spec.version or "",
                state,
                entry.size_bytes or entry.reserved_bytes,
                round(last_used, 3) if last_used else None,
                entry.requests,
                entry.hits,
                entry.failed_requests,
                entry.pinned,
                copies,
                redact(entry.reason) if entry.reason else "",
            ]
        )
    return rows


def _llm_engines(dp: DataPlane) -> list[dict[str, Any]]:
    from meshserve.server.llm.metrics import loaded_engines

    keys = ("running", "waiting", "generation_tokens", "prompt_tokens", "requests_finished", "requests_rejected")
    out = []
    for model, engine in loaded_engines(dp.cache.entries()):
        stats = engine.stats()
        out.append({"model": model, **{k: stats.get(k, 0) for k in keys}})
    return out


def _fleet(dp: DataPlane) -> dict[str, Any] | None:
    fleet = dp.fleet
    if fleet is None:
        return None
    held: dict[str, int] = {}
    for entry in dp.cache.entries():
        for pod in fleet.view.holders_of(entry.key):
            held[pod] = held.get(pod, 0) + 1
    keys = ("id", "http", "grpc", "capacity", "used", "models", "oldest_lru", "loading", "rate", "shutting_down")
    pods = [{**{k: p[k] for k in keys}, "alive": p["alive"], "self": p["self"]} for p in fleet.pods_summary()]
    for p in pods:
        p["copies"] = held.get(p["id"], 0)
    return {
        "pod": fleet.id,
        "store_connected": bool(fleet.store.connected),
        "routes": dict(fleet.counts),
        "pods": pods,
    }


def dashboard_state(dp: DataPlane, query: Query, own: bool = False) -> dict[str, Any]:
    """The feed for one refresh (``own``: the rows a peer worker needs, cut but not paged)."""
    cache = dp.cache
    stats = cache.stats
    rows = model_rows(dp)
    states: dict[str, int] = {}
    for r in rows:
        states[r[2]] = states.get(r[2], 0) + 1
    total = len(rows)
    matched, page = select(rows, query, query.offset + query.limit)
    if not own:
        page = page[query.offset :]
    return {
        "server": {"name": dp.settings.server_name, "version": _version(), "workers": dp.settings.workers},
        "time": time.time(),
        "ready": dp.ready(),
        "cache": {
            "used_bytes": cache.used_bytes,
            "capacity_bytes": cache.capacity_bytes or 0,
            "resident": cache.resident,
            "registered": len(cache.entries()),
            "hits": stats.hits,
            "misses": stats.misses,
            "loads": stats.loads,
            "load_failures": stats.load_failures,
            "evictions": stats.evictions,
        },
        "states": states,
        "models": {"columns": list(COLUMNS), "total": total, "matched": matched, "offset": query.offset, "rows": page},
        "fleet": _fleet(dp),
        "llm": _llm_engines(dp),
    }


def merge_states(own: dict[str, Any], peers: list[dict[str, Any]], query: Query) -> dict[str, Any]:
    """One worker's feed and its peers' (each ``own=1``): summed figures, one page of rows."""
    out = dict(own)
    cache = dict(own["cache"])
    states = dict(own["states"])
    rows = list(own["models"]["rows"])
    total, matched = own["models"]["total"], own["models"]["matched"]
    llm = list(own["llm"])
    for peer in peers:
        for k in TOTALS:
            cache[k] += peer["cache"][k]
        for state, n in peer["states"].items():
            states[state] = states.get(state, 0) + n
        rows += peer["models"]["rows"]
        total += peer["models"]["total"]
        matched += peer["models"]["matched"]
        llm += peer["llm"]
        out["ready"] = out["ready"] and peer["ready"]
    _order(rows, query)
    out["cache"], out["states"], out["llm"] = cache, states, llm
    page = rows[query.offset : query.offset + query.limit]
    out["models"] = {**own["models"], "total": total, "matched": matched, "offset": query.offset, "rows": page}
    return out


def _version() -> str:
    from meshserve.server.version import __version__

    return __version__
