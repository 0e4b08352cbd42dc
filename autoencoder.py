"""Autoencoder-P and Autoencoder-R: the pixel decoder that turns DINOv3 features back into images.

SVG-T2I has no VAE: its latent is the frozen DINOv3 ViT-S+/16 feature map (dino.py). This file is the rest:

    image [-1,1] ─► ImageNet-norm ─► DINOv3 (frozen) ────────────────────► [B,384,H/16,W/16] ─┐
                               └──► ResidualViT (R) ─► match_distribution ─► [B,8,H/16,W/16] ─┤ concat
                                                                                              ▼
                      image ◄── Decoder (LDM-style convs, ×16 upsampling) ◄── z [B,384|392,h,w]

- Autoencoder-P ("pure"): z is the DINOv3 features alone (384 channels). The released DiT uses these.
- Autoencoder-R ("residual"): a small RoPE ViT adds 8 channels of detail DINOv3 drops (392 in all).
- The decoder's training loss (AutoencoderLoss): L1 + LPIPS + a hinge PatchGAN with an adaptive weight.

Why R exists, and why generation still uses P: DINOv3 was trained to describe an image, not to redraw it, so
fine texture, small text and exact colours are partly lost in its features. R's 8 channels carry what the
decoder misses, but the released DiT was trained on the 384 P channels (`in_channels=384` in KlingTeam/SVG-T2I
`svg_t2i/train_svg_t2i.py`; no T2I model was trained on R, say the authors in its GitHub issues #1, #2). Numbers
follow the official code (`svg_t2i/ldm/`) and configs (`svg_t2i/pre-trained/autoencoder/*.yaml`) unless noted.
"""
import json
import math
import os
import warnings
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

import dino


# ----- Decoder --------------------------------------------------------------------------------------

class Decoder(nn.Module):
    """LDM's convolutional decoder (Rombach et al. 2022) from taming-transformers (Esser et al. 2021, arXiv
    2012.09841, the VQGAN code), in the released key layout (`svg_t2i/ldm/modules/diffusionmodules/model.py`).

    z [B, z_channels, h, w] → image [B, out_ch, h·2^(L-1), w·2^(L-1)], L = len(ch_mult), trained towards [-1, 1].
    Level i is ch·ch_mult[i] wide: num_res_blocks+1 ResnetBlocks (GroupNorm → swish → 3×3 conv, twice, + skip),
    then an Upsample (nearest ×2, 3×3 conv): standard LDM blocks, below the banner. One-head attention over all
    h·w positions once in the middle and after *every* ResnetBlock of the lowest level: the released configs
    say `attn_resolutions: []`, but the official `model.py` hard-codes it and the released weights have it.
    """

    def __init__(self, z_channels, ch, ch_mult, num_res_blocks, out_ch=3):
        super().__init__()
        ch_mult = tuple(int(m) for m in ch_mult)
        self.config = dict(z_channels=z_channels, ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, out_ch=out_ch)
        self.z_channels = z_channels
        self.upsample_factor = 2 ** (len(ch_mult) - 1)
        widths = [ch * m for m in ch_mult]                  # released: 128, 128, 256, 256, 512
        lowest = len(ch_mult) - 1
        block_in = widths[lowest]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = nn.ModuleDict(OrderedDict(block_1=ResnetBlock(block_in, block_in), attn_1=AttnBlock(block_in),
                                             block_2=ResnetBlock(block_in, block_in)))
        # `up[i]` is level i (up[0] = full resolution); it is *built* and *run* from the lowest level up,
        # but registered in index order, which is the official state-dict order.
        levels = [None] * len(ch_mult)
        for level in reversed(range(len(ch_mult))):
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, widths[level]))
                block_in = widths[level]
                if level == lowest:
                    attns.append(AttnBlock(block_in))
            stage = nn.ModuleDict(OrderedDict(block=blocks, attn=attns))
            if level != 0:
                stage["upsample"] = Upsample(block_in)
            levels[level] = stage
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z):                                   # [B, Z, h, w]
        _check_latent(self, z)
        h = self.conv_in(z)                                 # [B, ch*ch_mult[-1], h, w]
        h = self.mid["block_2"](self.mid["attn_1"](self.mid["block_1"](h)))
        for level in reversed(range(len(self.up))):
            stage = self.up[level]
            for i, block in enumerate(stage["block"]):
                h = block(h)
                if len(stage["attn"]):
                    h = stage["attn"][i](h)
            if level != 0:
                h = stage["upsample"](h)                    # spatial ×2
        return self.conv_out(swish(self.norm_out(h)))       # [B, out_ch, h·f, w·f]


# ----- The autoencoder ----------------------------------------------------------------------------
# Below the banner (R only; generation uses P): `ResidualViT`, `match_distribution` (its 8 channels to DINOv3's scale).

