"""Run a test body in several OS processes (spawned, so nothing is shared by fork)."""

from __future__ import annotations

import multiprocessing
import traceback
from collections.abc import Callable, Sequence
from typing import Any

_CTX = multiprocessing.get_context("spawn")


def _entry(
    target: Callable[..., Any], index: int, barrier: Any, args: tuple[Any, ...], results: Any
) -> None:
    try:
        results.put((index, True, target(index, barrier, *args)))
    except BaseException:
        results.put((index, False, traceback.format_exc()))


def run_in_processes(
    target: Callable[..., Any], args: Sequence[tuple[Any, ...]], timeout: float = 90.0
) -> list[Any]:
    """Start ``target(index, barrier, *args[index])`` in one process per entry.

    ``barrier`` lets the bodies start their racing part together. Returns the
    results in index order; a failure in any process fails with its traceback.
    """
    barrier = _CTX.Barrier(len(args))
    results = _CTX.Queue()
    processes = [
        _CTX.Process(target=_entry, args=(target, index, barrier, tuple(a), results))
        for index, a in enumerate(args)
    ]
    for process in processes:
        process.start()
    collected: dict[int, Any] = {}
    try:
        for _ in processes:
            index, ok, value = results.get(timeout=timeout)
            if not ok:
                raise AssertionError(f"worker process {index} failed:\n{value}")
            collected[index] = value
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
    return [collected[index] for index in range(len(args))]
