"""Timelines of a run: a Chrome trace (open in Perfetto / chrome://tracing) and a matplotlib
picture of one decode step, with CPU, GPU and PCIe lanes per MoE layer.

Input: `HybridRuntime.timeline` records (one per layer call, host wall-clock) and the transfer
engine's events. Lanes: "CPU experts" from submit to the join, "GPU experts" from launch to its
return (emulated or, on CUDA, host-side launch span), "PCIe" one slice per copy (on CUDA its
device-side span, placed on the host clock by TransferEngine.event_times).
"""

from __future__ import annotations

import json


def _events(runtime):
    recs = runtime.timeline
    if not recs:
        return [], 0.0
    t0 = recs[0]["t0"]
    ev = []
    for r in recs:
        name = f"L{r['layer']} step {r['step']}"
        p = r["plan"]
        c0, c1 = r["cpu"]
        g0, g1 = r["gpu"]
        ev.append(("CPU", f"{name}: {len(p.cpu)} experts", c0 - t0, c1 - t0, r))
        ev.append(("GPU", f"{name}: {len(p.gpu)} hits + {len(p.loads)} loads", g0 - t0, g1 - t0, r))
    for kind, pool, slot, n, s, e in runtime.transfers.event_times():
        ev.append(("PCIe", f"{kind} pool {pool} slot {slot} ({n / 1e6:.2f} MB)", s - t0, e - t0, None))
    return ev, t0


def write_chrome_trace(runtime, path: str) -> int:
    """Write a Chrome trace JSON; returns the number of slices."""
    ev, _ = _events(runtime)
    tids = {"CPU": 1, "GPU": 2, "PCIe": 3}
    out = [{"name": "thread_name", "ph": "M", "pid": 1, "tid": t, "args": {"name": lane}} for lane, t in tids.items()]
    for lane, name, s, e, _r in ev:
        out.append({"name": name, "ph": "X", "pid": 1, "tid": tids[lane], "ts": s * 1e6,
                    "dur": max(e - s, 1e-7) * 1e6})
    with open(path, "w") as f:
        json.dump({"traceEvents": out, "displayTimeUnit": "ms"}, f)
    return len(ev)


def plot_step(runtime, path: str, step: int | None = None) -> None:
    """Draw one step (default: the last full decode step) as three lanes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = runtime.timeline
    if not recs:
        raise ValueError("no timeline recorded (run with record_timeline / --timeline or --plot)")
    steps = sorted({r["step"] for r in recs})
    step = steps[-1] if step is None else step
    sel = [r for r in recs if r["step"] == step]
    t0 = sel[0]["t0"]
    fig, ax = plt.subplots(figsize=(11, 3.2))
    colors = plt.cm.tab20.colors
    for k, r in enumerate(sel):
        c = colors[k % len(colors)]
        for lane, y, (a, b) in (("CPU", 2, r["cpu"]), ("GPU", 1, r["gpu"])):
            ax.broken_barh([((a - t0) * 1e3, max((b - a) * 1e3, 1e-3))], (y - 0.35, 0.7), facecolors=c)
        ax.text((r["cpu"][0] - t0) * 1e3, 2.42, f"L{r['layer']}", fontsize=7)
    t_end = max(r["cpu"][1] for r in sel)
    for kind, pool, slot, n, s, e in runtime.transfers.event_times():
        if t0 <= s <= t_end:
            ax.broken_barh([((s - t0) * 1e3, max((e - s) * 1e3, 1e-3))], (0 - 0.35, 0.7),
                           facecolors="tab:red" if kind == "load" else "tab:green")
    ax.set_yticks([0, 1, 2], ["PCIe", "GPU", "CPU"])
    ax.set_xlabel("ms since the step's first MoE layer")
    ax.set_title(f"decode step {step}: {len(sel)} MoE layers, schedule {runtime.schedule} "
                 f"({runtime.device}{'' if runtime.gpu_real else ', emulated gpu' if runtime.gpu_enabled else ''})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
