"""lmcore.profiling: kernel names into categories (names as they appear in H100/H200 traces),
the breakdown of a GPU trace's device events, the speed switches (torch.compile arguments;
train.rope_cache trains the same losses),
and `train.profile_step` on a CPU run: step N profiled into RUN/profile (breakdown.json with
the gemm time, a readable gzip Chrome trace), no other step, nothing without the switch."""

from __future__ import annotations

import contextlib
import gc
import gzip
import json
import time

import pytest
import torch

from lmcore.config import ConfigError, preset
from lmcore.profiling import category, device_breakdown, profile_step
from lmcore.train import train
from tests.conftest import train_losses


@pytest.mark.parametrize("name, cat", [
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", "gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "gemm"),
    ("triton_tem_fused_mm_3", "gemm"),
    ("void flash::FlashAttnFwdSm90<flash::CollectiveMainloopFwdSm90<2, cute::tuple<>>>", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_3_64x64x64", "attention"),
    ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "communication"),
    ("triton_poi_fused__to_copy_add_mul_0", "fused elementwise (triton)"),
    ("triton_red_fused__log_softmax_tanh_1", "fused elementwise (triton)"),
    ("Memcpy HtoD (Pinned -> Device)", "memory"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", "elementwise (aten)"),
    ("aten::mm", "gemm"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("cudaLaunchKernel", "other"),
])
def test_categories(name, cat):
    assert category(name) == cat


def test_device_breakdown_counts_device_events_once():
    # a host op carrying its kernel's device time (as torch.profiler reports aten::mm) is not
    # counted again; two kernels overlapping on two streams are busy time once
    events = [
        {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 900},
        {"cat": "kernel", "name": "nvjet_sm90_tst_256x128", "ts": 100, "dur": 400},
        {"cat": "kernel", "name": "nvjet_sm90_tst_256x128", "ts": 1000, "dur": 200},
        {"cat": "kernel", "name": "ncclDevKernel_AllReduce_Sum_bf16_RING_LL", "ts": 1100, "dur": 300},
        {"cat": "gpu_memset", "name": "Memset (Device)", "ts": 2000, "dur": 50},
        {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 90, "dur": 5},
        {"ph": "M", "name": "process_name"},
    ]
    info = device_breakdown(events, wall_ms=3.0)
    assert info["categories"] == {"gemm": 0.6, "communication": 0.3, "memory": 0.05}
    assert info["busy_ms"] == pytest.approx(0.4 + 0.4 + 0.05)  # 1000-1400 once
    assert info["top"][0] == {"name": "nvjet_sm90_tst_256x128", "ms": 0.6, "calls": 2, "category": "gemm"}
    assert [r["name"] for r in info["top"]] == ["nvjet_sm90_tst_256x128", "ncclDevKernel_AllReduce_Sum_bf16_RING_LL", "Memset (Device)"]
    assert info["kernels"] == {"nvjet_sm90_tst_256x128": [0.6, 2], "ncclDevKernel_AllReduce_Sum_bf16_RING_LL": [0.3, 1],
                               "Memset (Device)": [0.05, 1]}
    # idle between the busy intervals: 500-1000 and 1400-2000 us, both long; nothing short
    assert info["gaps"] == {"short_ms": 0.0, "long_ms": 1.1, "long": 2}


def test_device_breakdown_splits_the_gaps_by_length():
    # kernels back to back with 2 us and 19 us between them (turnaround), one 20 us and one
    # 300 us wait (the host), one kernel inside another's interval on a second stream (no gap)
    starts_durs = [(0, 100), (102, 50), (171, 10), (201, 40), (541, 60), (550, 20)]
    events = [{"cat": "kernel", "name": "k", "ts": t, "dur": d} for t, d in starts_durs]
    info = device_breakdown(events, wall_ms=1.0)
    assert info["busy_ms"] == pytest.approx((100 + 50 + 10 + 40 + 60) / 1000)
    assert info["gaps"] == {"short_ms": 0.021, "long_ms": 0.32, "long": 2}
    assert info["busy_ms"] + info["gaps"]["short_ms"] + info["gaps"]["long_ms"] == pytest.approx(601 / 1000)


def test_profile_step_writes_the_breakdown(tmp_path):
    cfg = preset("tiny", ["train.profile_step=3", "train.iterations=4"])
    before = time.time()
    train(cfg, tmp_path / "run", progress=False)
    info = json.loads((tmp_path / "run/profile/breakdown.json").read_text())
    assert info["step"] == 3 and info["device"] == "cpu" and not info["on_device"]
    assert info["categories"]["gemm"] > 0 and info["wall_ms"] > 0
    start, end = info["unix_s"]  # the step's own wall time, inside the training call
    assert before <= start <= end <= time.time() and end - start == pytest.approx(info["wall_ms"] / 1000, abs=2e-3)
    assert info["busy_ms"] == pytest.approx(sum(info["categories"].values()), abs=0.01)
    assert info["top"] and all({"name", "ms", "calls", "category"} <= set(r) for r in info["top"])
    with gzip.open(tmp_path / "run/profile/trace.json.gz", "rt") as f:
        assert json.load(f)["traceEvents"]
    train(preset("tiny", ["train.iterations=4"]), tmp_path / "off", progress=False)
    assert not (tmp_path / "off/profile").exists()


def test_the_export_runs_while_the_clock_is_paused(tmp_path):
    seen = []

    @contextlib.contextmanager
    def pause():
        seen.append((tmp_path / "breakdown.json").exists())
        yield
        seen.append((tmp_path / "breakdown.json").exists())

    with profile_step(tmp_path, torch.device("cpu"), step=1, pause=pause):
        torch.ones(8, 8) @ torch.ones(8, 8)
    assert seen == [False, True] and (tmp_path / "trace.json.gz").exists()


def test_rope_cache_trains_the_same(tmp_path):
    on = ["train.iterations=3", "train.log_every=1"]
    train(preset("tiny", [*on, "train.rope_cache=false"]), tmp_path / "plain", progress=False)
    train(preset("tiny", on), tmp_path / "cached", progress=False)  # on by default
    plain = train_losses(tmp_path / "plain")
    assert len(plain) == 3 and train_losses(tmp_path / "cached") == plain


def test_bad_compile_mode_is_refused():
    with pytest.raises(ConfigError, match="train.compile_mode"):
        preset("tiny", ["train.compile_mode=fastest"]).validate()


def test_compile_arguments_of_the_switches():
    import torch._inductor.config as inductor_config
    from torch._inductor import list_mode_options

    from lmcore.session import compile_kwargs

    tc = preset("record").train  # the defaults: mix-order reduction off
    assert compile_kwargs(tc) == {"fullgraph": True, "dynamic": False, "options": {"triton.mix_order_reduction": False}}
    assert hasattr(inductor_config.triton, "mix_order_reduction")  # the option torch.compile is given exists
    on = preset("record", ["train.inductor_mix_order_reduction=true"]).train  # torch's own default
    assert compile_kwargs(on) == {"fullgraph": True, "dynamic": False}
    both = preset("record", ["train.inductor_coordinate_descent=true"]).train
    assert compile_kwargs(both)["options"] == {"triton.mix_order_reduction": False, "coordinate_descent_tuning": True}
    assert inductor_config.coordinate_descent_tuning is False  # the option exists; off by default
    # a compile mode is given as torch's own options for it, with the switches' on top (never mode=)
    graphs = preset("record", ["train.compile_mode=reduce-overhead"]).validate().train
    assert compile_kwargs(graphs) == {"fullgraph": True, "dynamic": False,
                                      "options": {"triton.cudagraphs": True, "triton.mix_order_reduction": False}}
    tuned = preset("record", ["train.compile_mode=max-autotune-no-cudagraphs", "train.inductor_mix_order_reduction=true"])
    assert compile_kwargs(tuned.validate().train)["options"] == {"max_autotune": True, "coordinate_descent_tuning": True}
    mix = preset("record", ["train.inductor_mix_order_reduction=true", "train.inductor_mix_order_tuning=true"]).train
    assert compile_kwargs(mix)["options"] == {"triton.mix_order_reduction_autotune_split_size": True,
                                              "triton.mix_order_reduction_allow_multi_stages": True}  # (torch 2.13 here)
    torch.compile(torch.nn.Linear(2, 2), **compile_kwargs(mix))
    combo = preset("record", ["train.inductor_combo_kernels=true"]).train
    assert compile_kwargs(combo)["options"] == {"triton.mix_order_reduction": False, "combo_kernels": True}
    assert inductor_config.combo_kernels is False  # the option exists; off by default
    torch.compile(torch.nn.Linear(2, 2), **compile_kwargs(combo))
    with pytest.raises(ConfigError, match="train.inductor_mix_order_tuning=true needs train.inductor_mix_order_reduction"):
        preset("record", ["train.inductor_mix_order_tuning=true"])
    for mode in ("reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
        opts = compile_kwargs(preset("record", [f"train.compile_mode={mode}"]).train)["options"]
        assert {k: v for k, v in opts.items() if k != "triton.mix_order_reduction"} == list_mode_options(mode)
        # torch.compile checks the options when it wraps (an unknown one raises), before any compiling
        torch.compile(torch.nn.Linear(2, 2), **compile_kwargs(preset("record", [f"train.compile_mode={mode}"]).train))


def test_ddp_split_graph_switch_splits_the_compiled_graph_at_ddp_buckets(tmp_path):
    """train.ddp_split_graph: under DDP dynamo compiles a graph a bucket (true, torch's default) or one
    graph (false); counted by a backend that records each graph it is given (one rank, gloo, CPU)."""
    import torch.distributed as tdist
    from torch import nn

    from lmcore.session import ddp_graph_mode

    graphs: list[int] = []

    def backend(gm, _inputs):
        graphs.append(sum(n.op == "call_function" for n in gm.graph.nodes))
        return gm.forward

    tdist.init_process_group("gloo", store=tdist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        counts = {}
        for split in (True, False):
            ddp_graph_mode(preset("record", [f"train.ddp_split_graph={str(split).lower()}"]).train)
            torch._dynamo.reset()
            graphs.clear()
            torch.manual_seed(0)
            model = nn.Sequential(*(nn.Linear(256, 256, bias=False) for _ in range(8)))
            ddp = nn.parallel.DistributedDataParallel(torch.compile(model, backend=backend), bucket_cap_mb=1)
            ddp(torch.randn(3, 256)).sum().backward()
            counts[split] = list(graphs)
            # DDP's reducer holds the process group: freed while the group is up. Freed after
            # destroy_process_group, the group's destructor can wait forever on its gloo worker
            # (session 27: the CI run hung there, in ~ProcessGroupGloo's thread join)
            del ddp, model
            gc.collect()
        assert len(counts[False]) == 1 and len(counts[True]) > 1  # 256 KiB a layer, 1 MiB buckets
        assert sum(counts[True]) == counts[False][0]  # the same ops, split
    finally:
        gc.collect()
        tdist.destroy_process_group()
        ddp_graph_mode(preset("record").train)
        torch._dynamo.reset()
