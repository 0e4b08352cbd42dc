"""Tests for autoencoder.py: released layouts, parity with independent references, behaviour, checkpoints.

References: diffusers' `Decoder` (an independent LDM decoder with other key names) for our Decoder; for the
residual ViT, match_distribution and LPIPS, functional re-statements of the official code written here
(complex-number RoPE, explicit softmax attention, torchvision-indexed VGG). Every parameter is randomised
first (tests/helpers.randomize_), so LayerScale 1e-4, identity norms or zero biases hide nothing.
"""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import autoencoder as A
from helpers import manifest, randomize_, rel_err

dino = pytest.importorskip("dino")


@pytest.fixture
def one_thread():
    """Tiny convs run ~10× faster on one thread than on two contended ones."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny_dino(patch_size=8, embed_dim=64, seed=0):
    torch.manual_seed(seed)
    enc = dino.DINOv3(patch_size=patch_size, embed_dim=embed_dim, depth=1, num_heads=2, ffn_layer="swiglu",
                      ffn_ratio=2.0, n_storage_tokens=1)
    randomize_(enc, seed)
    return enc.eval()


def tiny_autoencoder(kind, seed=0):
    """DINOv3 patch 8 / dim 64, a ×8 decoder, and for R a 1-block residual ViT with 8 channels."""
    enc = tiny_dino(seed=seed)
    residual = A.ResidualViT(64, 1, 1, 8, patch_size=8, img_size=32) if kind == "R" else None
    dec = A.Decoder(64 + (8 if residual else 0), 32, (1, 2, 2, 4), 1)
    ae = A.Autoencoder(enc, dec, residual)
    randomize_(ae.decoder, seed + 1)
    if residual is not None:
        randomize_(ae.extra_vit, seed + 2)
    return ae.eval()


# ----- Released layouts -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,z,count", [("P", 384, 43_039_619), ("R", 392, 43_076_483)])
def test_released_decoder_layout(kind, z, count):
    with torch.device("meta"):
        dec = A.Decoder(z, **A.DECODER_CONFIG)
    shapes = {k: list(v.shape) for k, v in dec.state_dict().items()}
    assert shapes == manifest(f"autoencoder_{kind}_decoder_official")
    assert list(shapes) == list(manifest(f"autoencoder_{kind}_decoder_official"))   # order too
    assert sum(p.numel() for p in dec.parameters()) == count
    assert sum(isinstance(m, A.AttnBlock) for m in dec.modules()) == 4   # mid + 3 on the lowest level
    assert dec.upsample_factor == 16


def test_released_loss_layouts():
    """LPIPS and the PatchGAN have the released `loss.perceptual_loss.*` / `loss.discriminator.*` tables."""
    with torch.device("meta"):
        lp, disc = A.LPIPS(), A.PatchDiscriminator()
    for module, n_tensors, numel in [(lp, 33, 14_716_166), (disc, 22, 2_767_425)]:
        sd = module.state_dict()
        # The released numel counts float tensors (not BatchNorm's integer num_batches_tracked).
        assert len(sd) == n_tensors and sum(v.numel() for v in sd.values() if v.is_floating_point()) == numel
    assert sum(p.numel() for p in disc.parameters()) == 2_765_633
    assert {k.rsplit(".", 1)[0] for k in disc.state_dict()} == {f"main.{i}" for i in (0, 2, 3, 5, 6, 8, 9, 11)}
    # Two stride-2 hidden convs then two stride-1 ones: 64 → 32 → 16 → 8 → 7 → 6 logits per side.
    assert A.PatchDiscriminator()(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 6, 6)


def test_released_residual_vit_layout():
    with torch.device("meta"):
        vit = A.ResidualViT(**A.RESIDUAL_VIT_CONFIG)
    shapes = {k: list(v.shape) for k, v in vit.state_dict().items()}
    assert shapes == manifest("autoencoder_R_extra_vit_official")
    assert sum(p.numel() for p in vit.parameters()) == 22_139_760


# ----- Decoder parity with diffusers ---------------------------------------------------------------

def to_diffusers_decoder_keys(state, n_levels):
    """Our (= official LDM) decoder keys → diffusers `Decoder` keys (levels reversed, linear attention)."""
    out = {}
    for key, v in state.items():
        k = key.replace("mid.block_1.", "mid_block.resnets.0.").replace("mid.block_2.", "mid_block.resnets.1.")
        k = k.replace("mid.attn_1.", "mid_block.attentions.0.").replace("nin_shortcut", "conv_shortcut")
        k = k.replace("norm_out.", "conv_norm_out.")
        if k.startswith("up."):
            _, level, rest = k.split(".", 2)
            rest = rest.replace("block.", "resnets.").replace("attn.", "attentions.")
            rest = rest.replace("upsample.conv", "upsamplers.0.conv")
            k = f"up_blocks.{n_levels - 1 - int(level)}.{rest}"
        if "attentions." in k:
            k = k.replace(".norm.", ".group_norm.").replace(".q.", ".to_q.").replace(".k.", ".to_k.")
            k = k.replace(".v.", ".to_v.").replace(".proj_out.", ".to_out.0.")
            if v.dim() == 4:
                v = v[:, :, 0, 0]                           # 1×1 conv → Linear
        out[k] = v
    return out


def test_decoder_matches_diffusers(one_thread):
    vae = pytest.importorskip("diffusers.models.autoencoders.vae")
    ch, ch_mult = 32, (1, 2, 2, 4)
    ours = randomize_(A.Decoder(48, ch, ch_mult, num_res_blocks=1), seed=3).eval()
    ref = vae.Decoder(in_channels=48, out_channels=3,
                      up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 3,
                      block_out_channels=tuple(ch * m for m in ch_mult), layers_per_block=1).eval()
    ref.load_state_dict(to_diffusers_decoder_keys(ours.state_dict(), len(ch_mult)), strict=True)
    for h, w in [(4, 4), (3, 5)]:
        z = torch.randn(2, 48, h, w)
        with torch.no_grad():
            out, expected = ours(z), ref(z)
        assert out.shape == (2, 3, 8 * h, 8 * w)
        assert rel_err(out, expected) < 1e-4              # x·sigmoid(x) vs F.silu: ~1e-6 here


# ----- Residual ViT parity with the official formulation -----------------------------------------------

def reference_residual_vit(sd, x, num_heads, patch):
    """The official `rope_vit_models.forward_features` + SVG heads, restated with complex numbers."""
    B, _, H, W = x.shape
    tok = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    tok = torch.cat([sd["cls_token"].expand(B, -1, -1), tok.flatten(2).transpose(1, 2)], dim=1)
    D = tok.shape[-1]
    depth = sd["freqs"].shape[1]
    if sd["freqs_t_x"].shape[0] == tok.shape[1] - 1:
        t_x, t_y = sd["freqs_t_x"], sd["freqs_t_y"]
    else:
        t = torch.arange((H // patch) * (W // patch), dtype=torch.float32)
        t_x, t_y = t % (W // patch), torch.div(t, W // patch, rounding_mode="floor")
    N = t_x.shape[0]
    fx = (t_x.unsqueeze(-1) @ sd["freqs"][0].unsqueeze(-2)).view(depth, N, num_heads, -1).permute(0, 2, 1, 3)
    fy = (t_y.unsqueeze(-1) @ sd["freqs"][1].unsqueeze(-2)).view(depth, N, num_heads, -1).permute(0, 2, 1, 3)
    cis = torch.polar(torch.ones_like(fx), fx + fy)
    ln = lambda t, p: F.layer_norm(t, (D,), sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)   # noqa: E731
    lin = lambda t, p: F.linear(t, sd[p + ".weight"], sd[p + ".bias"])                     # noqa: E731
    for i in range(depth):
        p = f"blocks.{i}."
        qkv = lin(ln(tok, p + "norm1"), p + "attn.qkv").reshape(B, N + 1, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0].clone(), qkv[1].clone(), qkv[2]
        for t in (q, k):
            c = torch.view_as_complex(t[:, :, 1:].reshape(*t[:, :, 1:].shape[:-1], -1, 2))
            t[:, :, 1:] = torch.view_as_real(c * cis[i]).flatten(3)
        attn = ((q * (D // num_heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        tok = tok + sd[p + "gamma_1"] * lin((attn @ v).transpose(1, 2).reshape(B, N + 1, D), p + "attn.proj")
        tok = tok + sd[p + "gamma_2"] * lin(F.gelu(lin(ln(tok, p + "norm2"), p + "mlp.fc1")), p + "mlp.fc2")
    tok = ln(tok, "norm")[:, 1:]
    out = lin(F.gelu(lin(tok, "heads.0")), "heads.2")
    return out.transpose(1, 2)                              # [B, out_dim, N]


@pytest.mark.parametrize("size", [(32, 32), (24, 40)])     # stored-position grid, recomputed grid
def test_residual_vit_matches_reference(size):
    vit = randomize_(A.ResidualViT(64, 2, 2, 8, patch_size=8, img_size=32), seed=4).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = vit(x)
        expected = reference_residual_vit(vit.state_dict(), x, num_heads=2, patch=8)
    assert out.shape == (2, 8, size[0] // 8, size[1] // 8)
    assert rel_err(out.flatten(2), expected) < 1e-5


def test_residual_vit_non_square_grid_with_stored_token_count():
    """A 2×8 grid has as many tokens as the stored 4×4 one; the official code would reuse the 4×4
    positions there, we use the real ones (the reference recomputes when given no stored positions)."""
    vit = randomize_(A.ResidualViT(64, 2, 2, 8, patch_size=8, img_size=32), seed=4).eval()
    x = torch.randn(1, 3, 16, 64)
    sd = dict(vit.state_dict(), freqs_t_x=torch.zeros(0), freqs_t_y=torch.zeros(0))
    with torch.no_grad():
        assert rel_err(vit(x).flatten(2), reference_residual_vit(sd, x, num_heads=2, patch=8)) < 1e-5


def test_residual_vit_rejects_bad_sizes():
    vit = A.ResidualViT(64, 1, 1, 8, patch_size=8, img_size=32)
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        vit(torch.randn(1, 3, 36, 32))


def test_match_distribution():
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(3, 16, 5, 4, generator=gen) * 2 + 1
    hv = torch.randn(3, 4, 5, 4, generator=gen) * 0.3 - 2
    out = A.match_distribution(h, hv)
    # Literal official form on [B, C, N], scalar statistics. (Its unbiased std cancels out in the
    # ratio std_h/std_v, both taken over the same B·N positions, except inside the 1e-6.)
    h3, v3 = h.flatten(2), hv.flatten(2)
    m_h, s_h = h3.mean(dim=(0, 2)).mean(), h3.std(dim=(0, 2), unbiased=True).mean()
    m_v, s_v = v3.mean(dim=(0, 2)).mean(), v3.std(dim=(0, 2), unbiased=True).mean()
    assert rel_err(out.flatten(2), (v3 - m_v) / (s_v + 1e-6) * s_h + m_h) < 1e-6
    # Batch dependence (documented): image 0 alone is encoded differently from image 0 in a batch.
    alone = A.match_distribution(h[:1], hv[:1])
    assert (alone - out[:1]).abs().max() > 1e-3


# ----- Autoencoder behaviour -----------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["P", "R"])
def test_autoencoder_shapes_and_frozen_encoder(kind):
    ae = tiny_autoencoder(kind)
    ae.train()
    assert not ae.encoder.training and ae.decoder.training   # train() leaves DINOv3 in eval
    assert not any(p.requires_grad for p in ae.encoder.parameters())
    assert ae.kind == kind
    images = torch.rand(2, 3, 32, 48) * 2 - 1
    z = ae.encode(images)
    assert z.shape == (2, 64 + (8 if kind == "R" else 0), 4, 6)
    assert torch.equal(z[:, :64], ae.encoder.encode(A.dino.imagenet_normalize(images)))
    out = ae.decode(z)
    assert out.shape == images.shape and out.dtype == torch.float32
    out.abs().mean().backward()
    assert all(p.grad is None for p in ae.encoder.parameters())   # never under autograd
    trainable = {id(p) for p in ae.trainable_parameters()}
    assert all(id(p) in trainable for p in ae.decoder.parameters())
    if kind == "R":
        assert ae.extra_vit.freqs.grad is not None and id(ae.extra_vit.freqs) in trainable
        assert id(ae.extra_vit.head.weight) not in trainable          # the unused classifier
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        ae.encode(torch.zeros(1, 3, 36, 32))


def test_decoder_width_must_suit_groupnorm():
    with pytest.raises(ValueError, match="multiple of 32"):
        A.Decoder(16, 24, (1, 2), 1)


def test_decoder_overfits_four_images(one_thread):
    """A small P decoder on a random frozen DINOv3 learns 4 smooth 32×32 images (L1 only: LPIPS needs VGG weights)."""
    torch.manual_seed(0)
    enc = tiny_dino(patch_size=4, embed_dim=64)
    ae = A.Autoencoder(enc, A.Decoder(64, 32, (1, 1, 2), 1))
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    images = torch.stack([torch.stack([torch.sin(3 * xx + i), torch.cos(2 * yy - i), xx * yy * (i - 1.5) / 1.5])
                          for i in range(4)]).clamp(-1, 1)   # [4, 3, 32, 32]
    z = ae.encode(images)                                  # features fixed: the encoder is frozen
    opt = torch.optim.Adam(ae.trainable_parameters(), lr=1e-3, betas=(0.5, 0.9))
    losses = []
    for _ in range(120):
        loss = (ae.decode(z) - images).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5, (losses[0], losses[-1])   # measured: 0.554 -> 0.056 (10x)


# ----- Losses --------------------------------------------------------------------------------------

def fake_vgg_files(tmp_path, seed=0):
    """A torchvision-layout vgg16 state dict (features.* + classifier.*) and an LPIPS v0.1 lin file."""
    gen = torch.Generator().manual_seed(seed)
    vgg, c_in = {}, 3
    convs = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]   # torchvision indices of the 13 convs
    widths = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    for idx, width in zip(convs, widths):
        vgg[f"features.{idx}.weight"] = torch.randn(width, c_in, 3, 3, generator=gen) * math.sqrt(2 / (9 * c_in))
        vgg[f"features.{idx}.bias"] = torch.randn(width, generator=gen) * 0.1
        c_in = width
    vgg["classifier.0.weight"] = torch.zeros(4, 4)     # present in torchvision files, unused by LPIPS
    lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=gen)
           for k, c in enumerate([64, 128, 256, 512, 512])}
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save(lin, tmp_path / "vgg.pth")
    return vgg, lin, convs


def reference_lpips(vgg, lin, convs, x, y):
    """LPIPS restated: scaling layer, torchvision VGG16 by index, unit-normalise, weighted squared diff."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    taps, pools = {3: 0, 8: 1, 15: 2, 22: 3, 29: 4}, {4, 9, 16, 23}

    def features(t):
        t, out = (t - shift) / scale, []
        for i in range(30):
            if i in convs:
                t = F.relu(F.conv2d(t, vgg[f"features.{i}.weight"], vgg[f"features.{i}.bias"], padding=1))
            elif i in pools:
                t = F.max_pool2d(t, 2)
            if i in taps:
                out.append(t)
        return out

    total = 0
    for k, (a, b) in enumerate(zip(features(x), features(y))):
        a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
        b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
        total = total + (F.conv2d((a - b) ** 2, lin[f"lin{k}.model.1.weight"])).mean(dim=(1, 2, 3))
    return total


