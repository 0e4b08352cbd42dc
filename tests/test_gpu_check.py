"""benchmarks/gpu_check.py is meant to be run as is on a CUDA machine this project rarely gets. Keep it working
by running every part at its tiny size on the CPU (what it does without CUDA), check its time limits, and
check the FLOP count that its MFU figures rest on."""
import importlib.util
import json
import math
import os
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_check  # noqa: E402


def test_every_part_runs_green_at_the_tiny_size(tmp_path):
    out = tmp_path / "gpu_check.json"
    # The limits are sized for an H200; a shared 2-core CPU (CI beside other jobs) gets 4x their time, so the
    # test fails on a broken part, not on a busy machine (the timeout path has its own test below).
    results = gpu_check.main(["--tiny", "--no-compile", "--timeout-scale", "4", "--out", str(out),
                              "--work", str(tmp_path / "work")])
    assert json.loads(out.read_text())["parts"].keys() == results["parts"].keys() == gpu_check.PARTS.keys()
    for name, part in results["parts"].items():
        expected = "skipped" if name == "diffusers" and importlib.util.find_spec("diffusers") is None else "ok"
        assert part["status"] == expected, f"{name}: {part.get('error')}"

    cli = results["parts"]["cli"]["checks"]
    assert list(cli) == ["autoencoder_stage1", "stage1_torchrun", "stage1_killed_and_resumed", "stage2_fsdp",
                         "sample_py"] and all(c["ok"] for c in cli.values())
    resume = cli["stage1_killed_and_resumed"]
    assert 0 < resume["killed_at_step"] < gpu_check.CLI_STEPS          # really killed mid-run
    assert resume["max_abs_diff"] == resume["relative_diff"] == {"model.safetensors": 0.0, "ema.safetensors": 0.0}

    for name in ("step_256", "step_1024"):
        part = results["parts"][name]
        step = part["eager"]
        assert step["seconds_per_step"] > 0 and 0 < step["mfu"] < 1, (name, step)
        tokens = part["batch"] * (part["image_tokens"] + part["caption_tokens"])
        assert math.isclose(step["tokens_per_second"], tokens / step["seconds_per_step"])

    loop = results["parts"]["train_loop"]
    assert len(loop["rows"]) >= 3 and loop["images_per_second"] == loop["rows"][-1]["images_per_s"] > 0
    assert loop["vs_model_only"]["mode"] == "eager" and loop["vs_model_only"]["ratio"] > 0

    sampling = results["parts"]["sample_1024"]
    assert sampling["seconds_per_image"] > 0 and sampling["steps"] == gpu_check.TINY["sample"]["steps"]
    if "relative_difference" in sampling:                               # once sample.py takes a dtype
        assert 0 <= sampling["relative_difference"] < 1

    batching = results["parts"]["sample_batch"]
    assert batching["speedup_batch_4"] > 0 and batching["max_pixel_difference"] <= 1
    assert batching["batch_4"]["images_per_second"] > 0
    lora = results["parts"]["lora_1024"]
    assert lora["seconds_per_step"] > 0 and lora["base_shared_with_ema"] and lora["grad_checkpointing"]
    # fewer adapter numbers than base numbers even at the tiny size (rank 8 on width 64); at 2B it is 0.4%
    assert 0 < lora["trainable_parameters"] < lora["frozen_base_gib"] * 2 ** 30 / 4

    ref = results["parts"]["diffusers"]
    if ref["status"] == "ok":
        assert ref["rel_err"] < 1e-4 and ref["ratio"] > 0


def test_a_part_past_its_limit_is_stopped_and_reported(tmp_path):
    out = tmp_path / "gpu_check.json"
    start = time.time()
    results = gpu_check.main(["--tiny", "--no-compile", "--parts", "cli", "--timeout-scale", "0.02", "--out", str(out),
                              "--work", str(tmp_path / "work")])
    assert time.time() - start < 30                                     # under 2 s allowed, then SIGTERM
    part = json.loads(out.read_text())["parts"]["cli"]
    assert part == results["parts"]["cli"]
    assert part["status"] == "timeout" and part["error"][0].startswith("stopped at its limit")


def test_unknown_part_is_a_clear_error():
    with pytest.raises(SystemExit, match="--parts nope: no such part"):
        gpu_check.main(["--parts", "nope"])


def test_step_flops_match_the_flop_counter():
    """The formula's matmul part against torch's FlopCounterMode on a real forward + backward."""
    from torch.utils.flop_counter import FlopCounterMode

    import flow
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
    estimate = gpu_check.step_flops(cfg, B, tokens, L, params)
    # the estimate counts every parameter for every token (refiners, embedders): an upper bound within 2x
    assert counter.get_total_flops() <= estimate <= 2 * counter.get_total_flops()
