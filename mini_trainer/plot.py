"""`mini-trainer plot RUN_DIR`: draw a run's `metrics.jsonl` as one PNG of learning curves.

`LoggingHook` appends one JSON object per `trainer.log()` call to `<workspace>/metrics.jsonl`:
`{"step": 200, "epoch": 1, "loss": 0.41, "val/loss": 0.45, ...}`. This module reads that file
into one series per metric (`read_metrics`), groups the series into panels (`panel_layout`:
"loss", "val/loss" and "ema_val/loss" share the panel "loss") and draws them with
matplotlib's Agg renderer (`plot_metrics`), without touching pyplot or the session's backend.
matplotlib is imported only when drawing; it comes with the `stream` extra.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .checkpoint import write_file
from .utils import flatten_dict

logger = logging.getLogger(__name__)

#: The file LoggingHook writes in the trainer's workspace.
METRICS_FILE = "metrics.jsonl"

#: Panels left out when no metrics are named: bookkeeping of the loop, not of learning.
#: Any panel whose name ends in "_time" (data_time, step_time, wall_time, ...) is left out too.
#: `lr`, `grad_norm`, throughput rates and memory stay: they explain a curve's shape (the
#: per-step counts `samples` and `flops` behind the rates do not).
DEFAULT_EXCLUDED = frozenset({"time", "retries", "micro_steps", "skipped", "samples", "flops", "peak_flops"})

#: Pixels are `PANEL_SIZE * dpi` per panel; panels are laid out in a grid of at most 3 columns.
PANEL_SIZE = (5.0, 3.5)
DPI = 100

Series = list[tuple[int, float]]

PLOT_HELP = """\
Draw the learning curves of a run as one PNG.

Reads RUN_DIR/metrics.jsonl (written by LoggingHook when the trainer has a workspace) and
draws one panel per metric against the step. A training metric and its evaluations share a
panel: the panel "loss" holds "loss", "val/loss", "test/loss", "ema_val/loss" (the name after
the last "/"). When a step was logged twice (a resumed run repeats the steps after its last
checkpoint), the later line wins.

Without --metrics every metric is drawn except timing and bookkeeping ones (names ending in
_time, retries, micro_steps, skipped). --metrics takes panel names ("loss": every series of
that panel) and series names ("val/loss": that series only), comma separated.

  mini-trainer plot runs/digits --metrics loss,accuracy,lr -o curves.png --log-y