class Autoencoder(nn.Module):
    """Frozen DINOv3 encoder + trained Decoder (+ trained ResidualViT for R); `encoder` None = decode-only.

    encode(images [B,3,H,W] in [-1, 1]) → z [B, Z, H/p, W/p], Z = DINOv3 width (P) or width + 8 (R);
    decode(z) → images [B,3,H,W], roughly in [-1, 1] (unclamped). The encoder is frozen: eval mode whatever
    `.train()` says, and no_grad (the official code computed and discarded its gradients, and its `ImageLogger`
    callback flipped it to train mode). Latent statistics belong to the DiT side, not here.
    """

    def __init__(self, encoder, decoder, residual=None):
        super().__init__()
        _check_parts(encoder, decoder, residual)
        self.encoder = encoder.requires_grad_(False).eval() if encoder is not None else None
        self.decoder = decoder
        # Named `extra_vit` so that our state dict uses the released prefixes (encoder., decoder., extra_vit.).
        self.extra_vit = residual

    @property
    def kind(self):
        """'R' (DINOv3 ⊕ residual channels) or 'P'. A decode-only R has no residual ViT: its 392-wide conv_in says R."""
        decode_only_r = self.encoder is None and self.decoder.z_channels == RELEASED_Z_CHANNELS["R"]
        return "R" if self.extra_vit is not None or decode_only_r else "P"

    @property
    def config(self):
        """A plain dict enough to rebuild the model (save_autoencoder writes it into the file)."""
        return dict(kind=self.kind, decoder=dict(self.decoder.config),
                    encoder=dict(self.encoder.config) if self.encoder is not None else None,
                    residual=dict(self.extra_vit.config) if self.extra_vit is not None else None)

    def train(self, mode=True):
        super().train(mode)
        if self.encoder is not None:
            self.encoder.eval()   # always (the official one, left in train mode, jittered its RoPE coordinates)
        return self

    def trainable_parameters(self):
        """What the optimiser updates: the decoder, and for R the residual ViT (incl. its RoPE freqs)."""
        params = list(self.decoder.parameters())
        if self.extra_vit is not None:
            params += [p for p in self.extra_vit.parameters() if p.requires_grad]   # not the unused `head`
        return params

    def encode(self, images):                              # [B, 3, H, W] in [-1, 1]
        _check_encode_input(self, images)
        x_in = dino.imagenet_normalize(images.float())     # DINOv3 and the residual ViT both read this
        # DINOv3 runs in fp32 (as the official code), even inside a caller's bf16 autocast region.
        with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
            z = self.encoder.encode(x_in)                  # [B, D, H/p, W/p]
        if self.extra_vit is not None:
            residual = self.extra_vit(x_in)                # [B, 8, H/p, W/p]; has grad when training R
            z = torch.cat([z, match_distribution(z, residual)], dim=1)   # [B, D+8, H/p, W/p]
        return z

    def decode(self, z):                                   # [B, Z, h, w] -> [B, 3, h·f, w·f]
        return self.decoder(z)

    def forward(self, images):
        return self.decode(self.encode(images))


# ----- Training loss -------------------------------------------------------------------------------
# Its two networks stand below the banner: LPIPS (Zhang et al. 2018: five VGG16 feature maps, unit-normalised,
# squared differences weighted by learned 1×1 convs) and taming's PatchGAN (one real/fake logit per ~70×70 patch).

