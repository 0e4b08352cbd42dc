"""The text encoder: Gemma-2-2B, its tokenizer and the system prompts.

SVG-T2I conditions its Next-DiT on a caption, prefixed with a plain-text "system prompt", tokenised with Gemma's
sentencepiece model and run through a frozen Gemma-2-2B. The DiT reads `hidden_states[-2]` of the transformers
`Gemma2Model` (KlingTeam/SVG-T2I `svg_t2i/train_svg_t2i.py`, `encode_prompt`): that list holds the embedding, then
each layer's output, the last one normed, so [-2] is the raw residual stream after the second-to-last layer.

    prompt ─► format_prompt ─► Tokenizer ─► ids [B, L], mask [B, L] ─► Gemma2Encoder ─► feats [B, L, 2304]

Why the second-to-last layer: SVG-T2I keeps the choice of Lumina-Image-2.0, whose DiT it reuses. The usual reason is
that a language model's last layer is specialised for predicting the next token, while the one before it still
describes the text as a whole (the same idea as Stable Diffusion's "CLIP skip"). No final norm is needed: the DiT's
caption embedder starts with an RMSNorm of its own (model.py).

Numerics match transformers' eager Gemma-2 bit for bit, except that attention logit soft-capping (tanh at 50) is OFF
by default: the transformers SVG-T2I pinned (4.57.3) runs Gemma-2 through SDPA, which ignores it, so the released DiT
was most likely (UNVERIFIED) trained without it. `use_softcapping=True` gives eager's numbers.
"""
import io
import json
import math
import os
import warnings

import sentencepiece as spm
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model import key_report

# ----- System prompts ------------------------------------------------------------------------------------
# Why a prefix: Gemma is causal, so every caption token is encoded after reading it, and it tells Gemma what kind of
# text follows. Quoted exactly from KlingTeam/SVG-T2I `svg_t2i/sample_svg_t2i.py` (system_type); the trainer uses
# 'base' for {"path", "prompt"} items (public JSONL) and 'align' for {"image_path", "super_high_quality_caption"}
# ones; at sampling the prefix picks which kind the DiT follows. The caption is glued on after the trailing space:
# 'base' alone is 21 pieces with the demo tokenizer (the space is a piece, "▁"), but before a caption the space joins
# its first word ("▁a"): 'base' + "a red circle in the top left" = [BOS] + 20 + 7 = 28 tokens.
SYSTEM_PROMPTS = {
    "base": "You are an assistant designed to generate high-quality images based on user prompts. "
            "<Prompt Start> ",
    "align": "You are an assistant designed to generate high-quality images with the highest degree of "
             "image-text alignment based on textual prompts. <Prompt Start> ",
    "aesthetics": "You are an assistant designed to generate high-quality images with highest degree of "
                  "aesthetics based on user prompts. <Prompt Start> ",
    "real": "You are an assistant designed to generate superior images with the superior degree of "
            "image-text alignment based on textual prompts or user prompts. <Prompt Start> ",
    "4grid": "You are an assistant designed to generate four high-quality images with highest degree of "
             "aesthetics arranged in 2x2 grids based on user prompts. <Prompt Start> ",
    "empty": "",
}

# Caption budgets in tokens, BOS and system prompt included: the official trainer means to honour --max_cap_len but
# passes it as `encode_prompt`'s `is_train`, so its limit stays 256; its sampler hard-codes 512. We keep both.
MAX_LENGTH_TRAIN = 256
MAX_LENGTH_SAMPLE = 512
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3   # Gemma's special pieces 0..3 (its config agrees)


def format_prompt(prompt: str, system_prompt: str) -> str:
    """The text Gemma reads: `system_prompt` (a SYSTEM_PROMPTS key or literal text) + prompt, glued as is.

    An empty prompt gives the system prompt alone (an uncaptioned training image). Guidance's unconditional input
    is the bare "" ([BOS] alone), not through this function: the official code replaces the whole prefixed caption
    with "" (caption dropout; `neg_cap = ""` at sampling).
    """
    return SYSTEM_PROMPTS.get(system_prompt, system_prompt) + prompt


