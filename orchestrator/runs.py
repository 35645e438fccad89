"""Run state in Redis: what every worker and client of a run reads and writes.

Keys (under the namespace): `run:<id>` a hash of the run's fields, `run:<id>:steps` a hash of step id →
StepResult JSON. A step's record is written by the one task that runs it, so no two writers race on a
field. A run is pending, running once a step has started, and ends once: a Lua script sets the first
terminal status and keeps it.

Each write also pushes a record event onto the records buffer (orchestrator/history/events.py) in the same
pipeline, unless records are off (MCPO_RECORDS=off): the SQL records cost a step no extra round trip.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

from redis import Redis
from redis.client import Pipeline

from orchestrator import scripts
from orchestrator.errors import RunNotFound
from orchestrator.history import events
from orchestrator.results import TERMINAL_RUN, TERMINAL_STEP, RunResult, StepError, StepResult
from orchestrator.security.sealing import seal_params
from orchestrator.settings import settings
from orchestrator.text import as_text
from orchestrator.workflow import Graph

# Ends a run unless it already ended: the first terminal status wins (a cancel over a late finish).
_END = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return false end
if current == 'succeeded' or current == 'failed' or current == 'cancelled' then return current end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'finished_at', ARGV[2])
return ARGV[1]
"""


# KEYS: the run's steps, the run, the records buffer. ARGV: the step id, its running record, now, its record event
# ('' with records off). Marks the step running unless its record says it ended.
MARK = scripts.Lua(
    """
local ended = ENDED
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current then
  local ok, record = pcall(cjson.decode, current)
  if ok and ended[record.status] then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSETNX', KEYS[2], 'started_at', ARGV[3])
if ARGV[4] ~= '' then redis.call('RPUSH', KEYS[3], ARGV[4]) end
return 1
""".replace("ENDED", "{" + ", ".join(f'["{status}"] = true' for status in TERMINAL_STEP) + "}")
)