def test_lpips_loads_torchvision_and_lpips_files(tmp_path, one_thread):
    vgg, lin, convs = fake_vgg_files(tmp_path)
    lp = A.LPIPS().load_weights(tmp_path / "vgg.pth", tmp_path / "vgg16.pth")
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        d = lp(x, y)
        assert d.shape == (2,) and (d > 0).all()
        assert torch.equal(lp(x, x), torch.zeros(2))
        assert rel_err(d, reference_lpips(vgg, lin, convs, x, y)) < 1e-5
    lp.train()
    assert not lp.training                                 # LPIPS stays frozen in eval mode


def test_lpips_random_weights_and_bad_file(tmp_path):
    lp = randomize_(A.LPIPS(), seed=5)
    x, y = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert lp(x, x).item() == 0 and lp(x, y).item() > 0
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "vgg16.pth")
    torch.save({}, tmp_path / "vgg.pth")
    with pytest.raises(ValueError, match="missing keys: .*net.slice1.0.bias"):
        A.LPIPS().load_weights(tmp_path / "vgg.pth", tmp_path / "vgg16.pth")


def test_loss_without_lpips_warns_and_uses_l1():
    with pytest.warns(UserWarning, match="LPIPS weights not found"):
        loss_fn = A.AutoencoderLoss(disc_start=10)
    x, x_hat = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    loss, log = loss_fn.generator_loss(x_hat, x, step=0, last_layer=None)
    assert torch.allclose(log["l1"], (x - x_hat).abs().mean())
    assert torch.allclose(loss, (x - x_hat).abs().sum() / 2)  # official scale: Σ over c,h,w / B


