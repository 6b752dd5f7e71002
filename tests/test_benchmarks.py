"""The attribution benchmark runs and reports every field its JSON line promises (a smoke test, not a timing)."""

import json

import pytest

from benchmarks.attribution import main

pytestmark = pytest.mark.slow  # each test runs a benchmark's main (models compiled and timed)


def test_attribution_benchmark_json(capsys):
    assert (
        main(
            [
                "--arch",
                "small",
                "--size",
                "32",
                "--classes",
                "4",
                "--batch",
                "1",
                "--repeats",
                "1",
                "--loop-outputs",
                "2",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in (
        "arch",
        "batch",
        "method",
        "device",
        "num_outputs",
        "forward_s",
        "explain_s",
        "ratio",
        "loop_s",
        "speedup",
        "loop_exact_s",
        "speedup_exact",
        "loop_full_s",
        "speedup_full",
        "images_per_s",
    ):
        assert key in out, key
    assert out["num_outputs"] == 5 and out["loop_timed_outputs"] == 2
    assert out["ratio"] == out["explain_s"] / out["forward_s"] and out["speedup"] == out["loop_s"] / out["explain_s"]


def test_breakdown_and_precision_benchmarks_json(capsys):
    from benchmarks import breakdown, precision

    assert (
        breakdown.main(
            ["--arch", "small", "--size", "32", "--classes", "4", "--batch", "1", "--repeats", "1", "--json"]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["ratio"] == out["explain_s"] / out["forward_args_s"]
    assert all(
        out[k] > 0
        for k in (
            "backbone_s",
            "explain_unchecked_s",
            "explain_two_stage_s",
            "forward_state_s",
            "forward_unfolded_args_s",
            "tangents_s",
            "tangents_feature_major_s",
            "tangents_row_major_s",
            "maps_s",
            "gemm_feature_major_s",
            "gemm_row_major_s",
        )
    )
    assert out["weight_arrays"] < out["weight_arrays_unfolded"]  # batch norm folded into the convolutions
    assert out["explain_flops"] > out["forward_flops"] > 0  # the maps add work, and XLA counted it
    assert out["flops_ratio"] == out["explain_flops"] / out["forward_flops"]
    assert precision.main(["--arch", "small", "--size", "32", "--classes", "4", "--batch", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["fast_vs_generic"] < 1e-4  # the two exact paths agree in float32 on CPU
    assert out["maps_default_vs_highest"] == 0.0  # XLA:CPU's default float32 matmul is full float32
    assert (
        precision.main(["--arch", "small", "--size", "32", "--classes", "4", "--batch", "2", "--bfloat16", "--json"])
        == 0
    )
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 < out["bf16_vs_f32"] < 0.1 and 0 <= out["pairs_changed"] <= 2


def test_explain_and_evaluation_benchmarks_json(capsys):
    """The job benchmark reports its stages and outputs; the evaluation benchmark its time per batch and ratio."""
    from benchmarks import evaluation, explain

    assert (
        explain.main(
            [
                "--arch",
                "small",
                "--crop",
                "32",
                "--classes",
                "4",
                "--images",
                "12",
                "--batch",
                "4",
                "--workers",
                "1",
                "--rounds",
                "1",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["explained"] == 12 and out["images"] == 12
    assert all(
        out[k] > 0
        for k in (
            "decode_img_s",
            "core_img_s",
            "e2e_img_s",
            "writer_img_s",
            "writer_shares_img_s",
            "figures_s_per_core",
            "bytes_per_image",
            "max_rss_mb",
        )
    )
    assert out["ratio_to_slowest"] == round(out["e2e_img_s"] / min(out["decode_img_s"], out["core_img_s"]), 3)
    assert (
        evaluation.main(
            [
                "--crop",
                "32",
                "--size",
                "48",
                "--classes",
                "3",
                "--images-per-class",
                "6",
                "--num-images",
                "4",
                "--batch",
                "2",
                "--runs",
                "1",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["images"] == 4 and out["eval_s_per_batch"] > 0 and out["job_s_per_batch"] > 0
    assert out["ratio"] == pytest.approx(out["eval_s_per_batch"] / out["job_s_per_batch"], rel=0.01)


def test_higher_order_benchmark_json(capsys):
    from benchmarks import higher_order

    assert (
        higher_order.main(
            ["--arch", "small", "--size", "16", "--classes", "4", "--top", "2", "--repeats", "1", "--json"]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["pixel_ratio"] == out["pixel_cross_s"] / out["pixel_first_s"] and out["pixel_locations"] == 256
    assert out["interactions_ratio"] == out["interactions_s"] / out["forward_s"]
    assert out["interactions_shape"] == [1, 5, 4, 4]  # 4 classes + hardness, L x L at A (2 x 2 at 16 px)


def test_pipeline_benchmark_compares_the_folder_with_its_tfds_builds(capsys):
    from benchmarks import pipeline

    argv = [
        "--compare",
        "--synthetic",
        "--size",
        "40",
        "--images-per-class",
        "2",
        "--batch",
        "4",
        "--steps",
        "1",
        "--rounds",
        "2",
        "--crop",
        "32",
        "--resize",
        "32",
        "--threads",
        "2",
    ]
    assert pipeline.main(argv) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["source"] for r in records] == ["folder", "tfds-original", "tfds-resize32"]
    assert records[0]["ratio_to_folder"] == records[0]["cpu_ratio_to_folder"] == 1.0
    assert all(len(r["rounds_images_per_s"]) == 2 and r["images_per_cpu_s"] > 0 for r in records)
    assert all(r["images_per_s"] > 0 and r["train_images"] == 10 for r in records)


def test_pipeline_benchmark_times_uint8_threads_or_processes(capsys):
    from benchmarks import pipeline

    argv = ["--synthetic", "--size", "40", "--images-per-class", "2", "--batch", "2", "--crop", "32"]
    assert pipeline.main([*argv, "--steps", "3", "--workers", "2", "--threads", "1"]) == 0
    assert pipeline.main([*argv, "--steps", "2", "--host-normalize"]) == 0
    processes, host = (json.loads(line) for line in capsys.readouterr().out.strip().splitlines())
    assert processes["workers"] == 2 and processes["images_per_cpu_s"] is None and processes["images_per_s"] > 0
    assert processes["images"].startswith("uint8") and host["images"].startswith("float32")
    assert host["workers"] == 0 and host["images_per_cpu_s"] > 0
    with pytest.raises(SystemExit):  # each worker's first batch is not timed: it needs more steps than workers
        pipeline.main([*argv, "--steps", "2", "--workers", "2"])


def test_xla_flags_benchmark_json(capsys):
    from benchmarks import xla_flags

    assert (
        xla_flags.main(
            [
                "--arch",
                "small",
                "--arch2",
                "",
                "--size",
                "32",
                "--classes",
                "4",
                "--cam-classes",
                "2",
                "--rounds",
                "1",
                "--repeats",
                "1",
                "--settings",
                "individual_dot",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["flag"] == "--xla_cpu_experimental_ynn_fusion_type=individual_dot" and out["rounds"] == 1
    assert all(
        out[k] > 0 for k in ("small_forward_s", "small_explain_s", "small_grad_cam_s", "small_grad_cam_2_classes_s")
    )


@pytest.mark.slow
def test_interactions_benchmark_json(capsys):
    from benchmarks import interactions

    assert (
        interactions.main(
            [
                "--case",
                "cnn",
                "mlp",
                "--size",
                "8",
                "--batch",
                "2",
                "--nodes",
                "2",
                "--features",
                "4",
                "--pe-samples",
                "4",
                "--repeats",
                "1",
                "--json",
            ]
        )
        == 0
    )
    cnn, mlp = (json.loads(line) for line in capsys.readouterr().out.strip().splitlines()[-2:])
    assert cnn["products"] == 2 * 16 and cnn["shape"] == [2, 1, 16, 16]  # 2 nodes x 4 x 4 rows at 8 px, 2 images
    assert cnn["batch"] == 2 and cnn["whole_per_products"] == cnn["whole_s"] / (cnn["products"] * cnn["hvp_s"])
    assert cnn["amortised_hvp_s"] == cnn["whole_s"] / cnn["products"]
    assert cnn["amortised_per_forward"] == cnn["amortised_hvp_s"] / cnn["forward_s"]
    assert mlp["products"] == 2 * 4 and mlp["error"] >= 0
    assert "path_explain_s" in mlp or isinstance(mlp.get("path_explain"), str)


@pytest.mark.slow
def test_interactions_benchmark_cnn_pe_json(capsys):
    from benchmarks import interactions

    argv = ["--case", "cnn-pe", "--size", "2", "--nodes", "2", "--pe-samples", "4", "--repeats", "1", "--json"]
    assert interactions.main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["features"] == 12 and out["products"] == 2 * 12 and out["error"] >= 0  # 2 x 2 x 3 pixel channels
    assert "path_explain_s" in out or isinstance(out.get("path_explain"), str)