def adaptive_gan_weight(rec_loss, gan_loss, last_layer):
    """VQGAN's λ (Esser et al. 2021; δ is 1e-6 there, 1e-4 in taming's code): ‖∇_W rec‖ / (‖∇_W gan‖ + δ), clamped
    to [0, 1e4], W = the decoder's last conv. Times disc_weight (0.5), it keeps the GAN gradient at the output
    layer half the reconstruction one however the two losses drift: no GAN weight to tune by hand."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


class AutoencoderLoss(nn.Module):
    """L1 + LPIPS + hinge PatchGAN: taming's recipe, as LDM and VA-VAE (Yao et al. 2025, arXiv 2501.01423, a VAE
    aligned to vision-foundation-model features) train with it (`svg_t2i/ldm/modules/losses/contperceptual_decoder.py`).

    Generator:  L_rec = mean over images of Σ_{c,h,w} (|x − x̂| + LPIPS(x, x̂))   (the official sum scale)
                L_G   = L_rec + d_w · [step ≥ disc_start] · (−mean D(x̂)),  d_w = adaptive weight × disc_weight
    Discriminator: L_D = [step ≥ disc_start] · ½(mean relu(1 − D(x)) + mean relu(1 + D(x̂)))

    Why each term (weights as released: L1 1, LPIPS 1 per pixel, GAN 0.5 × the adaptive weight):
    - L1, pixel fidelity. Not L2: where the decoder is unsure, L2's optimum is the mean of the possible
      pixels, a blur, and it squares large errors, so a few outliers dominate; L1 takes the median.
    - LPIPS, perceptual: it compares VGG16 features instead of pixels, so a sharp texture a pixel off costs
      little and a blur costs a lot: it buys the sharp textures pixel losses give away.
    - GAN: the PatchGAN tells real from decoded patches, pushing the remaining high-frequency detail to look
      real. It starts at disc_start = 2,500 iterations (the official 5000 are Lightning steps, 2 per iteration):
      a discriminator easily beats a decoder that cannot yet reconstruct, and its gradients would fight the
      reconstruction terms; once L1 + LPIPS have the picture, the GAN refines (the demo's 700 + 150 steps end first).
    Without the LPIPS files (`_load_lpips`) the loss is L1 + GAN. Inputs may be lists of images of different
    sizes (`_as_groups`): each image counts in proportion to its pixel count.
    """

    def __init__(self, lpips_path=None, vgg_path=None, disc_start=2500, disc_weight=0.5, perceptual_weight=1.0):
        super().__init__()
        self.disc_start, self.disc_weight, self.perceptual_weight = disc_start, disc_weight, perceptual_weight
        self.discriminator = PatchDiscriminator()
        self.perceptual_loss = _load_lpips(lpips_path, vgg_path)   # None (with a warning) without the files

    def disc_active(self, step):                            # whether the GAN terms are on at this iteration
        return step >= self.disc_start

    def _reconstruction(self, recons, targets):
        """Per-image Σ|x − x̂| and mean LPIPS; returns (L_rec, mean L1 per pixel, mean LPIPS)."""
        rec_sums, l1_means, lpips_vals = [], [], []
        for x_hat, x in zip(recons, targets):
            _check_same_shape(x_hat, x)
            l1 = (x - x_hat).abs()                          # [b, 3, H, W]
            per_image = l1.sum(dim=(1, 2, 3))               # [b]
            l1_means.append(l1.mean(dim=(1, 2, 3)))
            if self.perceptual_loss is not None:
                p = self.perceptual_loss(x.contiguous(), x_hat.contiguous())   # [b]
                per_image = per_image + self.perceptual_weight * p * x[0].numel()   # broadcast over C·H·W
                lpips_vals.append(p)
            rec_sums.append(per_image)
        lpips_mean = torch.cat(lpips_vals).mean() if lpips_vals else torch.zeros(())
        return torch.cat(rec_sums).mean(), torch.cat(l1_means).mean(), lpips_mean

    def generator_loss(self, recon, target, step, last_layer):
        """(L_G, log) for the decoder (and residual ViT) update. `last_layer` = decoder.conv_out.weight."""
        recons, targets = _as_groups(recon), _as_groups(target)
        rec_loss, l1, lp = self._reconstruction(recons, targets)
        log = dict(rec_loss=rec_loss.detach(), l1=l1.detach(), lpips=lp.detach())
        if not self.disc_active(step):
            # Before disc_start the GAN factor is 0: skip the discriminator pass and the two extra backward
            # passes of the adaptive weight (the official code ran and then zeroed them).
            log.update(g_loss=torch.zeros(()), d_weight=torch.zeros(()), total=rec_loss.detach())
            return rec_loss, log
        logits = [self.discriminator(x_hat).mean(dim=(1, 2, 3)) for x_hat in recons]   # [b] each
        g_loss = -torch.cat(logits).mean()
        if torch.is_grad_enabled():
            d_weight = adaptive_gan_weight(rec_loss, g_loss, last_layer) * self.disc_weight
        else:
            d_weight = torch.zeros((), device=rec_loss.device)   # evaluation: no gradients to balance
        total = rec_loss + d_weight * g_loss
        log.update(g_loss=g_loss.detach(), d_weight=d_weight.detach(), total=total.detach())
        return total, log

    def discriminator_loss(self, recon, target, step):
        """(L_D, log) for the discriminator update; the reconstructions are detached here. Hinge: a logit
        already beyond ±1 on the right side costs nothing, so D stops pushing on patches it has settled."""
        recons, targets = _as_groups(recon), _as_groups(target)
        real, fake = [], []
        for x_hat, x in zip(recons, targets):
            real.append(F.relu(1.0 - self.discriminator(x.contiguous())).mean(dim=(1, 2, 3)))       # [b]
            fake.append(F.relu(1.0 + self.discriminator(x_hat.detach().contiguous())).mean(dim=(1, 2, 3)))
        factor = 1.0 if self.disc_active(step) else 0.0
        d_loss = factor * 0.5 * (torch.cat(real).mean() + torch.cat(fake).mean())
        return d_loss, dict(d_loss=d_loss.detach(), hinge_real=torch.cat(real).detach().mean(),
                            hinge_fake=torch.cat(fake).detach().mean())


# ==================================================================================================
# Building blocks, R's residual ViT, loss networks, checks, files. A first reading can skip everything below: the
# standard LDM blocks, Autoencoder-R's RoPE ViT, the LPIPS and PatchGAN networks, input checks, checkpoint files.
# ==================================================================================================

# ----- Decoder building blocks ----------------------------------------------------------------------

def swish(x):
    """x·sigmoid(x), written out as LDM's `nonlinearity`: `F.silu` rounds differently, ~1e-5 apart after
    the decoder's 40 layers."""
    return x * torch.sigmoid(x)


def group_norm(channels):
    """GroupNorm(32 groups, eps 1e-6), the LDM `Normalize`. Widths must be multiples of 32."""
    if channels % 32:
        raise ValueError(f"decoder width {channels} is not a multiple of 32, which GroupNorm(32) needs: "
                         f"choose `ch` and `ch_mult` so that every ch*mult is a multiple of 32")
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm → swish → conv3×3, twice, plus a (1×1-projected when widths differ) skip. No time embedding."""

    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(out_ch)
        # The official block has Dropout(0.0) here; a no-op, so it is left out (it holds no weights).
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x):                                   # [B, in_ch, h, w]
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))                # [B, out_ch, h, w]
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h·w positions, with 1×1 convs as q/k/v/out projections.

    Cost is O((hw)²): at 1024² pixels the latent is 64×64, i.e. 4096² attention weights per block.
    """

    def __init__(self, channels):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):                                   # [B, C, h, w]
        B, C, H, W = x.shape
        hn = self.norm(x)
        # One head of width C: [B, 1, hw, C]. SDPA's default scale C^-0.5 is the official one.
        q, k, v = (proj(hn).flatten(2).transpose(1, 2).unsqueeze(1) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)       # [B, 1, hw, C]
        out = out.squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(out)


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 conv (LDM `Upsample(with_conv=True)`)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):                                   # [B, C, h, w] -> [B, C, 2h, 2w]
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


