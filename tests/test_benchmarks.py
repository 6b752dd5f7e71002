"""The attribution benchmark runs and reports every field its JSON line promises (a smoke test, not a timing)."""

import json

from benchmarks.attribution import main


def test_attribution_benchmark_json(capsys):
    assert main(["--arch", "small", "--size", "32", "--classes", "4", "--batch", "1", "--repeats", "1",
                 "--loop-outputs", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("arch", "batch", "method", "device", "num_outputs", "forward_s", "explain_s", "ratio", "loop_s",
                "speedup", "loop_exact_s", "speedup_exact", "loop_full_s", "speedup_full", "images_per_s"):
        assert key in out, key
    assert out["num_outputs"] == 5 and out["loop_timed_outputs"] == 2
    assert out["ratio"] == out["explain_s"] / out["forward_s"] and out["speedup"] == out["loop_s"] / out["explain_s"]


def test_breakdown_and_precision_benchmarks_json(capsys):
    from benchmarks import breakdown, precision

    assert breakdown.main(["--arch", "small", "--size", "32", "--classes", "4", "--batch", "1", "--repeats", "1",
                           "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["ratio"] == out["explain_s"] / out["forward_args_s"]
    assert all(out[k] > 0 for k in ("backbone_s", "explain_unchecked_s", "explain_two_stage_s", "forward_state_s",
                                    "tangents_s", "maps_s", "gemm_feature_major_s", "gemm_row_major_s"))
    assert out["explain_flops"] > out["forward_flops"] > 0  # the maps add work, and XLA counted it
    assert out["flops_ratio"] == out["explain_flops"] / out["forward_flops"]
    assert precision.main(["--arch", "small", "--size", "32", "--classes", "4", "--batch", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["fast_vs_generic"] < 1e-4  # the two exact paths agree in float32 on CPU
    assert out["maps_default_vs_highest"] == 0.0  # XLA:CPU's default float32 matmul is full float32


def test_xla_flags_benchmark_json(capsys):
    from benchmarks import xla_flags

    assert xla_flags.main(["--arch", "small", "--arch2", "", "--size", "32", "--classes", "4", "--cam-classes", "2",
                           "--rounds", "1", "--repeats", "1", "--settings", "individual_dot"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["flag"] == "--xla_cpu_experimental_ynn_fusion_type=individual_dot" and out["rounds"] == 1
    assert all(out[k] > 0 for k in ("small_forward_s", "small_explain_s", "small_grad_cam_s",
                                    "small_grad_cam_2_classes_s"))
