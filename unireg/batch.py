"""Many pairs with one model: ``unireg register --pairs pairs.csv`` (a cohort onto an atlas, every follow-up
scan of a study).

The CSV has a header row naming ``fixed`` and ``moving`` (image files or DICOM series folders) and, optionally,
``name`` (the pair's output folder; default ``pair_0001``, ``pair_0002`` ...), ``prompt`` (default: the batch's
prompt), ``fixed_labels``, ``moving_labels``, ``fixed_mask`` and ``moving_mask``; paths are relative to the CSV.
The whole list is checked before the first registration (columns, names, files, prompts), so a typo in row 90
does not surface after an hour.

Each pair is then registered and written atomically to ``out/<name>/`` (``RegistrationResult.save``). A pair
whose folder already holds a finished run (its ``metrics.json``) is left alone unless ``overwrite``: a batch
stopped half-way picks up where it was. A pair that fails (a corrupt file, grids that cannot be related, a
field that cannot be inverted) is logged and listed with its reason, and the others go on.
``out/summary.csv`` lists every pair - done, done before, failed - with its seconds, Dice and Jacobian
figures; it is rewritten atomically after each pair, so it is never lost or half-written.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError, shorten
from .io import InputError
from .prompt import parse_prompt

logger = logging.getLogger(__name__)

SCAN_COLUMNS = ("fixed", "moving")
COLUMNS = (*SCAN_COLUMNS, "name", "prompt", "fixed_labels", "moving_labels", "fixed_mask", "moving_mask")
FILE_COLUMNS = (*SCAN_COLUMNS, "fixed_labels", "moving_labels", "fixed_mask", "moving_mask")
SUMMARY_FIELDS = ("name", "status", "reason", "seconds", "mean_dice_before", "mean_dice_after",
                  "nonpositive_jacobian_pct", "max_displacement_mm", "folder")
#: Most problems one pre-flight error message lists.
MAX_PROBLEMS_SHOWN = 10
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class BatchPair:
    """One row of the list, its paths resolved."""
    name: str
    fixed: str
    moving: str
    prompt: str = ""
    fixed_labels: str | None = None
    moving_labels: str | None = None
    fixed_mask: str | None = None
    moving_mask: str | None = None


def read_pair_csv(path, default_prompt: str = "") -> list[BatchPair]:
    """The pairs of a CSV, every problem of the list raised at once as one :class:`InputError`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"pair list not found: {path} (a CSV with a header row fixed,moving[,name,prompt,"
                         f"fixed_labels,moving_labels,fixed_mask,moving_mask])")
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            fields = [(f or "").strip() for f in reader.fieldnames or []]
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path} is not a readable CSV file ({exc})") from None
    if not set(SCAN_COLUMNS) <= set(fields):
        raise InputError(f"{path}: the header row must name the columns fixed and moving (optionally "
                         f"{', '.join(COLUMNS[2:])}); got {', '.join(fields) or 'nothing'}")
    unknown = [f for f in fields if f not in COLUMNS]
    if unknown:
        raise InputError(f"{path}: unknown column(s) {', '.join(map(repr, unknown))}; the columns are "
                         f"{', '.join(COLUMNS)}")
    pairs, problems, seen = [], [], {}
    for line, row in enumerate(rows, start=2):          # line 1 is the header
        if not any(row.values()):
            continue
        name = row.get("name") or f"pair_{len(pairs) + 1:04d}"
        where = f"line {line} ({name})"
        if not _SAFE_NAME.fullmatch(name):
            problems.append(f"{where}: the name must be letters, digits, '.', '_' or '-' (it names a folder), "
                            f"got {shorten(name, 40)!r}")
        elif name in seen:
            problems.append(f"{where}: the name is also on line {seen[name]}")
        seen.setdefault(name, line)
        files = {}
        for column in FILE_COLUMNS:
            value = row.get(column, "")
            if not value:
                if column in SCAN_COLUMNS:
                    problems.append(f"{where}: no {column} scan")
                continue
            file = path.parent / value
            if not (file.is_file() or (file.is_dir() and column in SCAN_COLUMNS)):   # a scan may be a DICOM folder
                problems.append(f"{where}: {column} {value} not found")
            files[column] = str(file.resolve())
        prompt = row.get("prompt") or default_prompt
        try:
            parse_prompt(prompt)
        except UserError as exc:
            problems.append(f"{where}: {exc}")
        pairs.append(BatchPair(name, files.get("fixed", ""), files.get("moving", ""), prompt,
                               *(files.get(c) for c in FILE_COLUMNS[2:])))
    if problems:
        shown = "; ".join(problems[:MAX_PROBLEMS_SHOWN])
        more = f"; and {len(problems) - MAX_PROBLEMS_SHOWN} more" if len(problems) > MAX_PROBLEMS_SHOWN else ""
        raise InputError(f"{path}: {len(problems)} problem(s), nothing registered: {shown}{more}")
    if not pairs:
        raise InputError(f"{path} lists no pairs")
    return pairs


