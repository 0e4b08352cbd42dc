"""DINOv3 ViT: the frozen image encoder whose patch features are SVG-T2I's latent space.

Where it sits in the pipeline: an image of H x W pixels, ImageNet-normalised (`imagenet_normalize`), goes
through DINOv3 ViT-S+/16; the final-LayerNorm patch tokens, reshaped to `[B, 384, H/16, W/16]`, are the
"latent" the Next-DiT diffuses in (KlingTeam/SVG-T2I `svg_t2i/ldm/models/dinov3_decoder_native_resolution.py`,
`encode`). The CLS token and the 4 register ("storage") tokens are computed but dropped. Before diffusion
the latent is normalised per channel with released statistics (`LatentStats`).

Why a self-supervised encoder's features can be a diffusion latent (paper §3.1): a VAE latent is trained
only to reconstruct pixels and has little semantic structure. DINOv3 (Siméoni et al. 2025, arXiv 2508.10104)
was trained without labels to describe what an image contains, so nearby features mean similar content, and
one frozen encoder can serve both understanding and generation. Its training set is LVD-1689M, 1.689 billion
web images that Meta curated for diversity (Meta also released a ViT-L and a 7B trained on SAT-493M, 493
million satellite images). The features were never trained to reconstruct, so a pixel decoder is trained afterwards
on the frozen features (autoencoder.py). The price is width: 384 channels at 1/16 of the resolution are
384 / (16*16) = 1.5 numbers per pixel, against 4 / (8*8) = 0.0625 for Stable Diffusion's VAE (4 channels at
1/8), 24 times more. The DiT's sequence stays ordinary: it uses patch size 1, so a 1024^2 image is
64 x 64 = 4,096 tokens, as many as SD's 128 x 128 latent cut into 2 x 2 patches; each token is just 384 wide.

This file re-implements Meta's `DinoVisionTransformer` (facebookresearch/dinov3
`dinov3/models/vision_transformer.py`) from scratch, with the key layout of Meta's released `.pth` files.
Reading order: RoPE -> attention -> block -> DINOv3 -> imagenet_normalize, LatentStats (pixels in, the DiT's
latent out). Below the banner: the standard layers (patch embedding, feed-forwards, LayerScale), the released
variants (DINOV3_CONFIGS), loading files, the statistics' files and sums, image files to tensors.
"""
import hashlib
import json
import math
import os
import re
from functools import lru_cache

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

# SVG-T2I's encoder is DINOV3_CONFIGS['vits16plus'] (the table of released variants is below the banner):
# width 384, 12 blocks of 6 heads, SwiGLU feed-forward, patch 16, 4 register tokens, RoPE base 100.
NORM_EPS = 1e-5                           # every release: the official "layernormbf16" is LayerNorm(eps=1e-5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)     # the LVD-1689M models' input statistics (official README); SVG-T2I's
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----- Rotary position embedding (RoPE) --------------------------------------------------------------------

