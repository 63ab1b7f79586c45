"""Cost model: interpolation, JSON round trip, calibration fit and cache, paper numbers."""

from __future__ import annotations

import pytest

from hybrimoe.costs import CostModel, CostModelError, LayerCost, cache_path, calibrate, load_or_calibrate, resolve


def test_piecewise_linear_interpolation_and_extension():
    lc = LayerCost((1, 3, 5), (1.0, 2.0, 6.0), (0.5, 0.5, 0.5), 1.0, 10)
    assert lc.cpu_time(0) == 1.0  # clamped below the first point
    assert lc.cpu_time(2) == pytest.approx(1.5)
    assert lc.cpu_time(4) == pytest.approx(4.0)
    assert lc.cpu_time(7) == pytest.approx(10.0)  # last segment (slope 2) extended
    assert lc.dense_time(3) == 0.0  # no dense points given


def test_json_roundtrip(tmp_path):
    cm = CostModel.paper_a6000("mixtral")
    p = tmp_path / "c.json"
    cm.save(p)
    back = CostModel.from_json(p)
    assert back == cm and CostModel.from_json(cm.to_json()) == cm
    with pytest.raises(CostModelError, match="unreadable"):
        CostModel.from_json('{"nope": 1}')
    with pytest.raises(CostModelError, match=r"nope\.json.*cannot read it.*paper-a6000"):
        CostModel.from_json(tmp_path / "nope.json")


def test_runtime_costs_take_the_paper_testbed_or_a_file(tmp_path):
    # RuntimeConfig.costs (generate --costs): 'paper-a6000' picks the shape from the expert count
    from hybrimoe.costs import resolve

    assert resolve("paper-a6000", "mixtral").name == "paper-a6000-mixtral"
    assert resolve("paper-a6000:deepseek-v2-lite").name == "paper-a6000-deepseek-v2-lite"
    cm = CostModel.paper_a6000("mixtral")
    cm.save(tmp_path / "c.json")
    assert resolve(str(tmp_path / "c.json")) == cm


def test_calibrate_fits_points_monotone_and_caches(tmp_path):
    calls = []

    def cpu(n):
        calls.append(n)
        return {1: 2e-4, 2: 3e-4, 4: 2.5e-4, 8: 9e-4}[n]  # a noisy dip at n=4

    cm = calibrate(cpu, lambda n: 1e-5 + 1e-7 * n, lambda: 2e-4, (1, 2, 4, 8), expert_bytes=4096)
    lc = cm.layer(0)
    assert lc.cpu_s[2] == pytest.approx(lc.cpu_s[1])  # dip removed: never faster with more tokens
    assert lc.cpu_s[3] == pytest.approx(9e-4)
    assert cm.transfer_time(5) == 2e-4 and cm.gpu_time(0, 8) == pytest.approx(1.08e-5)
    with pytest.raises(CostModelError, match="positive"):
        calibrate(lambda n: 0.0, lambda n: 1.0, lambda: 1.0, (1, 2), expert_bytes=1)
    n_before = len(calls)
    a = load_or_calibrate(tmp_path, "h2048-i1408-q4k",
                          lambda: calibrate(cpu, lambda n: 1e-5, lambda: 2e-4, (1, 2), expert_bytes=1))
    assert a.meta["shape_key"] == "h2048-i1408-q4k" and "machine" in a.meta
    b = load_or_calibrate(tmp_path, "h2048-i1408-q4k", lambda: pytest.fail("should come from the cache"))
    assert a.layers == b.layers and len(calls) == n_before + 2
    assert cache_path(tmp_path, "m1", "s") != cache_path(tmp_path, "m2", "s")


def test_paper_a6000_arithmetic():
    ds = CostModel.paper_a6000("deepseek-v2-lite")
    lc = ds.layer(0)
    assert lc.expert_bytes == int(3 * 2048 * 1408 * 4.5 / 8)  # 4.87 MB Q4_K
    assert lc.transfer_s == pytest.approx(10e-6 + lc.expert_bytes / 25e9)  # ~205 us
    assert lc.gpu_time(1) < lc.cpu_time(1) < lc.transfer_s  # 14 us < 81 us < 205 us
    mx = CostModel.paper_a6000("mixtral").layer(0)
    assert mx.transfer_s == pytest.approx(3.97e-3, rel=0.01)
    assert mx.cpu_time(1) == pytest.approx(1.26e-3, rel=0.01)
    assert mx.cpu_time(64) > mx.cpu_time(1)  # compute-bound for large batches
    assert resolve("paper-a6000:mixtral").name == "paper-a6000-mixtral"
    with pytest.raises(CostModelError, match="unknown model"):
        CostModel.paper_a6000("gpt-4")
