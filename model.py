"""The Unified Next-DiT: the generator of SVG-T2I (paper Fig. 2, left: the single-stream DiT).

    normalised DINOv3 latent x_t [B, 384, H/16, W/16] ─┐
    flow time t in [0, 1] (0 = noise, 1 = data)       ─┼─► NextDiT ─► velocity v ≈ x_data − noise
    Gemma-2 caption features [B, L, 2304] + mask      ─┘

SVG-T2I reuses, unchanged, the single-stream "Unified Next-DiT" of Lumina-Image-2.0 (arXiv 2503.21758) at
its own sizes (384 input channels, patch 1, 2.61 B parameters). Numerics and key names follow the official
KlingTeam/SVG-T2I `svg_t2i/models/model_dino.py`: the released `consolidated.00-of-01.pth` loads strictly,
and diffusers' `Lumina2Transformer2DModel` computes the same function (tests/test_model.py, to 1e-5).

    t ──► TimestepEmbedder ──► c [B, 1024]  (conditions every modulated block; no pooled caption term)
    caption ──► cap_embedder (RMSNorm + Linear) ──► context_refiner (plain blocks, caption only)
    image ──► patchify ──► x_embedder ──► noise_refiner (modulated blocks, image only)
    [caption ; image] ──► layers (modulated joint blocks) ──► final_layer (image rows) ──► unpatchify
"Single stream": after the refiners, caption and image tokens are one sequence, run through one set of weights
(SD3's MM-DiT keeps separate ones per modality). Why refiners first: the tokens start in different spaces -- Gemma-2
features made for next-token prediction, DINOv3 patches under noise whose level changes every step -- so each gets
private blocks (2 in the release) to align it before they mix. Every block is a JointTransformerBlock (its
docstring says why each piece, against DiT's). Start at NextDiT.forward.
"""
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Sizes (NEXTDIT_CONFIGS, below the banner), 2B: dim 2304, 26 joint blocks, 24 heads sharing 8 K/V heads.
QK_NORM_EPS = 1e-6          # official fallback RMSNorm's default (apex's FusedRMSNorm, if used, had 1e-5)
FREQ_EMBED_SIZE = 256       # sinusoidal timestep features (TimestepEmbedder frequency_embedding_size)
MAX_ADALN_DIM = 1024        # adaLN / timestep width is min(dim, 1024)
# Standard pieces, below the banner: RMSNorm(x, scale) = x / rms(x) · weight (· scale), in float32; FeedForward =
# SwiGLU w2(silu(w1 x) · w3 x), no biases; FinalLayer(x, c) = Linear(LayerNorm(x) · (1 + scale(c))); rope_tables /
# apply_rope = RoPE over 3 axes (text position, row, column), each rotating its own head dims (axes_dims: 2B 32 each).


# ----- Timestep embedding -----------------------------------------------------------------------------
class TimestepEmbedder(nn.Module):
    """t in [0, 1] (used as is, not ×1000) -> 256 sinusoidal features [cos | sin] -> MLP -> [B, width].

    Angles t · 10000^(−i/128), i = 0..127. DiT feeds t·1000, so its fastest pair turns 1000 rad (~160 turns) along
    the path; here the fastest (i = 0) is t itself, one radian over [0, 1], and only the 32 with i < 32 turn more
    than 0.1 rad: a smooth code of t. The released weights were trained on it (official: t unscaled, max_period 10000).
    """

    def __init__(self, width):
        super().__init__()
        # Sequential indices 0 and 2 are the released key names (t_embedder.mlp.{0,2}).
        self.mlp = nn.Sequential(nn.Linear(FREQ_EMBED_SIZE, width), nn.SiLU(), nn.Linear(width, width))

    @staticmethod
    def sinusoidal(t, size=FREQ_EMBED_SIZE, max_period=10000.0):
        half = size // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        angles = t.float()[:, None] * freqs[None]                        # [B, 128]
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # cos FIRST, as the official code

    def forward(self, t):
        return self.mlp(self.sinusoidal(t).to(self.mlp[0].weight.dtype))  # [B, width]


# ----- Attention --------------------------------------------------------------------------------------
class JointAttention(nn.Module):
    """Multi-head self-attention with grouped KV heads, per-head QK RMSNorm and RoPE.

    One fused `qkv`, rows [q (n_heads·hd) | k (n_kv·hd) | v (n_kv·hd)]. The mask is key-only: padded tokens are never
    attended to but still produce (ignored) outputs, so no row turns NaN.
    Why GQA with no KV cache to shrink (its usual reason): fewer K/V parameters and FLOPs. In the 2B model 8 K/V heads
    instead of 24 make qkv 2304 -> 3840, not 6912: 8.8 M instead of 15.9 M parameters per block, 0.21 B over the 30
    blocks (inherited from Lumina-Next, which built Next-DiT from Llama-style blocks). Why QK-norm: RMS-normalised q
    and k bound the logits (|q·k|/√hd ≤ √hd·max|w_q|·max|w_k|), which can otherwise grow in training until the softmax
    saturates: bounded logits keep large-scale bf16 training stable (ViT-22B, arXiv 2302.05442; SD3).
    """

    def __init__(self, dim, n_heads, n_kv_heads, qk_norm):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = dim // n_heads
        self.qkv = nn.Linear(dim, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=False)
        self.out = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        # Without qk_norm the official code uses nn.Identity here, which has no keys.
        self.q_norm = RMSNorm(self.head_dim, QK_NORM_EPS) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim, QK_NORM_EPS) if qk_norm else nn.Identity()

    def forward(self, x, key_mask, freqs):
        (B, S, _), hd = x.shape, self.head_dim
        q, k, v = self.qkv(x).split([self.n_heads * hd, self.n_kv_heads * hd, self.n_kv_heads * hd], dim=-1)
        q = self.q_norm(q.view(B, S, self.n_heads, hd))                 # [B, S, H, hd]
        k = self.k_norm(k.view(B, S, self.n_kv_heads, hd))              # [B, S, Hkv, hd]
        v = v.view(B, S, self.n_kv_heads, hd)
        q, k = apply_rope(q, freqs), apply_rope(k, freqs)
        n_rep = self.n_heads // self.n_kv_heads    # GQA: kv head j serves query heads j·n_rep ... (j + 1)·n_rep − 1
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, S, hd]
        if n_rep > 1:
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1, 1, S] keys only
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # scale 1/sqrt(hd)
        return self.out(out.transpose(1, 2).reshape(B, S, self.n_heads * hd))


