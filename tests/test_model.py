"""Tests for model.py: parity with diffusers, batching/padding invariance, released layout, loading."""
import pytest
import torch

import model as M
from helpers import manifest, randomize_, rel_err

# A tiny parity config: head_dim 12 = 4 + 4 + 4, GQA 4/2, refiners and joint layers 2 each.
PARITY_CFG = dict(dim=48, n_heads=4, n_kv_heads=2, axes_dims=[4, 4, 4], axes_lens=[600, 512, 512],
                  in_channels=8, n_layers=2, n_refiner_layers=2, multiple_of=16, cap_feat_dim=32,
                  norm_eps=1e-5, qk_norm=True, ffn_dim_multiplier=None)


def build(patch_size=1, seed=0, **over):
    torch.manual_seed(seed)
    model = M.NextDiT(**{**PARITY_CFG, "patch_size": patch_size, **over}).eval()
    return randomize_(model, seed)


def caption_inputs(lengths, L, dim=32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(len(lengths), L, dim, generator=gen)
    mask = torch.arange(L)[None] < torch.tensor(lengths)[:, None]
    return feats, mask


# ----- Parity with diffusers' Lumina2Transformer2DModel -------------------------------------------------

def to_diffusers(state, n_heads, n_kv_heads, head_dim):
    """Released keys -> diffusers keys, written independently of model.py and benchmarks/reference.py."""
    out = {}
    for key, val in state.items():
        if key == "norm_final.weight":
            continue
        new = key
        new = new.replace("t_embedder.mlp.0.", "time_caption_embed.timestep_embedder.linear_1.")
        new = new.replace("t_embedder.mlp.2.", "time_caption_embed.timestep_embedder.linear_2.")
        new = new.replace("cap_embedder.", "time_caption_embed.caption_embedder.")
        new = new.replace("final_layer.adaLN_modulation.1.", "norm_out.linear_1.")
        new = new.replace("final_layer.linear.", "norm_out.linear_2.")
        if new.endswith("attention.qkv.weight"):
            base = new[: -len("attention.qkv.weight")]
            q, k, v = val.split([n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim])
            out[base + "attn.to_q.weight"], out[base + "attn.to_k.weight"], out[base + "attn.to_v.weight"] = q, k, v
            continue
        new = new.replace("attention.out.", "attn.to_out.0.")
        new = new.replace("attention.q_norm.", "attn.norm_q.").replace("attention.k_norm.", "attn.norm_k.")
        new = new.replace("feed_forward.w1.", "feed_forward.linear_1.")
        new = new.replace("feed_forward.w2.", "feed_forward.linear_2.")
        new = new.replace("feed_forward.w3.", "feed_forward.linear_3.")
        if ".attention_norm1." in new:
            modulated = not key.startswith("context_refiner.")
            new = new.replace(".attention_norm1.", ".norm1.norm." if modulated else ".norm1.")
        new = new.replace(".attention_norm2.", ".norm2.")
        new = new.replace(".adaLN_modulation.1.", ".norm1.linear.")
        out[new] = val
    return out


@pytest.mark.parametrize("patch_size", [1, 2])
def test_parity_with_diffusers(patch_size):
    diffusers = pytest.importorskip("diffusers")
    ours = build(patch_size)
    ref = diffusers.Lumina2Transformer2DModel(
        patch_size=patch_size, in_channels=8, hidden_size=48, num_layers=2, num_refiner_layers=2,
        num_attention_heads=4, num_kv_heads=2, multiple_of=16, ffn_dim_multiplier=None, norm_eps=1e-5,
        axes_dim_rope=(4, 4, 4), axes_lens=(600, 512, 512), cap_feat_dim=32).eval()
    ref.load_state_dict(to_diffusers(ours.state_dict(), 4, 2, 12), strict=True)
    for mod in ref.modules():   # the official q/k-norm eps, 1e-6 (RMSNorm's default)
        if hasattr(mod, "norm_q") and mod.norm_q is not None:
            mod.norm_q.eps = mod.norm_k.eps = 1e-6
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 8, 8, 12, generator=gen)         # non-square: catches H/W swaps
    t = torch.rand(2, generator=gen)
    for lengths in ([12, 12], [12, 7]):
        feats, mask = caption_inputs(lengths, 12)
        with torch.no_grad():
            got = ours(x, t, feats, mask)
            want = ref(hidden_states=x, timestep=t, encoder_hidden_states=feats, encoder_attention_mask=mask,
                       return_dict=False)[0]
        err = rel_err(got, want)
        print(f"patch {patch_size} lengths {lengths}: rel err {err:.2e}")
        assert err <= 1e-5


# ----- Batching and padding ---------------------------------------------------------------------------

