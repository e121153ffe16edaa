"""Restarting what dies: the background tasks of an extproc process, and the children of `up`.

A background task that raises used to vanish without a trace while the process kept answering
as if nothing had happened: key refresh stopped (so revocations stopped working), policy
reloads stopped while the metric still said OK. Here every task runs under a supervisor that
logs the exception with its class, counts it, restarts the task after a growing delay, and
reports the process unhealthy while a task keeps failing, so Envoy takes it out of rotation.

The pieces are small and take their clock from the caller, so tests drive them without
processes, sockets or real waiting.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import structlog

from extproc.metrics import Sample

log = structlog.get_logger("spendgate.supervise")

T = TypeVar("T")


@dataclass
class Backoff:
    """Delays that start at `initial`, grow by `factor` per failure and stop at `maximum`."""

    initial: float = 0.5
    factor: float = 2.0
    maximum: float = 30.0
    _next: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        self._next = self.initial

    def next(self) -> float:
        """The delay before the next attempt; the one after it is longer."""
        delay = self._next
        self._next = min(delay * self.factor, self.maximum)
        return delay

    def reset(self) -> None:
        """Back to the initial delay, after a run that lasted."""
        self._next = self.initial


@dataclass
class RestartPolicy:
    """When a dead child process is started again, and when it has died too often to go on.

    A child that stayed up `stable_after` seconds starts its backoff afresh; a child that needs
    more than `max_restarts` restarts within `window` seconds is crash-looping, and restarting it
    again would only hide that.
    """

    backoff: Backoff = field(default_factory=Backoff)
    stable_after: float = 30.0
    max_restarts: int = 5
    window: float = 60.0
    _restarts: deque[float] = field(default_factory=deque)

    def on_exit(self, started: float, now: float) -> float | None:
        """The delay before restarting a child that ran from `started` to `now`; None: give up."""
        if now - started >= self.stable_after:
            self.backoff.reset()
        while self._restarts and now - self._restarts[0] > self.window:
            self._restarts.popleft()
        if len(self._restarts) >= self.max_restarts:
            return None
        self._restarts.append(now)
        return self.backoff.next()

    @property
    def restarts(self) -> int:
        """Restarts within the current window."""
        return len(self._restarts)


def describe_error(exc: BaseException, depth: int = 4) -> str:
    """An exception's class and message, followed by its causes.

    Several errors that stop a start-up carry no message of their own (asyncio's TimeoutError,
    a psycopg pool giving up, cryptography's InvalidTag); without the class and the chained
    cause the log line says nothing.
    """
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(parts) < depth:
        seen.add(id(current))
        message = re.sub(r"\s+", " ", str(current)).strip()
        parts.append(f"{type(current).__name__}: {message}" if message else type(current).__name__)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return "; caused by ".join(parts)[:1000]


class NotReady(Exception):
    """A start-up step did not succeed before the deadline."""

    def __init__(self, step: str, cause: str) -> None:
        super().__init__(f"{step}: {cause}")
        self.step = step
        self.cause = cause


async def retry_until(
    step: str,
    attempt: Callable[[], Awaitable[T]],
    deadline: float,
    *,
    transient: tuple[type[BaseException], ...],
    backoff: Backoff | None = None,
) -> T:
    """Await `attempt()` until it succeeds, with retries on `transient` errors, until `deadline`.

    `deadline` is on the event loop's clock. An attempt still running at the deadline is
    cancelled, so a connection that hangs cannot stretch the start-up. Any other error is
    raised at once: retrying a missing table or a bad master key only delays the message.
    Raises NotReady with the last attempt's cause.
    """
    loop = asyncio.get_running_loop()
    delays = backoff or Backoff(0.25, 2.0, 2.0)
    last = ""
    tries = 0
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            cut = "the last attempt was still waiting at the deadline"
            raise NotReady(step, f"not done after {tries} attempt(s): {last or cut}")
        tries += 1
        try:
            return await asyncio.wait_for(attempt(), remaining)
        except transient as exc:
            if isinstance(exc, TimeoutError) and loop.time() >= deadline:
                # Cut off by the deadline: what the attempts before it said is the better clue.
                last += "; the last attempt was still waiting at the deadline" if last else ""
                continue
            last = describe_error(exc)
            log.warning("startup.retry", step=step, attempt=tries, error=last)
        await asyncio.sleep(max(0.0, min(delays.next(), deadline - loop.time())))


@dataclass
class _Task:
    name: str
    critical: bool
    backoff: Backoff
    up: bool = False
    failures: int = 0  # every failure since start, for the counter
    consecutive: int = 0  # failures without a run of `stable_after` seconds in between
    down_since: float | None = None
    task: asyncio.Task[None] | None = None


class TaskSupervisor:
    """Runs background tasks forever: restarts each one that raises (or returns), with backoff.

    The process is healthy while no critical task is failing: a task is failing after
    `max_failures` failures in a row (it never ran `stable_after` seconds in between), or when it
    has been down longer than `dead_after` seconds. `on_health` hears every change, and a task
    that then runs `stable_after` seconds without failing makes the process healthy again.
    """

    def __init__(
        self,
        on_health: Callable[[bool], Awaitable[None]] | None = None,
        *,
        max_failures: int = 3,
        dead_after: float = 30.0,
        stable_after: float = 10.0,
        backoff: Callable[[], Backoff] = Backoff,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._on_health = on_health
        self._max_failures = max_failures
        self._dead_after = dead_after
        self._stable_after = stable_after
        self._new_backoff = backoff
        self._clock = clock
        self._tasks: dict[str, _Task] = {}
        self._healthy = True

    @property
    def healthy(self) -> bool:
        """No critical task is failing."""
        return self._healthy

    def failures(self, name: str) -> int:
        """How often the task `name` has failed since start."""
        return self._tasks[name].failures

    def is_up(self, name: str) -> bool:
        """Whether the task `name` is running now (not waiting to be restarted)."""
        return self._tasks[name].up

    def start(self, name: str, run: Callable[[], Awaitable[None]], *, critical: bool = True) -> None:
        """Run `run()` under supervision. A non-critical task's failures never make the process
        unhealthy: housekeeping must not take traffic away."""
        if name in self._tasks:
            raise ValueError(f"a task named {name!r} is already supervised")
        state = _Task(name, critical, self._new_backoff())
        self._tasks[name] = state
        state.task = asyncio.create_task(self._watch(state, run), name=f"supervise:{name}")

    async def stop(self) -> None:
        """Cancel every task and wait for them; cancellation is not a failure."""
        tasks = [s.task for s in self._tasks.values() if s.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def samples(self) -> list[Sample]:
        """The metrics: failures per task, and whether each task is running now."""
        out: list[Sample] = []
        for s in self._tasks.values():
            labels = {"task": s.name}
            out.append(("spendgate_background_task_failures_total", "counter", labels, s.failures))
            out.append(("spendgate_background_task_up", "gauge", dict(labels), 1 if s.up else 0))
        return out

    def _failing(self, s: _Task) -> bool:
        if s.consecutive >= self._max_failures:
            return True
        return s.down_since is not None and self._clock() - s.down_since >= self._dead_after

    async def _evaluate(self) -> None:
        failing = [s.name for s in self._tasks.values() if s.critical and self._failing(s)]
        healthy = not failing
        if healthy == self._healthy:
            return
        self._healthy = healthy
        if healthy:
            log.info("background_tasks.healthy")
        else:
            log.error("background_tasks.failing", tasks=failing)
        if self._on_health is not None:
            await self._on_health(healthy)

    async def _watch(self, s: _Task, run: Callable[[], Awaitable[None]]) -> None:
        while True:
            s.up, s.down_since = True, None
            await self._evaluate()
            exc = await self._run_once(s, run)
            s.up, s.down_since = False, self._clock()
            s.failures += 1
            s.consecutive += 1
            delay = s.backoff.next()
            log.error(
                "background_task.failed",
                task=s.name,
                error=describe_error(exc),
                consecutive=s.consecutive,
                restart_in=delay,
                exc_info=exc,
            )
            await self._evaluate()
            # Wake at the dead_after mark too, so a long wait still turns the health status.
            first = min(delay, self._dead_after)
            await asyncio.sleep(first)
            await self._evaluate()
            await asyncio.sleep(delay - first)
            log.info("background_task.restarting", task=s.name, failures=s.failures)

    async def _run_once(self, s: _Task, run: Callable[[], Awaitable[None]]) -> BaseException:
        """Run the task once; return what ended it."""
        inner = asyncio.ensure_future(run())
        try:
            done, _ = await asyncio.wait({inner}, timeout=self._stable_after)
            if not done:
                if s.consecutive:
                    log.info("background_task.recovered", task=s.name, after_failures=s.consecutive)
                s.consecutive = 0
                s.backoff.reset()
                await self._evaluate()
                await asyncio.wait({inner})
        except asyncio.CancelledError:
            inner.cancel()
            await asyncio.gather(inner, return_exceptions=True)
            raise
        if inner.cancelled():
            return RuntimeError("cancelled by something other than its supervisor")
        return inner.exception() or RuntimeError("returned; it should run until cancelled")