# ----- Transformer block ------------------------------------------------------------------------------
class JointTransformerBlock(nn.Module):
    """Sandwich-norm block; with `modulation`, a tanh-gated (1 + scale) adaLN driven by the timestep.

        scale_msa, gate_msa, scale_mlp, gate_mlp = Linear(SiLU(c)).chunk(4)     (this order)
        x = x + tanh(gate_msa) · norm2(Attn(norm1(x) · (1 + scale_msa)))
        x = x + tanh(gate_mlp) · ffn_norm2(FFN(ffn_norm1(x) · (1 + scale_mlp)))

    Without modulation (the context refiner) scale = 0 and the gates are 1. Against DiT's adaLN-Zero block
    (facebookresearch/DiT `models.py`: x + gate · Attn(modulate(LayerNorm(x), shift, scale))):
    * Sandwich norm, an RMSNorm after each sub-layer too. Pre-norm adds the sub-layer's output raw, so one large
      update grows the residual stream, 26 blocks x 2 compound it, and in bf16 (8 significant bits) a large stream
      swallows later, smaller updates. Normalised, each update has RMS about its norm's weight.
    * tanh gates: a gate in (-1, 1) bounds that update again; DiT's linear gate is unbounded.
    * Zero init, as in DiT: adaLN_modulation starts at 0, so scale = tanh(gate) = 0, a block is the identity and, with
      the zero final layer, the untrained model predicts v = 0: training starts stable and learns each block's share.
    * No shift: x · (1 + scale). RMSNorm never centres and the attention and FFN linears have no bias, so nothing in
      the residual path adds a constant (only adaLN_modulation, computing scales and gates from c, has a bias); c
      drives 4 vectors, not 6: 2B: 1024 -> 4 x 2304, 9.4 M parameters per block instead of 14.2 M.
    """

    def __init__(self, dim, n_heads, n_kv_heads, ffn_hidden, norm_eps, qk_norm, modulation, adaln_dim):
        super().__init__()
        # Registration order = released key order.
        self.attention = JointAttention(dim, n_heads, n_kv_heads, qk_norm)
        self.feed_forward = FeedForward(dim, ffn_hidden)
        self.attention_norm1 = RMSNorm(dim, norm_eps)
        self.ffn_norm1 = RMSNorm(dim, norm_eps)
        self.attention_norm2 = RMSNorm(dim, norm_eps)
        self.ffn_norm2 = RMSNorm(dim, norm_eps)
        self.modulation = modulation
        if modulation:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(adaln_dim, 4 * dim))

    def forward(self, x, key_mask, freqs, c=None):
        if not self.modulation:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), key_mask, freqs))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(c)[:, None].chunk(4, dim=-1)  # [B,1,D]
        # Each adaLN factor rides on a norm's weight (RMSNorm's `scale`): the same products, fewer passes.
        attn_out = self.attention(self.attention_norm1(x, 1 + scale_msa), key_mask, freqs)
        x = x + self.attention_norm2(attn_out, gate_msa.tanh())
        ffn_out = self.feed_forward(self.ffn_norm1(x, 1 + scale_mlp))
        return x + self.ffn_norm2(ffn_out, gate_mlp.tanh())


