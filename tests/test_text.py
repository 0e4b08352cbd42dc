"""Tests for text.py: Gemma-2 encoder parity with transformers, the 2B layout, tokenizer rules, loading.

The parity references are transformers' Gemma2Model (eager attention) and its tokenizers-backed
GemmaTokenizer; both tests skip when transformers is not installed. Every parameter is randomised first
(tests/helpers.randomize_), so identity-initialised norms cannot hide a missing (1 + w).
"""
import json
import math
import warnings

import pytest
import torch

import text
from helpers import manifest, randomize_, rel_err

# A tiny Gemma-2 that exercises every feature: GQA (4 heads, 2 kv heads),
# query_pre_attn_scalar != head_dim (catches a wrong scale), a sliding window shorter than the sequence,
# a small soft-cap so that it changes the numbers, and a RoPE base other than Gemma's 10000 (transformers 5
# stores it in config.json's `rope_parameters`; a loader that missed it would fall back to the default).
TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=500.0,
            query_pre_attn_scalar=24, sliding_window=5, attn_logit_softcapping=5.0)

CAPTIONS = ["a red circle in the top left", "a blue square on the right", "a green triangle at the bottom",
            "tiny 123 shapes, café 東京 😀", " two  spaces\tand\nnewline", "<start_of_turn>hi there"]