def test_gan_start_and_adaptive_weight(one_thread):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss_fn = A.AutoencoderLoss(disc_start=3, disc_weight=0.5)
    dec = randomize_(A.Decoder(32, 32, (1, 2), 1), seed=6)
    z, target = torch.randn(2, 32, 16, 16), torch.rand(2, 3, 32, 32) * 2 - 1
    last = dec.conv_out.weight

    recon = dec(z)
    loss, log = loss_fn.generator_loss(recon, target, step=2, last_layer=last)
    assert log["d_weight"] == 0 and log["g_loss"] == 0 and torch.equal(loss, log["rec_loss"])
    d_loss, _ = loss_fn.discriminator_loss(recon, target, step=2)
    assert d_loss.item() == 0

    recon = dec(z)
    loss, log = loss_fn.generator_loss(recon, target, step=3, last_layer=last)
    rec = (target - recon).abs().sum() / 2
    g = -loss_fn.discriminator(recon).mean()
    g_rec = torch.autograd.grad(rec, last, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g, last, retain_graph=True)[0]
    d_w = 0.5 * (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0, 1e4)
    assert log["d_weight"] > 0 and rel_err(log["d_weight"], d_w) < 1e-5
    assert rel_err(loss, rec + d_w * g) < 1e-5
    d_loss, _ = loss_fn.discriminator_loss(recon, target, step=3)
    hinge = 0.5 * (F.relu(1 - loss_fn.discriminator(target)).mean() + F.relu(1 + loss_fn.discriminator(recon)).mean())
    assert d_loss.item() > 0 and rel_err(d_loss, hinge) < 1e-5