# ----- The model --------------------------------------------------------------------------------------
class NextDiT(nn.Module):
    """The Unified Next-DiT, with the official constructor names and defaults (model_dino.py). One image size
    per forward: buckets (data.py) batch one size (the official forward also packs sizes with padding)."""

    def __init__(self, patch_size=1, in_channels=384, dim=4096, n_layers=32, n_refiner_layers=2, n_heads=32,
                 n_kv_heads=None, multiple_of=256, ffn_dim_multiplier=None, norm_eps=1e-5, qk_norm=False,
                 cap_feat_dim=5120, axes_dims=(16, 56, 56), axes_lens=(1, 512, 512)):
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        check_config(dim, n_heads, n_kv_heads, axes_dims)
        self.config = dict(patch_size=patch_size, in_channels=in_channels, dim=dim, n_layers=n_layers,
                           n_refiner_layers=n_refiner_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                           multiple_of=multiple_of, ffn_dim_multiplier=ffn_dim_multiplier, norm_eps=norm_eps,
                           qk_norm=qk_norm, cap_feat_dim=cap_feat_dim, axes_dims=list(axes_dims),
                           axes_lens=list(axes_lens))  # a plain dict: save_nextdit writes it next to the weights
        self.patch_size, self.in_channels, self.out_channels = patch_size, in_channels, in_channels
        self.axes_lens = list(axes_lens)
        adaln_dim = min(dim, MAX_ADALN_DIM)
        hidden = ffn_hidden_dim(dim, multiple_of, ffn_dim_multiplier)

        def block(modulation):
            return JointTransformerBlock(dim, n_heads, n_kv_heads, hidden, norm_eps, qk_norm, modulation, adaln_dim)

        # Registration order below is the released key order (a state dict lists keys in this order).
        self.x_embedder = nn.Linear(patch_size * patch_size * in_channels, dim)
        self.noise_refiner = nn.ModuleList([block(True) for _ in range(n_refiner_layers)])
        self.context_refiner = nn.ModuleList([block(False) for _ in range(n_refiner_layers)])
        self.t_embedder = TimestepEmbedder(adaln_dim)
        self.cap_embedder = nn.Sequential(RMSNorm(cap_feat_dim, norm_eps), nn.Linear(cap_feat_dim, dim))
        self.layers = nn.ModuleList([block(True) for _ in range(n_layers)])
        self.norm_final = RMSNorm(dim, norm_eps)   # never used in forward; kept so released weights load strictly
        self.final_layer = FinalLayer(dim, patch_size * patch_size * self.out_channels, adaln_dim)

        # RoPE tables are plain float32 tensors, not buffers: the released state dict has none, and casting the
        # model to bf16 (sample.py) must not round them. They follow the weights' device (see _apply).
        self._rope_tables = rope_tables(axes_dims, axes_lens)
        self.grad_checkpointing = False
        initialize_weights(self)  # official: xavier; adaLN and final layer zero, so the untrained v is 0

    def set_grad_checkpointing(self, enabled=True):
        """Recompute joint-block activations in backward (only `layers`, like the official FSDP setup)."""
        self.grad_checkpointing = enabled
        return self

    # ----- Positions: from the caption mask and image size alone, in tensor ops (one torch.compile graph) -----
    def rope(self, pos_ids):
        """pos_ids [B, S, 3] int64 -> freqs [B, S, head_dim/2, 2] (cos, sin), axis groups concatenated in order."""
        return torch.cat([tab[pos_ids[..., i]] for i, tab in enumerate(self._rope_tables)], dim=-2)

    def _apply(self, fn, recurse=True):
        """The RoPE tables follow `.to(device)` (float32): moved in a torch.compile'd forward, they would recompile."""
        super()._apply(fn, recurse)
        self._rope_tables = [tab.to(self.x_embedder.weight.device) for tab in self._rope_tables]
        return self

    @staticmethod
    def caption_positions(cap_mask):
        """Caption token j sits at (j, 0, 0); padding at (0, 0, 0) (a masked key whose output is unused)."""
        axis0 = torch.arange(cap_mask.shape[1], device=cap_mask.device) * cap_mask      # [B, L]
        return torch.stack([axis0, torch.zeros_like(axis0), torch.zeros_like(axis0)], dim=-1)  # [B, L, 3]

    @staticmethod
    def grid_positions(axis0, height, width):
        """Image token positions (axis0, row, col) in row-major order -> [B, height·width, 3].

        axis0 [B] = caption length L_i: the image follows its caption (official). RoPE sees only differences, so the
        offset cancels between image tokens (refine_image relies on it), and caption token j is L_i − j back.
        """
        rows = torch.arange(height, device=axis0.device).repeat_interleave(width)       # [N]
        cols = torch.arange(width, device=axis0.device).repeat(height)                  # [N]
        grid = torch.stack([rows, cols], dim=-1).expand(axis0.shape[0], -1, -1)         # [B, N, 2]
        return torch.cat([axis0[:, None, None].expand(-1, height * width, 1), grid], dim=-1)

    # ----- Caption path (independent of x and t) ------------------------------------------------------
    def refine_captions(self, cap_feats, cap_mask, check=True):
        """cap_feats [B, L, cap_feat_dim], cap_mask [B, L] -> cap_tokens [B, L, dim].

        Caption embedder + context refiner; sees neither x nor t, so a sampler runs it once (forward's
        cap_tokens). Padded rows are meaningless. check=False: the caller checked cap_mask (a host sync).
        """
        cap_mask = cap_mask.bool()
        if check and not torch.compiler.is_compiling():
            check_caption_mask(self, cap_mask)
        # Padding is zeroed on the way in: a padded key gets attention weight exactly 0, but 0 · NaN = NaN,
        # so a NaN left in the padding of cap_feats would otherwise reach every real token.
        cap_feats = cap_feats.masked_fill(~cap_mask[..., None], 0.0)     # [B, L, cap_feat_dim]
        freqs = self.rope(self.caption_positions(cap_mask))              # [B, L, hd/2, 2]
        cap = self.cap_embedder(cap_feats)                               # [B, L, dim]
        key_mask = None if unpadded(cap_mask) else cap_mask
        for blk in self.context_refiner:
            cap = blk(cap, key_mask, freqs)
        return cap

    # ----- Patchify -----------------------------------------------------------------------------------
    def patchify(self, images):
        """[B, C, H, W] -> [B, H/p · W/p, p·p·C] tokens, row-major, features ordered (ph, pw, C)."""
        check_latent(self, images)
        B, C, H, W = images.shape
        p = self.patch_size
        tokens = images.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)  # [B, h, w, p, p, C]
        return tokens.reshape(B, (H // p) * (W // p), p * p * C)

    def unpatchify(self, tokens, height, width):
        """[B, H/p · W/p, p·p·C] -> [B, C, H, W], the inverse of patchify."""
        p, C = self.patch_size, self.out_channels
        grid = tokens.reshape(tokens.shape[0], height // p, width // p, p, p, C)        # [B, h, w, p, p, C]
        return grid.permute(0, 5, 1, 3, 2, 4).reshape(tokens.shape[0], C, height, width)

    # ----- Image path (independent of the caption) ----------------------------------------------------
    def refine_image(self, x, t, cap_lens):
        """Latents x [B, C, H, W] and times t [B] -> image tokens after the noise refiner [B, N, dim].

        The noise refiner never sees the caption: its attention is image to image, and the caption length
        enters only as a RoPE offset that cancels (grid_positions), so this is a function of x and t alone.
        """
        t = torch.as_tensor(t, device=x.device)
        c = self.t_embedder(t.expand(len(x)) if t.dim() == 0 else t)     # [B, adaln_dim]
        freqs = self.rope(self.grid_positions(cap_lens, x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size))
        return self.noise_refine(self.x_embedder(self.patchify(x)), freqs, c)

    def noise_refine(self, img, freqs, c):
        for blk in self.noise_refiner:
            img = blk(img, None, freqs, c)                               # every image token is real: no mask
        return img

    # ----- Forward ------------------------------------------------------------------------------------
    def forward(self, x, t, cap_feats, cap_mask, cap_tokens=None, img_tokens=None):
        """Latents x [B, C, H, W] at flow times t [B] (or a scalar), captions cap_feats [B, L, cap_feat_dim]
        with cap_mask [B, L] (True for real tokens, right-padded, >= 1 per caption) -> velocity [B, C, H, W].

        cap_tokens, img_tokens: a guided sampler's caches (sample.guided_velocity); None in training.
        """
        (B, _, H, W), p = x.shape, self.patch_size
        t = check_inputs(self, x, t, cap_feats, cap_mask)               # [B]
        cap_mask = cap_mask.bool()                                       # [B, L]
        c = self.t_embedder(t)                                           # [B, adaln_dim]
        if cap_tokens is None:
            cap_tokens = self.refine_captions(cap_feats, cap_mask, check=False)  # [B, L, dim]
        img_freqs = self.rope(self.grid_positions(cap_mask.sum(1), H // p, W // p))  # [B, N, hd/2, 2]
        if img_tokens is None:
            img_tokens = self.noise_refine(self.x_embedder(self.patchify(x)), img_freqs, c)  # [B, N, dim]

        # One sequence [caption (L rows, right-padded) ; image (N rows)]: attention is blind to token order (RoPE
        # carries positions), all else is per token, so this is the official packing [caption ; image ; padding].
        # Caption padding is masked and zeroed: junk in a cached cap_tokens (even NaN) cannot pass a zero weight.
        L, N = cap_mask.shape[1], img_tokens.shape[1]
        cap = cap_tokens.to(img_tokens.dtype).masked_fill(~cap_mask[..., None], 0.0)  # [B, L, dim]
        joint = torch.cat([cap, img_tokens], dim=1)                      # [B, L + N, dim]
        freqs = torch.cat([self.rope(self.caption_positions(cap_mask)), img_freqs], dim=1)  # [B, L + N, hd/2, 2]
        key_mask = None if unpadded(cap_mask) else torch.cat([cap_mask, cap_mask.new_ones(B, N)], dim=1)
        for blk in self.layers:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                joint = checkpoint(blk, joint, key_mask, freqs, c, use_reentrant=False)
            else:
                joint = blk(joint, key_mask, freqs, c)                   # [B, L + N, dim]
        out = self.final_layer(joint[:, L:], c)                          # image rows only: [B, N, p·p·C]
        return self.unpatchify(out, H, W)                                # [B, C, H, W]


# ======================================================================================================
# Presets, standard pieces, checks, LoRA, files. A first reading can skip everything below: the sizes, the
# init, RMSNorm / SwiGLU / RoPE, input checks, fine-tuning adapters (LoRA), and the checkpoint formats.
# ======================================================================================================

# ----- Presets ----------------------------------------------------------------------------------------
# Keys are the official constructor names (KlingTeam/SVG-T2I `svg_t2i/models/model_dino.py`, NextDiT.__init__).
# The two released sizes come from NextDiT_2B_GQA_patch1_Adaln_Refiner and NextDiT_08B_GQA_patch1_Adaln_Refiner
# (same file), with the values the official scripts pass in: in_channels=384 (DINOv3-S/16+ width),
# cap_feat_dim=2304 (Gemma-2-2B width), qk_norm=True. The small presets are ours; callers override in_channels and
# cap_feat_dim to match their encoders.
NEXTDIT_CONFIGS = {
    # 2,611,246,336 parameters (the official "2.6B"; tests/test_model.py counts them).
    "2B": dict(patch_size=1, in_channels=384, dim=2304, n_layers=26, n_refiner_layers=2, n_heads=24,
               n_kv_heads=8, multiple_of=256, ffn_dim_multiplier=None, norm_eps=1e-5, qk_norm=True,
               cap_feat_dim=2304, axes_dims=[32, 32, 32], axes_lens=[600, 512, 512]),
    # 784,896,640 parameters.
    "0.8B": dict(patch_size=1, in_channels=384, dim=1152, n_layers=28, n_refiner_layers=2, n_heads=16,
                 n_kv_heads=8, multiple_of=256, ffn_dim_multiplier=None, norm_eps=1e-5, qk_norm=True,
                 cap_feat_dim=2304, axes_dims=[24, 24, 24], axes_lens=[600, 512, 512]),
    # CPU demo: 4,298,816 parameters at in_channels=64, cap_feat_dim=64, sized so all four stages train in
    # minutes on 2 cores. Patch 2 (the released model uses 1): a 128-px image is a 16x16 latent grid but
    # only 8x8 = 64 tokens. head_dim 32 = 8 (caption axis) + 8 (rows) + 16 (columns).
    "demo": dict(patch_size=2, in_channels=64, dim=192, n_layers=4, n_refiner_layers=1, n_heads=6,
                 n_kv_heads=3, multiple_of=64, ffn_dim_multiplier=None, norm_eps=1e-5, qk_norm=True,
                 cap_feat_dim=64, axes_dims=[8, 8, 16], axes_lens=[600, 512, 512]),
    # Unit tests: trains in seconds. head_dim 16 = 4 + 6 + 6.
    "tiny": dict(patch_size=1, in_channels=16, dim=64, n_layers=2, n_refiner_layers=1, n_heads=4,
                 n_kv_heads=2, multiple_of=32, ffn_dim_multiplier=None, norm_eps=1e-5, qk_norm=True,
                 cap_feat_dim=32, axes_dims=[4, 6, 6], axes_lens=[600, 512, 512]),
}


def ffn_hidden_dim(dim, multiple_of, ffn_dim_multiplier):
    """SwiGLU hidden width: 4·dim, optionally scaled, rounded up to a multiple (2B: 9216, 0.8B: 4608)."""
    hidden = 4 * dim
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# ----- Initialisation --------------------------------------------------------------------------------
def initialize_weights(model):
    """The official init (model_dino.py): xavier for projections, zero adaLN and final layer (so every
    modulated block starts as the identity and the first prediction is 0: JointTransformerBlock says
    why), N(0, 0.02) timestep MLP. Nothing on the meta device (a model about to be loaded)."""
    if model.x_embedder.weight.is_meta:
        return
    for blk in [*model.noise_refiner, *model.context_refiner, *model.layers]:
        for lin in [blk.attention.qkv, blk.attention.out, blk.feed_forward.w1, blk.feed_forward.w2,
                    blk.feed_forward.w3]:
            nn.init.xavier_uniform_(lin.weight)
        if blk.modulation:
            nn.init.zeros_(blk.adaLN_modulation[1].weight)
            nn.init.zeros_(blk.adaLN_modulation[1].bias)
    nn.init.xavier_uniform_(model.x_embedder.weight)
    nn.init.zeros_(model.x_embedder.bias)
    for lin in (model.t_embedder.mlp[0], model.t_embedder.mlp[2]):
        nn.init.normal_(lin.weight, std=0.02)
        nn.init.zeros_(lin.bias)
    nn.init.trunc_normal_(model.cap_embedder[1].weight, std=0.02)
    nn.init.zeros_(model.cap_embedder[1].bias)
    for lin in (model.final_layer.linear, model.final_layer.adaLN_modulation[1]):
        nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)


# ----- Standard pieces: RMSNorm, SwiGLU, the final layer, RoPE ---------------------------------------
ROPE_THETA = 10000.0        # RopeEmbedder's default; NextDiT never passes another (model_dino.py)


class RMSNorm(nn.Module):
    """Root-mean-square norm in float32, cast back, then scaled (the official fallback RMSNorm). An optional
    per-sample `scale` [B, 1, D] (adaLN scale or gate) is folded into the weight: one pass over [B, S, D]."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, scale=None):
        weight = self.weight if scale is None else self.weight * scale
        # x · rsqrt(mean(x²) + eps) in one op (~1.6x faster forward+backward on CPU than spelled out).
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * weight


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) · w3 x), no biases."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class FinalLayer(nn.Module):
    """Non-affine LayerNorm (eps 1e-6), (1 + scale) from c, then a linear map to p·p·C_out per token."""

    def __init__(self, dim, out_dim, adaln_dim):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)  # no keys
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(adaln_dim, dim))

    def forward(self, x, c):
        scale = self.adaLN_modulation(c)[:, None]                        # [B, 1, D]
        return self.linear(self.norm_final(x) * (1 + scale))


def rope_tables(axes_dims, axes_lens, theta=ROPE_THETA):
    """Per-axis (cos, sin) tables [len_i, dim_i/2, 2] float32 on the CPU, like the official complex64 table:
    frequencies in float64, angles cast to float32, then cos/sin."""
    tables = []
    for d, length in zip(axes_dims, axes_lens):
        freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device="cpu") / d)  # [d/2]
        angles = torch.outer(torch.arange(length, dtype=torch.float64, device="cpu"), freqs).float()
        tables.append(torch.stack([angles.cos(), angles.sin()], dim=-1))
    return tables


def apply_rope(x, freqs):
    """Rotate interleaved pairs of x [B, S, H, D] by the angles freqs [B, S, D/2, 2] = (cos, sin); float32.

    One complex multiply per pair, as in the official code (~5x faster eager on CPU than spelled out; under
    torch.compile, which cannot fuse complex ops, rotate_spelled_out does the same).
    """
    pairs = x.float().unflatten(-1, (-1, 2))                                # [B, S, H, D/2, 2]
    if torch.compiler.is_compiling():
        return rotate_spelled_out(pairs, freqs).type_as(x)
    rotated = torch.view_as_real(torch.view_as_complex(pairs) * torch.view_as_complex(freqs)[:, :, None])
    return rotated.flatten(-2).type_as(x)


def rotate_spelled_out(pairs, freqs):
    """apply_rope's complex product in real and imaginary parts, which Inductor can fuse (complex ops fall back
    to eager kernels: a compiled step was 2x slower). pairs [B, S, H, D/2, 2] -> [B, S, H, D]."""
    real, imag = pairs.unbind(-1)
    cos, sin = freqs[:, :, None].unbind(-1)                                 # [B, S, 1, D/2] each
    return torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1).flatten(-2)


# ----- Input checks ------------------------------------------------------------------------------------
# NextDiT calls these; each turns a wrong input into one ValueError that names what to change.

def check_config(dim, n_heads, n_kv_heads, axes_dims):
    """The sizes must fit: heads divide dim, KV heads divide heads, RoPE axes fill a head."""
    if dim % n_heads or n_heads % n_kv_heads:
        raise ValueError(f"NextDiT: dim {dim} must divide by n_heads {n_heads}, which must divide by "
                         f"n_kv_heads {n_kv_heads}")
    if sum(axes_dims) != dim // n_heads or any(d % 2 for d in axes_dims):
        raise ValueError(f"NextDiT: axes_dims {list(axes_dims)} must be even and sum to head_dim {dim // n_heads}")


def check_latent(model, images):
    """A latent [B, C, H, W] must have the model's channels, patch-divisible sides, and fit the RoPE grid."""
    _, C, H, W = images.shape
    p = model.patch_size
    if C != model.in_channels or H % p or W % p:
        raise ValueError(f"NextDiT: latent of shape {tuple(images.shape[1:])} needs {model.in_channels} "
                         f"channels and H, W divisible by patch_size {p}")
    if H // p > model.axes_lens[1] or W // p > model.axes_lens[2]:
        raise ValueError(f"NextDiT: latent {H}x{W} exceeds the RoPE grid {model.axes_lens[1:]} (in patches)")


def check_caption_mask(model, cap_mask):
    """Raise a clear error unless cap_mask [B, L] is right-padded with 1 <= length < axes_lens[0].

    These checks read values (a host sync, and a graph break under torch.compile), so the model runs
    them in eager mode only; a compiled training step relies on its data pipeline having been
    checked eagerly.
    """
    lengths = cap_mask.sum(1)
    expected = torch.arange(cap_mask.shape[1], device=cap_mask.device)[None] < lengths[:, None]
    if not torch.equal(expected, cap_mask):
        raise ValueError("NextDiT: cap_mask must be right-padded (True for real tokens, then False)")
    lengths = lengths.tolist()
    if min(lengths) < 1:
        raise ValueError("NextDiT: every caption needs at least one real token (the empty prompt is <bos>)")
    if max(lengths) >= model.axes_lens[0]:
        raise ValueError(f"NextDiT: caption of {max(lengths)} tokens exceeds the RoPE text axis "
                         f"(axes_lens[0] = {model.axes_lens[0]}); truncate captions first")


def check_inputs(model, x, t, cap_feats, cap_mask):
    """t as a [B] tensor on x's device (a scalar is broadcast); a clear error for inputs that disagree."""
    t = torch.as_tensor(t, device=x.device)
    t = t.expand(len(x)) if t.dim() == 0 else t
    if t.shape != (len(x),) or cap_feats.shape[0] != len(x) or cap_mask.shape[0] != len(x):
        raise ValueError(f"NextDiT: batch sizes disagree: latents {tuple(x.shape)}, t {tuple(t.shape)}, "
                         f"cap_feats {tuple(cap_feats.shape)}, cap_mask {tuple(cap_mask.shape)}")
    if not torch.compiler.is_compiling():
        check_caption_mask(model, cap_mask.bool())
    return t


def unpadded(cap_mask):
    """True when no caption has padding (one prompt, or prompts of one length): attention then needs no
    mask, and SDPA's unmasked kernel is the faster one. Eager only: the check reads the mask on the host,
    which torch.compile would turn into a graph break, so compiled code always keeps the mask."""
    return not torch.compiler.is_compiling() and bool(cap_mask.all())


# ----- LoRA adapters ----------------------------------------------------------------------------------
# Fine-tuning with low-rank adapters (Hu et al., "LoRA", arXiv 2106.09685): every targeted Linear keeps its
# frozen weight W [out, in] and learns a low-rank update on top of it,
#
#     y = x W^T + (alpha / r) · (x A^T) B^T          A [r, in], B [out, r], r << in, out
#
# B starts at zero, so at step 0 the adapted model *is* the base model, bit for bit (x A^T B^T = 0 exactly),
# and A starts kaiming-uniform as an nn.Linear would (a = sqrt(5)). Only A and B train: for the 2B model at
# r = 8 over the default targets that is 10.9 M numbers (43 MB in fp32) instead of 2.6 B, so there are no
# gradients and no AdamW moments for the base, which can also be stored in bf16 (train.py does so on CUDA).
# The update can be folded into the weight afterwards, W' = W + (alpha / r) · B A (merge_lora), and the
# merged model costs nothing extra at sampling time.
#
# The wrapper keeps the base's parameters under their own names (`.weight`, `.bias`), so the state dict of an
# adapted model is the released layout plus `<name>.lora_A` / `<name>.lora_B`; an adapter file holds those
# alone. The official code has no LoRA (its README points users with less memory to it); the default targets
# are the attention's fused qkv and output projections and the SwiGLU's w1, w2, w3 in every block (joint
# blocks, noise refiner and context refiner) -- the usual choice for DiTs; the adaLN modulation, embedders and
# final layer stay frozen.

LORA_TARGETS = ("qkv", "out", "w1", "w2", "w3")     # matched against the end of a Linear's module name
LORA_FORMAT = "nextdit-lora"


class LoRALinear(nn.Module):
    """A frozen Linear (its very `weight` and `bias` Parameters) plus a trainable rank-r update in float32."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight                    # the same Parameter object: same key, same storage
        self.bias = base.bias                        # None for every Linear the default targets name
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=torch.float32))
        if device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):                            # x [..., in] -> [..., out]
        # Under autocast (CUDA) both products run in bf16; otherwise the adapter runs in its own float32.
        h = x if torch.is_autocast_enabled(x.device.type) else x.to(self.lora_A.dtype)
        update = F.linear(F.linear(h, self.lora_A), self.lora_B)          # [..., out]; exactly 0 while B is 0
        return F.linear(x, self.weight, self.bias) + (update * self.scale).to(x.dtype)

    def merged_weight(self):
        """W + (alpha / r) · B A in float32: the Linear this adapter is equivalent to."""
        return self.weight.float() + self.scale * (self.lora_B @ self.lora_A)


def lora_modules(model):
    """{module name: LoRALinear} of an adapted model (empty for a plain one)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def attach_lora(model, rank, alpha=None, targets=LORA_TARGETS):
    """Wrap every nn.Linear whose name ends in one of `targets` ("qkv" matches layers.3.attention.qkv) in a
    LoRALinear, in place; freeze everything else. alpha defaults to rank (scale 1). -> the wrapped names."""
    if rank < 1:
        raise ValueError(f"--lora {rank}: the rank must be at least 1")
    if lora_modules(model):
        raise ValueError("attach_lora: the model has adapters already; merge them first (merge_lora)")
    alpha = float(rank if alpha is None else alpha)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
             and any(n == t or n.endswith("." + t) for t in targets)]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        raise ValueError(f"--lora-targets: {unmatched} match no Linear of the model; the default targets are "
                         f"{','.join(LORA_TARGETS)} (the end of a module name, e.g. adaLN_modulation.1)")
    model.requires_grad_(False)                      # the base is frozen; only A and B will train
    for name in names:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, LoRALinear(model.get_submodule(name), rank, alpha))
    model.lora = dict(rank=rank, alpha=alpha, targets=list(targets))
    return names


def lora_state(model):
    """{"<name>.lora_A": [r, in], "<name>.lora_B": [out, r]} of an adapted model, float32, detached."""
    return {f"{name}.{part}": getattr(m, part).detach().float()
            for name, m in lora_modules(model).items() for part in ("lora_A", "lora_B")}


def key_report(expected, state):
    """(missing, unexpected, misshapen) keys of a state dict against {key: shape} of the model it should fill."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshapen = [f"{k}: file {tuple(state[k].shape)} vs model {expected[k]}"
                 for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    return missing, unexpected, misshapen


def load_lora_state(model, state, where):
    """Put adapter tensors into an adapted model: every adapter key present, nothing else, shapes equal."""
    expected = {k: tuple(v.shape) for k, v in lora_state(model).items()}
    missing, unexpected, misshapen = key_report(expected, state)
    if missing or unexpected or misshapen:
        raise ValueError(f"{where}: the adapter does not fit this model (rank, targets or base differ):\n"
                         f"  missing: {missing[:6]}\n  unexpected: {unexpected[:6]}\n  wrong shapes: {misshapen[:6]}")
    modules = lora_modules(model)
    with torch.no_grad():
        for key, value in state.items():
            name, part = key.rsplit(".", 1)
            getattr(modules[name], part).copy_(value)


def merge_lora(model):
    """A plain NextDiT (float32, CPU) whose weights are the adapted model's with every update folded in."""
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items() if ".lora_" not in k}
    for name, m in lora_modules(model).items():
        state[f"{name}.weight"] = m.merged_weight().detach().cpu()
    with torch.device("meta"):
        plain = NextDiT(**model.config)
    plain.load_state_dict(state, strict=True, assign=True)
    return plain


