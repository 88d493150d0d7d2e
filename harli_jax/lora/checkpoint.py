"""Crash-safe checkpoints of a fine-tune job's full state, with Orbax.

This module owns `JobCheckpointer`, which saves and restores everything a preempted or crashed job
needs to continue exactly: adapter params, optax state, step, data-loader position, RNG key and
a small metadata dict. A state is a flat dict; each entry is stored by its shape:

- JSON-shaped entries (made only of dicts with string keys, lists, str, int, float, bool, None),
  such as the step, `PackedBatches.state()` and metadata, are stored as JSON and come back equal;
- every other entry (arrays, optax states, typed PRNG keys) goes into one Orbax PyTree and comes
  back with the structure, dtypes and shardings of the template passed to `restore`.

Orbax writes each step into a temporary directory and renames it into place when complete, so a
kill during a save leaves the previous checkpoints loadable; leftover temporaries are deleted when
the next `JobCheckpointer` opens the directory. Saves are asynchronous: `save` copies the state's
arrays to new buffers on their devices (the caller may then donate or overwrite its own) and
hands the copies to a writer thread, so a co-located job's checkpoint does not
stall serving: on a 2-core CPU it held the thread 2.7-3.0 ms, where Orbax's own asynchronous save
held it 12-30 ms (once 162) and its synchronous one 60-105 ms
(`bench/results/checkpoint-stall-cpu.json`). The write then delays a busy thread by 3-11 ms
at worst (the GIL); the scheduler fills no iteration while it goes on. `wait` returns once the
last save is on disk (and raises what it raised); every read of the directory and `close` wait
first.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp

_ARRAYS, _JSON = "arrays", "json"
T = TypeVar("T")


class JobCheckpointer:
    """Numbered checkpoints of one job's state in `directory`, keeping the newest `max_to_keep`."""

    def __init__(self, directory: str | os.PathLike[str], max_to_keep: int = 2) -> None:
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            enable_async_checkpointing=False,  # the writer thread is this class's
            cleanup_tmp_directories=True,
        )
        # Orbax requires an absolute path.
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._last: Future[bool] | None = None  # the last save's write

    def save(self, step: int, state: Mapping[str, Any]) -> bool:
        """Save `state` as `step`; returns False, writing nothing, if `step` is already saved.

        A job's state is a function of its step, so a second save of the same step (e.g. a job
        preempted again before it made progress) has nothing new to record.
        """
        if step in self.all_steps():
            return False
        arrays, json_items = _split(state)
        items: dict[str, Any] = {_JSON: ocp.args.JsonSave(json_items)}
        if arrays:
            # New buffers, no program to compile: ~1 ms on a CPU for a LoRA job's state. Their
            # transfers to the host start here, so the writer thread only waits for them: the
            # caller's thread (the engine loop's) stays the one that gives the device work.
            copies = jax.device_put(arrays, may_alias=False)
            for leaf in jax.tree.leaves(copies):
                leaf.copy_to_host_async()
            items[_ARRAYS] = ocp.args.StandardSave(copies)
        args = ocp.args.Composite(**items)
        self._last = in_thread(self._manager.save, step, args=args)
        return True

    def wait(self) -> None:
        """Returns once the last save is on disk; raises the error it raised, if any."""
        if self._last is not None:
            self._last.result()

    def writing(self) -> bool:
        """Whether a save is still being written (by the writer thread)."""
        return self._last is not None and not self._last.done()

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None if there is none."""
        self.wait()
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of all complete checkpoints, oldest first."""
        self.wait()
        return sorted(self._manager.all_steps())

    def restore(self, step: int | None = None, *, like: Mapping[str, Any]) -> dict[str, Any]:
        """Load the state saved as `step` (default: the latest).

        `like` is a state of the same structure (concrete arrays or `jax.ShapeDtypeStruct`s);
        its non-JSON entries give the structure, dtypes and shardings to restore to. Its JSON
        entries are not needed: those come back as saved.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
        elif step not in self.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; have {self.all_steps()}"
            )
        arrays_like, _ = _split(like)
        items: dict[str, Any] = {_JSON: ocp.args.JsonRestore()}
        if arrays_like:
            items[_ARRAYS] = ocp.args.StandardRestore(arrays_like)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        state = dict(restored[_JSON])
        if arrays_like:
            state.update(restored[_ARRAYS])
        return state

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self) -> JobCheckpointer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def in_thread(work: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
    """Runs ``work`` in a new thread; the future holds what it returns or raises. The thread is
    not a daemon: the interpreter waits for it before exiting, so a write it makes is whole."""
    future: Future[T] = Future()

    def run() -> None:
        try:
            future.set_result(work(*args, **kwargs))
        except BaseException as error:
            future.set_exception(error)

    threading.Thread(target=run, name=getattr(work, "__name__", "writer")).start()
    return future


def _split(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Partition a state's entries into (Orbax PyTree entries, JSON entries)."""
    arrays, json_items = {}, {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise TypeError(f"state keys must be strings, got {key!r}")
        (json_items if _is_json(value) else arrays)[key] = value
    return arrays, json_items


def _is_json(value: Any) -> bool:
    # Tuples (and so optax's NamedTuple states) are excluded: JSON would bring them back as lists.
    if value is None or isinstance(value, (str, bool, int, float)):
        return True
    if isinstance(value, list):
        return all(_is_json(v) for v in value)
    if type(value) is dict:
        return all(isinstance(k, str) and _is_json(v) for k, v in value.items())
    return False