def padded_batch(lengths, length=16, vocab=1000, seed=0):
    """Random ids [B, L] starting with BOS, right-padded with 0 to the given real lengths, and the mask."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (len(lengths), length), generator=gen)
    ids[:, 0] = text.BOS_ID
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return ids.masked_fill(mask == 0, text.PAD_ID), mask


def tiny_encoder(seed=0, **overrides):
    torch.manual_seed(seed)
    return randomize_(text.Gemma2Encoder(**{**TINY, **overrides}), seed).eval()


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return text.train_tokenizer(CAPTIONS * 5, str(tmp_path_factory.mktemp("tok") / "tokenizer.model"), 400)


# ----- Parity with transformers ------------------------------------------------------------------------
def test_matches_transformers_hidden_states_minus_2(tmp_path):
    tr = pytest.importorskip("transformers")
    cfg = tr.Gemma2Config(**TINY, pad_token_id=0, attn_implementation="eager")
    torch.manual_seed(0)
    hf = randomize_(tr.Gemma2ForCausalLM(cfg), seed=1).eval()   # `model.`-prefixed keys, like the hub files
    hf.save_pretrained(tmp_path, max_shard_size="50KB")         # many shards: exercises the index path
    assert len(list(tmp_path.glob("*.safetensors"))) > 1

    ids, mask = padded_batch([16, 9, 3])                         # window 5 < 16: sliding layers bite
    real = mask.bool()
    with torch.no_grad():
        hs_on = hf.model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        for layer in hf.model.layers:                            # the same weights without soft-capping
            layer.self_attn.attn_logit_softcapping = None
        hs_off = hf.model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert len(hs_on) == TINY["num_hidden_layers"] + 1

    ours_default = text.load_gemma2(str(tmp_path))
    ours_on = text.load_gemma2(str(tmp_path), use_softcapping=True)
    assert len(ours_default.layers) == TINY["num_hidden_layers"] - 1
    with torch.no_grad():
        out_off, out_on = ours_default(ids, mask), ours_on(ids, mask)
    assert rel_err(out_on[real], hs_on[-2][real]) <= 1e-5
    assert rel_err(out_off[real], hs_off[-2][real]) <= 1e-5      # soft-capping is off by default
    assert rel_err(out_on[real], out_off[real]) > 1e-2           # ... and the flag really changes numbers
    assert torch.isfinite(out_on).all() and torch.isfinite(out_off).all()   # padded rows included


def test_transformers_reads_saved_folder(tmp_path):
    tr = pytest.importorskip("transformers")
    ours = tiny_encoder(seed=2, use_softcapping=True)       # transformers applies the config's cap
    text.save_gemma2(ours, str(tmp_path))
    # Our folder lacks the last layer and the final norm; transformers initialises them (and says so),
    # which cannot touch hidden_states[-2].
    hf = tr.Gemma2Model.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    ids, mask = padded_batch([16, 7])
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        out = ours(ids, mask)
    real = mask.bool()
    assert rel_err(out[real], ref[real]) <= 1e-5


# ----- Invariants (no reference needed) ----------------------------------------------------------------
def test_real_tokens_ignore_padding_and_bos_is_shared():
    enc = tiny_encoder(seed=3)
    ids, mask = padded_batch([16, 9, 3, 1])
    with torch.no_grad():
        batched = enc(ids, mask)
        alone = enc(ids[1:2, :9], mask[1:2, :9])                 # the 9-token prompt without padding
        bos_only = enc(ids[3:4, :1], mask[3:4, :1])              # the unconditional input: just [BOS]
    assert rel_err(batched[1, :9], alone[0]) <= 1e-5
    assert rel_err(batched[:, 0], bos_only[0, 0].expand(4, -1)) <= 1e-5
    assert torch.isfinite(batched).all()


def test_sliding_window_only_matters_beyond_its_length():
    ids, mask = padded_batch([16])
    with torch.no_grad():
        full = tiny_encoder(seed=4, sliding_window=None)(ids, mask)
        wide = tiny_encoder(seed=4, sliding_window=16)(ids, mask)
        narrow = tiny_encoder(seed=4, sliding_window=5)(ids, mask)
    assert rel_err(wide, full) <= 1e-6
    assert rel_err(narrow[0, :5], full[0, :5]) <= 1e-5           # first W tokens see the same keys
    assert rel_err(narrow[0, 5:], full[0, 5:]) > 1e-3


def test_left_padding_is_refused():
    ids, mask = padded_batch([16, 9])
    with pytest.raises(ValueError, match="right-padded"):
        tiny_encoder()(ids, mask.flip(1))


# ----- The released 2B layout ---------------------------------------------------------------------------
def test_2b_layout_and_parameter_counts_on_meta():
    cfg = text.GEMMA2_CONFIGS["2b"]
    with torch.device("meta"):
        enc = text.Gemma2Encoder(**cfg)
    built = {"model." + k: list(v.shape) for k, v in enc.state_dict().items()}
    last = cfg["num_hidden_layers"] - 1
    released = {k: v for k, v in manifest("gemma2_2b_hf").items()
                if not k.startswith(f"model.layers.{last}.") and k != "model.norm.weight"}
    assert built == released
    # google/gemma-2-2b: embedding 589,824,000; per layer 77,865,984; the full model 2,614,341,888.
    # Embedding + 25 layers = 589,824,000 + 25 * 77,865,984 = 2,536,473,600 (2,536,475,904 with the final
    # norm, which is not built).
    n_params = sum(p.numel() for p in enc.parameters())
    per_layer = sum(p.numel() for p in enc.layers[0].parameters())
    assert enc.embed_tokens.weight.numel() == 589_824_000
    assert per_layer == 77_865_984
    assert n_params == 2_536_473_600
    assert n_params + per_layer + cfg["hidden_size"] == 2_614_341_888


# ----- Tokenizer and prompts ----------------------------------------------------------------------------
def test_tokenizer_bos_padding_truncation(tokenizer_path, tmp_path):
    again = text.train_tokenizer(CAPTIONS * 5, str(tmp_path / "again.model"), 400)
    with open(tokenizer_path, "rb") as a, open(again, "rb") as b:
        assert a.read() == b.read()                              # deterministic training

    tok = text.Tokenizer(tokenizer_path)
    assert tok.vocab_size == 400
    batch = CAPTIONS + [""]
    ids, mask = tok.encode(batch, 256)
    lengths = mask.sum(1)
    assert ids.shape[1] % 8 == 0 and ids.shape[1] == 8 * math.ceil(lengths.max().item() / 8)
    assert (ids[:, 0] == text.BOS_ID).all() and not (ids == text.EOS_ID).any()
    assert ids[-1, :1].tolist() == [text.BOS_ID] and lengths[-1] == 1             # "" -> [BOS]
    assert (ids[mask == 0] == text.PAD_ID).all() and (mask[:, :-1] >= mask[:, 1:]).all()
    for row, n, caption in zip(ids, lengths, batch):
        assert tok.sp.decode(row[1:n].tolist()) == caption                       # round trip, exact text

    long_prompt = " ".join(CAPTIONS)
    with pytest.warns(UserWarning, match="top left"):             # the warning quotes the prompt
        cut, cut_mask = tok.encode([long_prompt, "a"], 16)
    full, _ = tok.encode([long_prompt], 256)
    assert cut.shape == (2, 16) and cut_mask[0].all() and cut[0].tolist() == full[0, :16].tolist()
    with pytest.raises(ValueError, match="multiple of 8"):
        tok.encode(["a"], 20)
    with pytest.raises(TypeError, match="list of strings"):
        tok.encode("a", 16)


def test_tokenizer_matches_transformers(tokenizer_path):
    tr = pytest.importorskip("transformers")
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import generate_merges

    tok = text.Tokenizer(tokenizer_path)
    # transformers would read tokenizer.model through protobuf; build its Gemma tokenizer from the same
    # vocabulary instead (its own merge derivation, normaliser, pre-tokeniser and byte fallback).
    vocab = {tok.sp.id_to_piece(i): i for i in range(tok.vocab_size)}
    hf = tr.GemmaTokenizer(vocab=vocab, merges=generate_merges(vocab), add_bos_token=True, add_eos_token=False,
                           extra_special_tokens=[AddedToken(s, normalized=False, special=False)
                                                 for s in ("<start_of_turn>", "<end_of_turn>")])
    hf.padding_side = "right"                                     # as SVG-T2I sets it
    batch = CAPTIONS + ["", "zzz unseen Ω red", " ".join(CAPTIONS)]
    for max_length in (16, 256):
        ref = hf(batch, padding=True, pad_to_multiple_of=8, max_length=max_length, truncation=True,
                 return_tensors="pt")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ids, mask = tok.encode(batch, max_length)
        assert len(caught) == (1 if max_length == 16 else 0)      # only the long prompt is cut, at 16
        assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])


def test_system_prompts_and_format():
    # Quoted from KlingTeam/SVG-T2I `svg_t2i/sample_svg_t2i.py` (the official sampler's system_type choices).
    base = "You are an assistant designed to generate high-quality images based on user prompts. <Prompt Start> "
    align = ("You are an assistant designed to generate high-quality images with the highest degree of "
             "image-text alignment based on textual prompts. <Prompt Start> ")
    real = ("You are an assistant designed to generate superior images with the superior degree of image-text "
            "alignment based on textual prompts or user prompts. <Prompt Start> ")
    aesthetics = ("You are an assistant designed to generate high-quality images with highest degree of "
                  "aesthetics based on user prompts. <Prompt Start> ")
    expected = {"base": base, "align": align, "real": real, "aesthetics": aesthetics, "empty": ""}
    assert {k: text.SYSTEM_PROMPTS[k] for k in expected} == expected
    assert text.format_prompt("a cat", "base") == base + "a cat"
    assert text.format_prompt("a cat", "Draw: ") == "Draw: a cat"                 # literal prefix
    # An uncaptioned training image reads the system prompt alone (the official item processor); the CFG
    # unconditional input is the bare "", which only the empty system prompt leaves as it is.
    assert text.format_prompt("", "real") == real
    assert text.format_prompt("", "") == ""


def test_encode_prompts(tokenizer_path):
    tok = text.Tokenizer(tokenizer_path)
    enc = tiny_encoder(seed=5, vocab_size=tok.vocab_size)
    # as the trainer and sampler call it: prompts already formatted, plus the bare unconditional ""
    feats, mask = text.encode_prompts(enc, tok, [text.format_prompt("a red circle", "base"), ""], 256)
    ids, am = tok.encode([text.format_prompt("a red circle", "base"), ""], 256)
    assert feats.shape == (2, ids.shape[1], TINY["hidden_size"]) and feats.dtype == torch.float32
    assert mask.dtype == torch.bool and torch.equal(mask, am.bool()) and mask[1].sum() == 1
    assert not feats.requires_grad
    with torch.no_grad():
        assert rel_err(feats, enc(ids, am)) == 0.0
    assert rel_err(feats[1, 0], feats[0, 0]) <= 1e-5             # both start with the same [BOS] feature
    with pytest.raises(ValueError, match="pieces"):
        text.encode_prompts(tiny_encoder(vocab_size=100), tok, ["a"], 256)


# ----- Saving, loading, bad input ------------------------------------------------------------------------
def test_sharded_save_load_roundtrip(tmp_path):
    enc = tiny_encoder(seed=6)
    text.save_gemma2(enc, str(tmp_path), max_shard_size=40_000)
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_hidden_layers"] == TINY["num_hidden_layers"]              # the FULL depth
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {"model." + k for k in enc.state_dict()}

    loaded = text.load_gemma2(str(tmp_path))
    assert not any(p.requires_grad for p in loaded.parameters())
    for k, v in enc.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    half = text.load_gemma2(str(tmp_path), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    ids, mask = padded_batch([8, 5], length=8)
    with torch.no_grad():
        assert rel_err(half(ids, mask).float(), enc(ids, mask)) < 5e-2


def test_bad_input_messages(tmp_path, tokenizer_path):
    enc = tiny_encoder(seed=7)
    good = tmp_path / "good"
    text.save_gemma2(enc, str(good), max_shard_size=40_000)

    with pytest.raises(FileNotFoundError, match="not a folder"):
        text.load_gemma2(str(good / "config.json"))
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        text.load_gemma2(str(tmp_path))

    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type is 'llama'"):
        text.load_gemma2(str(other))

    # A shard cut in half (an interrupted download): the message names the file.
    shard = sorted(good.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=shard.name + ".*truncated"):
        text.load_gemma2(str(good))
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name + ".*missing"):
        text.load_gemma2(str(good))

    # A checkpoint whose config promises something else: the key is named.
    single = tmp_path / "single"
    text.save_gemma2(enc, str(single))
    config = json.loads((single / "config.json").read_text())
    (single / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(ValueError, match="gate_proj.weight: file"):
        text.load_gemma2(str(single))
    (single / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 5}))
    with pytest.raises(ValueError, match="missing keys: .*layers.3.mlp"):
        text.load_gemma2(str(single))

    # Tokenizers: a file that is not sentencepiece, and a sentencepiece model with other special ids.
    with pytest.raises(ValueError, match="config.json is not a sentencepiece model"):
        text.Tokenizer(str(single / "config.json"))
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CAPTIONS), model_prefix=str(tmp_path / "llama_like"),
                                   vocab_size=60, model_type="bpe", num_threads=1, minloglevel=2)
    with pytest.raises(ValueError, match="not a Gemma tokenizer"):
        text.Tokenizer(str(tmp_path / "llama_like.model"))
    with pytest.raises(ValueError, match="at least"):
        text.train_tokenizer(CAPTIONS, str(tmp_path / "small.model"), 100)


# ----- Gemma-2 as a language model: prompt enhancement --------------------------------------------------
def hf_causal_lm(tmp_path, seed=1, **overrides):
    """transformers' Gemma2ForCausalLM at the tiny size, every parameter random (the LM head is the embedding:
    tied, as google/gemma-2-2b), saved where load_gemma2 reads it."""
    tr = pytest.importorskip("transformers")
    cfg = tr.Gemma2Config(**{**TINY, **overrides}, pad_token_id=0, final_logit_softcapping=3.0,
                          attn_implementation="eager")
    torch.manual_seed(0)
    hf = randomize_(tr.Gemma2ForCausalLM(cfg), seed=seed).eval()
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    hf.save_pretrained(tmp_path)
    return hf


def hf_greedy(hf, ids, max_new_tokens):
    """The official call (sample_svg_t2i.py, generate_enhanced_prompt): greedy, stop at <eos>."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=text.EOS_ID,
                          pad_token_id=text.EOS_ID)
    return out[0, len(ids):].tolist()