def save_lora(model, path, **meta):
    """Write the adapter alone as safetensors; rank, alpha, targets, the DiT config and `meta` (base path and
    fingerprint, ...) as JSON metadata, so sample.py can check that it fits before applying it."""
    from safetensors.torch import save_file
    info = dict(model.lora, config=model.config, **meta)
    save_file({k: v.contiguous().cpu() for k, v in lora_state(model).items()}, path,
              metadata={"format": LORA_FORMAT, "lora": json.dumps(info)})


def read_lora(path):
    """-> ({key: tensor}, metadata dict) of an adapter file written by save_lora."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(path)
    except Exception as e:  # noqa: BLE001 - truncated, not safetensors, ...: name the file
        raise ValueError(f"--lora {path}: could not read it ({type(e).__name__}: {e}); copy it again") from e
    if meta.get("format") != LORA_FORMAT:
        raise ValueError(f"--lora {path}: not an adapter file (written by train.py --lora: its metadata says "
                         f"format={LORA_FORMAT})")
    return state, json.loads(meta["lora"])


def apply_lora(model, path, scale=1.0):
    """Fold the adapter in `path` into a plain NextDiT, in place: W += scale · (alpha / r) · B A for every
    adapted Linear (scale 0 = the base, 1 = the trained adapter). -> the adapter's metadata."""
    state, info = read_lora(path)
    with torch.device("meta"):
        shaped = NextDiT(**model.config)
    attach_lora(shaped, info["rank"], info["alpha"], info["targets"])
    expected = {k: tuple(v.shape) for k, v in shaped.named_parameters() if ".lora_" in k}
    problems = sorted(set(expected) ^ set(state)) + [k for k in expected if k in state and
                                                      tuple(state[k].shape) != expected[k]]
    if problems:
        raise ValueError(f"--lora {path}: does not fit this DiT (made for {info.get('config')}); keys or shapes "
                         f"that differ: {problems[:6]}")
    factor = scale * info["alpha"] / info["rank"]
    with torch.no_grad():
        for key in expected:
            if key.endswith(".lora_A"):
                name = key[:-len(".lora_A")]
                weight = model.get_submodule(name).weight
                update = state[f"{name}.lora_B"].float() @ state[key].float()          # [out, in]
                weight.copy_((weight.float() + factor * update.to(weight.device)).to(weight.dtype))
    return info


