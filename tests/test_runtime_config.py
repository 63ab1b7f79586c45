"""Interfaces that say what they carry: the CPU job's descriptor (C++ struct and numpy twin), the
runtime's behaviour switches in RuntimeConfig, the step counter the runtime owns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hybrimoe import cpu
from hybrimoe.costs import CostModel, LayerCost
from hybrimoe.errors import HybrimoeError
from hybrimoe.layer import GPU_SIDES, HybridRuntime, RuntimeConfig

need_ext = pytest.mark.skipif(not cpu.available(), reason="hybrimoe._cpu is not built")


@need_ext
def test_job_expert_struct_and_its_numpy_twin_agree():
    size, offsets = cpu._ext().job_expert_layout()
    dt = cpu.JOB_EXPERT_DTYPE
    assert size == dt.itemsize == 88
    assert list(offsets) == list(dt.names) == list(cpu.JOB_EXPERT_FIELDS)  # same order
    assert offsets == {n: dt.fields[n][1] for n in dt.names}


@need_ext
def test_the_job_rejects_a_table_that_is_not_job_experts(rng):
    x = np.zeros((1, 256), np.float32)
    out = np.zeros((1, 256), np.float32)
    bad = np.zeros((1, 11), np.int64)  # the old 11-column int64 table
    with pytest.raises(ValueError, match="JobExpert"):
        cpu._ext().moe_ffn(x.ctypes.data, False, 1, 256, out.ctypes.data, bad)


def _costs(nbytes):
    pts = (1, 4, 16, 64, 256)
    return CostModel((LayerCost(pts, tuple(1e-4 * n + 1e-4 for n in pts), tuple(2e-5 for _ in pts), 1e-4, nbytes),),
                     "hand")


@pytest.mark.parametrize("gpu,emulate,side", [(None, True, "emulated"), (None, False, "none"),
                                              ("emulated", False, "emulated"), ("none", False, "none")])
def test_gpu_side_is_one_field(tiny, gpu, emulate, side):
    m, store = tiny
    costs = _costs(store.layout(store.layers[0]).nbytes)
    rt = HybridRuntime(store, RuntimeConfig(cache_size=2, gpu=gpu, emulate_gpu=emulate, device="cpu", costs=costs))
    assert rt.gpu_side == side and side in GPU_SIDES
    assert rt.costs is costs  # a cost model object is used as given (no calibration)
    assert rt.schedule == ("cpu-only" if side == "none" else "hybrid")


def test_gpu_side_errors_name_the_value(tiny):
    m, store = tiny
    with pytest.raises(HybrimoeError, match="'gpu-ish'"):
        HybridRuntime(store, RuntimeConfig(gpu="gpu-ish", device="cpu", costs="paper-a6000"))
    if not torch.cuda.is_available():
        with pytest.raises(HybrimoeError, match="does not go with device 'cpu'"):
            HybridRuntime(store, RuntimeConfig(gpu="cuda", device="cpu", costs="paper-a6000"))


def test_the_runtime_owns_its_step_counter(tiny):
    m, store = tiny
    rt = HybridRuntime(store, RuntimeConfig(cache_size=2, gpu="emulated", device="cpu", costs="paper-a6000",
                                            record_routing=True))
    assert rt.record_routing and rt.step == 0
    with pytest.raises(HybrimoeError, match="next_step"):
        rt.step = 3
    assert rt.next_step() == 1 and rt.next_step() == 2 and rt.step == 2
    rt.new_sequence()
    assert rt.step == 0
    assert not rt.transfers.has_pending()


def test_engine_choice_for_a_policy_the_engine_does_not_run(tiny, tmp_path):
    """profiled has only its Python implementation: 'auto' takes it in Python, 'native' refuses with a
    line naming the policy and the engine's own (bypass, once Python-only too, now runs natively)."""
    from hybrimoe import engine as native_engine

    if not native_engine.available():
        pytest.skip("hybrimoe._cpu is not built with the decision engine")
    _, store = tiny
    base = dict(policy="profiled", emulate_gpu=True, device="cpu", costs="paper-a6000", cache_dir=str(tmp_path),
                cache_size=2)
    rt = HybridRuntime(store, RuntimeConfig(engine="auto", **base))
    assert rt.engine == "python"
    rt.close()
    with pytest.raises(HybrimoeError,
                       match="engine 'native' runs the cache policies mrs, lru, lfu, static, bypass, not 'profiled'"):
        HybridRuntime(store, RuntimeConfig(engine="native", **base))
    for pol in ("lru", "bypass"):
        rt = HybridRuntime(store, RuntimeConfig(engine="auto", **dict(base, policy=pol)))
        assert rt.engine == "native"
        rt.close()