# ----- Residual ViT (Autoencoder-R) -----------------------------------------------------------------

class ResidualViT(nn.Module):
    """Autoencoder-R's residual branch: a RoPE-Mixed DeiT-S/16 with LayerScale and an MLP head.

    image (ImageNet-normalised) [B,3,H,W] → patch conv → [CLS; patches] → depth × LayerScaleBlock →
    LayerNorm → drop CLS → heads (Linear, GELU, Linear) → [B, out_dim, H/p, W/p]. The blocks are dino.py's
    pre-norm LayerScale blocks (the next section) with RoPE-Mixed attention (Heo et al. 2024, "Rotary Position
    Embedding for Vision Transformer"): each head rotates (even, odd) pairs of the patch tokens' q/k by an
    angle that is a *learned* linear function of the patch's (x, y) index (the other RoPEs of this project
    use fixed frequencies). With no absolute position embedding, any H, W that are multiples of the patch
    size work. Its 1000-way `head` is kept (frozen, never called) only so the released file loads strictly.
    """

    def __init__(self, embed_dim, depth, num_heads, out_dim, patch_size=16, img_size=1024):
        super().__init__()
        _check_residual_config(embed_dim, num_heads)
        self.config = dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, out_dim=out_dim,
                           patch_size=patch_size, img_size=img_size)
        self.patch_size, self.num_heads, self.out_dim = patch_size, num_heads, out_dim
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        # The RoPE-Mixed frequencies, [2 (x, y), depth, heads·head_dim/2]: learned, trained with the rest.
        self.freqs = nn.Parameter(init_mixed_rope_freqs(depth, num_heads, embed_dim // num_heads))
        # Positions of the img_size² grid, stored in the released file; other grids recompute them.
        self.stored_grid = img_size // patch_size
        t_x, t_y = patch_positions(self.stored_grid, self.stored_grid)
        self.register_buffer("freqs_t_x", t_x)
        self.register_buffer("freqs_t_y", t_y)
        self.patch_embed = nn.ModuleDict({"proj": nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)})
        self.blocks = nn.ModuleList(LayerScaleBlock(embed_dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, NUM_CLASSES).requires_grad_(False)   # unused, see docstring
        self.heads = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, out_dim))
        _deit_init(self)

    def rope_angles(self, grid_h, grid_w):
        """cos/sin of every block's rotation angles, angle = x·freqs[0] + y·freqs[1]: two [depth, heads, N,
        head_dim/2] tensors."""
        t_x, t_y = _grid_positions(self, grid_h, grid_w)    # integer (x, y) of each patch, [N] each
        depth, n = self.freqs.shape[1], t_x.numel()
        # Angles stay in float32 even under autocast: positions reach 63 and need the mantissa.
        with torch.autocast(self.freqs.device.type, enabled=False):
            angles = t_x[None, :, None] * self.freqs[0].float()[:, None, :] \
                + t_y[None, :, None] * self.freqs[1].float()[:, None, :]          # [depth, N, heads·hd/2]
            angles = angles.view(depth, n, self.num_heads, -1).permute(0, 2, 1, 3)   # [depth, heads, N, hd/2]
            return angles.cos(), angles.sin()

    def forward(self, x):                                   # [B, 3, H, W], ImageNet-normalised
        B, _, H, W = x.shape
        p = self.patch_size
        _check_multiple(H, W, p, "ResidualViT: image size")
        tokens = self.patch_embed["proj"](x).flatten(2).transpose(1, 2)            # [B, N, D]
        tokens = torch.cat([self.cls_token.expand(B, -1, -1), tokens], dim=1)      # [B, 1+N, D]
        cos, sin = self.rope_angles(H // p, W // p)
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, cos[i].to(tokens.dtype), sin[i].to(tokens.dtype))
        out = self.heads(self.norm(tokens)[:, 1:])          # [B, N, out_dim]
        return out.transpose(1, 2).reshape(B, self.out_dim, H // p, W // p)


def match_distribution(dino_feats, res_feats, eps=1e-6):
    """Give the residual channels DINOv3's overall scale: a *scalar* mean/std transfer (the `use_outnorm`
    step of `svg_t2i/ldm/models/dinov3_decoder_native_resolution.py`).

    dino_feats [B, C, ...], res_feats [B, R, ...]. Why: the 8 channels are concatenated to DINOv3's and enter
    the same first conv, so they are put on DINOv3's scale, one mean and one std for all channels (the mean
    over channels of per-channel means and unbiased stds over batch and positions). The statistics are
    detached, so gradients flow only through the residual values. They are pooled over the batch, so an
    image's latent depends on its batch mates: encode one image per call when that matters (as the official
    native-resolution trainer did).
    """
    def scalar_stats(t):
        dims = [0] + list(range(2, t.dim()))
        return t.mean(dim=dims).mean().detach(), t.std(dim=dims).mean().detach()

    mean_d, std_d = scalar_stats(dino_feats)
    mean_r, std_r = scalar_stats(res_feats)
    return (res_feats - mean_r) / (std_r + eps) * std_d + mean_d


# ----- Residual ViT building blocks: RoPE-Mixed attention, LayerScale block, init ---------------------

ROPE_THETA = 10.0          # `rope_mixed_deit_*` in `svg_t2i/ldm/rope_vit/vit_rope.py`: rope_theta=10
LAYERSCALE_INIT = 1e-4     # DeiT-III `Layer_scale_init_Block` init_values
NUM_CLASSES = 1000         # the unused ImageNet classifier `head` still in the released state dict


def init_mixed_rope_freqs(depth, num_heads, head_dim, theta=ROPE_THETA):
    """Initial RoPE-Mixed frequencies, [2 (x, y), depth, num_heads·head_dim/2].

    Per head: a random direction α and head_dim/4 magnitudes theta^(-4j/head_dim); the first half of the
    pairs turns along α, the second half along α+90°.
    """
    mag = theta ** (-torch.arange(0, head_dim, 4)[: head_dim // 4].float() / head_dim)   # [head_dim/4]
    alpha = torch.rand(depth, num_heads, 1) * 2 * math.pi
    fx = torch.cat([mag * torch.cos(alpha), mag * torch.cos(alpha + math.pi / 2)], dim=-1)
    fy = torch.cat([mag * torch.sin(alpha), mag * torch.sin(alpha + math.pi / 2)], dim=-1)
    return torch.stack([fx, fy]).reshape(2, depth, num_heads * head_dim // 2)


def patch_positions(grid_h, grid_w, device=None):
    """Integer (x, y) index of each patch in row-major order: two [grid_h·grid_w] float tensors."""
    idx = torch.arange(grid_h * grid_w, dtype=torch.float32, device=device)
    return idx % grid_w, torch.div(idx, grid_w, rounding_mode="floor")


def rotate_pairs(x, cos, sin):
    """Rotate adjacent channel pairs (x[2j], x[2j+1]) by the angles behind cos/sin [.., N, head_dim/2]."""
    pairs = x.unflatten(-1, (-1, 2))                        # [B, heads, N, head_dim/2, 2]
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


class RoPEAttention(nn.Module):
    """Multi-head self-attention; RoPE on the patch tokens' q and k, never on the CLS token (index 0)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, cos, sin):                         # x [B, 1+N, D]; cos/sin [heads, N, head_dim/2]
        B, L, D = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q = torch.cat([q[:, :, :1], rotate_pairs(q[:, :, 1:], cos, sin)], dim=2)   # [B, heads, 1+N, hd]
        k = torch.cat([k[:, :, :1], rotate_pairs(k[:, :, 1:], cos, sin)], dim=2)
        out = F.scaled_dot_product_attention(q, k, v)       # default scale head_dim^-0.5, as the official
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


class LayerScaleBlock(nn.Module):
    """Pre-norm transformer block whose two branches are scaled by learned per-channel gammas (DeiT-III).
    The MLP is DINOv3's (`dino.Mlp`, the timm `Mlp`: fc1 → exact GELU → fc2), with the DeiT ratio of 4."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RoPEAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = dino.Mlp(dim, 4 * dim)
        self.gamma_1 = nn.Parameter(torch.full((dim,), LAYERSCALE_INIT))
        self.gamma_2 = nn.Parameter(torch.full((dim,), LAYERSCALE_INIT))

    def forward(self, x, cos, sin):                         # [B, 1+N, D]
        x = x + self.gamma_1 * self.attn(self.norm1(x), cos, sin)
        return x + self.gamma_2 * self.mlp(self.norm2(x))


# ----- Input checks and initialisation ------------------------------------------------------------

def _check_latent(decoder, z):
    if z.dim() != 4 or z.shape[1] != decoder.z_channels:
        raise ValueError(f"Decoder expects latents [B, {decoder.z_channels}, h, w], got {tuple(z.shape)}")


def _check_residual_config(embed_dim, num_heads):
    if embed_dim % num_heads or (embed_dim // num_heads) % 4:
        raise ValueError(f"ResidualViT: embed_dim {embed_dim} / num_heads {num_heads} must give a head "
                         f"width divisible by 4 (RoPE-Mixed rotates pairs, split between x and y)")


def _check_multiple(H, W, p, what):
    if H % p or W % p:
        raise ValueError(f"{what} {H}x{W} is not a multiple of the patch size {p}; "
                         f"resize or crop the image to multiples of {p}")


def _grid_positions(vit, grid_h, grid_w):
    """The stored positions for the stored grid, recomputed ones for every other grid. The official code
    reuses the stored 64×64 positions for *any* grid of 4096 patches (e.g. 32×128), which scrambles
    non-square grids."""
    if grid_h == grid_w == vit.stored_grid:
        return vit.freqs_t_x, vit.freqs_t_y
    return patch_positions(grid_h, grid_w, device=vit.freqs.device)


def _deit_init(vit):
    """DeiT init for the transformer's Linear layers; `heads` keeps PyTorch's default (it was swapped in
    after the DeiT init in the official code)."""
    for module in [vit.blocks, vit.head]:
        for m in module.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)


def _check_parts(encoder, decoder, residual):
    """An Autoencoder's parts must fit: decoder input width = DINOv3 width (+ residual channels), equal patches."""
    if encoder is None:
        return
    z_expected = encoder.embed_dim + (residual.out_dim if residual is not None else 0)
    if decoder.z_channels != z_expected:
        raise ValueError(f"Autoencoder: the decoder takes {decoder.z_channels} latent channels, but the "
                         f"encoder gives {encoder.embed_dim}"
                         + (f" + {residual.out_dim} residual" if residual is not None else "")
                         + f" = {z_expected}: a P decoder needs no residual ViT, an R decoder needs one")
    if residual is not None and residual.patch_size != encoder.patch_size:
        raise ValueError(f"Autoencoder: residual ViT patch {residual.patch_size} != DINOv3 patch "
                         f"{encoder.patch_size}; their token grids must line up")


def _check_encode_input(ae, images):
    if ae.encoder is None:
        raise RuntimeError("this autoencoder was loaded decode-only (the file has no `encoder.*` weights): "
                           "pass a DINOv3 as load_autoencoder(path, encoder=load_dinov3(...)) to encode")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"Autoencoder.encode expects images [B, 3, H, W] in [-1, 1], got {tuple(images.shape)}")
    p = ae.encoder.patch_size
    H, W = images.shape[-2:]
    if H % p or W % p:
        raise ValueError(f"Autoencoder.encode: image size {H}x{W} is not a multiple of the patch size {p}; "
                         f"resize or crop to multiples of {p} (the official P code silently cropped)")


def _check_same_shape(x_hat, x):
    if x_hat.shape != x.shape:
        raise ValueError(f"AutoencoderLoss: reconstruction {tuple(x_hat.shape)} and target "
                         f"{tuple(x.shape)} differ in shape")


# ----- LPIPS (taming / LPIPS v0.1 "vgg") ---------------------------------------------------------------

# torchvision's VGG16 `features`: conv widths and max-pools ("M"), each conv followed by a ReLU; LPIPS cuts
# the stack after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, i.e. before `features` indices 4, 9, 16, 23, 30.
VGG16_WIDTHS = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
LPIPS_SLICE_ENDS = [4, 9, 16, 23, 30]
LPIPS_CHANNELS = [64, 128, 256, 512, 512]


class ScalingLayer(nn.Module):
    """Maps [-1, 1] images to the VGG input range (official LPIPS constants)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

    def forward(self, x):
        return (x - self.shift) / self.scale


class VGG16Features(nn.Module):
    """torchvision's VGG16 `features`, cut into five slices; layers keep their torchvision index as name."""

    def __init__(self):
        super().__init__()
        layers, in_ch = [], 3
        for width in VGG16_WIDTHS:
            if width == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_ch, width, 3, padding=1), nn.ReLU()]
                in_ch = width
        start = 0
        for n, end in enumerate(LPIPS_SLICE_ENDS, 1):
            setattr(self, f"slice{n}", nn.Sequential(OrderedDict((str(i), layers[i]) for i in range(start, end))))
            start = end

    def forward(self, x):
        feats = []
        for n in range(1, 6):
            x = getattr(self, f"slice{n}")(x)
            feats.append(x)                                 # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
        return feats


class LinearHead(nn.Module):
    """LPIPS per-layer weights: a 1×1 conv to one channel. The Dropout only keeps the official key
    `model.1.weight`; LPIPS always runs in eval mode, where it does nothing."""

    def __init__(self, channels):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))