def test_variable_size_batch_counts_every_image():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss_fn = A.AutoencoderLoss(disc_start=0)
    gen = torch.Generator().manual_seed(0)
    targets = [torch.rand(3, 32, 48, generator=gen), torch.rand(3, 48, 32, generator=gen)]
    recons = [torch.rand(3, 32, 48, generator=gen), torch.rand(3, 48, 32, generator=gen)]
    with torch.no_grad():
        both, _ = loss_fn.generator_loss(recons, targets, step=-1, last_layer=None)
        each = [loss_fn.generator_loss([r], [t], step=-1, last_layer=None)[0] for r, t in zip(recons, targets)]
        assert rel_err(both, (each[0] + each[1]) / 2) < 1e-6
        changed, _ = loss_fn.generator_loss([targets[0]] + recons[1:], targets, step=-1, last_layer=None)
        assert changed < both                               # the first image is not ignored
        d_loss, _ = loss_fn.discriminator_loss(recons, targets, step=0)
        assert d_loss > 0


# ----- Checkpoints ---------------------------------------------------------------------------------

def mock_lightning_ckpt(ae, path):
    """The released `.ckpt` layout: Lightning top-level keys, state_dict with every prefix."""
    state = {f"encoder.{k}": v for k, v in ae.encoder.state_dict().items()}
    if ae.extra_vit is not None:
        state.update({f"extra_vit.{k}": v for k, v in ae.extra_vit.state_dict().items()})
        state.update({"norm_vit.weight": torch.ones(40), "norm_vit.bias": torch.zeros(40)})
    state.update({f"decoder.{k}": v for k, v in ae.decoder.state_dict().items()})
    state["loss.logvar"] = torch.zeros(())
    state.update({f"loss.discriminator.{k}": v for k, v in A.PatchDiscriminator().state_dict().items()})
    state["loss.perceptual_loss.lin0.model.1.weight"] = torch.rand(1, 64, 1, 1)
    torch.save({"epoch": 3, "global_step": 5000, "pytorch-lightning_version": "2.6.0",
                "state_dict": state, "loops": {}}, path)