def test_greedy_generation_gives_transformers_tokens(tmp_path):
    """All layers, the final norm, the tied head with the final logit soft-cap, sliding-window layers (window 5
    here, 40 tokens long), the KV cache: the same tokens as Gemma2ForCausalLM.generate(do_sample=False). Without
    attention soft-capping, as the official sampler's transformers (4.57.3, SDPA) ran it, and with it (eager)."""
    hf = hf_causal_lm(tmp_path)
    ours = text.load_gemma2(str(tmp_path), causal_lm=True)
    ours_capped = text.load_gemma2(str(tmp_path), causal_lm=True, use_softcapping=True)
    assert len(ours.layers) == TINY["num_hidden_layers"]
    prompts = [[text.BOS_ID] + torch.randint(4, 1000, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (9, 3)]
    for ids in prompts:
        capped = hf_greedy(hf, ids, 30)
        assert ours_capped.generate(ids, 30) == capped
        for layer in hf.model.layers:
            layer.self_attn.attn_logit_softcapping = None
        plain = hf_greedy(hf, ids, 30)
        for layer in hf.model.layers:
            layer.self_attn.attn_logit_softcapping = TINY["attn_logit_softcapping"]
        assert ours.generate(ids, 30) == plain and plain != capped    # the soft-cap changes the tokens here
    # The same object still encodes captions: its forward stops at hidden_states[-2].
    encoder = text.load_gemma2(str(tmp_path))
    batch, mask = padded_batch([16, 9, 3])
    with torch.no_grad():
        assert torch.equal(ours(batch, mask), encoder(batch, mask))


def test_generation_stops_at_eos_as_transformers_does(tmp_path):
    hf = hf_causal_lm(tmp_path)
    ids = [text.BOS_ID] + list(range(10, 19))
    free = hf_greedy(hf, ids, 30)
    late = next(t for k, t in enumerate(free) if k >= 4 and t not in free[:k])
    with torch.no_grad():                                   # <eos> now outscores that token where it would come
        hf.model.embed_tokens.weight[text.EOS_ID] = 1.5 * hf.model.embed_tokens.weight[late]
    hf.save_pretrained(tmp_path)
    stopped = hf_greedy(hf, ids, 30)
    assert stopped[-1] == text.EOS_ID and len(stopped) < 30
    for layer in hf.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    assert text.load_gemma2(str(tmp_path), causal_lm=True, use_softcapping=True).generate(ids, 30) == stopped


def test_enhanced_prompt_clean_up_follows_the_official_rules():
    clean = text.clean_enhanced_prompt
    assert clean("  Enhanced description: a red circle, glossy\nsecond line", "p") == "a red circle, glossy"
    assert clean("\n\nA bright red circle\nmore", "p") == "A bright red circle"
    assert clean("Note: keep this", "p") == "Note: keep this"            # not a label word: kept
    assert clean("a, b, A, c, d, e", "p") == "a, b, c, d"                # de-duplicated, at most 4 clauses
    long = " ".join(["word"] * 80)
    assert clean(long, "p") == " ".join(["word"] * 51)                   # <= 256 characters, cut at a space
    assert clean("   ", "the prompt") == clean("Prompt:", "the prompt") == "the prompt"


def test_enhance_prompt_runs_the_instruction_and_an_encoder_folder_is_refused(tmp_path, tokenizer_path):
    folder = tmp_path / "lm"
    hf_causal_lm(folder, vocab_size=text.Tokenizer(tokenizer_path).vocab_size)
    tokenizer = text.Tokenizer(tokenizer_path)
    lm = text.load_gemma2(str(folder), causal_lm=True)
    ids = [text.BOS_ID] + tokenizer.sp.encode(text.ENHANCE_INSTRUCTION.format(prompt="a red circle"))
    assert text.ENHANCE_INSTRUCTION.format(prompt="a red circle").endswith("User prompt: a red circle\n"
                                                                           "Enhanced description:")
    expected = text.clean_enhanced_prompt(text.decode_generated(tokenizer, lm.generate(ids, 12)), "a red circle")
    assert text.enhance_prompt(lm, tokenizer, "a red circle", max_new_tokens=12) == expected
    text.save_gemma2(text.load_gemma2(str(folder)), str(tmp_path / "encoder"))   # hidden_states[-2] only
    with pytest.raises(ValueError, match="hidden_states.-2. only.*whole model"):
        text.load_gemma2(str(tmp_path / "encoder"), causal_lm=True)
