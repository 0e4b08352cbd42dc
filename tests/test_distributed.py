"""What the GPU path needs, shown on the CPU: collectives get tensors on the training device, the step loop does
not read the loss back every micro-step, and a stage starts from weights that depend on (seed, stage) alone."""
import socket

import pytest
import torch
import torch.distributed as dist

import machinery
import train
from test_train import FAST, assert_same, copy_encoders, run, weights


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_collectives_get_tensors_on_the_training_device_and_the_loss_is_not_read_per_micro_step(
        tiny_run, tmp_path, monkeypatch):
    """`torchrun train.py` on a GPU died at the first log step: NCCL reduces CUDA tensors only, and the metrics were
    reduced as a tensor built on the spot from a host number, torch.tensor(float(loss)), which lands on the default
    device, the CPU. On a CPU-only machine the training device *is* that default device, so the bug passes unseen.
    This test pulls the two apart. It runs a DiT stage as a 1-process torchrun does (RANK / WORLD_SIZE set: a gloo
    process group, world 1, no DDP), makes "meta" the default device inside machinery.total_over_ranks (the function
    train.py reduces its metrics with), and has every collective check what NCCL checks: that each tensor handed to
    it is on the training device. A tensor built there without naming the device is now on meta, not on the CPU,
    and fails as it failed on CUDA; a tensor that was on the training device stays there.

    Also checked: no .item() of a tensor still in the autograd graph. A per-micro-step loss.item() makes the host
    wait for the GPU to finish that micro-step's backward before it may queue the next one."""
    run_dir = tmp_path / "run"
    copy_encoders(tiny_run, run_dir)
    for name, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(name, value)

    training_device = []
    setup = machinery.setup_distributed

    def recording_setup():
        rank, world, device = setup()
        training_device.append(device)
        return rank, world, device
    monkeypatch.setattr(machinery, "setup_distributed", recording_setup)
    seen = []

    def on_training_device(name, collective):
        def checked(*args, **kwargs):
            for tensor in [a for a in (*args, *kwargs.values()) if torch.is_tensor(a)]:
                assert tensor.device == training_device[0], (
                    f"dist.{name} got a tensor on {tensor.device}, the training device is {training_device[0]}: "
                    "under NCCL this is 'No backend type associated with device type'")
            seen.append(name)
            return collective(*args, **kwargs)
        return checked
    for name in ("all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor"):
        monkeypatch.setattr(dist, name, on_training_device(name, getattr(dist, name)))

    reduce = machinery.total_over_ranks

    def reduce_with_another_default_device(*args, **kwargs):
        with torch.device("meta"):
            return reduce(*args, **kwargs)
    monkeypatch.setattr(machinery, "total_over_ranks", reduce_with_another_default_device)

    graph_reads = []
    item = torch.Tensor.item

    def recording_item(tensor):
        if tensor.requires_grad:
            graph_reads.append(tuple(tensor.shape))
        return item(tensor)
    monkeypatch.setattr(torch.Tensor, "item", recording_item)

    run(run_dir, "--stage", "1", "--max-steps", "3", "--global-batch-size", "4", "--micro-batch-size", "2")
    assert training_device == [torch.device("cpu")] and not dist.is_initialized()
    assert "all_reduce" in seen                   # the metrics were reduced, through the checked collective
    assert graph_reads == []


def test_a_stage_starts_from_the_same_weights_whatever_the_process_did_before(tiny_run, tmp_path):
    """The DiT's initial weights depend on (seed, stage) alone. They used to come from the global RNG, whose state
    then depended on whether this process had just made the random encoders: the same command gave other
    weights in a fresh folder than in one where an autoencoder stage had made them (0.49 apart after 6 steps)."""
    fresh, after_ae = tmp_path / "fresh", tmp_path / "after_ae"
    common = ["--stage", "1", "--max-steps", "2", "--global-batch-size", "4"]
    run(fresh, *common)                           # makes the encoders in this process, then trains the DiT
    copy_encoders(fresh, after_ae)                # the same encoders, loaded from disk ...
    run(after_ae, "--autoencoder", "P", "--stage", "1", "--max-steps", "1")   # ... after an autoencoder stage
    run(after_ae, *common)
    assert_same(weights(fresh / "stage1" / "model.safetensors"), weights(after_ae / "stage1" / "model.safetensors"),
                atol=1e-6)


@pytest.fixture(autouse=True)
def no_process_group_left():
    yield
    if dist.is_initialized():                     # a failed run must not leave its group to the next test
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_stage_over_many_buckets_and_caption_lengths_compiles_at_most_3_graphs(
        tiny_run, tmp_path, monkeypatch, backend):
    """A compiled stage sees many latent grids (aspect buckets) and caption lengths. Dynamo compiled a graph per
    newly varying size and, at its recompile limit, silently ran eagerly; now the varying sizes are dynamic from the
    first call, and log.jsonl reports the compilations in `compiles`. aot_eager (the default run) captures and
    guards exactly as inductor does, without generating code; inductor itself is the slow variant."""
    import json

    from PIL import Image
    monkeypatch.setattr(machinery, "COMPILE_BACKEND", backend)
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", False)   # restored after the test
    # Stage 1 at 64 px (the tiny preset trains it at 32, a single bucket): 9 buckets of 8-px DINOv3 patches.
    monkeypatch.setitem(train.PRESETS, "tiny", dict(train.PRESETS["tiny"], dit_res=(64, 64, 64, 64)))
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    words = "a small red circle sits near the top left corner of a very plain light grey background".split()
    with open(data_dir / "pairs.jsonl", "w") as f:
        for i in range(24):                       # 8 images in each of 3 buckets, captions of 1-16 words
            width, height = [(64, 64), (128, 32), (32, 128)][i % 3]
            Image.new("RGB", (width, height), (40 * (i % 6), 90, 200)).save(data_dir / f"{i}.png")
            f.write(json.dumps(dict(path=f"{i}.png", prompt=" ".join(words[:1 + (5 * i) % 16]))) + "\n")

    shapes = []
    compile_dit = machinery.compile_dit

    def recording_compile_dit(module):
        forward, compiles = compile_dit(module)

        def recorded(x, t, cap_feats, cap_mask):
            shapes.append((tuple(x.shape[-2:]), cap_feats.shape[1]))
            return forward(x, t, cap_feats, cap_mask)
        return recorded, compiles
    monkeypatch.setattr(machinery, "compile_dit", recording_compile_dit)

    run_dir = tmp_path / "run"
    copy_encoders(tiny_run, run_dir)
    torch._dynamo.reset()
    try:
        train.main(["--out", str(run_dir), *FAST, "--compile", "--stage", "1", "--max-steps", "6",
                    "--global-batch-size", "4", "--data", str(data_dir / "pairs.jsonl")])
    finally:
        torch._dynamo.reset()
    assert len({grid for grid, _ in shapes}) >= 3 and len({length for _, length in shapes}) >= 3
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [5, 6]
    assert 1 <= rows[0]["compiles"] <= rows[1]["compiles"] <= 3
    eager_rows = [json.loads(line) for line in (tiny_run / "log.jsonl").read_text().splitlines()]
    assert [row["compiles"] for row in eager_rows if "autoencoder" not in row] == [0]     # eager: 0
