"""Replica starts, stage by stage: when each step of one start happened, and the stage
durations that status, /metrics, the log and the simulator read from it. Pure: the
actuator passes every time (`trio.current_time()`); nothing here reads a clock.

A cold start's stages, each from the end of the one before:

    provision     scale decision -> the actuator begins this replica (on a node that
                  exists, only the actuator's own reaction; a new machine would count here)
    image         the image made runnable: pulled (the first replica on a node) and the
                  container created
    weights       the host's setup command (if any, e.g. `aws s3 cp` of the weights) plus
                  the load time the replica reports in its ready answer
    server_init   process start -> ready, less the reported load time: interpreter start,
                  imports, warm-up, and the probe's own latency
    first_answer  ready -> the first answer it sent (None while nobody asked)

A promotion (a ready standby routed after a decision) has two: `promote` (decision ->
routed) and `first_answer`. `total` is decision -> first answer, or -> ready when no
answer came yet.
"""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass
from typing import Any

@dataclass(eq=False)
class Start:
    """One replica start or promotion, filled in as it happens."""

    replica: str
    kind: str                        # "cold" or "promotion"
    role: str                        # what it was started for: "serving" or "standby"
    decided: float
    began: float | None = None       # the actuator began preparing it
    image_s: float | None = None     # pull + create (the runner's report)
    setup_s: float = 0.0             # host setup command
    process_started: float | None = None
    ready: float | None = None       # cold: probe answered; promotion: routed
    answered: float | None = None
    reported_weights_s: float | None = None
    failed: str | None = None

    @property
    def done(self) -> bool:
        return self.failed is not None or self.answered is not None

    def stages(self) -> dict[str, float | None]:
        if self.kind == "promotion":
            out: dict[str, float | None] = {
                "promote": _span(self.decided, self.ready),
                "first_answer": _span(self.ready, self.answered)}
        else:
            run = _span(self.process_started, self.ready)
            weights = (None if self.reported_weights_s is None and not self.setup_s
                       else self.setup_s + (self.reported_weights_s or 0.0))
            init = None if run is None else max(0.0, run - (self.reported_weights_s or 0.0))
            out = {"provision": _span(self.decided, self.began), "image": self.image_s,
                   "weights": weights, "server_init": init,
                   "first_answer": _span(self.ready, self.answered)}
        end = self.answered if self.answered is not None else self.ready
        out["total"] = _span(self.decided, end)
        return {k: None if v is None else round(v, 3) for k, v in out.items()}

    def as_dict(self) -> dict[str, Any]:
        return {"replica": self.replica, "kind": self.kind, "role": self.role,
                "state": ("failed" if self.failed else "answered" if self.answered is not None
                          else "ready" if self.ready is not None else "starting"),
                "stages": self.stages(), **({"error": self.failed} if self.failed else {})}

    def log_line(self) -> str:
        parts = ", ".join(f"{k} {v:.2f}s" for k, v in self.stages().items()
                          if v is not None and k != "total")
        total = self.stages()["total"]
        what = "promoted" if self.kind == "promotion" else f"started ({self.role})"
        return f"replica {self.replica} {what} in {total:.2f}s: {parts}"


def _span(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else max(0.0, b - a)


class StartLog:
    """The newest `keep` starts (a bounded history) and running sums per stage."""

    def __init__(self, keep: int = 100) -> None:
        self._recent: collections.deque[Start] = collections.deque(maxlen=keep)
        self._by_replica: dict[str, Start] = {}
        self.sums: dict[tuple[str, str], tuple[int, float]] = {}  # (kind, stage) -> (n, s)

    def begin(self, start: Start) -> Start:
        self._recent.append(start)
        self._by_replica[start.replica] = start
        return start

    def latest(self, replica: str) -> Start | None:
        return self._by_replica.get(replica)

    def forget(self, replica: str) -> None:
        self._by_replica.pop(replica, None)

    def answered(self, replica: str, now: float) -> Start | None:
        """The replica sent an answer: the first one ends its open start (returned once)."""
        s = self._by_replica.get(replica)
        if s is None or s.done or s.ready is None:
            return None
        s.answered = now
        self._count(s)
        return s

    def failed(self, start: Start, why: str) -> None:
        if not start.done:
            start.failed = why

    def _count(self, s: Start) -> None:
        for stage, v in s.stages().items():
            if v is not None:
                n, total = self.sums.get((s.kind, stage), (0, 0.0))
                self.sums[(s.kind, stage)] = (n + 1, total + v)

    def recent(self) -> list[Start]:
        return list(self._recent)


def parse_ready_body(body: bytes) -> float | None:
    """The load time a replica reports in its ready answer: a JSON object whose
    `stages.weights` is a non-negative number (docs/SCALER.md, "Replica contract").
    Anything else (not JSON, no stages) is no report, never an error."""
    try:
        doc = json.loads(body)
        v = doc["stages"]["weights"]
    except (ValueError, TypeError, KeyError, RecursionError):
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1e6:
        return None
    return float(v)


def cold_start_figures(doc: Any) -> tuple[float, float, int]:
    """(provision_s, startup_s, count) for the simulator from a status document (or its
    `starts` list): medians over the cold starts that became ready, startup being image +
    weights + server_init of each start. ValueError when there is none."""
    import statistics
    starts = doc.get("starts") if isinstance(doc, dict) else doc
    if not isinstance(starts, list):
        raise ValueError("expected a status document (p2pfs-scaler status --json) or its starts list")
    provision, startup = [], []
    for s in starts:
        if not isinstance(s, dict) or s.get("kind") != "cold" or s.get("state") not in ("ready", "answered"):
            continue
        st = s.get("stages") or {}
        nums = {k: float(v) for k, v in st.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0}
        provision.append(nums.get("provision", 0.0))
        startup.append(sum(nums.get(k, 0.0) for k in ("image", "weights", "server_init")))
    if not startup:
        raise ValueError("no cold start that became ready in it")
    return statistics.median(provision), statistics.median(startup), len(startup)