class LPIPS(nn.Module):
    """Learned perceptual distance (Zhang et al. 2018), VGG16 variant; per-image values [B].

    For each of the five VGG stages: unit-normalise features over channels, square the difference, weight
    channels with the learned 1×1 head, average over space; then sum the five. Frozen, eval mode always.
    Key layout = taming's `perceptual_loss.*` (scaling_layer, net.sliceN.idx, linK.model.1).
    """

    def __init__(self):
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Features()
        for k, ch in enumerate(LPIPS_CHANNELS):
            setattr(self, f"lin{k}", LinearHead(ch))
        self.requires_grad_(False).eval()

    def train(self, mode=True):
        return super().train(False)

    def forward(self, x, y):                                # [B, 3, H, W] each, in [-1, 1]
        fx, fy = self.net(self.scaling_layer(x)), self.net(self.scaling_layer(y))
        total = 0
        for k, (a, b) in enumerate(zip(fx, fy)):
            a = a / (a.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            total = total + getattr(self, f"lin{k}").model((a - b) ** 2).mean(dim=(1, 2, 3))   # [B]
        return total

    def load_weights(self, lpips_path, vgg_path):
        """Load torchvision's `vgg16-397923af.pth` (features.* keys) and LPIPS v0.1 `vgg.pth` (lin*)."""
        vgg = torch.load(vgg_path, map_location="cpu", weights_only=True)
        state = {}
        for name, tensor in vgg.items():
            if name.startswith("features."):
                idx = int(name.split(".")[1])
                slice_no = next(n for n, end in enumerate(LPIPS_SLICE_ENDS, 1) if idx < end)
                state[f"net.slice{slice_no}.{idx}.{name.split('.')[2]}"] = tensor
        lin = torch.load(lpips_path, map_location="cpu", weights_only=True)
        state.update({k: v for k, v in lin.items() if k.startswith("lin")})
        state.update({f"scaling_layer.{k}": v for k, v in self.scaling_layer.state_dict().items()})
        _load_strict(self, state, f"LPIPS weights ({vgg_path} + {lpips_path})")
        return self


# ----- PatchGAN discriminator ---------------------------------------------------------------------

class PatchDiscriminator(nn.Module):
    """taming's `NLayerDiscriminator(ndf=64, n_layers=3)`: 4×4 convs with BatchNorm and LeakyReLU(0.2),
    one logit per ~70×70 patch. Key layout `main.{0,2,3,5,6,8,9,11}` as in the released `loss.discriminator`."""

    def __init__(self, in_ch=3, ndf=64, n_layers=3):
        super().__init__()
        layers = [nn.Conv2d(in_ch, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = ndf
        for n in range(1, n_layers + 1):
            out = ndf * min(2 ** n, 8)
            stride = 2 if n < n_layers else 1               # the last hidden conv keeps the resolution
            layers += [nn.Conv2d(width, out, 4, stride, 1, bias=False), nn.BatchNorm2d(out), nn.LeakyReLU(0.2)]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():                            # taming `weights_init`
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):                                   # [B, 3, H, W] -> logits [B, 1, h', w']
        return self.main(x)


# ----- The loss's inputs: LPIPS weights, image lists ----------------------------------------------

def _load_lpips(lpips_path, vgg_path):
    """LPIPS from two user-supplied files (torchvision `vgg16` and LPIPS v0.1 `vgg.pth`), or None with one
    warning when either is missing: the loss is then L1 + GAN."""
    missing = [p for p in (lpips_path, vgg_path) if p is None or not os.path.isfile(p)]
    if missing:
        warnings.warn("AutoencoderLoss: LPIPS weights not found (need vgg_path = torchvision vgg16 .pth and "
                      f"lpips_path = LPIPS v0.1 vgg.pth; missing: {missing}); training on L1 + GAN only")
        return None
    return LPIPS().load_weights(lpips_path, vgg_path)


def _as_groups(images):
    """A [B,3,H,W] batch, or a list of [3,H,W] / [b,3,H,W] images of different sizes → list of 4-D tensors.

    Every image of a list counts, in proportion to its pixel count as in the official batched path (the
    official list path overwrote the loss in its loop, so only the last image of each list counted)."""
    if torch.is_tensor(images):
        return [images if images.dim() == 4 else images.unsqueeze(0)]
    return [im if im.dim() == 4 else im.unsqueeze(0) for im in images]


# ----- Checkpoints ---------------------------------------------------------------------------------
# Three kinds of file, one loader:
#   - the released Lightning `.ckpt`: {'state_dict': {encoder.*, decoder.*, [extra_vit.*, norm_vit.*],
#     loss.*}, 'epoch', 'global_step', ...}; the config is read off the tensor shapes;
#   - decode-only files: a state dict with only `decoder.*` keys, or a bare decoder state dict;
#   - our own `.safetensors` (save_autoencoder): the same prefixes, config JSON in the file's metadata.

# The released decoder (`ddconfig` of every released yaml): 5 levels → 4 upsamplings → ×16.
# `z_channels` is 384 for P (DINOv3 ViT-S+ width) and 392 for R (+ 8 residual); nothing else differs.
DECODER_CONFIG = dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2)
RELEASED_Z_CHANNELS = dict(P=384, R=392)
# The released residual branch: `rope_mixed_deit_small_patch16_LS(img_size=1024)` with an 8-channel head.
RESIDUAL_VIT_CONFIG = dict(embed_dim=384, depth=12, num_heads=6, out_dim=8, patch_size=16, img_size=1024)

FILE_FORMAT = "svg-t2i-autoencoder"
# Released keys that the models here do not use: the training loss (LPIPS + discriminator + a fixed
# logvar), the never-called `norm_vit` of R, and SVG's training-only `mask_token`.
IGNORED_PREFIXES = ("loss", "norm_vit", "mask_token")


def _load_strict(module, state, where):
    """load_state_dict(strict=True), failing with one message that lists every missing, unexpected and
    misshapen key."""
    from model import key_report  # the DiT chapter's rule, shared by every loader of this project
    missing, unexpected, misshapen = key_report({k: tuple(v.shape) for k, v in module.state_dict().items()}, state)
    if missing or unexpected or misshapen:
        def show(items):
            return ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "") or "none"
        raise ValueError(f"{where} does not match the model built for it:\n  missing keys: {show(missing)}\n"
                         f"  unexpected keys: {show(unexpected)}\n  misshapen keys: {show(misshapen)}")
    module.load_state_dict(state, strict=True)


