"""benchmarks/gpu_bench.py is meant to be run as is on a CUDA machine this project rarely gets: keep it
working by running its whole path on a CPU at a tiny size, and check the FLOP count it reports MFU with."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def test_gpu_bench_runs_end_to_end_on_a_tiny_configuration(tmp_path):
    import gpu_bench
    out = tmp_path / "gpu.json"
    results = gpu_bench.main(["--dit", "tiny", "--res", "64", "--encoder-patch", "8", "--batch", "2", "--cap-len",
                              "8", "--runs", "1", "--no-compile", "--sample-res", "32", "--sample-steps", "2",
                              "--sample-runs", "1", "--decoder", '{"ch": 32, "ch_mult": [1, 1], "num_res_blocks": 1}',
                              "--dtype", "float32", "--matmul-size", "256", "--out", str(out)])
    assert out.exists()
    train = results["training"]["eager"]
    assert train["seconds_per_step"] > 0 and 0 < train["mfu"] and train["tokens_per_second"] > 0
    assert results["sampling"]["seconds_per_image"] > 0


def test_gpu_bench_refuses_the_released_sizes_without_cuda():
    import gpu_bench
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit, match="no CUDA device"):
        gpu_bench.main(["--dit", "2B"])


def test_step_flops_match_the_flop_counter():
    """The formula's matmul part against torch's FlopCounterMode on a real forward + backward."""
    from torch.utils.flop_counter import FlopCounterMode

    import flow
    import gpu_bench
    import model as dit_lib
    cfg = dict(dit_lib.NEXTDIT_CONFIGS["tiny"])
    m = dit_lib.NextDiT(**cfg)
    B, L, n = 2, 8, 8                        # 8x8 latent cells
    x1 = torch.randn(B, cfg["in_channels"], n, n)
    feats, mask = torch.randn(B, L, cfg["cap_feat_dim"]), torch.ones(B, L, dtype=torch.bool)
    with FlopCounterMode(display=False) as counter:
        flow.training_loss(m(x1, torch.rand(B), feats, mask), torch.randn_like(x1), x1).mean().backward()
    tokens = (n // cfg["patch_size"]) ** 2
    params = sum(p.numel() for p in m.parameters())
    estimate = gpu_bench.step_flops(cfg, B, tokens, L, params)
    # the estimate counts every parameter for every token (refiners, embedders): an upper bound within 2x
    assert counter.get_total_flops() <= estimate <= 2 * counter.get_total_flops()
