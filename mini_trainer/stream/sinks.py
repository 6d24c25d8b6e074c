"""Sinks: what runs a stream to its end and keeps its events (a list, JSON lines, a pandas
DataFrame). They drop the live objects (`model`, `trainer`) and turn 0-d tensors into
Python numbers."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from ..plain import to_plain
from .events import _abort_run

_NEVER_COLLECTED = ("model", "trainer")  # live objects, not metrics


def _select(event: Mapping[str, Any], include: Sequence[str] | None, exclude: Sequence[str] | None) -> dict[str, Any]:
    # Checked for each event, as fitstream does: an empty stream raises nothing, and a
    # source has given one event (a training epoch has run) when this raises.
    _check_include_exclude(include, exclude)
    if include is not None:
        return {k: event[k] for k in include if k in event and k not in _NEVER_COLLECTED}
    dropped = set(_NEVER_COLLECTED).union(exclude or ())
    return {k: v for k, v in event.items() if k not in dropped}


def _check_include_exclude(include: Any, exclude: Any) -> None:
    if include is not None and exclude is not None:
        raise ValueError(
            f"Provide only one of include or exclude. Got include={include!r} and exclude={exclude!r}."
        )
    for name, keys in (("include", include), ("exclude", exclude)):
        if isinstance(keys, str):
            raise TypeError(f"{name} must be a list of keys, not a single string ({keys!r}); write [{keys!r}].")


_READ_EVERY = 1024  # collect() reads its pending tensors every this many events


def collect(
    events: Iterable[dict[str, Any]],
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Run the stream to its end and return the events as a list of dicts, without
    `model` (and `trainer`), optionally keeping only `include` or dropping `exclude`.

    0-d tensors (a trainer's per-step loss, grad_norm, records) become Python numbers.
    They are read in batches of 1024 events: one host sync per 1024 steps, and device
    memory does not grow with the run's length.

    >>> import torch
    >>> collect([{"step": 1, "loss": torch.tensor(0.5), "model": None}])
    [{'step': 1, 'loss': 0.5}]
    >>> collect([{"step": 1, "loss": 0.5}], include=["loss", "missing"])
    [{'loss': 0.5}]
    """
    rows: list[dict[str, Any]] = []
    done = 0  # rows[:done] hold numbers already
    for event in events:
        rows.append(_select(event, include, exclude))
        if len(rows) - done >= _READ_EVERY:
            rows[done:] = [to_plain(row) for row in rows[done:]]
            done = len(rows)
    rows[done:] = [to_plain(row) for row in rows[done:]]
    return rows


def collect_jsonl(
    events: Iterable[dict[str, Any]],
    dest: str | Path | IO[str],
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> None:
    """Write each event as one JSON line to `dest` (a path, overwritten, its directory
    created if missing; or an open text file), as it arrives: a crashed run keeps the lines
    of the events it finished.

    Keys are filtered as in `collect`; 0-d tensors are written as numbers; other values
    must be JSON-serialisable.

    >>> import io, torch
    >>> out = io.StringIO()
    >>> collect_jsonl([{"step": 1, "loss": torch.tensor(0.25), "model": None}], out)
    >>> out.getvalue()
    '{"step": 1, "loss": 0.25}\\n'
    """
    if isinstance(dest, (str, Path)):
        # The file is opened before the first event, i.e. before a trainer has created its
        # workspace: a missing parent directory would fail every run that writes there.
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        with open(dest, "w", encoding="utf-8") as file:
            _write_jsonl(events, file, include, exclude, flush=True)
    else:
        _write_jsonl(events, dest, include, exclude, flush=False)


def _write_jsonl(events, file, include, exclude, flush: bool) -> None:
    writable = hasattr(file, "write")
    for event in events:
        try:
            line = json.dumps(to_plain(_select(event, include, exclude)))
            if not writable:  # fitstream's AttributeError, on the first event as there
                raise AttributeError(
                    f"{type(file).__name__!r} object has no attribute 'write'."
                    f" Got dest={file!r}; allowed: a path or an open text file."
                )
        except BaseException as error:  # an event it cannot write: the run ends with the error
            _abort_run(events, error)
            raise
        file.write(line + "\n")
        if flush:
            file.flush()


def collect_pd(
    events: Iterable[dict[str, Any]],
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
):
    """`collect`, as a pandas DataFrame with one row per event (needs pandas:
    `pip install pandas`)."""
    try:
        import pandas
    except Exception as error:  # as fitstream: any failure to import it
        raise ImportError("pandas is required for collect_pd. Install it with: pip install pandas") from error
    return pandas.DataFrame(collect(events, include=include, exclude=exclude))