@pytest.mark.parametrize("kind", ["P", "R"])
def test_released_ckpt_round_trip(tmp_path, kind, one_thread):
    ae = tiny_autoencoder(kind, seed=7)
    mock_lightning_ckpt(ae, tmp_path / "svg.ckpt")
    loaded = A.load_autoencoder(tmp_path / "svg.ckpt", kind=kind)
    assert loaded.kind == kind and loaded.decoder.config == ae.decoder.config
    images = torch.rand(1, 3, 16, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.encode(images), ae.encode(images))
        z = ae.encode(images)
        assert torch.equal(loaded.decode(z), ae.decode(z))
    other = "R" if kind == "P" else "P"
    with pytest.raises(ValueError, match=f"Autoencoder-{kind} checkpoint .* kind='{other}'"):
        A.load_autoencoder(tmp_path / "svg.ckpt", kind=other)

    # Our own format round-trips too, config included.
    A.save_autoencoder(loaded, tmp_path / "ours.safetensors")
    again = A.load_autoencoder(tmp_path / "ours.safetensors")
    assert again.config == loaded.config
    with torch.no_grad():
        assert torch.equal(again.decode(z), ae.decode(z)) and torch.equal(again.encode(images), z)


def test_decode_only_files(tmp_path):
    ae = tiny_autoencoder("P", seed=8)
    torch.save({f"decoder.{k}": v for k, v in ae.decoder.state_dict().items()}, tmp_path / "dec.pth")
    torch.save(ae.decoder.state_dict(), tmp_path / "bare.pth")
    z = torch.randn(1, 64, 2, 3)
    for name in ["dec.pth", "bare.pth"]:
        dec_only = A.load_autoencoder(tmp_path / name)
        with torch.no_grad():
            assert torch.equal(dec_only.decode(z), ae.decode(z))
        with pytest.raises(RuntimeError, match="decode-only"):
            dec_only.encode(torch.zeros(1, 3, 16, 16))
    with_enc = A.load_autoencoder(tmp_path / "dec.pth", encoder=ae.encoder)
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(with_enc.encode(images), ae.encode(images))


