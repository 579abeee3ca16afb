"""Where an open probe or edit applies: the code that opened it.

HeadModel's hooks sit on the modules once per install and see every forward pass of the model;
each entry of its hook table carries an :class:`Opened` record, and a hook applies only the entries
whose record applies to the forward pass running now:

- a block opened in a function's (or coroutine's) body belongs to the current ``contextvars``
  context: it applies in that context and in copies made while it is open (an ``asyncio`` task
  created inside the block inherits it), never in another task's context, a context made before,
  or another thread (HeadModel's edits belong to one thread at a time);
- a block opened in a generator's or async generator's body belongs to that body: it applies only
  while the body runs. A generator that yields inside ``with hm.ablate(...)`` edits its own forward
  passes, not its caller's between items (a generator shares its caller's context, so the context
  alone cannot tell them apart). The bodies of ``contextlib.contextmanager`` functions are looked
  through: their blocks belong to the code that entered the context manager. (So a pytest yield
  fixture cannot hand an open edit to its test: open it in the test.)
- :func:`suspended` stops every record opened before it, for its block, in its context (records
  opened inside it apply): reference activations come from the unedited model whatever is open.

Blocks may close in any order (a generator's block may close inside a block its caller opened
later); a record applies nowhere once its block has closed.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import sys
from contextvars import ContextVar
from types import FrameType
from typing import Iterator

_OPEN: ContextVar[tuple["Opened", ...]] = ContextVar("headscope_open", default=())  # context-bound records
_FLOOR: ContextVar[int] = ContextVar("headscope_floor", default=-1)  # records numbered below it are suspended
_SERIAL = itertools.count()
_BODIES = inspect.CO_GENERATOR | inspect.CO_ASYNC_GENERATOR


class Opened:
    """One open entry of a hook table: its kind, its item, and where it applies (``frame``: the
    generator body it belongs to, or None: the context it was opened in)."""

    __slots__ = ("kind", "item", "frame", "serial", "open")

    def __init__(self, kind: str, item, frame: FrameType | None):
        self.kind, self.item, self.frame = kind, item, frame
        self.serial = next(_SERIAL)
        self.open = True


def _opener(frame: FrameType | None) -> FrameType | None:
    """The generator body that is opening a block (``frame``: the innermost frame), or None when a
    function's or coroutine's body opens it. contextlib's frames, and the bodies of the context
    managers it is entering, are looked through."""
    while frame is not None:
        if _in_contextlib(frame):
            frame = frame.f_back
        elif frame.f_code.co_flags & _BODIES and frame.f_back is not None and _in_contextlib(frame.f_back):
            frame = frame.f_back  # a contextmanager body being entered
        else:
            break
    return frame if frame is not None and frame.f_code.co_flags & _BODIES else None


def _in_contextlib(frame: FrameType) -> bool:
    return frame.f_globals.get("__name__") == "contextlib"


@contextlib.contextmanager
def opened(records: list[Opened], kind: str, item) -> Iterator[Opened]:
    """Append a record of ``item`` to ``records`` for the block's duration (see the module docstring
    for where it applies); removed on exit, also after an exception, in whatever order blocks close."""
    record = Opened(kind, item, _opener(sys._getframe()))
    records.append(record)
    if record.frame is None:
        _OPEN.set(_OPEN.get() + (record,))
    try:
        yield record
    finally:
        record.open = False
        records.remove(record)
        here = _OPEN.get()
        if record in here:  # closed in the context that opened it (another context's copy keeps a closed record)
            _OPEN.set(tuple(r for r in here if r is not record))
        record.item = record.frame = None


def active(records: list[Opened]) -> list[Opened]:
    """The records that apply to the code running now, in the order they were opened."""
    if not records:
        return []
    floor, here, stack = _FLOOR.get(), _OPEN.get(), None
    out = []
    for record in records:
        if not record.open or record.serial < floor:
            continue
        if record.frame is None:
            if record in here:
                out.append(record)
        elif record.frame.f_back is not None:  # its generator runs (a suspended one has no caller)
            if stack is None:
                stack = _running_frames()
            if id(record.frame) in stack:
                out.append(record)
    return out


def _running_frames() -> set[int]:
    frame, ids = sys._getframe(1), set()
    while frame is not None:
        ids.add(id(frame))
        frame = frame.f_back
    return ids


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """Suspend every record opened so far, for the block, in this context (records opened inside apply)."""
    token = _FLOOR.set(next(_SERIAL))
    try:
        yield
    finally:
        _FLOOR.reset(token)
