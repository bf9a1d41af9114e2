"""bench/sample.py runs end to end on the CPU (the GPU benchmark's smoke test)."""

from conftest import load_module


def test_sampling_benchmark_smoke(capsys):
    bench = load_module("bench/sample.py", "bench_sample")
    rows = bench.main(
        [
            "--config",
            "tiny-32-64",
            "--steps",
            "5",
            "--solver-steps",
            "3",
            "--device",
            "cpu",
            "--batch",
            "1",
            "2",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--stub-text",
            "--arms",
            "plain,fast,compiled",
        ]
    )
    assert [(r["sampler"], r["batch"]) for r in rows] == [("ddim", 1), ("ddim", 2), ("dpmpp_2m", 1)]
    # On a CPU the fast and compiled arms are the plain path.
    assert all(r["fast_max_abs_diff"] == 0.0 and r["compiled_max_abs_diff"] == 0.0 for r in rows)
    assert "compiled x" in capsys.readouterr().out