# ----- Gemma-2 up to hidden_states[-2] -------------------------------------------------------------------
# Each decoder layer (DecoderLayer, below the banner) is a standard Gemma-2 block, sandwich-normed:
#     x = x + post_attention_layernorm(attn(input_layernorm(x)))
#     x = x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))
# with RMSNorms that scale by (1 + w) (weights stored around 0), grouped-query attention (2B: 8 query heads sharing
# 4 K/V heads of 256, scale 256^-0.5) with 1-D rotate-half RoPE over the token index, a 4096-key sliding window on
# even layers (a no-op for prompts <= 512 tokens), and a GeGLU MLP 2304 -> 9216 -> 2304.
class Gemma2Encoder(nn.Module):
    """Gemma-2 up to `hidden_states[-2]`: the embedding and the first num_hidden_layers − 1 decoder layers.

    HF config names (GEMMA2_CONFIGS), `num_hidden_layers` the FULL depth (2B: 26); keys: the HF checkpoint's minus
    `model.`. causal_lm=True also builds the last layer and final norm for `generate` (prompt enhancement).
    """

    def __init__(self, vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
                 num_key_value_heads, head_dim, rms_norm_eps=1e-6, rope_theta=10000.0,
                 query_pre_attn_scalar=None, sliding_window=None, attn_logit_softcapping=None,
                 final_logit_softcapping=30.0, use_softcapping=False, causal_lm=False):
        super().__init__()
        check_config(num_hidden_layers, use_softcapping, attn_logit_softcapping)
        self.config = dict(  # everything needed to rebuild or save this model, in HF names (save_gemma2)
            vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads, head_dim=head_dim, rms_norm_eps=rms_norm_eps,
            rope_theta=rope_theta, query_pre_attn_scalar=query_pre_attn_scalar or head_dim,
            sliding_window=sliding_window, attn_logit_softcapping=attn_logit_softcapping,
            final_logit_softcapping=final_logit_softcapping)
        self.use_softcapping, self.causal_lm = use_softcapping, causal_lm
        softcap = attn_logit_softcapping if use_softcapping else None
        self.embed_tokens = nn.Embedding(vocab_size, hidden_size)
        self.feature_layers = num_hidden_layers - 1
        self.layers = nn.ModuleList(   # layer i slides when i is even (transformers' layer_types)
            DecoderLayer(self.config, softcap, sliding=(i % 2 == 0 and sliding_window is not None))
            for i in range(num_hidden_layers if causal_lm else num_hidden_layers - 1))
        if causal_lm:
            self.norm = RMSNorm(hidden_size, rms_norm_eps)   # the final norm, before the (tied) LM head

    def forward(self, input_ids, attention_mask=None):
        """input_ids [B, L] long, attention_mask [B, L] (1 = token, 0 = right padding) -> [B, L, hidden]:
        transformers' `hidden_states[-2]` at real positions; padded ones are finite and meaningless."""
        real = check_token_inputs(input_ids, attention_mask)                           # [B, L] bool
        L, cfg = input_ids.shape[1], self.config
        x = self.embed_tokens(input_ids)                                               # [B, L, H]
        # Gemma scales embeddings by sqrt(hidden), built in the model dtype as transformers does (bf16: 48 exact).
        x = x * torch.tensor(cfg["hidden_size"] ** 0.5, dtype=x.dtype)
        cos, sin = rope_cos_sin(L, cfg["head_dim"], cfg["rope_theta"], x.dtype, x.device)  # [L, D]
        # True = may attend: causal, not to padding keys, on sliding layers only the last `sliding_window` keys; and
        # itself, so a padded query with no key left stays finite (softmax over nothing: NaN, and 0 · NaN spreads).
        pos = torch.arange(L, device=x.device)
        causal = pos[None, :] <= pos[:, None]                                          # [L(q), L(k)]
        itself = torch.eye(L, dtype=torch.bool, device=x.device)
        allowed_full = (causal & real[:, None, None, :]) | itself                      # [B, 1, L, L]
        allowed_sliding = allowed_full
        if cfg["sliding_window"] is not None:
            allowed_sliding = allowed_full & (pos[None, :] > pos[:, None] - cfg["sliding_window"])
        for layer in self.layers[:self.feature_layers]:
            x = layer(x, cos, sin, allowed_sliding if layer.sliding else allowed_full)
        return x                                                                       # [B, L, H]

    def generate(self, input_ids, max_new_tokens, eos_id=EOS_ID):
        """Greedy decoding of one sequence (causal_lm=True): greedy_generate, below the banner."""
        return greedy_generate(self, input_ids, max_new_tokens, eos_id)


# ----- Prompts to features -------------------------------------------------------------------------------
@torch.no_grad()
def encode_prompts(encoder, tokenizer, prompts, max_length):
    """Formatted prompts (format_prompt, or the unconditional "") -> (feats [B, L, hidden] in the encoder's dtype and
    device, mask [B, L] bool, True = real token). Tokenised as the official code does: [BOS] + pieces, no EOS, cut at
    `max_length`, right-padded to a multiple of 8 (Tokenizer). The DiT zeroes and masks the padded rows
    (NextDiT.refine_captions), so what they hold never reaches a real token."""
    check_vocab(tokenizer, encoder)
    input_ids, attention_mask = tokenizer.encode(prompts, max_length)
    device = encoder.embed_tokens.weight.device
    feats = encoder(input_ids.to(device), attention_mask.to(device))
    return feats, attention_mask.bool().to(device)


