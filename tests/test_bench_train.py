"""The training benchmark's parts on a tiny budget: the loader's rates and one timed step (no speed asserted)."""

from __future__ import annotations

from dmgr.bench_train import cases, grey_frames, loader_bench, train_case


def test_the_loader_bench_and_a_training_case_report_their_numbers(tmp_path):
    frames = grey_frames(tmp_path / "frames", 2, size=(160, 120))
    loader = loader_bench(frames, size=64, batch=4, steps=3)
    assert loader["frames"] == 2 and loader["cache_build_s"] > 0
    assert all(loader[k] > 0 for k in ("decode_each_tile", "cache_cold", "cache_warm", "cache_workers"))
    assert len(list((frames / ".frames").glob("*.npy"))) == 2
    r = train_case("demo_global", "frames", str(frames), 1, "cpu", "fp32", 1)
    assert r["batch"] == 16 and r["steps"] == 1 and r["parameters"] > 1e6
    assert r["flops_per_step"] > 1e11  # forward and backward of 16 images of 64 px: 3 x 2.5 GFLOP each
    assert 0 <= r["data_wait"] < 1 and r["steps_per_s"] > 0 and r["peak_memory_bytes"] >= 0
    assert cases(["demo_global", "global_128", "local_mask_32"]) == [
        ("demo_global", "demo boards"), ("demo_global", "frames"), ("global_128", "frames"),
        ("local_mask_32", "demo patches")]
