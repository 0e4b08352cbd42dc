"""Tests for dino.py: parity with transformers' DINOv3ViTModel through both weight layouts, the released
key layouts and parameter counts, the two numerical traps (bf16 periods, bias_mask), bad input, and
LatentStats.

The reference is an HF model with *every* parameter randomised (LayerScale, norms, mask/cls/register tokens
included), exported (a) with `save_pretrained` and (b) to a Meta-layout `.pth` by `meta_from_hf` below,
a key mapping written independently of dino.py's own converter (the inverse of transformers'
`models/dinov3_vit/convert_dinov3_vit_to_hf.py`).
"""
import hashlib
import os

import numpy as np
import pytest
import torch

import dino
from helpers import manifest, randomize_, rel_err

TOL = 1e-5

# ----- Reference: a tiny random HF model and an independent Meta export ------------------------------------


def make_hf(gated: bool, seed: int):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.DINOv3ViTConfig(
        hidden_size=32, num_attention_heads=2, num_hidden_layers=2, patch_size=4, image_size=16,
        intermediate_size=64 if gated else 128, use_gated_mlp=gated, hidden_act="silu" if gated else "gelu",
        num_register_tokens=4)
    hf = transformers.DINOv3ViTModel(cfg).eval()  # eval: no random RoPE rescale
    return randomize_(hf, seed=seed)


def hf_file_state(hf, tmp_path) -> dict:
    """The HF state dict as written on disk (files keep `layer.*` even where memory says `model.layer.*`)."""
    from safetensors.torch import load_file
    hf.save_pretrained(tmp_path / "hf")
    return load_file(str(tmp_path / "hf" / "model.safetensors"))