class RopePositionEmbedding(nn.Module):
    """Axial 2-D RoPE tables for an h x w grid of patches (dinov3 `dinov3/layers/rope_position_encoding.py`).

    The first of this project's four RoPEs (then Gemma's 1-D one, text.py; the DiT's three axes, model.py;
    the residual ViT's learned RoPE-Mixed, autoencoder.py). Patch centres get coordinates in (-1, 1) along y
    and x separately, so any grid size and aspect ratio works without interpolation. A head of width Dh
    spends Dh/4 frequencies on y and Dh/4 on x, laid out [y, x, y, x] over Dh for the rotate-half pairing.
    """

    def __init__(self, head_dim: int, base: float, rescale_coords: float | None = None):
        super().__init__()
        _check_head_dim(head_dim)
        # periods[k] = base ** (4k / Dh), k < Dh/4: 1 ... ~75 for Dh = 64, base = 100. Persistent: the Meta files
        # store it (bf16-rounded), and those values are what SVG-T2I's latent statistics were computed with.
        k = torch.arange(head_dim // 4, dtype=torch.float32)
        self.register_buffer("periods", base ** (2 * k / (head_dim // 2)))
        # The official training-time augmentation (coords times a log-uniform factor in [1/r, r]); a frozen
        # encoder must never use it, so it is off unless asked for.
        self.rescale_coords = rescale_coords

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` must not round the periods again: keep the fp32 buffer, follow the device
        # (the official RoPE module, too, computes in fp32 whatever the weights are cast to).
        before = self.periods
        super()._apply(fn, recurse)
        if not before.is_meta:
            self.periods = before.to(device=self.periods.device, dtype=torch.float32)
        return self

    def forward(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (sin, cos), each [h*w, Dh], for patches in row-major order; always in fp32."""
        periods = self.periods
        dev = periods.device
        coords_y = torch.arange(0.5, h, device=dev, dtype=torch.float32) / h  # patch centres in (0, 1)
        coords_x = torch.arange(0.5, w, device=dev, dtype=torch.float32) / w
        coords = torch.stack(torch.meshgrid(coords_y, coords_x, indexing="ij"), dim=-1).flatten(0, 1)  # [hw, 2]
        coords = 2.0 * coords - 1.0  # -> (-1, 1)
        if self.training and self.rescale_coords is not None:
            log_r = math.log(self.rescale_coords)
            coords = coords * torch.empty(1, device=dev).uniform_(-log_r, log_r).exp()
        # Divide by the periods (the official op order) rather than multiply by 1/periods (HF's).
        angles = 2 * math.pi * coords[:, :, None] / periods[None, None, :]  # [hw, 2, Dh/4]
        angles = angles.flatten(1, 2).tile(2)  # [hw, Dh] = [y-angles, x-angles, y-angles, x-angles]
        return torch.sin(angles), torch.cos(angles)


def apply_rope(t: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotate t [..., N, Dh] by tables [N, Dh], in fp32 whatever the activation dtype (official behaviour).

    DINOv3 rotates only the patch tokens: forward_features gives the leading CLS and register rows angle 0
    (cos 1, sin 0), which leaves them as they are, with no split and re-concatenation of the sequence.
    """
    t32 = t.float()
    a, b = t32.chunk(2, dim=-1)  # rotate-half pairing: dim i turns with dim i + Dh/2
    return (t32 * cos + torch.cat([-b, a], dim=-1) * sin).to(t.dtype)


# ----- Attention and block --------------------------------------------------------------------------------

class SelfAttention(nn.Module):
    """Multi-head self-attention over [CLS, registers, patches] with RoPE on the patch tokens only."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        # Rows of qkv.weight: [0:D] q, [D:2D] k, [2D:3D] v. The bias goes through a mask that the released
        # files set to zero (LinearKMaskedBias, below the banner), so the loaded model has no qkv bias.
        self.qkv = LinearKMaskedBias(dim) if qkv_bias else nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)  # [B, N, 3, heads, Dh]
        qkv = qkv.permute(2, 0, 3, 1, 4)  # [3, B, heads, N, Dh]
        q, k = apply_rope(qkv[:2], *rope).unbind(0)  # q and k rotated in one pass; v is never rotated
        out = F.scaled_dot_product_attention(q, k, qkv[2])  # scale 1/sqrt(Dh), no mask
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class Block(nn.Module):
    """Pre-norm ViT block: x + ls1(attn(norm1 x)), then x + ls2(mlp(norm2 x)).

    ls = LayerScale, a learned per-channel gamma starting at 1e-5, so each block starts near the identity and a
    deep stack trains stably (CaiT, Touvron et al. 2021); mlp = Mlp, fc2(GELU(fc1 x)), or SwiGLUFFN,
    w3(SiLU(w1 x) * w2 x) (the "plus" models and 7B). Standard layers, below the banner with PatchEmbed.
    """

    def __init__(self, dim, num_heads, ffn_layer, ffn_ratio, qkv_bias, layerscale_init):
        super().__init__()
        hidden = ffn_hidden_dim(dim, ffn_layer, ffn_ratio)  # official rounding (below the banner); ViT-S+: 1536
        self.norm1 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.attn = SelfAttention(dim, num_heads, qkv_bias)
        self.ls1 = LayerScale(dim, layerscale_init)
        self.norm2 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.mlp = Mlp(dim, hidden) if ffn_layer == "mlp" else SwiGLUFFN(dim, hidden)
        self.ls2 = LayerScale(dim, layerscale_init)

    def forward(self, x: torch.Tensor, rope) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), rope))
        return x + self.ls2(self.mlp(self.norm2(x)))


# ----- The model -------------------------------------------------------------------------------------------

class DINOv3(nn.Module):
    """DINOv3 Vision Transformer; `state_dict()` has exactly the keys and shapes of Meta's `.pth` files.

    Arguments are the official constructor names (DINOV3_CONFIGS). Nothing assumes patch 16: the demo encoder
    uses e.g. patch_size=8, embed_dim=64. `pos_embed_rope_rescale_coords` enables the official train-mode RoPE
    augmentation; leave it None for a frozen encoder.
    """

    def __init__(self, patch_size=16, embed_dim=384, depth=12, num_heads=6, ffn_layer="mlp", ffn_ratio=4.0,
                 n_storage_tokens=4, qkv_bias=True, layerscale_init=1e-5, pos_embed_rope_base=100.0,
                 untie_global_and_local_cls_norm=False, in_chans=3, pos_embed_rope_rescale_coords=None):
        super().__init__()
        _check_config(embed_dim, num_heads, ffn_layer, ffn_ratio)
        self.config = dict(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                           ffn_layer=ffn_layer, ffn_ratio=ffn_ratio, n_storage_tokens=n_storage_tokens,
                           qkv_bias=qkv_bias, layerscale_init=layerscale_init,
                           pos_embed_rope_base=pos_embed_rope_base,
                           untie_global_and_local_cls_norm=untie_global_and_local_cls_norm, in_chans=in_chans)
        self.patch_size, self.embed_dim, self.n_storage_tokens = patch_size, embed_dim, n_storage_tokens

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        if n_storage_tokens > 0:
            # Register tokens (Darcet et al. 2024, "Vision Transformers Need Registers"): extra learned tokens
            # that give attention a place to store global information, so patch features stay clean.
            self.storage_tokens = nn.Parameter(torch.zeros(1, n_storage_tokens, embed_dim))
        # Used only in training, by iBOT (Zhou et al. 2022, arXiv 2111.07832), DINOv2/v3's masked-image-
        # modelling loss: masked patches are replaced by this token and the student predicts the teacher's
        # features for them. Kept so that the released files load strictly.
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)  # one strided p x p conv -> [B, hw, D]
        self.rope_embed = RopePositionEmbedding(embed_dim // num_heads, pos_embed_rope_base,
                                                pos_embed_rope_rescale_coords)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, ffn_layer, ffn_ratio, qkv_bias, layerscale_init) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=NORM_EPS)
        if untie_global_and_local_cls_norm:
            # Training-only norm for the CLS token of local crops (ViT-L SAT, 7B); kept to load strictly.
            self.local_cls_norm = nn.LayerNorm(embed_dim, eps=NORM_EPS)
        _init_weights(self)

    def forward_features(self, x: torch.Tensor) -> dict:
        """x [B, 3, H, W] ImageNet-normalised, H and W multiples of the patch size.

        Returns the official dict: x_norm_clstoken [B, D], x_storage_tokens [B, R, D] (normalised, despite
        the name), x_norm_patchtokens [B, h*w, D] (row-major), x_prenorm [B, 1+R+h*w, D] (last block output).
        """
        _check_images(self, x)
        B = x.shape[0]
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        patches = self.patch_embed(x)  # [B, hw, D]
        prefix = [self.cls_token.expand(B, -1, -1)]  # [B, 1, D]
        if self.n_storage_tokens > 0:
            prefix.append(self.storage_tokens.expand(B, -1, -1))  # [B, R, D]
        tokens = torch.cat(prefix + [patches], dim=1)  # [B, 1+R+hw, D]; no additive position embedding
        sin, cos = self.rope_embed(h, w)  # [hw, Dh], computed once: every block and head shares them
        # Angle 0 for the 1 + R prefix tokens (CLS, registers): DINOv3 does not rotate them.
        n_prefix = 1 + self.n_storage_tokens
        rope = (F.pad(sin, (0, 0, n_prefix, 0)), F.pad(cos, (0, 0, n_prefix, 0), value=1.0))  # [N, Dh] each
        for block in self.blocks:
            tokens = block(tokens, rope)
        normed = self.norm(tokens)
        return dict(x_norm_clstoken=normed[:, 0], x_storage_tokens=normed[:, 1:n_prefix],
                    x_norm_patchtokens=normed[:, n_prefix:], x_prenorm=tokens)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The SVG-T2I latent: final-norm patch tokens as a feature map [B, D, H/p, W/p].

        Under no_grad because the encoder is frozen (the official training computed and discarded its gradients).
        """
        patch_tokens = self.forward_features(x)["x_norm_patchtokens"]  # [B, hw, D]
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        return patch_tokens.transpose(1, 2).reshape(x.shape[0], self.embed_dim, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as `encode`: the only output this project uses."""
        return self.encode(x)


# ----- From pixels to the DiT's latent ---------------------------------------------------------------------

def imagenet_normalize(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] [B, 3, H, W] -> the ImageNet-normalised input DINOv3 (and the residual ViT) read.

    The data loader keeps images in [-1, 1], the range the pixel decoder is trained to output and its
    losses compare. DINOv3 was trained on ImageNet-normalised pixels, so the encoder side converts:
    (x + 1) / 2 back to [0, 1], then (x - mean) / std per colour channel, the formula of the official
    autoencoder (KlingTeam/SVG-T2I `svg_t2i/ldm/models/dinov3_decoder_native_resolution.py`,
    `get_input_list`). The one place this normalisation is written: images_to_latents,
    Autoencoder.encode and `preprocess` call it.
    """
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((images + 1) / 2 - mean) / std


@torch.no_grad()
def images_to_latents(dino_model: "DINOv3", images: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1] -> raw DINOv3 patch features [B, C, H/p, W/p] (fp32; the model frozen, in
    eval). The DiT's x1 is these, normalised per channel by LatentStats below."""
    return dino_model.encode(imagenet_normalize(images))


class LatentStats:
    """Per-channel mean/std of encoder latents; the DiT sees (z - mean) / (std + eps).

    Why per channel: the DiT's noise is N(0, 1) in every channel, while DINOv3's 384 channels have very
    different scales: in the released statistics (final row) the channel means run from -1.82 to 3.54 and
    the stds from 0.16 to 1.55. Left as they are, halfway along the path (t = 0.5, half data, half noise)
    a std-0.16 channel would have a signal-to-noise power ratio of 0.16² ≈ 0.03 and a std-1.55 channel
    1.55² ≈ 2.4: one timestep would mean a different noise level in each channel. Normalised, every channel
    has mean 0 and std 1 like the noise, and a timestep means the same for all of them.

    The released file (KlingTeam/SVG-T2I `svg_t2i/pre-trained/dinov3_s16p_layer_patchtoken_stats_dist.pt`)
    is a torch dict {'mean': [12, 384], 'std': [12, 384]}, one row per block; SVG-T2I uses row -1, the
    statistics of the final-norm patch tokens that `DINOv3.encode` returns. Training normalises with
    (z - mean) / (std + 1e-8) (`svg_t2i/train_svg_t2i.py`); sampling inverts with z * std + mean, no eps
    (`svg_t2i/sample_svg_t2i.py`). Note: official training cast mean/std to bf16 first (effective
    |d mean| <= 5e-3); we keep fp32, which is what sampling used.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-8):
        mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        if mean.ndim != 1 or mean.shape != std.shape:
            raise ValueError(f"mean and std must be 1-D of equal length, got {list(mean.shape)} and {list(std.shape)}")
        self.mean, self.std, self.eps = mean, std, eps

    # Reading, writing and accumulating the statistics: module functions below the banner.
    @classmethod
    def load(cls, path: str, layer: int = -1) -> "LatentStats":  # row `layer` of a stats file (-1, as SVG-T2I)
        return cls(*_read_stats(path, layer))

    @classmethod
    def from_latents(cls, latents) -> "LatentStats":  # over an iterable of latent batches [B, C, h, w]
        return cls(*_stats_of_latents(latents))

    @classmethod
    def over_images(cls, dino_model: "DINOv3", dataset, device, n: int = 2048, batch_size: int = 64) -> "LatentStats":
        return cls.from_latents(_latents_of_images(dino_model, dataset, device, n, batch_size))  # first n images

    def save(self, path: str):  # the released format, a single row
        _write_stats(self, path)

    def _shaped(self, z: torch.Tensor):
        if z.ndim != 4 or z.shape[1] != self.mean.numel():
            raise ValueError(f"latent must be [B, {self.mean.numel()}, h, w], got shape {list(z.shape)}")
        view = (1, -1, 1, 1)
        return self.mean.to(z).view(view), self.std.to(z).view(view)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Encoder latent [B, C, h, w] -> the DiT's roughly unit-variance space."""
        mean, std = self._shaped(z)
        return (z - mean) / (std + self.eps)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """DiT sample [B, C, h, w] -> encoder latent for the pixel decoder (official sampling: no eps)."""
        mean, std = self._shaped(z)
        return z * std + mean


# ===========================================================================================================
# Standard layers, released variants, checks, files. A first reading can skip everything below: patch embedding,
# feed-forwards, LayerScale, the variant table, input checks, loading Meta / HF checkpoints, the latent
# statistics' files and sums, and turning PIL images into tensors; no new ideas.
# ===========================================================================================================

# ----- Standard layers: patch embedding, feed-forwards, LayerScale ----------------------------------------

class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> D channels, one strided conv (no norm, no absolute position)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, D, h, w] -> [B, h*w, D], row-major


class Mlp(nn.Module):
    """fc2(GELU(fc1(x))), exact erf GELU (ViT-S, B, L; also the residual ViT's, autoencoder.py)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """w3(SiLU(w1 x) * w2 x) (the "plus" models and 7B). w1 is the gate, w2 the linear branch, w3 the output."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch, gamma [D] (why it starts at 1e-5: Block's docstring)."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


# ----- Presets ---------------------------------------------------------------------------------------------
# The released ViTs, from facebookresearch/dinov3 `dinov3/hub/backbones.py`. Keys are the official
# constructor argument names, so `DINOv3(**DINOV3_CONFIGS['vits16plus'])` reads like the hub code.
# Shared by every release: patch 16, 4 storage (register) tokens, RoPE base 100, LayerScale (init 1e-5).
_SHARED = dict(patch_size=16, n_storage_tokens=4, layerscale_init=1e-5, pos_embed_rope_base=100.0)

DINOV3_CONFIGS = {
    # name           width          depth      heads         FFN type and ratio               qkv bias
    "vits16": dict(_SHARED, embed_dim=384, depth=12, num_heads=6, ffn_layer="mlp", ffn_ratio=4.0,
                   qkv_bias=True, untie_global_and_local_cls_norm=False),
    "vits16plus": dict(_SHARED, embed_dim=384, depth=12, num_heads=6, ffn_layer="swiglu", ffn_ratio=6.0,
                       qkv_bias=True, untie_global_and_local_cls_norm=False),  # SVG-T2I's encoder
    "vitb16": dict(_SHARED, embed_dim=768, depth=12, num_heads=12, ffn_layer="mlp", ffn_ratio=4.0,
                   qkv_bias=True, untie_global_and_local_cls_norm=False),
    # 'vitl16' is the LVD-1689M release; the SAT-493M one additionally has `local_cls_norm` (untie=True),
    # which `load_dinov3` infers from the file.
    "vitl16": dict(_SHARED, embed_dim=1024, depth=24, num_heads=16, ffn_layer="mlp", ffn_ratio=4.0,
                   qkv_bias=True, untie_global_and_local_cls_norm=False),
    "vitl16plus": dict(_SHARED, embed_dim=1024, depth=24, num_heads=16, ffn_layer="swiglu", ffn_ratio=6.0,
                       qkv_bias=True, untie_global_and_local_cls_norm=False),
    "vith16plus": dict(_SHARED, embed_dim=1280, depth=32, num_heads=20, ffn_layer="swiglu", ffn_ratio=6.0,
                       qkv_bias=True, untie_global_and_local_cls_norm=False),
    # 7B: head dim 128, no qkv bias at all, SwiGLU hidden rounded up to a multiple of 64.
    "vit7b16": dict(_SHARED, embed_dim=4096, depth=40, num_heads=32, ffn_layer="swiglu64", ffn_ratio=3.0,
                    qkv_bias=False, untie_global_and_local_cls_norm=True),
}

# SwiGLU hidden sizes are rounded up to a multiple of this (official `ffn_layer_dict`; plain "swiglu" is 8).
SWIGLU_ALIGN = {"swiglu": 8, "swiglu32": 32, "swiglu64": 64, "swiglu128": 128}


def ffn_hidden_dim(embed_dim: int, ffn_layer: str, ffn_ratio: float) -> int:
    """Hidden width of the feed-forward net, exactly as the official code computes it.

    "mlp": int(D * ratio). SwiGLU keeps the parameter count of an MLP of that width: two thirds of it,
    rounded *up* to the alignment of its kind (ViT-S+: int(int(384*6) * 2/3) = 1536; 7B: 8192).
    """
    hidden = int(embed_dim * ffn_ratio)
    if ffn_layer == "mlp":
        return hidden
    hidden = int(hidden * 2 / 3)
    if ffn_layer not in SWIGLU_ALIGN:
        raise ValueError(f"unknown ffn_layer {ffn_layer!r}: use 'mlp' or one of {sorted(SWIGLU_ALIGN)}")
    return hidden + (-hidden % SWIGLU_ALIGN[ffn_layer])


# ----- The parts of the model that only serve the released files and bad input -----------------------------

class LinearKMaskedBias(nn.Linear):
    """The fused q|k|v projection. Its bias is multiplied by the persistent buffer `bias_mask`.

    The official model was meant to have q and v biases but no k bias (a k bias is nearly pointless), and
    implemented that with a mask: [1]*D + [0]*D + [1]*D. The *released* files store an all-zero mask (and
    all-zero biases, facebookresearch/dinov3#195), so the loaded model has no qkv bias at all; we apply
    whatever mask the file holds.
    """

    def __init__(self, dim: int):
        super().__init__(dim, 3 * dim, bias=True)
        mask = torch.ones(3 * dim)
        mask[dim: 2 * dim] = 0.0  # the k third
        self.register_buffer("bias_mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias * self.bias_mask)


def _check_head_dim(head_dim: int):
    if head_dim % 4:
        raise ValueError(f"RoPE needs a head dim divisible by 4 (2 axes x cos/sin pairs), got {head_dim}")


def _check_config(embed_dim: int, num_heads: int, ffn_layer: str, ffn_ratio: float):
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
    ffn_hidden_dim(embed_dim, ffn_layer, ffn_ratio)  # validates ffn_layer early, with a clear message


@torch.no_grad()
def _init_weights(model: DINOv3):
    """The official random init: truncated-normal(0.02) linears with zero bias, N(0, 0.02) tokens.

    Only matters for models that are not loaded from a file (the demo encoder); LayerScale gammas
    and the bias mask are already set by their modules, the patch conv keeps PyTorch's default.
    """
    nn.init.normal_(model.cls_token, std=0.02)
    if model.n_storage_tokens > 0:
        nn.init.normal_(model.storage_tokens, std=0.02)
    for m in model.blocks.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _check_images(model: DINOv3, x: torch.Tensor):
    if x.ndim != 4 or x.shape[1] != model.patch_embed.proj.in_channels:
        raise ValueError(f"DINOv3 expects images [B, {model.patch_embed.proj.in_channels}, H, W], "
                         f"got shape {list(x.shape)}")
    H, W = x.shape[-2:]
    p = model.patch_size
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} (HxW) is not a multiple of the patch size {p}: resize or "
                         f"crop it to e.g. {max(p, H // p * p)}x{max(p, W // p * p)} first (the official "
                         f"code would silently drop the last rows/columns)")


# ----- Loading and saving ----------------------------------------------------------------------------------
# Three file kinds load through one door, all ending as a Meta-layout state dict:
#   * Meta's `.pth` (flat state dict; periods stored, bf16-rounded in the releases);
#   * HF `model.safetensors` or its folder (HF names, split q/k/v, no k bias, no periods -> recomputed);
#   * our own `.safetensors` in the Meta layout (`save_dinov3`, used for the demo encoder).
# The config is read off the tensor shapes, then the model is built and loaded strictly.

def _read_tensors(path: str) -> dict:
    """Read a flat {name: tensor} dict from a .pth / .pt or .safetensors file, with readable errors."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated download, wrong format, ...
        raise ValueError(f"could not read checkpoint {path!r} ({type(e).__name__}: {e}). The file may be "
                         f"truncated or not a PyTorch/safetensors checkpoint; download it again.") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        keys = list(sd)[:8] if isinstance(sd, dict) else type(sd).__name__
        raise ValueError(f"{path!r} is not a flat state dict of tensors (found {keys}); DINOv3 files from "
                         f"Meta are flat dicts such as {{'cls_token': ..., 'blocks.0.norm1.weight': ...}}")
    return sd


def _verify_hash(path: str):
    """Check the `-xxxxxxxx` suffix of an official file name against the file's SHA-256 (torch.hub rule)."""
    match = re.search(r"-([0-9a-f]{6,})\.[A-Za-z]+$", os.path.basename(path))
    if match is None:
        raise ValueError(f"check_hash=True but {os.path.basename(path)!r} has no '-<sha256 prefix>' suffix "
                         f"(official names look like dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth)")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if not digest.hexdigest().startswith(match.group(1)):
        raise ValueError(f"hash mismatch for {path!r}: the name says {match.group(1)}, the file's sha256 starts "
                         f"{digest.hexdigest()[:len(match.group(1))]}. The download is corrupt or incomplete.")


def _periods(head_dim: int, base: float, bf16: bool) -> torch.Tensor:
    periods = base ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2))
    return periods.to(torch.bfloat16).float() if bf16 else periods


def hf_to_meta(hf_sd: dict, num_heads: int, rope_base: float = 100.0, bf16_periods: bool = False) -> dict:
    """Rename an HF `DINOv3ViTModel` state dict to the Meta layout (the inverse of HF's converter).

    q/k/v are fused into `qkv`. HF has no k bias, so the k third of the bias is zero and the mask is
    [1, 0, 1], which makes both layouts compute the same thing. HF stores no RoPE periods: they are
    recomputed in fp32 as HF does, or bf16-rounded like the Meta releases if `bf16_periods`.
    Keys that do not map stay under their HF names, so the strict load reports them as unexpected.
    """
    # transformers 5.x names blocks `model.layer.*` in memory (files keep `layer.*`): accept both.
    sd = {k[len("model."):] if k.startswith("model.layer.") else k: v for k, v in hf_sd.items()}
    out = {}

    def move(hf_key, meta_key):
        if hf_key in sd:
            out[meta_key] = sd.pop(hf_key)

    for hf_key, meta_key in [("embeddings.cls_token", "cls_token"), ("embeddings.register_tokens", "storage_tokens"),
                             ("embeddings.mask_token", "mask_token"),
                             ("embeddings.patch_embeddings.weight", "patch_embed.proj.weight"),
                             ("embeddings.patch_embeddings.bias", "patch_embed.proj.bias"),
                             ("norm.weight", "norm.weight"), ("norm.bias", "norm.bias")]:
        move(hf_key, meta_key)
    if "mask_token" in out:
        out["mask_token"] = out["mask_token"].reshape(1, -1)  # HF [1, 1, D] -> Meta [1, D]

    layer_ids = {int(m.group(1)) for k in sd if (m := re.match(r"layer\.(\d+)\.", k))}
    for i in sorted(layer_ids):
        a, b = f"layer.{i}.", f"blocks.{i}."
        gated = a + "mlp.gate_proj.weight" in sd
        renames = {"norm1": "norm1", "norm2": "norm2", "attention.o_proj": "attn.proj",
                   **({"mlp.gate_proj": "mlp.w1", "mlp.up_proj": "mlp.w2", "mlp.down_proj": "mlp.w3"} if gated
                      else {"mlp.up_proj": "mlp.fc1", "mlp.down_proj": "mlp.fc2"})}
        for hf_name, meta_name in renames.items():
            for p in ("weight", "bias"):
                move(f"{a}{hf_name}.{p}", f"{b}{meta_name}.{p}")
        move(a + "layer_scale1.lambda1", b + "ls1.gamma")
        move(a + "layer_scale2.lambda1", b + "ls2.gamma")
        qkv = [a + f"attention.{p}_proj.weight" for p in "qkv"]
        if all(n in sd for n in qkv):
            out[b + "attn.qkv.weight"] = torch.cat([sd.pop(n) for n in qkv])  # [3D, D], rows q | k | v
        q_bias, v_bias = a + "attention.q_proj.bias", a + "attention.v_proj.bias"
        if q_bias in sd and v_bias in sd:
            zeros = torch.zeros_like(sd[q_bias])
            out[b + "attn.qkv.bias"] = torch.cat([sd.pop(q_bias), zeros, sd.pop(v_bias)])
            out[b + "attn.qkv.bias_mask"] = torch.cat([zeros + 1, zeros, zeros + 1])
    out.update(sd)  # whatever did not map
    if "patch_embed.proj.weight" in out:
        head_dim = out["patch_embed.proj.weight"].shape[0] // num_heads
        out["rope_embed.periods"] = _periods(head_dim, rope_base, bf16_periods)
    return out


def _infer_config(sd: dict, where: str) -> dict:
    """Read a DINOv3 constructor config off the shapes of a Meta-layout state dict.

    Tolerant of missing keys (so that the strict load afterwards can list them all); raises only when
    the file does not look like DINOv3 at all. A file whose shapes match a released variant gets that
    variant's exact preset (e.g. 'swiglu64' for 7B, which shapes alone cannot tell from 'swiglu').
    """
    w = sd.get("patch_embed.proj.weight")
    block_ids = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if w is None or w.ndim != 4 or not block_ids:
        raise ValueError(f"{where} does not look like a DINOv3 ViT checkpoint: no 'patch_embed.proj.weight' "
                         f"(Meta layout) / 'embeddings.patch_embeddings.weight' (HF layout) or no blocks. "
                         f"First keys: {list(sd)[:6]}")
    dim, in_chans, patch_size = w.shape[0], w.shape[1], w.shape[-1]
    periods = sd.get("rope_embed.periods")
    head_dim = 4 * periods.numel() if periods is not None else 64  # 64: every release but 7B
    if dim % head_dim:
        raise ValueError(f"{where}: head dim {head_dim} (4 x the length of 'rope_embed.periods', 64 if absent) "
                         f"does not divide embed_dim {dim}")
    storage = sd.get("storage_tokens")
    cfg = dict(patch_size=patch_size, embed_dim=dim, depth=max(block_ids) + 1, num_heads=dim // head_dim,
               n_storage_tokens=storage.shape[1] if storage is not None else 0,
               qkv_bias=any(k.endswith("attn.qkv.bias") for k in sd),
               layerscale_init=1e-5, pos_embed_rope_base=100.0,  # init values only; the file overrides them
               untie_global_and_local_cls_norm="local_cls_norm.weight" in sd, in_chans=in_chans)
    gate = next((v for k, v in sd.items() if re.fullmatch(r"blocks\.\d+\.mlp\.w1\.weight", k)), None)
    fc1 = next((v for k, v in sd.items() if re.fullmatch(r"blocks\.\d+\.mlp\.fc1\.weight", k)), None)
    hidden = (gate if gate is not None else fc1).shape[0] if (gate is not None or fc1 is not None) else 4 * dim
    ffn_kinds = ["swiglu", "swiglu64", "swiglu32", "swiglu128"] if gate is not None else ["mlp"]

    for preset in DINOV3_CONFIGS.values():  # an exact released variant?
        same = all(preset[k] == cfg[k] for k in ("patch_size", "embed_dim", "depth", "num_heads",
                                                  "n_storage_tokens", "qkv_bias", "untie_global_and_local_cls_norm"))
        if same and preset["ffn_layer"] in ffn_kinds and \
                ffn_hidden_dim(dim, preset["ffn_layer"], preset["ffn_ratio"]) == hidden:
            return dict(preset, in_chans=in_chans)
    # Otherwise find a ratio that reproduces the hidden width (SwiGLU stores 2/3 of int(D * ratio)).
    for kind in ffn_kinds:
        width = hidden if kind == "mlp" else hidden * 3 / 2
        for ratio in (round(width / dim, 6), (math.floor(width) + 0.5) / dim):
            if ffn_hidden_dim(dim, kind, ratio) == hidden:
                return dict(cfg, ffn_layer=kind, ffn_ratio=ratio)
    raise ValueError(f"{where}: FFN hidden width {hidden} cannot come from any ffn_layer/ffn_ratio of DINOv3")


@lru_cache(maxsize=None)
def _preset_shapes(name: str) -> dict:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in DINOv3(**DINOV3_CONFIGS[name]).state_dict().items()}


def _closest_variant(sd: dict) -> str:
    """A phrase naming the released variant whose key/shape table best matches this state dict."""
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    best, best_hits = None, 0
    for name in DINOV3_CONFIGS:
        ref = _preset_shapes(name)
        hits = sum(ref.get(k) == s for k, s in shapes.items())
        if hits > best_hits:
            best, best_hits = name, hits
    if best is None:
        return "it matches no released DINOv3 variant"
    n = len(_preset_shapes(best))
    return f"it looks most like the released '{best}' ({best_hits} of its {n} keys present with the right shape)"


def _strict_load(model: DINOv3, sd: dict, where: str):
    """load_state_dict(strict=True) with one message listing every missing, unexpected and misshapen key."""
    from model import key_report  # the DiT chapter's rule, shared by every loader of this project
    missing, unexpected, misshapen = key_report({k: tuple(v.shape) for k, v in model.state_dict().items()}, sd)
    if missing or unexpected or misshapen:
        def show(items):
            return ", ".join(items[:10]) + (f", ... ({len(items)} in all)" if len(items) > 10 else "") or "none"
        raise ValueError(f"{where} does not match the DINOv3 it describes ({_closest_variant(sd)}).\n"
                         f"  missing keys: {show(missing)}\n  unexpected keys: {show(unexpected)}\n"
                         f"  misshapen keys: {show(misshapen)}\n"
                         f"The file is truncated, from another model, or was saved with different code.")
    model.load_state_dict(sd, strict=True)


def _read_folder(path: str) -> dict:
    """An HF folder: model.safetensors, or shards listed in model.safetensors.index.json (7B)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        sd = {}
        for shard in shards:
            sd.update(_read_tensors(os.path.join(path, shard)))
        return sd
    single = os.path.join(path, "model.safetensors")
    if not os.path.isfile(single):
        raise ValueError(f"folder {path!r} has no model.safetensors (or model.safetensors.index.json)")
    return _read_tensors(single)


def _read_hf_config(folder: str) -> dict:
    """config.json beside HF weights, if any (only the head count and RoPE base are needed from it)."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def load_dinov3(path: str, check_hash: bool = False, bf16_periods: bool = False) -> DINOv3:
    """Load a DINOv3 ViT from a Meta `.pth`, an HF `model.safetensors` / folder, or our Meta-layout
    `.safetensors`. The config is inferred from the tensors; loading is strict. Returns an eval-mode,
    frozen model.

    check_hash: verify the `-xxxxxxxx` SHA-256 prefix in an official file name (as torch.hub does).
    bf16_periods: for HF files only (which store no periods), round the recomputed RoPE periods to bf16
        like the Meta releases, i.e. what SVG-T2I's encoder and latent statistics used. The default (fp32)
        reproduces HF's own outputs. Meta files always keep the periods they store.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"DINOv3 checkpoint {path!r} does not exist")
    if check_hash:
        _verify_hash(path)
    sd = _read_folder(path) if os.path.isdir(path) else _read_tensors(path)
    is_hf = "embeddings.patch_embeddings.weight" in sd
    if is_hf:
        hf_config = _read_hf_config(path if os.path.isdir(path) else os.path.dirname(path))
        if hf_config.get("layer_norm_eps", NORM_EPS) != NORM_EPS:
            raise ValueError(f"{path!r}: config.json has layer_norm_eps={hf_config['layer_norm_eps']}; DINOv3 "
                             f"uses {NORM_EPS} and this implementation supports only that")
        dim = sd["embeddings.patch_embeddings.weight"].shape[0]
        num_heads = hf_config.get("num_attention_heads") or next(
            (c["num_heads"] for c in DINOV3_CONFIGS.values() if c["embed_dim"] == dim), None)
        if num_heads is None:
            raise ValueError(f"{path!r} is in the HF layout, which stores no RoPE periods, so the number of "
                             f"heads cannot be read off the tensors (width {dim} is no released variant): "
                             f"put the model's config.json next to it")
        sd = hf_to_meta(sd, num_heads, hf_config.get("rope_theta", 100.0), bf16_periods)
    where = f"checkpoint {path!r}" + (" (HF layout, converted to Meta names)" if is_hf else "")
    config = _infer_config(sd, where)
    if is_hf:
        config["pos_embed_rope_base"] = float(hf_config.get("rope_theta", 100.0))
    model = DINOv3(**config)
    _strict_load(model, sd, where)
    return model.eval().requires_grad_(False)


def save_dinov3(model: DINOv3, path: str):
    """Write the model's state dict, Meta key layout, as `.safetensors` (`load_dinov3` reads it back)."""
    from safetensors.torch import save_file
    if not path.endswith(".safetensors"):
        raise ValueError(f"save_dinov3 writes safetensors; name the file *.safetensors, not {path!r}")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, path)


# ----- LatentStats files and accumulation -----------------------------------------------------------------

def _read_stats(path: str, layer: int):
    """Read a stats file: {'mean': [L, C] or [C], 'std': same} -> (mean, std) of row `layer` (SVG-T2I: -1)."""
    try:
        stats = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"could not read latent statistics {path!r} ({type(e).__name__}: {e})") from e
    if not isinstance(stats, dict) or "mean" not in stats or "std" not in stats:
        found = list(stats) if isinstance(stats, dict) else type(stats).__name__
        raise ValueError(f"{path!r} is not a latent-statistics file: expected a dict with 'mean' and 'std' "
                         f"tensors of shape [layers, channels], found {found}")
    mean, std = stats["mean"], stats["std"]
    if mean.ndim == 2:
        mean, std = mean[layer], std[layer]
    return mean, std


@torch.no_grad()
def _stats_of_latents(latents):
    """(mean, std) per channel over an iterable of latent batches [B, C, h, w] (for encoders without a released
    file). Accumulated in float64 over every batch, position and image; std is the population std."""
    total, total_sq, count = 0.0, 0.0, 0
    for z in latents:
        if z.ndim != 4:
            raise ValueError(f"latents must be [B, C, h, w], got shape {list(z.shape)}")
        z = z.double().transpose(0, 1).flatten(1)  # [C, B*h*w]
        total, total_sq, count = total + z.sum(1), total_sq + (z * z).sum(1), count + z.shape[1]
    if count == 0:
        raise ValueError("LatentStats.from_latents got no latents")
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0).sqrt()
    return mean.float(), std.float()


def _latents_of_images(dino_model: DINOv3, dataset, device, n: int, batch_size: int):
    """The DINOv3 latents of the first `n` images of a training dataset, batch by batch (LatentStats.over_images:
    what the small presets' random encoders use, having no released file). A batch stacks images of one aspect
    bucket (`dataset.bucket_of(i)`); an unreadable item (false, see data.py) is left out. from_latents raises
    ValueError if none is read."""
    by_bucket = {}
    for i in range(min(len(dataset), n)):
        by_bucket.setdefault(dataset.bucket_of(i), []).append(i)
    for indices in by_bucket.values():
        for j in range(0, len(indices), batch_size):
            images = [item["image"] for item in (dataset[i] for i in indices[j:j + batch_size]) if item]
            if images:
                yield images_to_latents(dino_model, torch.stack(images).to(device))    # [b, C, h, w]


def _write_stats(stats: LatentStats, path: str):
    """Write the released format: {'mean': [1, C], 'std': [1, C]} (a single 'layer', so row -1 works)."""
    torch.save({"mean": stats.mean[None].clone(), "std": stats.std[None].clone()}, path)


# ----- Image files to tensors ------------------------------------------------------------------------------

def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB, the one conversion used by training (data.py) and `preprocess`.

    * Anything with transparency (RGBA, LA, PA, a palette or grey image with a transparent colour) is
      composited on white, as the official `to_rgb_if_rgba` does for RGBA.
    * 16-bit greyscale (PIL modes I;16*, and I, which 16-bit PNG / TIFF files open as) is scaled by 255/65535.
      PIL's own convert would clip it to 0..255, turning 50% grey (32768) white.
    * Everything else (L, P, CMYK, 1, YCbCr, ...) goes through PIL's convert.
    The official loader composites RGBA only, converts P and L, and skips every other mode.
    """
    if image.mode == "I" or image.mode.startswith("I;16"):
        grey = np.asarray(image, dtype=np.float64) * (255 / 65535)          # [H, W], 0..65535 -> 0..255
        image = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), mode="L")
    if "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", image.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def _to_float_chw(image) -> torch.Tensor:
    """One image or a batch (PIL / numpy / tensor) -> float tensor [B, 3, H, W] in [0, 1]."""
    if isinstance(image, Image.Image):
        image = np.asarray(to_rgb(image))  # [H, W, 3] uint8 (see to_rgb for grey, 16-bit, alpha, palette)
    # np.array copies: arrays taken from PIL images are read-only.
    t = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.array(image))
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4:
        raise ValueError(f"expected an image [H, W, 3] / [3, H, W] or a batch of them, got shape {list(t.shape)}")
    # uint8 images are stored channels-last; float tensors are usually channels-first (ToTensor).
    if t.shape[-1] == 3 and t.shape[1] != 3:
        t = t.permute(0, 3, 1, 2)
    elif t.shape[1] != 3:
        raise ValueError(f"expected 3 colour channels (first or last axis), got shape {list(t.shape)}")
    if t.dtype == torch.uint8:
        return t.float() / 255.0
    if not t.is_floating_point():
        raise ValueError(f"images must be uint8 (0..255) or float (0..1), got {t.dtype}")
    t = t.float()
    if t.numel() and (t.min() < -1e-3 or t.max() > 1 + 1e-3):
        raise ValueError(f"float images must lie in [0, 1], got values in [{t.min():.3g}, {t.max():.3g}]; "
                         f"pass uint8 for 0..255 data (and do not normalise twice)")
    return t


def preprocess(images, patch_size: int = 16) -> torch.Tensor:
    """PIL image(s), uint8 HWC / BHWC arrays or tensors, or float [0, 1] images -> ImageNet-normalised
    float tensor [B, 3, H, W].

    No resizing or cropping happens here: the size must already be a multiple of the patch size (the
    official model would silently crop the remainder, which shifts the latent grid against the image).
    """
    if isinstance(images, (list, tuple)):
        batch = [_to_float_chw(im) for im in images]
        sizes = {tuple(b.shape[-2:]) for b in batch}
        if len(sizes) > 1:
            raise ValueError(f"images in one batch must share a size, got {sorted(sizes)}")
        x = torch.cat(batch, 0)
    else:
        x = _to_float_chw(images)
    H, W = x.shape[-2:]
    if H % patch_size or W % patch_size:
        p = patch_size
        raise ValueError(f"image size {H}x{W} (HxW) is not a multiple of the patch size {p}: resize or crop it "
                         f"first, e.g. to {max(p, H // p * p)}x{max(p, W // p * p)} "
                         f"or {-(-H // p) * p}x{-(-W // p) * p}")
    return imagenet_normalize(x * 2 - 1)  # [0, 1] -> [-1, 1], the range the pipeline passes around