class RunStore:
    """Reads and writes runs and their steps in Redis."""

    def __init__(self, redis: Redis, namespace: str, ttl: int, record: bool | None = None) -> None:
        self.redis = redis
        self.namespace = namespace
        self.ttl = ttl
        self.record = settings.records if record is None else record
        self.buffer = events.buffer_key(namespace)
        self._end = redis.register_script(_END)

    @property
    def cancel_channel(self) -> str:
        return f"{self.namespace}:cancel"

    def cancel(self, run_id: str, who: str | None = None) -> str:
        """End a run as cancelled (unless it already ended) and tell every worker; returns its status."""
        now = time.time()
        pipe = self.redis.pipeline(transaction=True)
        self._end(keys=[self._run_key(run_id)], args=["cancelled", repr(now)], client=pipe)
        pipe.publish(self.cancel_channel, run_id)
        if self.record:
            pipe.rpush(self.buffer, events.event("cancel", run_id=run_id, who=who or events.caller(), finished_at=now))
        status = pipe.execute()[0]
        if status is None:
            raise RunNotFound(f"run {run_id} is not known (expired or never enqueued)")
        return as_text(status)

    def _run_key(self, run_id: str) -> str:
        return f"{self.namespace}:run:{run_id}"

    def _steps_key(self, run_id: str) -> str:
        return f"{self.namespace}:run:{run_id}:steps"

    @staticmethod
    def records(graph: Graph, version: str, params: dict[str, Any], fallback: Any = None,
                who: str | None = None, origin: dict[str, str] | None = None,
                reused: dict[str, StepResult] | None = None) -> dict[str, Any]:  # fmt: skip
        """What `write` stores for a new pending run; `fallback` is what starts if the run fails, on behalf
        of the same caller `who`. `origin` holds what rebuilds or names the run (its workflow definition as JSON,
        the run it resumes, its idempotency key); `reused` the finished steps a resumed run takes over."""
        plan = {
            "steps": [
                {"id": s.id, "service": s.service, "tool": s.tool, "depends_on": s.depends_on} for s in graph.steps
            ],
            "sinks": graph.sinks(),
            "output": graph.output,
            "fallback": fallback,
            "sensitive": graph.sensitive,
        }
        if graph.sensitive:
            params = seal_params(params)
        fields = {"workflow": graph.name, "version": version, "status": "pending", "params": json.dumps(params),
                  "plan": json.dumps(plan), "who": who or events.caller(), **(origin or {})}  # fmt: skip
        if fallback:
            fallback["records"]["fields"]["who"] = fields["who"]
        reused = reused or {}
        steps = {
            s.id: (reused[s.id] if s.id in reused else StepResult(service=s.service, tool=s.tool)).model_dump_json()
            for s in graph.steps
        }
        return {"fields": fields, "steps": steps, "reused": sorted(reused)}

    def write(self, run_id: str, records: dict[str, Any]) -> None:
        """Store a new pending run made by `records`, created now."""
        created = time.time()
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self._run_key(run_id), mapping={**records["fields"], "created_at": repr(created)})
        if records["steps"]:
            pipe.hset(self._steps_key(run_id), mapping=records["steps"])
        pipe.expire(self._run_key(run_id), self.ttl)
        pipe.expire(self._steps_key(run_id), self.ttl)
        if self.record:
            pipe.rpush(self.buffer, events.run_event(run_id, records["fields"], created))
            for step_id in records.get("reused", ()):  # finished already: the records get them whole now
                pipe.rpush(self.buffer, events.step_event(run_id, step_id, records["steps"][step_id]))
        pipe.execute()

    def inputs(
        self,
        run_id: str,
        step_ids: Iterable[str],
        mark: tuple[str, StepResult] | None = None,
        pipe: Pipeline | None = None,
    ) -> tuple[str, dict[str, Any], dict[str, StepResult], list[Any]]:
        """The run's status, its params and the records of the given steps (as they were before `mark`), in one round
        trip; `mark` (a step id and its running record) is saved in the same trip, unless that step's record says it
        ended. Commands the caller queued on `pipe` go in the same trip too: their replies come first."""
        ids = list(step_ids)
        pipe = self.redis.pipeline(transaction=False) if pipe is None else pipe
        theirs = len(pipe)
        pipe.hmget(self._run_key(run_id), ["status", "params"])
        if ids:
            pipe.hmget(self._steps_key(run_id), ids)
        if mark is not None:
            self._mark(run_id, mark[0], mark[1], pipe)
        replies = scripts.execute(pipe)  # the caller's commands may be scripts
        earlier, replies = replies[:theirs], replies[theirs:]
        status, params = replies[0]
        if status is None:
            if mark is not None:
                self.redis.hdel(self._steps_key(run_id), mark[0])  # no record outlives its run
            raise RunNotFound(f"run {run_id} is not known (expired or never enqueued)")
        records = replies[1] if ids else []
        steps = {sid: StepResult.model_validate_json(raw) for sid, raw in zip(ids, records, strict=True) if raw}
        return as_text(status), json.loads(params), steps, earlier

    def _mark(self, run_id: str, step_id: str, result: StepResult, pipe: Pipeline) -> None:
        """Queue the mark of a step as running on `pipe`, unless its record says it ended: a message delivered again
        after its call was recorded (its worker died before acknowledging it) must not undo the record."""
        raw = result.model_dump_json()
        event = events.step_event(run_id, step_id, raw) if self.record else ""
        keys = [self._steps_key(run_id), self._run_key(run_id), self.buffer]
        MARK.queue(pipe, keys, [step_id, raw, repr(time.time()), event])

    def save_step(self, run_id: str, step_id: str, result: StepResult, pipe: Pipeline | None = None) -> None:
        """Record a step's result (its running mark is `inputs`'s, which also marks the run started). With `pipe`,
        the writes are queued on it for the caller to execute."""
        own = pipe is None
        pipe = self.redis.pipeline(transaction=False) if pipe is None else pipe
        raw = result.model_dump_json()
        pipe.hset(self._steps_key(run_id), step_id, raw)
        if self.record:
            pipe.rpush(self.buffer, events.step_event(run_id, step_id, raw))
        if own:
            pipe.execute()

    def finish(self, run_id: str, status: str, output: Any, errors: list[StepError],
               summary: dict[str, dict[str, int]]) -> str:  # fmt: skip
        """Close a run unless it already ended (a cancel wins); returns the status it ends with."""
        pipe = self.redis.pipeline(transaction=True)
        fields: dict[Any, str] = {
            "output": json.dumps(output),
            "errors": json.dumps([e.model_dump() for e in errors]),
            "error_summary": json.dumps(summary),
        }
        now = time.time()
        pipe.hset(self._run_key(run_id), mapping=fields)
        self._end(keys=[self._run_key(run_id)], args=[status, repr(now)], client=pipe)
        if self.record:
            # Pushed after the Lua end in one transaction: the buffer sees ends in the order Redis decided them.
            finished = events.event("finish", run_id=run_id, status=status, output=output, finished_at=now,
                                    errors=[e.model_dump() for e in errors], error_summary=summary)  # fmt: skip
            pipe.rpush(self.buffer, finished)
        index = -2 if self.record else -1
        return as_text(pipe.execute()[index])

    def link_fallback(self, run_id: str, fallback_run: str) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(self._run_key(run_id), "fallback_run", fallback_run)
        if self.record:
            pipe.rpush(self.buffer, events.event("fallback", run_id=run_id, fallback_run=fallback_run))
        pipe.execute()

    def status(self, run_id: str) -> str:
        status, started = self.redis.hmget(self._run_key(run_id), ["status", "started_at"])
        if status is None:
            raise RunNotFound(f"run {run_id} is not known (expired or never enqueued)")
        return _live(as_text(status), started)

    def exists(self, run_id: str) -> bool:
        return bool(self.redis.exists(self._run_key(run_id)))

    def definition(self, run_id: str) -> dict[str, Any] | None:
        """The workflow definition a run was started from (None for a run enqueued before it was kept)."""
        raw = self.redis.hget(self._run_key(run_id), "definition")
        return None if raw is None else dict(json.loads(raw))

    def plan(self, run_id: str) -> dict[str, Any]:
        raw = self.redis.hget(self._run_key(run_id), "plan")
        if raw is None:
            raise RunNotFound(f"run {run_id} is not known (expired or never enqueued)")
        return dict(json.loads(raw))

    def load(self, run_id: str) -> RunResult:
        """The run as it stands now."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self._run_key(run_id))
        pipe.hgetall(self._steps_key(run_id))
        fields, steps = pipe.execute()
        if not fields:
            raise RunNotFound(f"run {run_id} is not known (expired or never enqueued)")
        run = {as_text(k): as_text(v) for k, v in fields.items()}
        plan = json.loads(run["plan"])
        records = {as_text(k): StepResult.model_validate_json(v) for k, v in steps.items()}
        return RunResult(
            id=run_id,
            workflow=run["workflow"],
            status=_live(run["status"], run.get("started_at")),  # type: ignore[arg-type]
            steps={s["id"]: records[s["id"]] for s in plan["steps"] if s["id"] in records},
            output=json.loads(run["output"]) if "output" in run else None,
            errors=[StepError.model_validate(e) for e in json.loads(run.get("errors", "[]"))],
            error_summary=json.loads(run.get("error_summary", "{}")),
            params=json.loads(run["params"]),
            fallback_run=run.get("fallback_run"),
            resumed_from=run.get("resumed_from"),
            idempotency_key=run.get("idempotency_key"),
            created_at=float(run["created_at"]),
            finished_at=float(run["finished_at"]) if "finished_at" in run else None,
        )

    def is_terminal(self, status: str) -> bool:
        return status in TERMINAL_RUN


def _live(status: str, started_at: Any) -> str:
    return "running" if status == "pending" and started_at is not None else status