def meta_from_hf(hf_sd: dict, head_dim: int) -> dict:
    """Meta layout from HF names (independent of dino.hf_to_meta)."""
    out = {
        "cls_token": hf_sd["embeddings.cls_token"],
        "storage_tokens": hf_sd["embeddings.register_tokens"],
        "mask_token": hf_sd["embeddings.mask_token"][0],
        "patch_embed.proj.weight": hf_sd["embeddings.patch_embeddings.weight"],
        "patch_embed.proj.bias": hf_sd["embeddings.patch_embeddings.bias"],
        "norm.weight": hf_sd["norm.weight"], "norm.bias": hf_sd["norm.bias"],
        "rope_embed.periods": 100.0 ** (2 * torch.arange(head_dim // 4).float() / (head_dim // 2)),
    }
    n_layers = 1 + max(int(k.split(".")[1]) for k in hf_sd if k.startswith("layer."))
    for i in range(n_layers):
        a, b = f"layer.{i}.", f"blocks.{i}."
        q_b = hf_sd[a + "attention.q_proj.bias"]
        out[b + "attn.qkv.weight"] = torch.cat([hf_sd[a + f"attention.{p}_proj.weight"] for p in "qkv"])
        out[b + "attn.qkv.bias"] = torch.cat([q_b, torch.zeros_like(q_b), hf_sd[a + "attention.v_proj.bias"]])
        out[b + "attn.qkv.bias_mask"] = torch.cat([torch.ones_like(q_b), torch.zeros_like(q_b),
                                                   torch.ones_like(q_b)])
        out[b + "attn.proj.weight"] = hf_sd[a + "attention.o_proj.weight"]
        out[b + "attn.proj.bias"] = hf_sd[a + "attention.o_proj.bias"]
        out[b + "ls1.gamma"] = hf_sd[a + "layer_scale1.lambda1"]
        out[b + "ls2.gamma"] = hf_sd[a + "layer_scale2.lambda1"]
        for n in ("norm1", "norm2"):
            for p in ("weight", "bias"):
                out[b + f"{n}.{p}"] = hf_sd[a + f"{n}.{p}"]
        gated = a + "mlp.gate_proj.weight" in hf_sd
        names = {"gate_proj": "w1", "up_proj": "w2", "down_proj": "w3"} if gated else \
            {"up_proj": "fc1", "down_proj": "fc2"}
        for hf_n, meta_n in names.items():
            for p in ("weight", "bias"):
                out[b + f"mlp.{meta_n}.{p}"] = hf_sd[a + f"mlp.{hf_n}.{p}"]
    return out


def ours_tokens(model, x):
    f = model.forward_features(x)
    return torch.cat([f["x_norm_clstoken"][:, None], f["x_storage_tokens"], f["x_norm_patchtokens"]], 1)


INPUTS = [torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2,
          torch.randn(2, 3, 12, 20, generator=torch.Generator().manual_seed(2)) * 2]  # 3x5 grid, non-square

# ----- Parity with transformers through both layouts -------------------------------------------------------


@pytest.mark.parametrize("gated", [True, False], ids=["swiglu", "mlp"])
def test_parity_hf_both_layouts(gated, tmp_path):
    hf = make_hf(gated, seed=10 + gated)
    hf_sd = hf_file_state(hf, tmp_path)
    torch.save(meta_from_hf(hf_sd, head_dim=16), tmp_path / "meta.pth")
    from_hf = dino.load_dinov3(str(tmp_path / "hf"))
    from_file = dino.load_dinov3(str(tmp_path / "hf" / "model.safetensors"))  # bare file, config.json beside
    from_meta = dino.load_dinov3(str(tmp_path / "meta.pth"))
    assert from_meta.config["ffn_layer"] == ("swiglu" if gated else "mlp")
    assert from_meta.config["num_heads"] == 2 and from_meta.config["patch_size"] == 4
    for x in INPUTS:
        with torch.no_grad():
            ref = hf(pixel_values=x).last_hidden_state  # [B, 1+4+hw, D]
        for model in (from_hf, from_file, from_meta):
            with torch.no_grad():
                ours = ours_tokens(model, x)
            assert ours.shape == ref.shape
            assert rel_err(ours[:, 0], ref[:, 0]) < TOL  # CLS
            assert rel_err(ours[:, 1:5], ref[:, 1:5]) < TOL  # registers
            assert rel_err(ours[:, 5:], ref[:, 5:]) < TOL  # patches
        # encode = patch tokens as a row-major [B, D, h, w] map
        h, w = x.shape[-2] // 4, x.shape[-1] // 4
        lat = from_meta.encode(x)
        assert lat.shape == (2, 32, h, w)
        assert rel_err(lat.flatten(2).transpose(1, 2), ref[:, 5:]) < TOL


def test_save_load_roundtrip_small_patch8(tmp_path):
    """The demo shape (patch 8, no hard-coded 16): save_dinov3 -> load_dinov3 gives identical outputs."""
    model = randomize_(dino.DINOv3(patch_size=8, embed_dim=64, depth=2, num_heads=4, ffn_layer="swiglu",
                                   ffn_ratio=4.0), seed=3).eval()
    dino.save_dinov3(model, str(tmp_path / "enc.safetensors"))
    loaded = dino.load_dinov3(str(tmp_path / "enc.safetensors"))
    x = torch.randn(1, 3, 24, 40)
    assert torch.equal(model.encode(x), loaded.encode(x))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_rope_rescale_only_behind_flag_and_dtype_cast_keeps_periods():
    kw = dict(patch_size=4, embed_dim=32, depth=1, num_heads=2)
    x = INPUTS[1]
    model = randomize_(dino.DINOv3(**kw), seed=7)
    with torch.no_grad():
        assert torch.equal(model.train().forward_features(x)["x_prenorm"],
                           model.eval().forward_features(x)["x_prenorm"])  # default: no augmentation
    augmented = dino.DINOv3(**kw, pos_embed_rope_rescale_coords=2.0)
    augmented.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(augmented.eval().encode(x), model.encode(x))
        torch.manual_seed(0)
        assert rel_err(augmented.train().forward_features(x)["x_prenorm"],
                       model.forward_features(x)["x_prenorm"]) > 1e-4
    # casting to bf16 keeps the RoPE periods in fp32, unrounded (the official RoPE module stays fp32)
    periods = model.rope_embed.periods.clone()
    model.to(torch.bfloat16)
    assert model.rope_embed.periods.dtype == torch.float32 and torch.equal(model.rope_embed.periods, periods)
    assert model.blocks[0].norm1.weight.dtype == torch.bfloat16


# ----- Layouts of the released variants --------------------------------------------------------------------

PARAM_COUNTS = {  # counted on the official model (facebookresearch/dinov3 `dinov3/hub/backbones.py`)
    "vits16": 21_601_152, "vits16plus": 28_697_472, "vitb16": 85_669_632, "vitl16": 303_154_176,
    "vitl16plus": 403_915_776, "vith16plus": 840_633_600, "vit7b16": 6_716_043_264}


@pytest.mark.parametrize("name", list(PARAM_COUNTS))
def test_variant_layout_and_param_count(name):
    with torch.device("meta"):
        model = dino.DINOv3(**dino.DINOV3_CONFIGS[name])
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[name]
    path = os.path.join(os.path.dirname(__file__), "manifests", f"dinov3_meta_{name}.json")
    if os.path.exists(path):  # no manifest for vitl16plus (weights not public)
        shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
        assert shapes == manifest(f"dinov3_meta_{name}")


@pytest.mark.parametrize("name", ["vits16", "vits16plus", "vitb16"])
def test_hf_manifest_converts_to_meta_manifest(name):
    """dino.hf_to_meta maps the released HF key table onto the released Meta key table."""
    hf = {k: torch.empty(s, device="meta") for k, s in manifest(f"dinov3_hf_{name}").items()}
    meta = dino.hf_to_meta(hf, num_heads=dino.DINOV3_CONFIGS[name]["num_heads"])
    assert {k: list(v.shape) for k, v in meta.items()} == manifest(f"dinov3_meta_{name}")


# ----- The two numerical traps -----------------------------------------------------------------------------


def test_bf16_periods_are_kept_and_matter(tmp_path):
    hf = make_hf(True, seed=20)
    sd = meta_from_hf(hf_file_state(hf, tmp_path), head_dim=16)
    sd_bf16 = dict(sd, **{"rope_embed.periods": sd["rope_embed.periods"].to(torch.bfloat16)})  # as released
    torch.save(sd, tmp_path / "fp32.pth")
    torch.save(sd_bf16, tmp_path / "bf16.pth")
    fp32, bf16 = dino.load_dinov3(str(tmp_path / "fp32.pth")), dino.load_dinov3(str(tmp_path / "bf16.pth"))
    assert torch.equal(bf16.rope_embed.periods, sd_bf16["rope_embed.periods"].float())
    assert not torch.equal(bf16.rope_embed.periods, fp32.rope_embed.periods)
    x = INPUTS[1]
    with torch.no_grad():
        assert rel_err(ours_tokens(bf16, x), ours_tokens(fp32, x)) > 1e-4  # the rounding is visible
        # and the bf16 model is right: HF with the same (rounded) frequencies agrees with it
        hf.rope_embeddings.inv_freq.copy_(1 / sd_bf16["rope_embed.periods"].float())
        assert rel_err(ours_tokens(bf16, x), hf(pixel_values=x).last_hidden_state) < TOL
    # loading from HF layout: periods recomputed, fp32 by default, bf16-rounded on request
    assert torch.equal(dino.load_dinov3(str(tmp_path / "hf")).rope_embed.periods, fp32.rope_embed.periods)
    assert torch.equal(dino.load_dinov3(str(tmp_path / "hf"), bf16_periods=True).rope_embed.periods,
                       bf16.rope_embed.periods)


def test_zero_bias_mask_cancels_qkv_bias():
    model = randomize_(dino.DINOv3(patch_size=4, embed_dim=32, depth=2, num_heads=2, ffn_ratio=2.0), seed=5)
    x = INPUTS[0]
    sd = model.state_dict()
    for i in range(2):
        sd[f"blocks.{i}.attn.qkv.bias"] = torch.randn(96)  # non-zero q, k and v bias
        sd[f"blocks.{i}.attn.qkv.bias_mask"] = torch.zeros(96)  # as in the released files
    masked = dino.DINOv3(patch_size=4, embed_dim=32, depth=2, num_heads=2, ffn_ratio=2.0).eval()
    masked.load_state_dict(sd)
    no_bias = {k: (torch.zeros_like(v) if k.endswith("qkv.bias") else v) for k, v in sd.items()}
    reference = dino.DINOv3(patch_size=4, embed_dim=32, depth=2, num_heads=2, ffn_ratio=2.0).eval()
    reference.load_state_dict(no_bias)
    assert torch.equal(masked.encode(x), reference.encode(x))
    # sanity: the same bias with an all-ones mask does change the output
    with torch.no_grad():
        for block in masked.blocks:
            block.attn.qkv.bias_mask.fill_(1.0)
    assert rel_err(masked.encode(x), reference.encode(x)) > 1e-3


# ----- Hash check ------------------------------------------------------------------------------------------


def test_check_hash(tmp_path):
    model = dino.DINOv3(patch_size=4, embed_dim=32, depth=1, num_heads=2)
    torch.save(model.state_dict(), tmp_path / "tmp.pth")
    digest = hashlib.sha256((tmp_path / "tmp.pth").read_bytes()).hexdigest()
    good, bad = tmp_path / f"dinov3_tiny-{digest[:8]}.pth", tmp_path / "dinov3_tiny-00000000.pth"
    (tmp_path / "tmp.pth").rename(good)
    bad.write_bytes(good.read_bytes())
    dino.load_dinov3(str(good), check_hash=True)
    with pytest.raises(ValueError, match="hash mismatch"):
        dino.load_dinov3(str(bad), check_hash=True)
    plain = tmp_path / "plain.pth"
    plain.write_bytes(good.read_bytes())
    with pytest.raises(ValueError, match="no '-<sha256 prefix>' suffix"):
        dino.load_dinov3(str(plain), check_hash=True)


# ----- Bad input -------------------------------------------------------------------------------------------


def test_wrong_file_is_rejected(tmp_path):
    from safetensors.torch import save_file
    gemma = {"model.embed_tokens.weight": torch.zeros(10, 8), "model.layers.0.input_layernorm.weight": torch.zeros(8)}
    save_file(gemma, str(tmp_path / "gemma.safetensors"))
    with pytest.raises(ValueError, match=r"gemma\.safetensors.*does not look like a DINOv3"):
        dino.load_dinov3(str(tmp_path / "gemma.safetensors"))
    torch.save({"weight": torch.zeros(3)}, tmp_path / "random.pth")
    with pytest.raises(ValueError, match="does not look like a DINOv3"):
        dino.load_dinov3(str(tmp_path / "random.pth"))
    torch.save({"model": {"cls_token": torch.zeros(1)}}, tmp_path / "nested.pth")
    with pytest.raises(ValueError, match="not a flat state dict"):
        dino.load_dinov3(str(tmp_path / "nested.pth"))


def test_truncated_checkpoint_names_missing_keys_and_variant(tmp_path):
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in dino.DINOv3(**dino.DINOV3_CONFIGS["vits16"]).state_dict().items()}
    sd = {k: torch.zeros(s) for k, s in shapes.items() if not k.startswith("blocks.11.mlp") and k != "norm.bias"}
    torch.save(sd, tmp_path / "cut.pth")
    with pytest.raises(ValueError) as err:
        dino.load_dinov3(str(tmp_path / "cut.pth"))
    msg = str(err.value)
    assert "cut.pth" in msg and "missing keys" in msg and "norm.bias" in msg and "blocks.11.mlp.fc1.weight" in msg
    assert "'vits16'" in msg
    # a file cut off mid-download
    torch.save(sd, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "half.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"could not read checkpoint .*half\.pth.*truncated"):
        dino.load_dinov3(str(tmp_path / "half.pth"))


def test_misshapen_and_unexpected_keys(tmp_path):
    sd = dino.DINOv3(patch_size=4, embed_dim=32, depth=2, num_heads=2).state_dict()
    sd["blocks.1.norm1.weight"] = torch.zeros(31)
    sd["head.weight"] = torch.zeros(3, 32)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as err:
        dino.load_dinov3(str(tmp_path / "bad.pth"))
    msg = str(err.value)
    assert "blocks.1.norm1.weight: file (31,) vs model (32,)" in msg and "unexpected keys: head.weight" in msg


def test_bad_image_sizes():
    image = np.zeros((250, 250, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"250x250.*not a multiple of the patch size 16.*240x240.*256x256"):
        dino.preprocess(image)
    model = dino.DINOv3(patch_size=8, embed_dim=32, depth=1, num_heads=2).eval()
    with pytest.raises(ValueError, match=r"250x250.*not a multiple of the patch size 8"):
        model.encode(torch.zeros(1, 3, 250, 250))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        dino.preprocess(torch.full((3, 16, 16), 255.0))


def test_preprocess_formats_agree():
    from PIL import Image
    rgb = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    a = dino.preprocess(Image.fromarray(rgb))
    b = dino.preprocess(rgb[None])  # BHWC uint8
    c = dino.preprocess(torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)  # CHW float [0, 1]
    d = dino.preprocess([rgb, rgb])
    assert a.shape == (1, 3, 32, 48) and d.shape == (2, 3, 32, 48)
    assert torch.allclose(a, b) and torch.allclose(a, c, atol=1e-6) and torch.allclose(d[1], a[0])
    expected = (rgb[0, 0, 0] / 255 - 0.485) / 0.229  # ImageNet normalisation, red channel
    assert abs(a[0, 0, 0, 0].item() - expected) < 1e-5


# ----- LatentStats -----------------------------------------------------------------------------------------


def test_latent_stats_released_format_and_roundtrip(tmp_path):
    gen = torch.Generator().manual_seed(0)
    mean, std = torch.randn(12, 8, generator=gen), torch.rand(12, 8, generator=gen) + 0.1
    torch.save({"mean": mean, "std": std}, tmp_path / "released.pt")  # the released layout, 12 rows
    stats = dino.LatentStats.load(str(tmp_path / "released.pt"))
    assert torch.equal(stats.mean, mean[-1]) and torch.equal(stats.std, std[-1])  # row -1, as SVG-T2I
    z = torch.randn(2, 8, 3, 5, generator=gen)
    n = stats.normalize(z)
    assert torch.allclose(n[:, 3], (z[:, 3] - mean[-1, 3]) / (std[-1, 3] + 1e-8))
    assert torch.allclose(stats.denormalize(n), z, atol=1e-5)
    with pytest.raises(ValueError, match=r"latent must be \[B, 8, h, w\]"):
        stats.normalize(torch.zeros(1, 4, 2, 2))
    # statistics from data, then save/load in the same format
    data = [torch.randn(4, 8, 3, 3, generator=gen) * 3 + 1 for _ in range(3)]
    fitted = dino.LatentStats.from_latents(iter(data))
    flat = torch.cat(data).transpose(0, 1).flatten(1)  # [C, N]
    assert torch.allclose(fitted.mean, flat.mean(1), atol=1e-5)
    assert torch.allclose(fitted.std, flat.std(1, unbiased=False), atol=1e-5)
    fitted.save(str(tmp_path / "ours.pt"))
    assert torch.load(tmp_path / "ours.pt")["mean"].shape == (1, 8)
    again = dino.LatentStats.load(str(tmp_path / "ours.pt"))
    assert torch.equal(again.mean, fitted.mean) and torch.equal(again.std, fitted.std)
    torch.save({"avg": mean}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match=r"wrong\.pt.*'mean' and 'std'"):
        dino.LatentStats.load(str(tmp_path / "wrong.pt"))


def test_imagenet_normalize_is_the_one_pipeline_normalisation():
    """dino.imagenet_normalize is the official ((x + 1) / 2 - mean) / std, bit for bit, and it is what the
    autoencoder and the DiT trainer feed DINOv3; dino.preprocess agrees to float rounding."""
    import autoencoder
    images = torch.rand(2, 3, 16, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x_in = dino.imagenet_normalize(images)
    assert torch.equal(x_in, ((images + 1) / 2 - mean) / std)
    assert torch.allclose(dino.preprocess((images + 1) / 2), x_in, atol=1e-6)
    torch.manual_seed(0)
    model = dino.DINOv3(patch_size=8, embed_dim=32, depth=1, num_heads=2, n_storage_tokens=1).eval()
    ae = autoencoder.Autoencoder(model, autoencoder.Decoder(32, ch=32, ch_mult=(1, 1, 1, 2), num_res_blocks=1))
    assert torch.equal(ae.encode(images), model.encode(x_in))
    assert torch.equal(dino.images_to_latents(model, images), model.encode(x_in))