def save_autoencoder(ae, path):
    """Write `ae` as one `.safetensors`: encoder.* (Meta DINOv3 layout), decoder.*, extra_vit.* (R), with
    `ae.config` as JSON in the metadata, so that load_autoencoder rebuilds it without guessing."""
    if not str(path).endswith(".safetensors"):
        raise ValueError(f"save_autoencoder writes safetensors; name the file *.safetensors, not {path!r}")
    tensors = {k: v.detach().contiguous().cpu() for k, v in ae.state_dict().items()}
    save_file(tensors, path, metadata=dict(format=FILE_FORMAT, config=json.dumps(ae.config)))


def _read_checkpoint(path, map_location):
    """→ (flat {key: tensor}, our config dict or None)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"autoencoder checkpoint {path!r} does not exist")
    try:
        if str(path).endswith(".safetensors"):
            with safe_open(path, framework="pt", device=str(map_location)) as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
            return state, json.loads(meta["config"]) if meta.get("format") == FILE_FORMAT else None
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated copy, another format, ...: say which file
        raise ValueError(f"could not read autoencoder checkpoint {str(path)!r} ({type(e).__name__}: {e}); the file "
                         "is truncated or not a PyTorch/safetensors checkpoint, copy or download it again") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]                             # a Lightning checkpoint
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{path!r} is neither a Lightning .ckpt (with a 'state_dict') nor a state dict of tensors")
    return obj, None


def _split_parts(state, where):
    """{prefix: sub-state-dict} for encoder / decoder / extra_vit; a bare decoder state dict is decoder."""
    if "conv_in.weight" in state and "decoder.conv_in.weight" not in state:
        return dict(encoder={}, decoder=dict(state), extra_vit={})
    parts, unknown = dict(encoder={}, decoder={}, extra_vit={}), []
    for key, tensor in state.items():
        prefix, _, rest = key.partition(".")
        if prefix in parts:
            parts[prefix][rest] = tensor
        elif prefix not in IGNORED_PREFIXES:
            unknown.append(key)
    if not parts["decoder"]:
        raise ValueError(f"{where} has no decoder weights (no 'decoder.conv_in.weight'); first keys: "
                         f"{list(state)[:6]}. Is it an SVG-T2I autoencoder checkpoint?")
    if unknown:
        warnings.warn(f"{where}: ignoring {len(unknown)} keys outside encoder./decoder./extra_vit.: {unknown[:5]}")
    return parts


def _infer_decoder_config(state, where):
    """Decoder(...) arguments from the tensor shapes: z_channels from conv_in, widths from each level's
    first ResnetBlock, num_res_blocks from how many blocks level 0 has."""
    try:
        levels = sorted({int(k.split(".")[1]) for k in state if k.startswith("up.")})
        widths = [state[f"up.{i}.block.0.conv1.weight"].shape[0] for i in levels]
        n_blocks = len({k.split(".")[3] for k in state if k.startswith("up.0.block.")})
        z_channels, out_ch = state["conv_in.weight"].shape[1], state["conv_out.weight"].shape[0]
    except KeyError as err:
        raise ValueError(f"{where}: decoder key {err} is missing; the file is truncated or not an LDM decoder")
    ch = widths[0]
    if levels != list(range(len(levels))) or any(w % ch for w in widths):
        raise ValueError(f"{where}: decoder levels {levels} with widths {widths} are not an LDM decoder layout")
    return dict(z_channels=z_channels, ch=ch, ch_mult=tuple(w // ch for w in widths),
                num_res_blocks=n_blocks - 1, out_ch=out_ch)


def _infer_residual_config(state, where):
    """ResidualViT(...) arguments from the tensor shapes. The head count is not in any shape (`freqs` is
    [2, depth, embed_dim/2] for every head count): DeiT's 64-wide heads are assumed (released: 384/64 = 6)."""
    if "conv_proj.weight" in state:
        raise ValueError(f"{where}: extra_vit.* is a torchvision ViT (original SVG's residual branch), not "
                         f"SVG-T2I's RoPE ViT; this file cannot be loaded here")
    try:
        dim, patch = state["cls_token"].shape[-1], state["patch_embed.proj.weight"].shape[-1]
        return dict(embed_dim=dim, depth=len({k.split(".")[1] for k in state if k.startswith("blocks.")}),
                    num_heads=max(1, dim // 64), out_dim=state["heads.2.weight"].shape[0], patch_size=patch,
                    img_size=math.isqrt(state["freqs_t_x"].numel()) * patch)
    except KeyError as err:
        raise ValueError(f"{where}: residual ViT key extra_vit.{err.args[0]} is missing; the file is truncated")


def _dinov3_from_state_dict(state, where, config=None):
    """A DINOv3 from Meta-layout tensors: our files store its config; for a released `.ckpt` it is read off
    the shapes by dino.py's own inference (the same one `load_dinov3` uses)."""
    model = dino.DINOv3(**(config or dino._infer_config(state, where)))
    _load_strict(model, state, where)
    return model.eval().requires_grad_(False)


def load_autoencoder(path, map_location="cpu", encoder=None, kind=None):
    """Load an Autoencoder from a released `.ckpt`, a decode-only file, or our own `.safetensors`.

    Strict on every part it builds (decoder, residual ViT, encoder); `loss.*` and `norm_vit.*` are ignored.
    encoder: a DINOv3 to attach instead of the file's `encoder.*` (needed to encode with a decode-only file).
    kind: 'P' or 'R' to insist on one; loading the other kind is then an error (the released R yamls are
    P copies with z_channels 384, so a 392-channel R file in a 384-channel model is the usual mistake).
    """
    where = f"autoencoder checkpoint {str(path)!r}"
    state, config = _read_checkpoint(path, map_location)
    parts = _split_parts(state, where)

    decoder = Decoder(**(config["decoder"] if config else _infer_decoder_config(parts["decoder"], where)))
    _load_strict(decoder, parts["decoder"], f"{where} (decoder.*)")
    residual = None
    if parts["extra_vit"]:
        residual_cfg = config["residual"] if config else _infer_residual_config(parts["extra_vit"], where)
        residual = ResidualViT(**residual_cfg)
        _load_strict(residual, parts["extra_vit"], f"{where} (extra_vit.*)")
    if encoder is None and parts["encoder"]:
        encoder = _dinov3_from_state_dict(parts["encoder"], f"{where} (encoder.*)",
                                          config["encoder"] if config else None)

    ae = Autoencoder(encoder, decoder, residual).to(map_location)
    if kind is not None and ae.kind != kind:
        raise ValueError(f"{where} is an Autoencoder-{ae.kind} checkpoint (decoder.conv_in takes "
                         f"{decoder.z_channels} channels, {'with' if residual is not None else 'no'} extra_vit.*), "
                         f"but kind={kind!r} was asked for; load the matching file (R files take 392 channels)")
    return ae.eval()

