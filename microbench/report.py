"""Render microbench result JSON files as Markdown tables (for BENCHMARKS.md) or a short text table.

    python microbench/report.py microbench/results/*.json            # Markdown, one table per file
    python microbench/report.py --text OUTDIR/*.json                  # plain columns (run_gpu.sh)
    python microbench/report.py --cols name,tokens,median_us,x_vs_cublas_bf16 FILE.json

Columns (unless --cols): name, shape, tokens, median_us and the keys that tell rows of one
name apart (qtype, act, threads, cache, context) where present, then every speed-up
(x_vs_*) and every fraction of a ceiling (frac_of_*) that some row has, then --extra ones.
Each table is headed by the file's bench, device, date and commit; a file that is not a result
document (no "rows") is named and skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

LEAD = ("name", "shape", "qtype", "act", "threads", "cache", "tokens", "context", "median_us")


def columns(rows: list[dict], extra: list[str]) -> list[str]:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    cols = [k for k in LEAD if k in keys]
    cols += [k for k in keys if k.startswith("x_vs_")]
    cols += [k for k in keys if k.startswith("frac_of_")]
    cols += [k for k in extra if k in keys and k not in cols]
    return cols


def fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    if isinstance(v, (list, tuple)):
        return "x".join(str(x) for x in v)
    return str(v)


def table(doc: dict, cols: list[str], markdown: bool) -> str:
    rows = doc["rows"]
    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    head = (f"{doc.get('bench', '?')} — {doc.get('device', '?')}, {doc.get('date', '?')}, commit "
            f"{doc.get('commit', '?')}{' (quick)' if doc.get('quick') else ''}")
    if markdown:
        lines = [f"**{head}**", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in cells]
        return "\n".join(lines)
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
    lines = [head, "  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--text", action="store_true", help="plain aligned columns instead of Markdown")
    ap.add_argument("--cols", type=lambda s: s.split(","), help="exactly these columns")
    ap.add_argument("--extra", type=lambda s: s.split(","), default=["gbps", "hit_rate", "decode_tok_s"],
                    help="more columns after the speed-ups and fractions, where present")
    args = ap.parse_args(argv)
    bad = 0
    for f in args.files:
        try:
            doc = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            print(f"{f}: not readable as JSON ({e})", file=sys.stderr)
            bad += 1
            continue
        if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
            print(f"{f}: not a microbench result (no 'rows' list); skipped", file=sys.stderr)
            bad += 1
            continue
        cols = args.cols or columns(doc["rows"], args.extra)
        print(table(doc, cols, markdown=not args.text))
        print()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