def register_batch(model, pairs: list[BatchPair], out, *, overwrite: bool = False, inverse: bool = False,
                   show_progress: bool = True, **register_kwargs) -> list[dict]:
    """Register and save every pair under ``out`` (see the module docstring); returns the summary rows.

    ``register_kwargs`` go to ``model.register`` for every pair (``refine``, ``align``, ``similarity``, ...)."""
    from tqdm import tqdm

    from .result import check_output_dir
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output folder {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for pair in tqdm(pairs, desc="pairs", unit="pair", disable=not show_progress):
        folder = out / pair.name
        finished = folder / "metrics.json"
        if finished.is_file() and not overwrite:
            rows.append(_row(pair, folder, "done before", metrics=_read_metrics(finished)))
        else:
            try:
                check_output_dir(folder, overwrite)        # before the work, as for one pair
                result = model.register(pair.fixed, pair.moving, prompt=pair.prompt, fixed_labels=pair.fixed_labels,
                                        moving_labels=pair.moving_labels, fixed_mask=pair.fixed_mask,
                                        moving_mask=pair.moving_mask, **register_kwargs)
                result.save(folder, overwrite=overwrite, inverse=inverse)
                rows.append(_row(pair, folder, "done", metrics=result.summary()))
            except (UserError, OSError) as exc:           # bad input: the reason is the message
                logger.warning("pair %s failed: %s", pair.name, exc)
                rows.append(_row(pair, folder, "failed", reason=" ".join(str(exc).split())))
            except Exception as exc:                      # a bug: its traceback goes to the log, the batch goes on
                logger.exception("pair %s failed", pair.name)
                rows.append(_row(pair, folder, "failed", reason=f"{type(exc).__name__}: {' '.join(str(exc).split())}"))
        _write_summary(out / "summary.csv", rows)
    return rows


def _read_metrics(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _row(pair: BatchPair, folder: Path, status: str, *, metrics: dict | None = None, reason: str = "") -> dict:
    """A summary line; ``seconds`` is the registration's own (``metrics.json``), saving left out."""
    metrics = metrics or {}
    jacobian = metrics.get("jacobian") or {}
    def number(value, digits):
        return "" if not isinstance(value, (int, float)) else round(float(value), digits)
    return {"name": pair.name, "status": status, "reason": reason, "seconds": number(metrics.get("seconds"), 2),
            "mean_dice_before": number(metrics.get("mean_dice_before"), 4),
            "mean_dice_after": number(metrics.get("mean_dice_after"), 4),
            "nonpositive_jacobian_pct": number(jacobian.get("nonpositive_jacobian_pct"), 4),
            "max_displacement_mm": number(metrics.get("max_displacement_mm"), 2),
            "folder": str(folder) if status != "failed" else ""}


def _write_summary(path: Path, rows: list[dict]) -> None:
    """``summary.csv``, written to a temporary file beside it and renamed over it."""
    handle = tempfile.NamedTemporaryFile("w", newline="", dir=path.parent, prefix=f".{path.name}.", delete=False)
    try:
        with handle:
            writer = csv.DictWriter(handle, SUMMARY_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