def test_batch_equals_per_sample_runs_and_padding_is_invisible():
    """Captions of different lengths in one batch: each sample gets what it gets alone, and extra padding
    columns change nothing, whatever the padded rows of cap_feats hold (large values, NaN)."""
    model = build(patch_size=2)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 8, 6, 4, generator=gen)
    lengths = [9, 3, 6]
    feats, mask = caption_inputs(lengths, 9)
    t = torch.tensor([0.1, 0.5, 0.9])
    with torch.no_grad():
        batched = model(x, t, feats, mask)
        for i, n in enumerate(lengths):
            alone = model(x[i:i + 1], t[i:i + 1], feats[i:i + 1, :n], mask[i:i + 1, :n])
            assert rel_err(batched[i:i + 1], alone) <= 1e-5
        wide = torch.cat([feats, torch.zeros(3, 5, 32)], dim=1)                        # 5 more columns
        wide_mask = torch.cat([mask, torch.zeros(3, 5, dtype=torch.bool)], dim=1)
        for junk in (100 * torch.randn(3, 14, 32, generator=gen), torch.full((3, 14, 32), float("nan"))):
            junk_in_padding = torch.where(wide_mask[..., None], wide, junk)
            assert rel_err(model(x, t, junk_in_padding, wide_mask), batched) <= 1e-5


def test_cached_caption_tokens_ignore_junk_in_their_padding():
    model = build(patch_size=2)
    x = torch.randn(3, 8, 6, 4)
    feats, mask = caption_inputs([7, 2, 5], 7)
    t = torch.tensor([0.2, 0.6, 0.9])
    with torch.no_grad():
        plain = model(x, t, feats, mask)
        junk = model.refine_captions(feats, mask).masked_fill(~mask[..., None], float("nan"))
        assert rel_err(model(x, t, feats, mask, cap_tokens=junk), plain) <= 1e-6


def test_cached_caption_tokens_and_scalar_t():
    model = build()
    x = torch.randn(2, 8, 4, 4)
    feats, mask = caption_inputs([5, 2], 5)
    with torch.no_grad():
        full = model(x, torch.full((2,), 0.3), feats, mask)
        cached = model(x, 0.3, feats, mask, cap_tokens=model.refine_captions(feats, mask))
    assert torch.equal(full, cached)


def test_noise_refiner_output_is_shared_by_captions_of_any_length():
    """refine_image(x, t) computed with one caption's length serves a pass with another (the CFG sampler's
    reuse): the RoPE text-axis offset cancels in image-to-image attention. Unpadded and padded batches."""
    model = build(patch_size=2).eval()
    x, t = torch.randn(2, 8, 4, 6), torch.tensor([0.2, 0.7])
    with torch.no_grad():
        img_tokens = model.refine_image(x, t, torch.tensor([9, 9]))
        for lengths, L in (([1, 1], 1), ([5, 5], 5), ([7, 3], 7)):
            feats, mask = caption_inputs(lengths, L)
            plain = model(x, t, feats, mask)
            assert rel_err(model(x, t, feats, mask, img_tokens=img_tokens), plain) <= 1e-5
        # an offset that does not cancel (a different image) must show: the reuse is not vacuous
        other = model.refine_image(torch.randn_like(x), t, torch.tensor([9, 9]))
        assert rel_err(model(x, t, feats, mask, img_tokens=other), plain) > 1e-2


def test_grad_checkpointing_gives_the_same_gradients():
    model = build().train()
    x = torch.randn(2, 8, 4, 4)
    feats, mask = caption_inputs([5, 2], 5)
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(flag)
        model(x, torch.tensor([0.2, 0.7]), feats, mask).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert rel_err(grads[1], grads[0]) <= 1e-6


# ----- Initialisation and presets ---------------------------------------------------------------------

def test_official_init_starts_as_zero_prediction():
    model = M.NextDiT(**M.NEXTDIT_CONFIGS["tiny"])
    feats, mask = caption_inputs([4, 2], 4)
    out = model(torch.randn(2, 16, 4, 4), torch.rand(2), feats, mask)
    assert out.abs().max() == 0                      # final layer is zero-initialised
    assert all(b.adaLN_modulation[1].weight.abs().max() == 0 for b in model.layers)
    assert model.layers[0].attention.qkv.weight.std() > 0   # xavier, not zero
    assert model.t_embedder.mlp[0].weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_small_presets_accept_encoder_overrides():
    for name in ("demo", "tiny"):
        model = M.NextDiT(**{**M.NEXTDIT_CONFIGS[name], "in_channels": 12, "cap_feat_dim": 20})
        feats, mask = caption_inputs([3], 3, dim=20)
        assert model(torch.randn(1, 12, 4, 4), torch.rand(1), feats, mask).shape == (1, 12, 4, 4)
        assert model.config["in_channels"] == 12


