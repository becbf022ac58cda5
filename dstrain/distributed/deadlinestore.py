"""Store calls that end within a deadline, even when the process serving the store is frozen.

A frozen process (SIGSTOP, a debugger, a hung file system read, a node swapping itself to death) keeps its
sockets open, so a TCPStore request to a store it serves is never answered: `add`, `check`, `get`,
`multi_get` and even connecting a new client wait forever (measured with torch 2.13: the store's timeout
bounds only the wait for a missing key; `set` alone returns, being fire-and-forget). A watchdog that calls
the store itself is then stuck exactly when it is needed.

So a `DeadlineStore` never calls the store on the caller's thread. One helper thread owns the connection
and makes the calls; the caller waits for the answer up to a deadline. A call that misses it leaves the
helper blocked: until the helper comes back (the server was only paused), later calls fail at once with
`StoreUnresponsive`, which says since when nothing was answered, so the caller can tell a short pause from
a frozen server. Nothing here waits without a bound, whatever the server does.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

CALL_DEADLINE_S = 2.0


class StoreUnresponsive(Exception):  # noqa: N818 (a state of the peer, not a bug)
    """The store has not answered a call sent at `since` (time.monotonic())."""

    def __init__(self, since: float) -> None:
        super().__init__(f"the store has not answered for {time.monotonic() - since:.1f} s")
        self.since = since


@dataclass
class _Call:
    name: str
    args: tuple[Any, ...]
    sent: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


class DeadlineStore:
    """A store client whose every call returns, raises, or raises `StoreUnresponsive` within a deadline.

    `connect` builds the real client; it runs on the helper thread too (connecting to a frozen server
    blocks as well), on the first call and again after a failed attempt.
    """

    def __init__(self, connect: Callable[[], Any], deadline_s: float = CALL_DEADLINE_S) -> None:
        self._connect, self.deadline_s = connect, deadline_s
        self._calls: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        self._lock = threading.Lock()  # one call at a time: the watchdog and the main thread share the store
        self._pending: _Call | None = None
        # A daemon thread: one blocked forever in a frozen server's socket must not hold the process at exit.
        threading.Thread(target=self._serve, name="dstrain-store-calls", daemon=True).start()

    def call(self, name: str, *args: Any, deadline_s: float | None = None) -> Any:
        """`store.<name>(*args)` on the helper thread: its result, its exception, or StoreUnresponsive."""
        with self._lock:
            if self._pending is not None and not self._pending.done.is_set():
                raise StoreUnresponsive(self._pending.sent)  # the helper is still waiting for an answer
            call = self._pending = _Call(name, args)
            self._calls.put(call)
            if not call.done.wait(self.deadline_s if deadline_s is None else deadline_s):
                raise StoreUnresponsive(call.sent)
        if call.error is not None:
            raise call.error
        return call.result

    def add(self, key: str, amount: int) -> int:
        return self.call("add", key, amount)

    def set(self, key: str, value: str) -> None:
        self.call("set", key, value)

    def get(self, key: str) -> bytes:
        return self.call("get", key)

    def check(self, keys: list[str]) -> bool:
        return self.call("check", keys)

    def multi_get(self, keys: list[str]) -> list[bytes]:
        return self.call("multi_get", keys)

    def _serve(self) -> None:
        store = None
        while True:
            call = self._calls.get()
            try:
                if store is None:
                    store = self._connect()
                call.result = getattr(store, call.name)(*call.args)
            except BaseException as exc:  # handed to the caller, who decides
                call.error = exc
            finally:
                call.done.set()