# =========================================================================================================
# Tokenizer, Gemma-2's layers, generation, files. A first reading can skip everything below: the tokenizer
# class, the standard Gemma-2 pieces summarised above, prompt enhancement, and the Hugging Face file layout.
# =========================================================================================================

# ----- Tokenizer -----------------------------------------------------------------------------------------


class Tokenizer:
    """Gemma's sentencepiece tokenizer, called the way SVG-T2I calls transformers' GemmaTokenizerFast.

    The official call is `tokenizer(texts, padding=True, pad_to_multiple_of=8, max_length=M,
    truncation=True)` with `padding_side="right"` (`svg_t2i/train_svg_t2i.py`, `encode_prompt`), which
    means per text:
    ids = [BOS] + sentencepiece ids, no EOS, cut to M tokens (BOS counts); then the batch is right-padded
    with 0 to its longest row rounded up to a multiple of 8. Gemma's sentencepiece model adds no dummy
    prefix space, so plain `encode(text)` gives the same pieces as the Hugging Face tokenizer.
    """

    def __init__(self, path: str):
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.model")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file; pass Gemma's sentencepiece `tokenizer.model` "
                                    "(or the folder that holds it)")
        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(path)
        except (OSError, RuntimeError) as err:
            raise ValueError(f"{path} is not a sentencepiece model ({err}); pass Gemma's `tokenizer.model`, "
                             "not tokenizer.json or a checkpoint") from None
        found = (self.sp.pad_id(), self.sp.eos_id(), self.sp.bos_id(), self.sp.unk_id())
        if found != (PAD_ID, EOS_ID, BOS_ID, UNK_ID):
            raise ValueError(f"{path}: special ids (pad, eos, bos, unk) are {found}, Gemma's are "
                             f"{(PAD_ID, EOS_ID, BOS_ID, UNK_ID)}; this is not a Gemma tokenizer (make one "
                             "with train_tokenizer, which sets them)")
        # A dummy-prefix model turns "a" into "▁a"; HF's Gemma tokenizer never does ("The Gemma tokenizer
        # never adds a prefix space", transformers `models/gemma/tokenization_gemma.py`). Such a
        # file still works, but its ids will not match what the released DiT was trained on.
        first = self.sp.encode("a", out_type=str)
        if first and first[0].startswith("\u2581"):
            warnings.warn(f"{path} adds a dummy prefix space; Gemma's tokenizer does not, so ids will differ "
                          "from the Hugging Face Gemma tokenizer")
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, texts, max_length: int):
        """Tokenise a batch: returns (input_ids [B, L] long, attention_mask [B, L] long), L % 8 == 0.

        Texts longer than `max_length` tokens (BOS included) are cut at the right, with a warning that
        quotes the prompt — the official code truncated silently.
        """
        if isinstance(texts, str):
            raise TypeError("Tokenizer.encode takes a list of strings; wrap a single prompt as [prompt]")
        if max_length < 8 or max_length % 8:
            # With padding to a multiple of 8, a budget that is not one could be overshot by the padding;
            # transformers refuses it too ("truncation length ... is not a multiple of pad_to_multiple_of").
            raise ValueError(f"max_length must be a positive multiple of 8, got {max_length}")
        rows = []
        for text in texts:
            ids = [BOS_ID] + self.sp.encode(text)
            if len(ids) > max_length:
                kept = self.sp.decode(ids[1:max_length])
                warnings.warn(f"prompt truncated from {len(ids)} to {max_length} tokens (BOS included); "
                              f"the text after {kept[-40:]!r} is dropped. Prompt: {text!r}")
                ids = ids[:max_length]
            rows.append(ids)
        length = 8 * math.ceil(max(len(r) for r in rows) / 8)           # longest, up to a multiple of 8
        input_ids = torch.full((len(rows), length), PAD_ID, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, ids in enumerate(rows):
            input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, :len(ids)] = 1
        return input_ids, attention_mask


# ----- Configuration -------------------------------------------------------------------------------------
# google/gemma-2-2b config.json, HF field names. `num_hidden_layers` is the FULL
# model's depth; Gemma2Encoder builds one layer fewer (it stops at hidden_states[-2]).
GEMMA2_CONFIGS = {
    "2b": dict(
        vocab_size=256000,
        hidden_size=2304,              # = 48^2, so the embedding scale sqrt(2304) = 48 is exact in bf16
        intermediate_size=9216,
        num_hidden_layers=26,
        num_attention_heads=8,
        num_key_value_heads=4,         # grouped-query attention: 2 query heads per key/value head
        head_dim=256,                  # q width 8 * 256 = 2048 != hidden 2304
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        query_pre_attn_scalar=256,     # attention scale 256^-0.5, not head_dim-derived in general
        sliding_window=4096,           # on even (0-based) layers; a no-op for prompts <= 512 tokens
        attn_logit_softcapping=50.0,   # the config's value; applied only with use_softcapping=True
        final_logit_softcapping=30.0,  # on the LM head's logits: generation only (enhance_prompt)
    ),
}