def test_released_layout_and_parameter_counts():
    with torch.device("meta"):
        big = M.NextDiT(**M.NEXTDIT_CONFIGS["2B"])
        small = M.NextDiT(**M.NEXTDIT_CONFIGS["0.8B"])
    released = manifest("nextdit_2b_official")
    ours = {k: list(v.shape) for k, v in big.state_dict().items()}
    assert list(ours) == list(released)              # same keys, same order
    assert ours == released
    assert sum(p.numel() for p in big.parameters()) == 2_611_246_336
    assert sum(p.numel() for p in small.parameters()) == 784_896_640
    assert len(list(big.buffers())) == 0
    # Config inference from the released shapes alone recovers the official 2B config.
    shapes = {k: torch.empty(v, device="meta") for k, v in released.items()}
    assert M.nextdit_config_from_state_dict(shapes) == M.NEXTDIT_CONFIGS["2B"]


# ----- Loading and saving -----------------------------------------------------------------------------

def test_released_style_pth_loads_with_inferred_config(tmp_path):
    cfg = dict(PARITY_CFG, patch_size=1, dim=96, n_heads=4, n_kv_heads=2, axes_dims=[8, 8, 8], multiple_of=256)
    model = build(**cfg)
    torch.save(model.state_dict(), tmp_path / "consolidated.00-of-01.pth")
    loaded = M.load_nextdit(str(tmp_path))
    assert loaded.config == model.config
    x = torch.randn(1, 8, 4, 6)
    feats, mask = caption_inputs([5], 5)
    with torch.no_grad():
        assert torch.equal(loaded(x, 0.4, feats, mask), model(x, 0.4, feats, mask))


def test_safetensors_round_trip_and_clear_errors(tmp_path):
    model = build(ffn_dim_multiplier=1.5)             # a config shapes alone would not reveal exactly
    path = str(tmp_path / "model.safetensors")
    M.save_nextdit(model, path)
    loaded = M.load_nextdit(str(tmp_path))
    assert loaded.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)

    state = model.state_dict()
    broken = dict(state)
    del broken["norm_final.weight"]
    torch.save(broken, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="missing keys.*norm_final.weight"):
        M.load_nextdit(str(tmp_path / "missing.pth"), config=model.config)
    broken = dict(state, **{"layers.0.ffn_norm1.weight": torch.ones(7)})
    torch.save(broken, tmp_path / "misshapen.pth")
    with pytest.raises(ValueError, match=r"misshapen.pth[\s\S]*layers.0.ffn_norm1.weight"):
        M.load_nextdit(str(tmp_path / "misshapen.pth"), config=model.config)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither"):
        M.load_nextdit(str(tmp_path / "empty"))


def test_bad_inputs_get_clear_errors():
    model = build(patch_size=2)
    feats, mask = caption_inputs([4, 2], 4)
    with pytest.raises(ValueError, match="divisible by patch_size"):
        model(torch.randn(2, 8, 5, 4), torch.rand(2), feats, mask)
    with pytest.raises(ValueError, match="right-padded"):
        model(torch.randn(2, 8, 4, 4), torch.rand(2), feats, mask.flip(1))
    with pytest.raises(ValueError, match="batch sizes"):
        model(torch.randn(3, 8, 4, 4), torch.rand(3), feats, mask)


# ----- Fast paths (benchmarks/bench_speed.py measures them) -------------------------------------------

def test_forward_traces_without_graph_breaks():
    # torch._dynamo.explain only traces (no compilation): one graph means torch.compile sees the whole
    # forward, caption-mask checks included (they run eagerly only).
    model = build()
    x = torch.randn(2, 8, 4, 6)
    feats, mask = caption_inputs([5, 3], 5)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x, torch.rand(2), feats, mask)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.slow
def test_compiled_training_step_matches_eager():
    model = build().train()
    compiled = torch.compile(build().train())
    x = torch.randn(2, 8, 4, 6)
    feats, mask = caption_inputs([5, 3], 5)
    t = torch.tensor([0.3, 0.8])
    grads = []
    for net, params in ((model, model.parameters()), (compiled, compiled.parameters())):
        out = net(x, t, feats, mask)
        out.square().mean().backward()
        # norm_final.weight is in the released layout but never used: it has no gradient on either side
        grads.append((out, torch.cat([p.grad.flatten() for p in params if p.grad is not None])))
    assert rel_err(grads[1][0], grads[0][0]) <= 1e-5
    assert rel_err(grads[1][1], grads[0][1]) <= 1e-4