def test_bad_checkpoints(tmp_path):
    ae = tiny_autoencoder("R", seed=9)
    sd = {f"decoder.{k}": v for k, v in ae.decoder.state_dict().items()}
    sd.update({f"extra_vit.{k}": v for k, v in ae.extra_vit.state_dict().items()})
    del sd["decoder.mid.attn_1.q.weight"]                  # e.g. an LDM decoder without attention
    torch.save({"state_dict": sd}, tmp_path / "broken.ckpt")
    with pytest.raises(ValueError, match="missing keys: mid.attn_1.q.weight"):
        A.load_autoencoder(tmp_path / "broken.ckpt")
    torch.save({"model.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="no decoder weights"):
        A.load_autoencoder(tmp_path / "other.pth")
    # A P decoder under an R model (392 channels expected): a clear error from the constructor.
    with pytest.raises(ValueError, match="decoder takes 64 latent channels.*= 72"):
        A.Autoencoder(ae.encoder, A.Decoder(64, 32, (1, 2, 2, 4), 1), ae.extra_vit)
    with pytest.raises(FileNotFoundError):
        A.load_autoencoder(tmp_path / "nope.ckpt")


def test_one_mlp_and_one_key_report(tmp_path):
    """The residual ViT's MLP is DINOv3's class (same keys, same maths), and a misshapen key is reported in
    the project's one format (model.key_report: shapes as tuples), with the file named."""
    ae = tiny_autoencoder("R", seed=3)
    assert not hasattr(A, "Mlp") and type(ae.extra_vit.blocks[0].mlp) is dino.Mlp
    sd = {f"decoder.{k}": v for k, v in ae.decoder.state_dict().items()}
    sd["decoder.conv_out.bias"] = torch.zeros(4)
    torch.save({"state_dict": sd}, tmp_path / "misshapen.ckpt")
    with pytest.raises(ValueError, match=r"misshapen.ckpt.*\(decoder\.\*\)[\s\S]*"
                                         r"misshapen keys: conv_out.bias: file \(4,\) vs model \(3,\)"):
        A.load_autoencoder(tmp_path / "misshapen.ckpt")