# ----- Building blocks -----------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """Gemma's RMSNorm: the weight is stored as an offset around 0 and applied as (1 + w).

    Computed in float32 and cast back only after the multiply (unlike Llama, which casts first). Loading
    Gemma weights into a plain `x * w` norm is the classic bug: every layer would scale by ~0.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))    # zeros == identity, as transformers initialises it

    def forward(self, x):
        # F.rms_norm is xf · rsqrt(mean(xf²) + eps) in one op (fewer passes over memory than spelling it out).
        xf = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return (xf * (1.0 + self.weight.float())).type_as(x)


def rope_cos_sin(length: int, head_dim: int, theta: float, dtype, device):
    """cos and sin tables [L, head_dim] for rotate-half RoPE at positions 0..L-1.

    Frequencies pair dimension j with j + head_dim/2 (the "rotate half" layout of transformers and
    gemma_pytorch — no weight permutation needed). Computed in fp32, then cast to the model dtype as the
    reference does (transformers `Gemma2RotaryEmbedding`). Positions ignore padding, which is why inputs
    must be right-padded.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim)
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]  # [L, D/2]
    angles = torch.cat((angles, angles), dim=-1)                                                     # [L, D]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate x [B, heads, L, D] by position: x*cos + rotate_half(x)*sin, rotate_half(a, b) = (-b, a)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


# ----- Attention -----------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Grouped-query self-attention with RoPE, optional tanh soft-capping, no biases.

    Keys of the projections are transformers' (`q_proj`, `k_proj`, `v_proj`, `o_proj`); rows are
    head-major, so a plain view [B, L, heads, head_dim] splits them.
    """

    def __init__(self, hidden_size, num_attention_heads, num_key_value_heads, head_dim,
                 query_pre_attn_scalar, softcap):
        super().__init__()
        if num_attention_heads % num_key_value_heads:
            raise ValueError(f"num_attention_heads ({num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({num_key_value_heads})")
        self.n_heads, self.n_kv_heads, self.head_dim = num_attention_heads, num_key_value_heads, head_dim
        self.scale = query_pre_attn_scalar ** -0.5
        self.softcap = softcap                       # None = off (SVG-T2I), a float = eager Gemma-2
        self.q_proj = nn.Linear(hidden_size, num_attention_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_key_value_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_key_value_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_attention_heads * head_dim, hidden_size, bias=False)

    def forward(self, x, cos, sin, allowed, cache=None):
        """x [B, L, hidden]; allowed [B, 1, L, L_keys] bool (True = query may attend to key) -> [B, L, hidden].

        cache: None, or a dict {"k", "v"} of this layer's earlier keys and values (empty at first), which x's own
        are appended to (generation: each new token attends to every earlier one without recomputing them)."""
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)     # [B, nh, L, D]
        k = self.k_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, nkv, L, D]
        v = self.v_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, nkv, L, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:                                                           # keys so far + these
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v                                               # [B, nkv, L_keys, D]
        # GQA: key/value head j serves query heads j*g .. j*g+g-1 (repeat_interleave == transformers'
        # repeat_kv). Prompts are short (<= 512 tokens), so the copies cost little.
        group = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)    # [B, nh, L, D]
        if self.softcap is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=self.scale)
        else:
            # SDPA has no soft-capping hook, so this path spells attention out: scores are squashed into
            # (-cap, cap) by cap * tanh(s / cap) BEFORE masking; softmax in fp32 as the reference does.
            scores = (q @ k.transpose(-1, -2)) * self.scale                             # [B, nh, L, L_keys]
            scores = self.softcap * torch.tanh(scores / self.softcap)
            scores = scores.masked_fill(~allowed, float("-inf"))
            out = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v   # [B, nh, L, D]
        out = out.transpose(1, 2).reshape(B, L, self.n_heads * self.head_dim)
        return self.o_proj(out)