Prints the path of the PNG (default RUN_DIR/curves.png).
"""


def read_metrics(path: str | os.PathLike[str]) -> dict[str, Series]:
    """Read a `metrics.jsonl` file into `{metric: [(step, value), ...]}`.

    Nested records are flattened with "." (`{"m": {"acc": 0.9}}` -> "m.acc"); "step" and
    "epoch" are not metrics. Each series is sorted by step with one point per step: when
    several lines give a metric at the same step (a resumed run logs again the steps after its
    last checkpoint), the last line in the file wins, and when that last value is null (a
    non-finite number) the step has no point. Values that are not numbers (text, lists,
    booleans) are not plotted. Metrics are in the order of their first appearance.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: a line that is not a JSON object with an integer "step" (the message names
            the file and the line number).
    """
    path = Path(path)
    latest: dict[str, dict[int, float | None]] = {}
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue  # a blank line carries nothing (e.g. an editor's trailing newline)
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg}): {_clip(line)}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {number}: expected a JSON object, got {_clip(line)}")
            step = record.get("step")
            if isinstance(step, bool) or not isinstance(step, int):
                raise ValueError(f"{path}, line {number}: expected an integer 'step', got {step!r}")
            for name, value in flatten_dict(record).items():
                if name in ("step", "epoch"):
                    continue
                if value is None or (isinstance(value, float) and not math.isfinite(value)):
                    latest.setdefault(name, {})[step] = None  # overrides what came before, then drawn as no point
                elif isinstance(value, (int, float)) and not isinstance(value, bool):
                    latest.setdefault(name, {})[step] = float(value)
    series = {name: sorted((s, v) for s, v in points.items() if v is not None) for name, points in latest.items()}
    return {name: points for name, points in series.items() if points}


def panel_of(name: str) -> str:
    """The panel a series belongs to: the name after its last "/" ("ema_val/loss" -> "loss")."""
    return name.rsplit("/", 1)[-1]


def excluded_by_default(panel: str) -> bool:
    """Whether `plot_metrics` leaves out this panel when no metrics are named."""
    return panel in DEFAULT_EXCLUDED or panel.endswith("_time")


def panel_layout(names: Iterable[str], metrics: str | Sequence[str] | None = None) -> dict[str, list[str]]:
    """Which series each panel draws: `{panel: [series, ...]}`, in drawing order.

    `names` are the series in the file. Without `metrics`, every panel except the timing and
    bookkeeping ones (`excluded_by_default`), in order of first appearance. With `metrics`
    (names, or one comma-separated string), in that order: a name without "/" is a panel and
    brings every series of it ("loss" -> "loss", "val/loss", "ema_val/loss"); a name with "/"
    is one series ("val/loss" -> only that one). Within a panel the training series (the plain
    name) comes first, then the others in order of first appearance.

    Raises:
        ValueError: `metrics` is empty or names something that is not in `names`.
    """
    names = list(dict.fromkeys(names))
    panels: dict[str, list[str]] = {}
    for name in names:
        panels.setdefault(panel_of(name), []).append(name)
    if metrics is None:
        chosen = {panel: series for panel, series in panels.items() if not excluded_by_default(panel)}
    else:
        wanted = _split_metrics(metrics)
        chosen = {}
        for item in wanted:
            if "/" in item:
                if item not in names:
                    raise ValueError(_unknown_metric(item, names, panels))
                picked = [item]
            elif item in panels:
                picked = panels[item]
            else:
                raise ValueError(_unknown_metric(item, names, panels))
            series = chosen.setdefault(panel_of(item), [])
            series.extend(name for name in picked if name not in series)
    # The training curve first (a stable colour for it), the evaluations in file order.
    order = {name: index for index, name in enumerate(names)}
    return {panel: sorted(series, key=lambda name: (name != panel, order[name])) for panel, series in chosen.items()}


def plot_metrics(
    run_dir: str | os.PathLike[str],
    metrics: str | Sequence[str] | None = None,
    output: str | os.PathLike[str] | None = None,
    log_y: bool = False,
    dpi: int = DPI,
    panel_size: tuple[float, float] = PANEL_SIZE,
    title: str | None = None,
) -> Path:
    """Draw `<run_dir>/metrics.jsonl` as a grid of panels and write it as a PNG; return its path.

    Args:
        run_dir: the trainer's workspace (the directory that holds metrics.jsonl).
        metrics: panels ("loss") and/or single series ("val/loss") to draw, as a list or one
            comma-separated string; None draws every metric except timing and bookkeeping
            ones (see `panel_layout`).
        output: where to write the PNG (must end in .png; its directory must exist); default
            `<run_dir>/curves.png`. Written atomically: a reader never sees half a file.
        log_y: logarithmic y-axes, for panels whose values are all positive; any other panel
            stays linear, says so in its title, and a warning is logged.
        dpi, panel_size: the image is `panel_size` inches (width, height) per panel at `dpi`,
            panels in a grid of at most 3 columns: 3 panels at the defaults are 1000x700 pixels.
        title: the figure's title; default the run directory's name.

    Raises:
        FileNotFoundError: `run_dir` or its metrics.jsonl does not exist.
        ValueError: `run_dir` is not a directory, the file is malformed or holds no metric
            values, `metrics` names one the file does not have, or `output` is unusable.
        ImportError: matplotlib is not installed.
    """
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise FileNotFoundError(f"run_dir {str(run_dir)!r} does not exist")
    if not run_dir.is_dir():
        raise ValueError(
            f"run_dir {str(run_dir)!r} is not a directory; pass the run's workspace, the directory that holds "
            f"{METRICS_FILE}"
        )
    source = run_dir / METRICS_FILE
    if not source.is_file():
        raise FileNotFoundError(
            f"no {METRICS_FILE} in run_dir {str(run_dir)!r} (looked for {str(source)!r}); LoggingHook writes it "
            "when the trainer has a workspace (and jsonl=True)"
        )
    if isinstance(dpi, bool) or not isinstance(dpi, int) or dpi < 1:
        raise ValueError(f"dpi (--dpi) must be an integer >= 1; got {dpi!r}")
    output = run_dir / "curves.png" if output is None else Path(output)
    _check_output(output)
    series = read_metrics(source)
    if not series:
        empty = source.stat().st_size == 0 or not source.read_text(encoding="utf-8").strip()
        raise ValueError(f"{source} is empty" if empty else f"{source} has no metric values (only step/epoch or nulls)")
    layout = panel_layout(series, metrics)
    if not layout:
        raise ValueError(
            f"{source} has only timing/bookkeeping metrics ({', '.join(series)}); name them with metrics= / --metrics"
        )
    Figure, FigureCanvasAgg, MaxNLocator = _matplotlib()

    columns = min(len(layout), 3 if len(layout) > 4 else 2)
    rows = math.ceil(len(layout) / columns)
    figure = Figure(figsize=(panel_size[0] * columns, panel_size[1] * rows), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)  # attaches itself to the figure: the Agg renderer, no pyplot state
    figure.suptitle(run_dir.resolve().name if title is None else title)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    linear = []
    for ax, (panel, names) in zip(axes, layout.items(), strict=False):
        for name in names:
            steps, values = zip(*series[name], strict=True)
            # A few points (an evaluation every epoch) would be invisible as a bare line.
            ax.plot(steps, values, label=name, marker="o" if len(steps) <= 30 else None, markersize=3, linewidth=1.2)
        panel_title = panel
        if log_y:
            if all(value > 0 for name in names for _, value in series[name]):
                ax.set_yscale("log")
            else:
                linear.append(panel)
                panel_title += " (linear: values <= 0)"
        ax.set_title(panel_title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers: no 12.5 ticks
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(layout):]:
        ax.set_visible(False)  # the grid's empty cells
    if linear:
        logger.warning("log_y (--log-y): kept a linear y-axis for %s (values <= 0)", ", ".join(linear))

    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=dpi)
    write_file(output, image.getvalue(), fsync=False, atomic=True)  # a reader never sees half a PNG
    return output


def add_plot_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `plot` command to an argparse `add_subparsers()` object; return its parser."""
    parser = subparsers.add_parser(
        "plot", help="draw a run's metrics.jsonl as a PNG of learning curves", description=PLOT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run's workspace (holds metrics.jsonl)")
    parser.add_argument(
        "--metrics", action="append", metavar="NAMES",
        help="comma-separated panels (loss) or series (val/loss) to draw; may repeat (default: all but timings)",
    )
    parser.add_argument("-o", "--output", metavar="PNG", help="where to write the image (default: RUN_DIR/curves.png)")
    parser.add_argument("--log-y", action="store_true", help="logarithmic y-axes (panels with values <= 0 stay linear)")
    parser.add_argument(
        "--dpi", type=int, default=DPI,
        help=f"dots per inch (default: {DPI}; a panel is {PANEL_SIZE[0]}x{PANEL_SIZE[1]} inches)"
    )
    return parser


def run_plot(args: argparse.Namespace) -> int:
    """Run `mini-trainer plot` from parsed arguments: print the PNG's path, return 0; on a
    usage error (bad directory, file, metric name, output, missing matplotlib) print
    `mini-trainer: error: ...` to stderr and return 2."""
    try:
        metrics = ",".join(args.metrics) if args.metrics else None
        path = plot_metrics(args.run_dir, metrics=metrics, output=args.output, log_y=args.log_y, dpi=args.dpi)
    except (ValueError, OSError, ImportError) as err:
        print(f"mini-trainer: error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


def _matplotlib() -> tuple[Any, Any, Any]:
    # Figure + FigureCanvasAgg, never pyplot: no global backend switch, no figure registry.
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as err:
        raise ImportError(
            f"mini-trainer plot needs matplotlib ({err}): pip install 'mini_trainer[examples]'"
        ) from err
    return Figure, FigureCanvasAgg, MaxNLocator


def _split_metrics(metrics: str | Sequence[str]) -> list[str]:
    items = [metrics] if isinstance(metrics, str) else list(metrics)
    names = [part.strip() for item in items for part in str(item).split(",")]
    names = list(dict.fromkeys(name for name in names if name))
    if not names:
        raise ValueError(f"metrics (--metrics) names no metric: {metrics!r}")
    return names


def _unknown_metric(item: str, names: list[str], panels: dict[str, list[str]]) -> str:
    return (
        f"metrics (--metrics): {item!r} is not in the file; its series are {', '.join(names)} "
        f"(panels: {', '.join(panels)})"
    )


def _check_output(output: Path) -> None:
    if output.suffix.lower() != ".png":
        raise ValueError(f"output (-o) {str(output)!r} must end in .png (the image is a PNG)")
    if output.is_dir():
        raise ValueError(f"output (-o) {str(output)!r} is a directory; give a file name ending in .png")
    if not output.parent.is_dir():
        raise FileNotFoundError(f"output (-o) {str(output)!r}: directory {str(output.parent)!r} does not exist")


def _clip(line: str, limit: int = 80) -> str:
    line = line.strip()
    return repr(line if len(line) <= limit else line[:limit] + "...")
