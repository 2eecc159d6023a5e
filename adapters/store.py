"""Jobs persisted in sqlite, so they survive a server restart.

A job that was queued or running when its process died lost its worker processes: on
start a training job that checkpointed resumes from its last checkpoint (Manager.recover);
the others are marked failed with the reason, and their logs stay readable.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

STATES = ("queued", "running", "succeeded", "failed")
KINDS = ("training", "trial", "tuning", "workflow")
INTERRUPTED = "the server stopped while this job was {state}"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
  id TEXT PRIMARY KEY, kind TEXT NOT NULL, name TEXT NOT NULL, parent TEXT,
  state TEXT NOT NULL, spec TEXT NOT NULL, created REAL NOT NULL, started REAL, finished REAL,
  log_path TEXT, metrics TEXT NOT NULL DEFAULT '{}', result TEXT NOT NULL DEFAULT '{}', error TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(kind, state);
CREATE TABLE IF NOT EXISTS triggers (name TEXT PRIMARY KEY, spec TEXT NOT NULL, created REAL NOT NULL);
-- Webhook deliveries seen (GitHub's X-GitHub-Delivery): a replayed signed delivery starts nothing.
-- Kept, not expired: the signature has no timestamp, so forgetting an id would re-arm its replay.
CREATE TABLE IF NOT EXISTS deliveries (id TEXT PRIMARY KEY, received REAL NOT NULL, result TEXT NOT NULL);
"""


@dataclass
class Job:
    id: str
    kind: str
    name: str
    state: str
    spec: dict[str, Any]
    created: float
    parent: str | None = None
    started: float | None = None
    finished: float | None = None
    log_path: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.state in ("succeeded", "failed")

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "kind": self.kind, "name": self.name, "parent": self.parent, "state": self.state,
            "created": self.created, "started": self.started, "finished": self.finished,
            "duration_seconds": (self.finished - self.started) if self.finished and self.started else None,
            "log_path": self.log_path, "metrics": self.metrics, "result": self.result, "error": self.error,
            "spec": self.spec,
        }  # fmt: skip


class JobStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _row(self, r: tuple) -> Job:
        return Job(
            id=r[0],
            kind=r[1],
            name=r[2],
            parent=r[3],
            state=r[4],
            spec=orjson.loads(r[5]),
            created=r[6],
            started=r[7],
            finished=r[8],
            log_path=r[9],
            metrics=orjson.loads(r[10]),
            result=orjson.loads(r[11]),
            error=r[12],
        )

    def create(self, kind: str, name: str, spec: dict[str, Any], parent: str | None = None) -> Job:
        job = Job(uuid.uuid4().hex[:12], kind, name, "queued", spec, time.time(), parent)
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, kind, name, parent, state, spec, created) VALUES (?,?,?,?,?,?,?)",
                (job.id, kind, name, parent, job.state, orjson.dumps(spec), job.created),
            )
        return job

    def update(self, job: Job, **changes: Any) -> Job:
        for k, v in changes.items():
            setattr(job, k, v)
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET state=?, started=?, finished=?, log_path=?, metrics=?, result=?, error=? WHERE id=?",
                (job.state, job.started, job.finished, job.log_path, orjson.dumps(job.metrics),
                 orjson.dumps(job.result), job.error, job.id),
            )  # fmt: skip
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            r = self._db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return self._row(r) if r else None

    def list(self, kind: str | None = None, state: str | None = None, parent: str | None = None,
             limit: int = 100) -> list[Job]:  # fmt: skip
        where, args = [], []
        for col, val in (("kind", kind), ("state", state), ("parent", parent)):
            if val is not None:
                where.append(f"{col}=?")
                args.append(val)
        sql = "SELECT * FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY created DESC LIMIT ?"
        with self._lock:
            rows = self._db.execute(sql, (*args, limit)).fetchall()
        return [self._row(r) for r in rows]

    def counts(self) -> dict[tuple[str, str], int]:
        with self._lock:
            rows = self._db.execute("SELECT kind, state, COUNT(*) FROM jobs GROUP BY kind, state").fetchall()
        return {(k, s): n for k, s, n in rows}

    def interrupted(self) -> list[Job]:
        """Jobs a stopped process left queued or running, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE state IN ('queued', 'running') ORDER BY created"
            ).fetchall()
        return [self._row(r) for r in rows]

    def fail_interrupted(self, exclude: Collection[str] = ()) -> list[str]:
        """Mark the jobs a dead server left queued or running as failed (but ``exclude``); their ids."""
        now = time.time()
        with self._lock:
            rows = self._db.execute("SELECT id, state FROM jobs WHERE state IN ('queued', 'running')").fetchall()
            rows = [r for r in rows if r[0] not in exclude]
            for job_id, state in rows:
                self._db.execute(
                    "UPDATE jobs SET state='failed', finished=?, error=? WHERE id=?",
                    (now, INTERRUPTED.format(state=state), job_id),
                )
        return [r[0] for r in rows]

    # -- triggers --------------------------------------------------------------
    def claim_delivery(self, delivery_id: str) -> dict[str, Any] | None:
        """Record a webhook delivery; None if it is new, else what the first one answered."""
        with self._lock:
            inserted = self._db.execute(
                "INSERT OR IGNORE INTO deliveries (id, received, result) VALUES (?,?,?)",
                (delivery_id, time.time(), "{}"),
            ).rowcount
            if inserted:
                return None
            row = self._db.execute("SELECT result FROM deliveries WHERE id=?", (delivery_id,)).fetchone()
        return orjson.loads(row[0])

    def delivery_result(self, delivery_id: str, result: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute("UPDATE deliveries SET result=? WHERE id=?", (orjson.dumps(result), delivery_id))

    def put_trigger(self, name: str, spec: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO triggers (name, spec, created) VALUES (?,?,?)",
                (name, orjson.dumps(spec), time.time()),
            )

    def triggers(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT name, spec FROM triggers ORDER BY name").fetchall()
        return {n: orjson.loads(s) for n, s in rows}

    def delete_trigger(self, name: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM triggers WHERE name=?", (name,)).rowcount > 0


class JobCollector(Collector):
    """Jobs by kind and state, read from the store at scrape time."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        g = GaugeMetricFamily("meshserve_adapter_jobs", "Adapter jobs by kind and state.", labels=["kind", "state"])
        counts = self.store.counts()
        for kind in KINDS:
            for state in STATES:
                g.add_metric([kind, state], counts.get((kind, state), 0))
        yield g