# ----- Feed-forward --------------------------------------------------------------------------------------
class MLP(nn.Module):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x)); `hidden_activation: gelu_pytorch_tanh` in the config."""

    def __init__(self, hidden_size, intermediate_size):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


# ----- Decoder layer -------------------------------------------------------------------------------------
class DecoderLayer(nn.Module):
    """One Gemma-2 block with four norms: each sub-layer is normed before AND after ("sandwich").

        x = x + post_attention_layernorm(attn(input_layernorm(x)))
        x = x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))

    Note the post-attention norm acts on the attention output, not (as in Llama) on the MLP input.
    """

    def __init__(self, cfg, softcap, sliding):
        super().__init__()
        self.sliding = sliding                       # sliding-window layer (even index) or global
        H, eps = cfg["hidden_size"], cfg["rms_norm_eps"]
        self.input_layernorm = RMSNorm(H, eps)
        self.self_attn = Attention(H, cfg["num_attention_heads"], cfg["num_key_value_heads"],
                                   cfg["head_dim"], cfg["query_pre_attn_scalar"], softcap)
        self.post_attention_layernorm = RMSNorm(H, eps)
        self.pre_feedforward_layernorm = RMSNorm(H, eps)
        self.mlp = MLP(H, cfg["intermediate_size"])
        self.post_feedforward_layernorm = RMSNorm(H, eps)

    def forward(self, x, cos, sin, allowed, cache=None):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, allowed, cache))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))



def pad_features(feats_list, multiple=8):
    """Unpadded caption features [L_i, D] (a FeatureCache's, or rows of encode_prompts cut to their masks) ->
    (feats [B, L, D], mask [B, L] bool), right-padded with zeros to the longest rounded up to `multiple`:
    the shapes encode_prompts would have produced for the same prompts."""
    length = multiple * math.ceil(max(len(f) for f in feats_list) / multiple)
    feats = feats_list[0].new_zeros(len(feats_list), length, feats_list[0].shape[-1])
    mask = torch.zeros(len(feats_list), length, dtype=torch.bool, device=feats.device)
    for row, f in enumerate(feats_list):
        feats[row, :len(f)], mask[row, :len(f)] = f, True
    return feats, mask


# ----- Input checks ------------------------------------------------------------------------------------
def check_config(num_hidden_layers, use_softcapping, attn_logit_softcapping):
    """Gemma2Encoder's arguments that cannot work, as one ValueError each."""
    if num_hidden_layers < 2:
        raise ValueError(f"num_hidden_layers is the full model's depth and must be >= 2 (one layer is "
                         f"dropped), got {num_hidden_layers}")
    if use_softcapping and not attn_logit_softcapping:
        raise ValueError("use_softcapping=True needs attn_logit_softcapping (50.0 for Gemma-2)")


def check_vocab(tokenizer, encoder):
    """A tokenizer with more pieces than the encoder embeds belongs to another model."""
    if tokenizer.vocab_size > encoder.config["vocab_size"]:
        raise ValueError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but the encoder embeds "
                         f"only {encoder.config['vocab_size']}; they do not belong together")


