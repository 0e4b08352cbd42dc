"""pytest setup: make the flat top-level modules (dino.py, model.py, ...) importable from tests/."""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run folder with the tiny preset's autoencoder stage 1 and DiT stage 1 trained (seconds, CPU).

    Tests that modify a run copy it first; this one is shared, read-only."""
    import train

    out = tmp_path_factory.mktemp("tiny_run")
    common = ["--out", str(out), "--preset", "tiny", "--no-compile", "--workers", "0", "--preview-every", "0"]
    train.main([*common, "--autoencoder", "P", "--stage", "1", "--max-steps", "4"])
    train.main([*common, "--stage", "1", "--max-steps", "4", "--ckpt-every", "2"])
    return out
