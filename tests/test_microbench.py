"""Every microbench script runs in its --quick (CPU) form and writes the agreed result document:
{"bench": stem, "device", "date", "commit", "rows": [{"name", "shape", "tokens", "median_us",
"x_vs_<baseline>", "frac_of_<ceiling>", ...}]}. A script broken here would waste a GPU lease."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "microbench"
SCRIPTS = sorted(p.stem for p in BENCH.glob("*.py") if p.stem not in ("common", "report"))
TRACES = ROOT.parent / "shared" / "traces"


def test_every_script_is_listed():
    assert {"cpu_kernels", "triton_moe", "moe_layer", "e2e", "sim_policies", "cpu_model"} <= set(SCRIPTS)


# soak --quick: 3 x 500 decode steps and a fresh run per mode, about 45 s of CPU on the 2-core box
_SLOW = {"soak"}


@pytest.mark.parametrize("stem", [pytest.param(s, marks=pytest.mark.slow) if s in _SLOW else s for s in SCRIPTS])
def test_quick_run_writes_the_result_document(stem, tmp_path):
    if stem in ("sim_policies", "trace_predictability") and not TRACES.is_dir():
        pytest.skip(f"needs the shared routing traces ({TRACES})")
    out = tmp_path / f"{stem}.json"
    r = subprocess.run([sys.executable, str(BENCH / f"{stem}.py"), "--quick", "--json", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    doc = json.loads(out.read_text())
    assert doc["bench"] == stem
    for key in ("device", "date", "commit"):
        assert isinstance(doc.get(key), str) and doc[key], key
    rows = doc["rows"]
    assert rows, "no rows"
    for row in rows:
        assert isinstance(row.get("name"), str) and row["name"], row
        assert "shape" in row and isinstance(row.get("tokens"), int), row
        assert row.get("median_us") is None or row["median_us"] > 0, row
    keys = set().union(*rows)
    assert any(k.startswith("x_vs_") for k in keys), f"no speed-up column in {sorted(keys)}"
    assert any(k.startswith("frac_of_") for k in keys), f"no fraction-of-ceiling column in {sorted(keys)}"


def test_cpu_kernels_quick_on_the_generic_tier(tmp_path):
    """CI runs on AVX-512 and on AVX2-only machines: forced to the portable tier, the CPU kernel
    benchmark must still run (an AVX-512-only entry called without checking the tier fails here on
    every machine, not only on the AVX2 one)."""
    out = tmp_path / "cpu_kernels.json"
    env = dict(os.environ, HYBRIMOE_CPU_TIER="generic")
    r = subprocess.run([sys.executable, str(BENCH / "cpu_kernels.py"), "--quick", "--json", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    rows = json.loads(out.read_text())["rows"]
    assert rows and not any(row.get("act") == "f32" for row in rows)  # the AVX-512 probe was skipped


def test_report_renders_results_and_names_bad_files(tmp_path):
    good = {"bench": "demo", "device": "cpu", "date": "d", "commit": "c",
            "rows": [{"name": "a|b", "shape": [2, 3], "tokens": 1, "median_us": 12.5, "x_vs_base": 2.0,
                      "frac_of_copy_bw": 0.5, "other": 7}]}
    (tmp_path / "good.json").write_text(json.dumps(good))
    (tmp_path / "bad.json").write_text(json.dumps({"rows": 3}))
    r = subprocess.run([sys.executable, str(BENCH / "report.py"), str(tmp_path / "good.json"),
                        str(tmp_path / "bad.json")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1  # one file was not a result
    assert "| name | shape | tokens | median_us | x_vs_base | frac_of_copy_bw |" in r.stdout
    assert "| a/b | 2x3 | 1 | 12.5 | 2 | 0.5 |" in r.stdout
    assert "bad.json: not a microbench result" in r.stderr


def test_vs_ggml_without_llama_cpp_writes_our_rows_and_the_reason(tmp_path):
    """CI has no llama-cpp-python: the script still measures our side, says why ggml is missing and
    leaves every x_vs_ggml empty (never a guessed figure)."""
    out = tmp_path / "vs_ggml.json"
    code = ("import sys, runpy; sys.modules['llama_cpp'] = None; "
            f"sys.argv = ['vs_ggml.py', '--quick', '--json', {str(out)!r}]; "
            f"runpy.run_path({str(BENCH / 'vs_ggml.py')!r}, run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    doc = json.loads(out.read_text())
    assert "llama-cpp-python not installed" in doc["note"] and doc["ggml"] is None
    assert doc["rows"] and all(row["x_vs_ggml"] is None and row["ggml_us"] is None and row["median_us"] > 0
                               for row in doc["rows"])
