"""Shared by the microbench scripts: result metadata (device, date, commit) and the JSON writer."""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess


def device_name() -> str:
    """GPU name when CUDA is present, else the CPU model and core count."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    from hybrimoe.costs import cpu_model

    model = cpu_model()
    return f"{model} ({os.cpu_count()} cpus)"


def commit() -> str:
    """Short HEAD (+ "-dirty"); $HYBRIMOE_COMMIT first: the GPU box's copy of the tree may have no .git."""
    if os.environ.get("HYBRIMOE_COMMIT"):
        return os.environ["HYBRIMOE_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        # result files are written by these runs: their changes do not make the code dirty
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no", "--", ":/",
                                ":(top,exclude)microbench/results"], capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_results(bench: str, rows: list[dict], path: str | None, device: str | None = None, **extra) -> dict:
    """The result document {bench, device, date, commit, **extra, rows}; written to `path` if given."""
    doc = {"bench": bench, "device": device or device_name(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "commit": commit(), **extra, "rows": rows}
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(doc, f, indent=1, default=float)
    return doc


def print_table(rows: list[dict], cols: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(cols, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)
