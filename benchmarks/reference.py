"""Reference implementations for the speed benchmark, built with the same weights as ours.

Benchmarks only (never imported by the runtime code): diffusers' `Lumina2Transformer2DModel` for the
Next-DiT, transformers' `DINOv3ViTModel` and `Gemma2Model` for the encoders. Each builder takes one of
our models and returns the reference with that model's weights, so a benchmark can time both on the same
inputs and check that they agree before it times anything.

The Next-DiT key mapping (released names -> diffusers names) is `nextdit_state_to_diffusers` below; the
encoders go through our own loaders' public formats (HF layouts), which tests/test_dino.py and
tests/test_text.py check independently.
"""
import torch

# ----- Random weights ------------------------------------------------------------------------------------------

@torch.no_grad()
def randomize_(module, seed):
    """Give every parameter random O(1)-preserving values (default inits hide whole code paths: zero adaLN,
    identity norms). Matrices: uniform with std 1/sqrt(fan_in); vectors: 1 + N(0, 0.2), biases N(0, 0.2).
    Drawn where the module lives (a 2B model on a GPU takes a second, not a minute of CPU draws)."""
    device = next(module.parameters()).device
    gen = torch.Generator(device).manual_seed(seed)
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            bound = (3.0 / p[0].numel()) ** 0.5
            p.copy_((torch.rand(p.shape, generator=gen, device=device) * 2 - 1) * bound)
        elif name.endswith("bias"):
            p.copy_(torch.randn(p.shape, generator=gen, device=device) * 0.2)
        else:
            p.copy_(1 + torch.randn(p.shape, generator=gen, device=device) * 0.2)
    return module


# ----- Next-DiT -> diffusers Lumina2Transformer2DModel ------------------------------------------------------
# Plain renames, in the order they are applied; the fused qkv is split into to_q / to_k / to_v, and the
# released `norm_final.weight` (unused in forward) has no diffusers counterpart.
_RENAMES = [
    ("t_embedder.mlp.0.", "time_caption_embed.timestep_embedder.linear_1."),
    ("t_embedder.mlp.2.", "time_caption_embed.timestep_embedder.linear_2."),
    ("cap_embedder.", "time_caption_embed.caption_embedder."),
    ("final_layer.adaLN_modulation.1.", "norm_out.linear_1."),
    ("final_layer.linear.", "norm_out.linear_2."),
    ("attention.out.", "attn.to_out.0."),
    ("attention.q_norm.", "attn.norm_q."),
    ("attention.k_norm.", "attn.norm_k."),
    ("feed_forward.w1.", "feed_forward.linear_1."),
    ("feed_forward.w2.", "feed_forward.linear_2."),
    ("feed_forward.w3.", "feed_forward.linear_3."),
    (".attention_norm2.", ".norm2."),
    (".adaLN_modulation.1.", ".norm1.linear."),
]


def nextdit_state_to_diffusers(state, config):
    """Our (= released) Next-DiT state dict -> diffusers Lumina2Transformer2DModel keys."""
    head_dim = config["dim"] // config["n_heads"]
    q_rows, kv_rows = config["n_heads"] * head_dim, config["n_kv_heads"] * head_dim
    out = {}
    for key, val in state.items():
        if key == "norm_final.weight":
            continue
        if key.endswith("attention.qkv.weight"):
            base = key[: -len("attention.qkv.weight")]
            q, k, v = val.split([q_rows, kv_rows, kv_rows])
            out[base + "attn.to_q.weight"], out[base + "attn.to_k.weight"], out[base + "attn.to_v.weight"] = q, k, v
            continue
        new = key
        for old, rep in _RENAMES:
            new = new.replace(old, rep)
        if ".attention_norm1." in new:
            # Modulated blocks wrap their first norm in LuminaRMSNormZero (norm1.norm); the context
            # refiner's is a plain RMSNorm (norm1).
            plain = key.startswith("context_refiner.")
            new = new.replace(".attention_norm1.", ".norm1." if plain else ".norm1.norm.")
        out[new] = val
    return out


def diffusers_nextdit(model):
    """diffusers' Lumina2Transformer2DModel with the configuration and weights of our NextDiT `model`."""
    import diffusers
    cfg = model.config
    ref = diffusers.Lumina2Transformer2DModel(
        patch_size=cfg["patch_size"], in_channels=cfg["in_channels"], hidden_size=cfg["dim"],
        num_layers=cfg["n_layers"], num_refiner_layers=cfg["n_refiner_layers"], num_attention_heads=cfg["n_heads"],
        num_kv_heads=cfg["n_kv_heads"], multiple_of=cfg["multiple_of"], ffn_dim_multiplier=cfg["ffn_dim_multiplier"],
        norm_eps=cfg["norm_eps"], axes_dim_rope=tuple(cfg["axes_dims"]), axes_lens=tuple(cfg["axes_lens"]),
        cap_feat_dim=cfg["cap_feat_dim"])
    ref.load_state_dict(nextdit_state_to_diffusers(model.state_dict(), cfg), strict=True)
    for mod in ref.modules():   # the official q/k-norm eps, 1e-6 (RMSNorm's default); diffusers builds 1e-5
        if getattr(mod, "norm_q", None) is not None:
            mod.norm_q.eps = mod.norm_k.eps = 1e-6
    return ref.train(model.training)


# ----- DINOv3 -> transformers DINOv3ViTModel ----------------------------------------------------------------

def hf_dinov3(config, seed=0):
    """A random transformers DINOv3ViTModel shaped like our DINOV3_CONFIGS entry `config` (eval mode).

    Our model gets its weights through dino.load_dinov3 on the saved folder (the public HF path)."""
    import transformers
    from dino import ffn_hidden_dim
    gated = config["ffn_layer"] != "mlp"
    hf_cfg = transformers.DINOv3ViTConfig(
        hidden_size=config["embed_dim"], num_attention_heads=config["num_heads"],
        num_hidden_layers=config["depth"], patch_size=config["patch_size"], use_gated_mlp=gated,
        hidden_act="silu" if gated else "gelu", num_register_tokens=config["n_storage_tokens"],
        intermediate_size=ffn_hidden_dim(config["embed_dim"], config["ffn_layer"], config["ffn_ratio"]),
        rope_theta=config["pos_embed_rope_base"], layerscale_value=1.0)
    torch.manual_seed(seed)
    return transformers.DINOv3ViTModel(hf_cfg).eval()


# ----- Gemma-2 -> transformers Gemma2Model ------------------------------------------------------------------

def hf_gemma2(config, seed=0):
    """A random transformers Gemma2Model from an HF-named config (text.GEMMA2_CONFIGS style), soft-capping
    off: the numbers SVG-T2I's features were computed with (text.py docstring). Eager attention: the only
    implementation transformers 5 offers for Gemma-2 (it refuses "sdpa")."""
    import transformers
    cfg = dict(config, attn_logit_softcapping=None, final_logit_softcapping=None, pad_token_id=0)
    hf_cfg = transformers.Gemma2Config(**cfg, attn_implementation="eager")
    torch.manual_seed(seed)
    return transformers.Gemma2Model(hf_cfg).eval()


def gemma2_state_for_ours(hf_model, encoder):
    """The subset of a Gemma2Model state dict that our Gemma2Encoder builds (it stops one layer early)."""
    hf_state = hf_model.state_dict()
    return {k: hf_state[k] for k in encoder.state_dict()}