# ----- Checkpoint files ------------------------------------------------------------------------------
# Two formats load: the released `consolidated.00-of-01.pth` (a plain {key: tensor} dict, config inferred
# from shapes) and ours, `*.safetensors` with the config as JSON under the metadata key "config".

RELEASED_NAME = "consolidated.00-of-01.pth"
OURS_NAME = "model.safetensors"


def save_nextdit(model, path):
    """Write model weights to `path` (.safetensors) with model.config as JSON metadata."""
    from safetensors.torch import save_file
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, path, metadata={"config": json.dumps(model.config), "format": "nextdit"})


def _count_blocks(keys, prefix):
    """Number of blocks `prefix.N.` present in a state dict."""
    ids = {int(k[len(prefix) + 1:].split(".")[0]) for k in keys if k.startswith(prefix + ".")}
    return max(ids) + 1 if ids else 0


def nextdit_config_from_state_dict(state, patch_size=1):
    """Infer constructor kwargs from tensor shapes alone (the released files carry no config).

    patch_size cannot be told apart from in_channels (both enter x_embedder as p·p·C); every released
    config uses 1. norm_eps, multiple_of (unless needed) and axes_lens take the official values; axes_dims
    split head_dim into thirds (2B: 32/32/32, 0.8B: 24/24/24), rounding to even with the remainder on axis 0.
    """
    def shape(key):
        if key not in state:
            raise ValueError(f"load_nextdit: key '{key}' is missing; this is not a NextDiT checkpoint")
        return tuple(state[key].shape)

    dim, patch_in = shape("x_embedder.weight")
    if patch_in % (patch_size * patch_size):
        raise ValueError(f"load_nextdit: x_embedder input {patch_in} is not divisible by patch_size² ({patch_size}²)")
    if "layers.0.attention.q_norm.weight" not in state:
        raise ValueError("load_nextdit: checkpoint has no q_norm (qk_norm=False), so head_dim cannot be "
                         "inferred from shapes; pass config=dict(...) explicitly")
    head_dim = shape("layers.0.attention.q_norm.weight")[0]
    qkv_rows = shape("layers.0.attention.qkv.weight")[0]
    n_heads = dim // head_dim
    n_kv_heads = (qkv_rows - dim) // (2 * head_dim)
    hidden = shape("layers.0.feed_forward.w1.weight")[0]
    multiple_of, mult = 256, None
    if ffn_hidden_dim(dim, 256, None) != hidden:
        # Not the default rule: express the width as a multiplier and a power-of-two rounding.
        multiple_of = math.gcd(hidden, 256)
        mult = hidden / (4 * dim)
        if ffn_hidden_dim(dim, multiple_of, mult) != hidden:
            raise ValueError(f"load_nextdit: cannot express FFN width {hidden} for dim {dim}; pass config=")
    third = (head_dim // 3) // 2 * 2
    return dict(patch_size=patch_size, in_channels=patch_in // (patch_size * patch_size), dim=dim,
                n_layers=_count_blocks(state, "layers"), n_refiner_layers=_count_blocks(state, "noise_refiner"),
                n_heads=n_heads, n_kv_heads=n_kv_heads, multiple_of=multiple_of, ffn_dim_multiplier=mult,
                norm_eps=1e-5, qk_norm=True, cap_feat_dim=shape("cap_embedder.1.weight")[1],
                axes_dims=[head_dim - 2 * third, third, third], axes_lens=[600, 512, 512])


def _resolve_checkpoint(path):
    """A file, or a folder holding model.safetensors or the released consolidated .pth."""
    if os.path.isdir(path):
        for name in (OURS_NAME, RELEASED_NAME):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise FileNotFoundError(f"load_nextdit: folder '{path}' holds neither {OURS_NAME} nor {RELEASED_NAME}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_nextdit: '{path}' does not exist")
    return path


def load_nextdit(path, map_location="cpu", config=None):
    """Load a NextDiT from the released .pth, our .safetensors, or a folder with either; strict.

    `config` overrides the stored or inferred configuration (needed only for unusual released files).
    """
    path = _resolve_checkpoint(path)
    stored_config = None
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open
            from safetensors.torch import load_file
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
            stored_config = json.loads(meta["config"]) if "config" in meta else None
            state = load_file(path, device=str(map_location))
        else:
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated copy, another format, ...: say which file
        raise ValueError(f"load_nextdit: could not read '{path}' ({type(e).__name__}: {e}); the file is truncated "
                         "or not a PyTorch/safetensors checkpoint, copy or download it again") from e
    if not isinstance(state, dict):
        raise ValueError(f"load_nextdit: '{path}' does not hold a state dict")
    state = state.get("model", state)          # a .pth may wrap it as {"model": state dict}
    # Wrappers (torch.compile, DDP) prefix the keys; strip them so any of our checkpoints loads.
    state = {k.replace("_orig_mod.", "").removeprefix("module."): v for k, v in state.items()}
    config = config or stored_config or nextdit_config_from_state_dict(state)
    with torch.device("meta"):
        model = NextDiT(**config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected, misshapen = key_report(expected, state)
    if missing or unexpected or misshapen:
        raise ValueError(f"load_nextdit: '{path}' does not match NextDiT({config}):\n"
                         f"  missing keys: {missing[:8]}{' ...' if len(missing) > 8 else ''}\n"
                         f"  unexpected keys: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}\n"
                         f"  wrong shapes: {misshapen[:8]}\n"
                         "Check that the file is a NextDiT checkpoint and that its config matches.")
    model.load_state_dict(state, strict=True, assign=True)
    return model
