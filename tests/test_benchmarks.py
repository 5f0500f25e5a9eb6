"""The benchmarks run: edit_bench's CPU path in-process, and its full-size GPU path built on ``meta``;
commit_scale at tiny sizes; how preprocess_bench combines its rounds."""

from __future__ import annotations

import json

import pytest
import torch

from jobs.benchmarks import edit_bench


def test_full_size_edit_models_build_on_meta():
    """The --full-size path assembles the sd15 architecture consistently (CLIP width = cross-attention)."""
    models = edit_bench.full_size_models("meta", torch.bfloat16)
    assert models.content.dim == models.unet.cross_attention_dim == 768
    assert models.unet.in_channels == 12
    assert sum(p.numel() for p in models.unet.image_unet.parameters()) > 859_520_964  # + temporal layers
    assert all(p.dtype == torch.bfloat16 for p in models.unet.parameters())
    assert edit_bench.attention_processors(models.unet) == ["AttnProcessor2_0"]  # SDPA


def test_full_size_refuses_cpu():
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        edit_bench.run(edit_bench.parse_args(["--full-size", "--device", "cpu"]))


def test_edit_bench_cpu_tiny(tiny_models, tmp_path):
    args = edit_bench.parse_args(
        ["--steps", "2", "--repeats", "1", "--frames", "4", "--size", "128", "64", "--device", "cpu"]
    )
    report = edit_bench.run(args)
    assert "TINY" in report["models"]
    assert report["unet_forwards"] == {"batched": 2, "unbatched": 6}  # 3 eq. 8 branches per step
    assert report["max_abs_pixel_diff_batched_vs_unbatched"] <= 2
    assert report["unbatched_over_batched"] > 0
    assert report["video"] == "4x128x64"


def test_stage_costs_count_the_real_architecture_and_follow_the_stated_formula():
    from gen1.architectures import build_component
    from gen1.config import TINY
    from jobs.benchmarks.stage_costs import StageCost, sample_flops, stage_costs

    unet = build_component("video_unet", TINY).train()
    cpu = sample_flops(unet, 4, 64, 64, checkpointing=False)
    meta = sample_flops(build_component("video_unet", TINY, device="meta").train(), 4, 64, 64, checkpointing=False)
    assert cpu == meta > 0  # counting on meta counts what the real tensors compute
    with_ckpt = sample_flops(unet, 4, 64, 64, checkpointing=True)
    assert cpu < with_ckpt < 1.5 * cpu  # + one recomputed forward (backward is about twice a forward)
    assert sample_flops(unet, 1, 64, 64, checkpointing=False) < cpu / 4  # an image: one frame, no temporal layers
    (s1,) = stage_costs(TINY, ("stage1",))
    assert (s1.steps, s1.image_prob, s1.clips, s1.images) == (15000, 1.0, 1152, 1152 * TINY.frames)
    cost = StageCost("x", steps=3600, image_prob=0.0, clips=1, images=8, flops_per_step=989e12 * 0.4)
    assert cost.gpu_hours(989.0, 0.4) == pytest.approx(1.0)


@pytest.mark.slow  # starts moto's S3 server
def test_commit_scale_at_tiny_sizes(tmp_path):
    """commit_scale end to end at tiny sizes (local and moto S3): every implementation finds every committed
    id (the benchmark checks), ours commits without listing while the baseline lists before each commit, and
    our second start reads the merged index instead of the parts."""
    from jobs.benchmarks import commit_scale

    out = tmp_path / "commit_scale.json"
    args = commit_scale.parse_args(["--sizes", "10,120", "--ids-per-part", "10", "--s3-parts", "10",
                                    "--commits", "3", "--root", str(tmp_path / "dsts"), "--json", str(out)])
    report = commit_scale.run(args)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    keys = {"commit_s", "startup_s", "rss_mb"}
    for where in (report, report["s3"]):
        assert set(where["parts"]) == set(where["baseline"]["parts"])
        for ours, base in ((where["parts"][n], where["baseline"]["parts"][n]) for n in where["parts"]):
            assert keys <= set(ours) and keys <= set(base) and "startup_cold_s" in ours
            assert ours["listings_per_commit"] == 0 and base["listings_per_commit"] == 1
    assert set(report["parts"]) == {"10", "120"} and set(report["s3"]["parts"]) == {"10"}
    # 120 parts >= MERGE_AFTER_PARTS: the cold start wrote the merged index, the next start read no part
    assert report["parts"]["120"]["parts_read_at_startup"] == 0
    assert report["baseline"]["parts"]["120"]["parts_read_at_startup"] == 120
    assert report["ids_10m_mb"] is None  # no size held 10M ids


def test_preprocess_bench_combines_rounds_into_medians_ratio_ranges_and_the_median_rounds_operators():
    """--repeats: each arm's median, ratios of the medians with the per-round range, and the operator
    figures (steady state over the busiest stage's active window, decode task time) of the median round."""
    from jobs.benchmarks.preprocess_bench import combine_rounds

    def ops(models_active: float, decode_udf: float) -> dict:
        return {"stage_seconds": {
            "MapBatches(DecodeStage)": {"function_body_s": decode_udf, "active_s": 9.0},
            "MapBatches(FusedModels)": {"function_body_s": 15.0, "active_s": models_active},
            "MapBatches(ShardWriter)": {"function_body_s": 0.5, "active_s": 20.0},
        }}

    rounds = [
        {"plain_s": 20.0, "plain_fresh_s": 30.0, "pipeline_s": 25.0, "summary": ops(16.0, 5.0)},
        {"plain_s": 18.0, "plain_fresh_s": 24.0, "pipeline_s": 30.0, "summary": ops(18.0, 6.0)},
        {"plain_s": 22.0, "plain_fresh_s": 26.0, "pipeline_s": 20.0, "summary": ops(12.0, 4.0)},
    ]
    r = combine_rounds(rounds, clips=600, floor_s=4.0)
    assert (r["plain_s"], r["plain_fresh_s"], r["pipeline_s"]) == (20.0, 26.0, 25.0)
    assert r["pipeline_vs_plain"] == pytest.approx(0.8)
    assert r["pipeline_vs_plain_fresh"] == pytest.approx(1.04)
    assert r["pipeline_vs_plain_range"] == pytest.approx([0.6, 1.1])
    assert r["pipeline_vs_plain_fresh_range"] == pytest.approx([0.8, 1.3])
    assert r["pipeline_summary"] is rounds[0]["summary"]  # the median pipeline round (25 s)
    assert r["pipeline_steady_clips_per_s"] == pytest.approx(600 / 16.0)  # FusedModels: the busiest
    assert r["steady_vs_plain"] == pytest.approx((600 / 16.0) / (600 / 20.0))
    assert (r["decode_task_s"], r["decode_vs_floor"]) == (5.0, 1.25)
    assert [set(x) for x in r["rounds"]] == [{"plain_s", "plain_fresh_s", "pipeline_s"}] * 3