def check_token_inputs(input_ids, attention_mask):
    """-> the mask as [B, L] bool (all True when None); a clear error unless ids are [B, L] and right-padded."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                         f"{tuple(input_ids.shape)}")
    real = attention_mask.bool()
    if (real[:, 1:] & ~real[:, :-1]).any():
        # Positions are 0..L-1 whatever the mask says, so left padding would shift every token's RoPE.
        raise ValueError("attention_mask must be right-padded (ones, then zeros) in every row; "
                         "use Tokenizer.encode, which pads on the right")
    return real


# ----- Gemma-2 as a language model: greedy generation (causal_lm=True only) ------------------------------
def lm_step(model, ids, start, cache, cos, sin):
    """Run ids [1, T] at positions start .. start+T-1 through every layer, keys and values of the earlier
    positions taken from `cache` (one dict per layer, extended in place) -> next-token logits [vocab]."""
    T, cfg = ids.shape[1], model.config
    x = model.embed_tokens(ids)
    x = x * torch.tensor(cfg["hidden_size"] ** 0.5, dtype=x.dtype)                  # [1, T, H]
    q_pos = torch.arange(start, start + T, device=x.device)
    k_pos = torch.arange(start + T, device=x.device)
    allowed_full = k_pos[None, :] <= q_pos[:, None]                                # [T, keys] causal
    allowed_sliding = allowed_full
    if cfg["sliding_window"] is not None:                                           # the last W keys only
        allowed_sliding = allowed_full & (k_pos[None, :] > q_pos[:, None] - cfg["sliding_window"])
    cos, sin = cos[start:start + T], sin[start:start + T]
    for layer, layer_cache in zip(model.layers, cache):
        x = layer(x, cos, sin, (allowed_sliding if layer.sliding else allowed_full)[None, None], layer_cache)
    # Final norm, then the tied LM head: logits = norm(x) . E^T, squashed by the final soft-cap,
    # cap * tanh(logits / cap) (30 for Gemma-2; transformers' Gemma2ForCausalLM applies it in every attention
    # implementation, unlike the attention soft-cap).
    logits = model.norm(x[0, -1]) @ model.embed_tokens.weight.T                     # [vocab]
    cap = cfg["final_logit_softcapping"]
    return logits if cap is None else cap * torch.tanh(logits / cap)

@torch.no_grad()
def greedy_generate(model, input_ids, max_new_tokens, eos_id=EOS_ID):
    """Greedy decoding of one sequence: input_ids (a list of ints, BOS first) -> the new token ids, at most
    `max_new_tokens`, ending with `eos_id` if it came. What transformers' `generate(do_sample=False,
    eos_token_id=eos_id)` returns after the prompt: each step appends the highest-scoring token (the first of
    equal ones, as torch.argmax), and stops after the end token. A KV cache keeps each step to one token."""
    if not model.causal_lm:
        raise ValueError("generate needs the whole Gemma-2: build it with causal_lm=True (load_gemma2(..., "
                         "causal_lm=True)); the encoder stops at hidden_states[-2]")
    device = model.embed_tokens.weight.device
    total = len(input_ids) + max_new_tokens
    cos, sin = rope_cos_sin(total, model.config["head_dim"], model.config["rope_theta"],
                            model.embed_tokens.weight.dtype, device)                # [total, D]
    cache = [{} for _ in model.layers]
    ids, start, new = torch.tensor([input_ids], device=device), 0, []
    while len(new) < max_new_tokens:
        logits = lm_step(model, ids, start, cache, cos, sin)
        token = int(logits.float().argmax())
        new.append(token)
        if token == eos_id:
            break
        start += ids.shape[1]
        ids = torch.tensor([[token]], device=device)
    return new

# ----- Prompt enhancement (the official `--system_type enhance`) --------------------------------------------
# KlingTeam/SVG-T2I `svg_t2i/sample_svg_t2i.py`, generate_enhanced_prompt: Gemma-2 itself, run as the causal
# language model it is, rewrites the user's prompt into a more detailed one before it is encoded (after the
# 'align' system prompt). The instruction is quoted exactly; the model reads it after BOS, decodes greedily for
# at most 196 new tokens, stops at <eos>, and the answer is cleaned up by clean_enhanced_prompt.
ENHANCE_INSTRUCTION = (
    "You are an assistant that rewrites image generation prompts.\n"
    "Given a user prompt, rewrite it into a more detailed and concrete visual description.\n"
    "You MUST strictly preserve:\n"
    "- the main subject(s) and their roles;\n"
    "- the number of each entity (do not change counts like 'one', 'two', 'three');\n"
    "- explicit attributes (e.g. colors, sizes, poses) that appear in the user prompt;\n"
    "- explicit spatial relationships (left/right, front/behind, on top of, in the background, etc.);\n"
    "- explicit style or format constraints (e.g. '3D render', 'line art', 'pixel art', 'photograph').\n"
    "You may only add a few plausible visual details (textures, lighting, background context) "
    "that do NOT contradict any part of the original prompt.\n"
    "Avoid repeating the same subject or action multiple times; keep the description concise.\n"
    "Do not remove or alter any constraints given in the user prompt.\n"
    "Do NOT mention the words 'User Prompt' or 'Enhanced Prompt' in your answer.\n"
    "Output only the enhanced description as one or two sentences.\n\n"
    "User prompt: {prompt}\n"
    "Enhanced description:"
)
ENHANCE_MAX_NEW_TOKENS = 196


def decode_generated(tokenizer, ids):
    """New token ids -> text, special tokens dropped (transformers' decode(skip_special_tokens=True)): the control
    pieces (<pad>, <eos>, <bos>), <unk> and Gemma's two turn markers."""
    sp = tokenizer.sp
    turn_markers = {"<start_of_turn>", "<end_of_turn>"}
    kept = [i for i in ids if not (sp.is_control(i) or sp.is_unknown(i) or sp.id_to_piece(i) in turn_markers)]
    return sp.decode(kept)


def clean_enhanced_prompt(answer, prompt):
    """The official clean-up of the model's answer (same rules, our code): its first non-empty line; a leading
    label such as "Enhanced description:" cut off; comma-separated clauses de-duplicated (case-insensitively) and
    at most 4 kept; at most 256 characters, cut at a space; the user's prompt if nothing is left."""
    text = answer.strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "\n" in text and lines:
        text = lines[0]
    if ":" in text[:40]:
        label, rest = text.split(":", 1)
        if any(word in label.lower() for word in ("enhanced", "description", "prompt")):
            text = rest.strip()
    clauses, seen = [], set()
    for clause in (c.strip() for c in text.split(",")):
        if clause and clause.lower() not in seen and len(clauses) < 4:
            seen.add(clause.lower())
            clauses.append(clause)
    if clauses:
        text = ", ".join(clauses)
    if len(text) > 256:
        cut = text[:256]
        text = cut.rsplit(" ", 1)[0] if " " in cut else cut
    return text.strip() or prompt


def enhance_prompt(model, tokenizer, prompt, max_new_tokens=ENHANCE_MAX_NEW_TOKENS):
    """The user's prompt -> Gemma-2's more detailed rewrite of it (model: load_gemma2(..., causal_lm=True))."""
    ids = [BOS_ID] + tokenizer.sp.encode(ENHANCE_INSTRUCTION.format(prompt=prompt))   # as transformers tokenises
    new = model.generate(ids, max_new_tokens, eos_id=EOS_ID)
    return clean_enhanced_prompt(decode_generated(tokenizer, new), prompt)



# ----- Loading and saving the Hugging Face layout --------------------------------------------------------
# A HF model folder: config.json, then either model.safetensors or shards model-0000i-of-0000n.safetensors
# listed in model.safetensors.index.json ({"metadata": {...}, "weight_map": {key: shard file}}). Released
# keys carry the `model.` prefix of Gemma2ForCausalLM, and there is no lm_head (tied to the embedding).

def _read_config(folder):
    """config.json -> the Gemma2Encoder keyword arguments, with a clear error for anything unexpected."""
    path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: not a folder; load_gemma2 takes the Hugging Face model folder "
                                "(config.json + *.safetensors), e.g. a download of google/gemma-2-2b")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing; load_gemma2 needs the model's config.json next to "
                                "its safetensors files")
    try:
        with open(path) as f:
            hf = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); re-download it") from None
    if hf.get("model_type") != "gemma2":
        raise ValueError(f"{path}: model_type is {hf.get('model_type')!r}, expected 'gemma2'")
    activation = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if activation != "gelu_pytorch_tanh":
        raise ValueError(f"{path}: hidden_activation {activation!r} is not supported (Gemma-2 uses "
                         "gelu_pytorch_tanh)")
    names = list(GEMMA2_CONFIGS["2b"])
    required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim"]
    missing = [n for n in required if n not in hf]
    if missing:
        raise ValueError(f"{path} lacks {missing}; it is not a complete Gemma-2 config")
    config = {n: hf[n] for n in names if n in hf}
    # transformers >= 5 writes rope_theta inside `rope_parameters`; older versions at the top level.
    rope = hf.get("rope_parameters") or {"rope_type": "default", "rope_theta": hf.get("rope_theta", 10000.0)}
    if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
        raise ValueError(f"{path}: RoPE scaling {rope} is not supported (Gemma-2 uses plain RoPE)")
    config["rope_theta"] = rope["rope_theta"]
    if hf.get("tie_word_embeddings", True) is False:
        raise ValueError(f"{path}: tie_word_embeddings is false; Gemma-2's LM head is its embedding, and only "
                         "that is supported")
    # Newer configs spell out the layer pattern; this file builds the released one (sliding on even layers).
    layer_types = hf.get("layer_types")
    released = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(hf["num_hidden_layers"])]
    if layer_types is not None and layer_types != released:
        raise ValueError(f"{path}: layer_types {layer_types} differ from Gemma-2's alternation "
                         "(sliding on even layers, full on odd ones), which is the only one supported")
    return config


def _weight_files(folder):
    """{checkpoint key: shard path}, through the index when there is one."""
    index_path = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise ValueError(f"{index_path} is not a safetensors index ({err!r}); download it again") from None
        return {key: os.path.join(folder, name) for key, name in weight_map.items()}
    files = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    if len(files) != 1:
        raise FileNotFoundError(f"{folder}: expected model.safetensors.index.json or exactly one *.safetensors "
                                f"file, found {files or 'none'}")
    path = os.path.join(folder, files[0])
    return {key: path for key in _open(path).keys()}


def _open(path):
    """safe_open with an error that names the file when it is missing, truncated or not safetensors."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: shard listed in the index is missing; download it again")
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err}); it is probably truncated or "
                         "corrupt — download it again") from None


def load_gemma2(folder, dtype=torch.float32, device="cpu", use_softcapping=False, causal_lm=False) -> Gemma2Encoder:
    """Build the encoder from a HF Gemma-2 folder and load its weights, strictly.

    Every tensor the encoder builds must be in the checkpoint with the right shape; the last layer and
    the final norm (not built) and a tied lm_head are skipped; anything else is an error. Weights are
    cast to `dtype` (fp32 for CPU, bf16 as SVG-T2I runs it on GPU) one tensor at a time, so peak memory
    stays near the final model size — the model is first built on the meta device (no allocation).
    causal_lm=True loads the whole model (the last layer and the final norm too) for `generate`; the LM head
    is the embedding matrix (the released google/gemma-2-2b stores no lm_head: tie_word_embeddings).
    """
    cfg = _read_config(folder)
    with torch.device("meta"):
        encoder = Gemma2Encoder(**cfg, use_softcapping=use_softcapping, causal_lm=causal_lm)
    expected = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    last = cfg["num_hidden_layers"] - 1
    skipped = ("lm_head.",) if causal_lm else (f"layers.{last}.", "norm.", "lm_head.")

    files = _weight_files(folder)
    handles = {path: _open(path) for path in dict.fromkeys(files.values())}
    prefixed = {k.removeprefix("model."): k for k in files if not k.removeprefix("model.").startswith(skipped)}
    # Shapes from the files' headers (meta tensors: nothing is read yet), checked as model.load_nextdit does.
    found = {name: torch.empty(handles[files[key]].get_slice(key).get_shape(), device="meta")
             for name, key in prefixed.items()}
    missing, unexpected, misshapen = key_report(expected, found)
    if causal_lm and missing and all(k.startswith((f"layers.{last}.", "norm.")) for k in missing):
        raise ValueError(f"{folder} holds Gemma-2 up to hidden_states[-2] only (no layer {last}, no final norm: "
                         "an encoder folder, as train.py writes for the small presets); generating text needs the "
                         "whole model, e.g. google/gemma-2-2b (--gemma)")
    if missing or unexpected or misshapen:
        raise ValueError(f"{folder}: the checkpoint does not match the Gemma-2 config in its config.json:\n"
                         f"  missing keys: {missing[:8]}{' ...' if len(missing) > 8 else ''}\n"
                         f"  unexpected keys: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}\n"
                         f"  wrong shapes: {misshapen[:8]}")

    state = {}
    for name in expected:
        path = files[prefixed[name]]
        try:
            tensor = handles[path].get_tensor(prefixed[name])
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"{path}: could not read {prefixed[name]} ({err}); the file is probably "
                             "truncated — download it again") from None
        state[name] = tensor.to(device=device, dtype=dtype)
    encoder.load_state_dict(state, strict=True, assign=True)
    return encoder.eval().requires_grad_(False)


def save_gemma2(encoder: Gemma2Encoder, folder, max_shard_size=None):
    """Write `encoder` as a HF-style Gemma-2 folder that load_gemma2 (and transformers) can read.

    config.json states the FULL depth (built layers + 1) so the folder describes a whole Gemma-2 whose
    last layer and final norm are absent; transformers would initialise those and warn, which is harmless
    for hidden_states[-2]. A causal_lm model is written whole. Keys get the `model.` prefix of the released files. With `max_shard_size` (in
    bytes) the tensors are split into model-0000i-of-0000n.safetensors files plus an index.
    """
    os.makedirs(folder, exist_ok=True)
    cfg = dict(encoder.config)
    dtype = next(encoder.parameters()).dtype
    hf_config = {
        "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", **cfg,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 8192, "attention_bias": False, "attention_dropout": 0.0,
        "pad_token_id": PAD_ID, "eos_token_id": EOS_ID, "bos_token_id": BOS_ID, "tie_word_embeddings": True,
        "torch_dtype": str(dtype).replace("torch.", ""),
    }
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)

    tensors = {"model." + k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
    shards, size = [{}], 0                               # greedy: start a new shard when the next overflows
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_size and shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return folder
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return folder


# ----- A small Gemma-like tokenizer (demo and tests) -----------------------------------------------------
def train_tokenizer(texts, out_path: str, vocab_size: int) -> str:
    """Train a small Gemma-like sentencepiece model on `texts` and write it to `out_path`; returns the path.

    For the demo and the tests, where the real 256k-piece Gemma tokenizer is not available. The settings
    copy what Gemma's file is known to use (the Gemma report: split digits, preserved whitespace, byte
    fallback; transformers' `GemmaConverter`: no prefix space, unk id 3): BPE, byte fallback, split digits,
    whitespace kept as is, no dummy prefix, special ids pad 0 / eos 1 / bos 2 / unk 3, and Gemma's two
    turn markers as user-defined pieces. Single-threaded without sampling, so the same texts give the same
    model. `vocab_size` is an upper bound: a tiny corpus may yield fewer pieces (read Tokenizer.vocab_size).
    Every distinct character and all 256 byte pieces need a slot, so very small sizes are refused.
    """
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("train_tokenizer needs at least one non-empty text")
    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    needed = len(special) + 256 + len(set("".join(texts)))
    if vocab_size < needed:
        raise ValueError(f"vocab_size {vocab_size} is too small for these texts: the special pieces, 256 byte "
                         f"pieces and every distinct character need {needed}; ask for at least that many")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        hard_vocab_limit=False, pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=special[4:], byte_fallback=True, split_digits=True,
        add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
        allow_whitespace_only_pieces=True, character_coverage=1.0, num_threads=1,
        shuffle_input_sentence=False, minloglevel=2)
    # Write to a temporary name and rename, so a half-written tokenizer.model is never left behind.
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path + ".tmp", "wb") as f:
        f.write(model.getvalue())
    os.replace(out_path + ".tmp", out_path)
    return out_path

