#!/usr/bin/env python3
"""Real-size OpenFlamingo model directories with random weights, without a download.

Writes DIR in the layout `flamingo download` lays out for a released checkpoint
(crates/flamingo-server/src/hub.rs, crates/flamingo-model/src/loader.rs):

    DIR/clip/open_clip_config.json        HF-hub style {"model_cfg": ..., "preprocess_cfg": ...}
    DIR/clip/open_clip_pytorch_model.bin  the FULL open_clip ViT-L-14 state dict (text tower too),
                                          fp32 (or open_clip_model.safetensors: --clip-format)
    DIR/lm/config.json                    the LM's config.json as published
    DIR/lm/tokenizer.json                 a SYNTHETIC byte-level BPE with the published length
    DIR/lm/tokenizer_config.json
    DIR/lm/special_tokens_map.json
    DIR/lm/pytorch_model.bin              one torch.save zip pickle, as both LM repos publish it
    DIR/checkpoint.pt                     OpenFlamingo's trainable state dict, as released
    DIR/flamingo.toml                     what Manifest::flamingo_toml() writes

with the exact key names, shapes, dtypes and file formats of

    of3b  openflamingo/OpenFlamingo-3B-vitl-mpt1b  (ViT-L/14 openai + anas-awadalla/mpt-1b-redpajama-200b)
    of4b  openflamingo/OpenFlamingo-4B-vitl-rpj3b  (ViT-L/14 openai + togethercomputer/RedPajama-INCITE-Base-3B-v1)

Values are random (seeded, deterministic: every tensor's generator is seeded from
(--seed, file, key), so a tensor has the same values whatever else is written). Files are written
tensor by tensor (the pickle's data.pkl first, then each storage in chunks), so peak memory is
one chunk (<= 64 MiB), not the model.

Only torch is needed to write. `--verify` (needs the reference venv /work/refenv: open_clip
2.20.0, transformers, open_flamingo 2.0.1, and for of3b the MosaicGPT remote code, --mosaic-code)
builds the reference models on torch's meta device (no weights allocated) and checks that every
file's key list, order and shapes equal the reference state dicts. See scripts/README-realsize.md.

Examples:
    python scripts/make_realsize_checkpoint.py --model of3b --out /data/of3b --dry-run
    python scripts/make_realsize_checkpoint.py --model of4b --out /data/of4b
    /work/refenv/bin/python scripts/make_realsize_checkpoint.py --model of3b --out /tmp/x --dry-run \\
        --verify --mosaic-code /tmp/mosaic_gpt_code
"""

import argparse
import collections
import io
import json
import math
import os
import pickle
import shutil
import struct
import sys
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass, field

import torch

# ----------------------------------------------------------------------------------------------
# Published configurations (sources in scripts/README-realsize.md)
# ----------------------------------------------------------------------------------------------

# open_clip 2.20 `get_model_config("ViT-L-14")` (the config open_clip's hub files carry; the
# OpenAI weights need QuickGELU, which flamingo.toml sets, as config/models/*.toml say).
OPEN_CLIP_VIT_L_14 = {
    "embed_dim": 768,
    "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12},
}
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]

# anas-awadalla/mpt-1b-redpajama-200b config.json (blame at 72e87cd6, 1,127 bytes; identical
# model fields in mosaicml/mpt-1b-redpajama-200b @7a256369). Key order as HF writes it (sorted).
MPT_1B_CONFIG = {
    "_name_or_path": "mosaicml/mpt-1b-redpajama-200b",
    "alibi": True,
    "alibi_bias_max": 8,
    "architectures": ["MosaicGPT"],
    "attn_clip_qkv": None,
    "attn_impl": "torch",
    "attn_pdrop": 0,
    "attn_qk_ln": True,
    "attn_uses_sequence_id": False,
    "auto_map": {
        "AutoConfig": "configuration_mosaic_gpt.MosaicGPTConfig",
        "AutoModelForCausalLM": "mosaic_gpt.MosaicGPT",
    },
    "d_model": 2048,
    "emb_init_std": None,
    "emb_init_uniform_lim": None,
    "emb_pdrop": 0,
    "embedding_fraction": 1.0,
    "fan_mode": "fan_in",
    "init_device": "cpu",
    "init_div_is_residual": True,
    "init_gain": 0,
    "init_nonlinearity": "relu",
    "init_std": 0.02,
    "logit_scale": None,
    "low_precision_layernorm": True,
    "max_seq_len": 2048,
    "mlp_ratio": 4,
    "model_type": "mosaic_gpt",
    "n_heads": 16,
    "n_layers": 24,
    "no_bias": True,
    "param_init_fn": "kaiming_normal_",
    "prefix_lm": False,
    "resid_pdrop": 0,
    "softmax_scale": None,
    "tokenizer_name": "EleutherAI/gpt-neox-20b",
    "torch_dtype": "float32",
    "transformers_version": "4.27.4",
    "use_cache": False,
    "verbose": 0,
    "vocab_size": 50432,
}

# togethercomputer/RedPajama-INCITE-Base-3B-v1 config.json ("init", 604 bytes).
RPJ_3B_CONFIG = {
    "_name_or_path": "/root/fm/models/rp_3b_800b_real_fp16",
    "architectures": ["GPTNeoXForCausalLM"],
    "bos_token_id": 0,
    "eos_token_id": 0,
    "hidden_act": "gelu",
    "hidden_size": 2560,
    "initializer_range": 0.02,
    "intermediate_size": 10240,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 2048,
    "model_type": "gpt_neox",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "rotary_emb_base": 10000,
    "rotary_pct": 1.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.28.1",
    "use_cache": True,
    "use_parallel_residual": False,
    "vocab_size": 50432,
}

SPECIAL_TOKENS_MAP = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
# RedPajama-INCITE-Base-3B-v1 tokenizer_config.json on main (237 bytes, "Update tokenizer_config.json").
# The mpt-1b one (366 bytes) is not public in text form here: the same fields are written.
TOKENIZER_CONFIG = {
    "add_prefix_space": False,
    "bos_token": "<|endoftext|>",
    "clean_up_tokenization_spaces": True,
    "eos_token": "<|endoftext|>",
    "model_max_length": 2048,
    "tokenizer_class": "GPTNeoXTokenizer",
    "unk_token": "<|endoftext|>",
}
# len() of EleutherAI/gpt-neox-20b's tokenizer (both LMs use it): OpenFlamingo adds
# <|endofchunk|>, <image>, <PAD> -> 50280 rows in the checkpoint's embeddings.
GPT_NEOX_20B_TOKENIZER_LEN = 50277
FLAMINGO_ADDED_TOKENS = 3

# OpenFlamingo 2.0.1 defaults (factory.py / helpers.py); the released checkpoints use them.
PERCEIVER = {"depth": 6, "dim_head": 64, "heads": 8, "num_latents": 64, "ff_mult": 4}
XATTN = {"dim_head": 64, "heads": 8, "ff_mult": 4}

MODELS = {
    "of3b": {
        "name": "openflamingo/OpenFlamingo-3B-vitl-mpt1b",
        "manifest": "config/models/OpenFlamingo-3B-vitl-mpt1b.toml",
        "lm_repo": "anas-awadalla/mpt-1b-redpajama-200b",
        "family": "mosaic_gpt",
        "config": MPT_1B_CONFIG,
        "lm_dtype": torch.float32,  # pickle imports: torch.FloatStorage only; 5.25 GB
        "every": 1,
    },
    "of4b": {
        "name": "openflamingo/OpenFlamingo-4B-vitl-rpj3b",
        "manifest": "config/models/OpenFlamingo-4B-vitl-rpj3b.toml",
        "lm_repo": "togethercomputer/RedPajama-INCITE-Base-3B-v1",
        "family": "gpt_neox",
        "config": RPJ_3B_CONFIG,
        "lm_dtype": torch.float16,  # pickle imports: torch.HalfStorage + torch.BoolStorage; 5.69 GB
        "every": 2,
    },
}

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
STORAGE_CLASS = {
    torch.float32: "FloatStorage",
    torch.float16: "HalfStorage",
    torch.bfloat16: "BFloat16Storage",
    torch.bool: "BoolStorage",
}
ST_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.bool: "BOOL"}
CHUNK_ELEMS = 1 << 24  # 16M elements (64 MiB of fp32) generated at a time

# ----------------------------------------------------------------------------------------------
# Tensor specs
# ----------------------------------------------------------------------------------------------


@dataclass
class T:
    """One tensor of a file: its key, shape, dtype and how its values are made."""

    key: str
    shape: tuple
    dtype: torch.dtype
    init: str = "normal"  # normal | norm_weight | bias | gate | const | tril | inv_freq
    arg: float = 0.0  # std (normal), value (const), base (inv_freq)

    @property
    def numel(self):
        return math.prod(self.shape)

    @property
    def nbytes(self):
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class FileSpec:
    rel: str  # path inside DIR
    fmt: str  # pickle | safetensors
    tensors: list = field(default_factory=list)
    part: str = ""  # clip | lm | checkpoint

    @property
    def nbytes(self):
        return sum(t.nbytes for t in self.tensors)


STD = 0.02  # weights and embeddings ~ N(0, 0.02^2): activations and logits stay O(1), finite


def linear(key, out_f, in_f, dtype, bias):
    ts = [T(f"{key}.weight", (out_f, in_f), dtype, "normal", STD)]
    if bias:
        ts.append(T(f"{key}.bias", (out_f,), dtype, "bias", STD))
    return ts


def layer_norm(key, dim, dtype, bias=True):
    ts = [T(f"{key}.weight", (dim,), dtype, "norm_weight", STD)]
    if bias:
        ts.append(T(f"{key}.bias", (dim,), dtype, "bias", STD))
    return ts


def clip_tensors(layers_vision, layers_text, dtype):
    """open_clip 2.20 CLIP("ViT-L-14").state_dict(), in order (text tower included, as the hub
    file has it; `attn_mask` is a non-persistent buffer)."""
    c = OPEN_CLIP_VIT_L_14
    v, t, embed = c["vision_cfg"], c["text_cfg"], c["embed_dim"]
    vw, tw = v["width"], t["width"]
    grid = v["image_size"] // v["patch_size"]

    def resblocks(prefix, n, w):
        out = []
        for i in range(n):
            p = f"{prefix}.resblocks.{i}"
            out += layer_norm(f"{p}.ln_1", w, dtype)
            out += [T(f"{p}.attn.in_proj_weight", (3 * w, w), dtype, "normal", STD),
                    T(f"{p}.attn.in_proj_bias", (3 * w,), dtype, "bias", STD)]
            out += linear(f"{p}.attn.out_proj", w, w, dtype, True)
            out += layer_norm(f"{p}.ln_2", w, dtype)
            out += linear(f"{p}.mlp.c_fc", 4 * w, w, dtype, True)
            out += linear(f"{p}.mlp.c_proj", w, 4 * w, dtype, True)
        return out

    ts = [
        T("positional_embedding", (t["context_length"], tw), dtype, "normal", 0.01),
        T("text_projection", (tw, embed), dtype, "normal", STD),
        T("logit_scale", (), dtype, "const", math.log(1 / 0.07)),
        T("visual.class_embedding", (vw,), dtype, "normal", STD),
        T("visual.positional_embedding", (grid * grid + 1, vw), dtype, "normal", STD),
        T("visual.proj", (vw, embed), dtype, "normal", STD),
        T("visual.conv1.weight", (vw, 3, v["patch_size"], v["patch_size"]), dtype, "normal", STD),
    ]
    ts += layer_norm("visual.ln_pre", vw, dtype)
    ts += resblocks("visual.transformer", layers_vision, vw)
    ts += layer_norm("visual.ln_post", vw, dtype)
    ts += resblocks("transformer", layers_text, tw)
    ts.append(T("token_embedding.weight", (t["vocab_size"], tw), dtype, "normal", STD))
    ts += layer_norm("ln_final", tw, dtype)
    return ts


def mosaic_gpt_tensors(cfg, dtype, prefix=""):
    """MosaicGPT (mosaicml/examples v0.0.4 remote code) state dict: no biases anywhere (no_bias
    removes LayerNorm biases too), q_ln/k_ln over the full width, no lm_head."""
    d, n, r, vocab = cfg["d_model"], cfg["n_layers"], cfg["mlp_ratio"], cfg["vocab_size"]
    ts = [T(f"{prefix}transformer.wte.weight", (vocab, d), dtype, "normal", STD)]
    for i in range(n):
        p = f"{prefix}transformer.blocks.{i}"
        ts += layer_norm(f"{p}.ln_1", d, dtype, bias=False)
        ts += linear(f"{p}.attn.Wqkv", 3 * d, d, dtype, False)
        ts += layer_norm(f"{p}.attn.q_ln", d, dtype, bias=False)
        ts += layer_norm(f"{p}.attn.k_ln", d, dtype, bias=False)
        ts += linear(f"{p}.attn.out_proj", d, d, dtype, False)
        ts += layer_norm(f"{p}.ln_2", d, dtype, bias=False)
        ts += linear(f"{p}.mlp.mlp_up", r * d, d, dtype, False)
        ts += linear(f"{p}.mlp.mlp_down", d, r * d, dtype, False)
    ts += layer_norm(f"{prefix}transformer.ln_f", d, dtype, bias=False)
    return ts


def neox_attention_buffers(p, cfg, dtype):
    """The persistent buffers of transformers <= 4.30 GPTNeoXAttention (the RedPajama file was
    saved with 4.28.1): the causal mask (bool), masked_bias, rotary_emb.inv_freq."""
    m = cfg["max_position_embeddings"]
    head = cfg["hidden_size"] // cfg["num_attention_heads"]
    rot = int(head * cfg["rotary_pct"])
    return [
        T(f"{p}.attention.bias", (1, 1, m, m), torch.bool, "tril"),
        T(f"{p}.attention.masked_bias", (), dtype, "const", -1e9),
        T(f"{p}.attention.rotary_emb.inv_freq", (rot // 2,), dtype, "inv_freq", float(cfg["rotary_emb_base"])),
    ]


def gpt_neox_tensors(cfg, dtype, legacy_buffers):
    """GPTNeoXForCausalLM state dict in the order transformers writes it."""
    d, n, ff, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
    ts = [T("gpt_neox.embed_in.weight", (vocab, d), dtype, "normal", STD)]
    for i in range(n):
        p = f"gpt_neox.layers.{i}"
        ts += layer_norm(f"{p}.input_layernorm", d, dtype)
        ts += layer_norm(f"{p}.post_attention_layernorm", d, dtype)
        if legacy_buffers:
            ts += neox_attention_buffers(p, cfg, dtype)
        ts += linear(f"{p}.attention.query_key_value", 3 * d, d, dtype, True)
        ts += linear(f"{p}.attention.dense", d, d, dtype, True)
        ts += linear(f"{p}.mlp.dense_h_to_4h", ff, d, dtype, True)
        ts += linear(f"{p}.mlp.dense_4h_to_h", d, ff, dtype, True)
    ts += layer_norm("gpt_neox.final_layer_norm", d, dtype)
    ts.append(T("embed_out.weight", (vocab, d), dtype, "normal", STD))
    return ts


def perceiver_tensors(dim, dtype):
    P = PERCEIVER
    inner = P["dim_head"] * P["heads"]
    ts = [T("perceiver.latents", (P["num_latents"], dim), dtype, "normal", 1.0)]
    for i in range(P["depth"]):
        p = f"perceiver.layers.{i}"
        ts += layer_norm(f"{p}.0.norm_media", dim, dtype)
        ts += layer_norm(f"{p}.0.norm_latents", dim, dtype)
        ts += linear(f"{p}.0.to_q", inner, dim, dtype, False)
        ts += linear(f"{p}.0.to_kv", 2 * inner, dim, dtype, False)
        ts += linear(f"{p}.0.to_out", dim, inner, dtype, False)
        ts += layer_norm(f"{p}.1.0", dim, dtype)
        ts += linear(f"{p}.1.1", P["ff_mult"] * dim, dim, dtype, False)
        ts += linear(f"{p}.1.3", dim, P["ff_mult"] * dim, dtype, False)
    ts += layer_norm("perceiver.norm", dim, dtype)
    return ts


def gated_xattn_tensors(p, dim, dim_visual, dtype):
    X = XATTN
    inner = X["dim_head"] * X["heads"]
    ts = [T(f"{p}.attn_gate", (1,), dtype, "gate", 0.1), T(f"{p}.ff_gate", (1,), dtype, "gate", 0.1)]
    ts += layer_norm(f"{p}.attn.norm", dim, dtype)
    ts += linear(f"{p}.attn.to_q", inner, dim, dtype, False)
    ts += linear(f"{p}.attn.to_kv", 2 * inner, dim_visual, dtype, False)
    ts += linear(f"{p}.attn.to_out", dim, inner, dtype, False)
    ts += layer_norm(f"{p}.ff.0", dim, dtype)
    ts += linear(f"{p}.ff.1", X["ff_mult"] * dim, dim, dtype, False)
    ts += linear(f"{p}.ff.3", dim, X["ff_mult"] * dim, dtype, False)
    return ts


def gated_layers(n_layers, every):
    """open_flamingo 2.0.1 flamingo_lm.py: layer i gets a block iff (i + 1) % every == 0."""
    return [i for i in range(n_layers) if (i + 1) % every == 0]


def checkpoint_tensors(m, cfg, legacy_buffers, dtype):
    """`filter_state_dict_to_trainable(model, model.state_dict())` of the Flamingo model: the
    perceiver, every gated cross-attention block under the decoder-layer path, every parameter
    whose name contains "embed" (the resized input embedding, GPT-NeoX's embed_out too), and
    the LM's persistent buffers (the filter deletes parameters only); the `old_decoder_blocks`,
    `gated_cross_attn_layers` and `vision_encoder` aliases removed. Trained in fp32."""
    vis = OPEN_CLIP_VIT_L_14["vision_cfg"]["width"]
    rows = GPT_NEOX_20B_TOKENIZER_LEN + FLAMINGO_ADDED_TOKENS
    ts = perceiver_tensors(vis, dtype)
    if m["family"] == "mosaic_gpt":
        d, n = cfg["d_model"], cfg["n_layers"]
        gated = set(gated_layers(n, m["every"]))
        ts.append(T("lang_encoder.transformer.wte.weight", (rows, d), dtype, "normal", STD))
        for i in range(n):
            if i in gated:
                ts += gated_xattn_tensors(f"lang_encoder.transformer.blocks.{i}.gated_cross_attn_layer", d, vis, dtype)
    else:
        d, n = cfg["hidden_size"], cfg["num_hidden_layers"]
        gated = set(gated_layers(n, m["every"]))
        ts.append(T("lang_encoder.gpt_neox.embed_in.weight", (rows, d), dtype, "normal", STD))
        for i in range(n):
            p = f"lang_encoder.gpt_neox.layers.{i}"
            if i in gated:
                ts += gated_xattn_tensors(f"{p}.gated_cross_attn_layer", d, vis, dtype)
            if legacy_buffers:
                ts += neox_attention_buffers(f"{p}.decoder_layer", cfg, dtype)
        ts.append(T("lang_encoder.embed_out.weight", (rows, d), dtype, "normal", STD))
    return ts


# ----------------------------------------------------------------------------------------------
# The plan: every file of DIR
# ----------------------------------------------------------------------------------------------


def lm_config(m, layers):
    cfg = dict(m["config"])
    if layers is not None:
        cfg["n_layers" if m["family"] == "mosaic_gpt" else "num_hidden_layers"] = layers
    return cfg


def open_clip_config(layers):
    c = json.loads(json.dumps(OPEN_CLIP_VIT_L_14))
    if layers is not None:
        c["vision_cfg"]["layers"] = layers
        c["text_cfg"]["layers"] = layers
    return {"model_cfg": c, "preprocess_cfg": {"mean": OPENAI_MEAN, "std": OPENAI_STD}}


def flamingo_toml(every):
    # toml::to_string of the manifest's [overrides] plus cross_attn_every_n_layers
    # (Manifest::flamingo_toml): plain values first, then tables.
    return f"cross_attn_every_n_layers = {every}\n\n[vision]\nquick_gelu = true\n"


def plan(args):
    m = MODELS[args.model]
    over = None if args.dtype == "published" else DTYPES[args.dtype]
    lm_dtype = over or m["lm_dtype"]
    f32 = over or torch.float32
    cfg = lm_config(m, args.layers)
    clip_cfg = open_clip_config(args.layers)
    lv = clip_cfg["model_cfg"]["vision_cfg"]["layers"]
    lt = clip_cfg["model_cfg"]["text_cfg"]["layers"]
    legacy = m["family"] == "gpt_neox" and not args.no_legacy_buffers
    clip_file = "clip/open_clip_pytorch_model.bin" if args.clip_format == "bin" else "clip/open_clip_model.safetensors"
    files = [
        FileSpec(clip_file, "pickle" if args.clip_format == "bin" else "safetensors", clip_tensors(lv, lt, f32), "clip"),
    ]
    if m["family"] == "mosaic_gpt":
        lm_t = mosaic_gpt_tensors(cfg, lm_dtype)
    else:
        lm_t = gpt_neox_tensors(cfg, lm_dtype, legacy)
    files.append(FileSpec("lm/pytorch_model.bin", "pickle", lm_t, "lm"))
    files.append(FileSpec("checkpoint.pt", "pickle", checkpoint_tensors(m, cfg, legacy, f32), "checkpoint"))
    texts = {
        "clip/open_clip_config.json": json.dumps(clip_cfg, indent=2) + "\n",
        "lm/config.json": json.dumps(cfg, indent=2, sort_keys=True) + "\n",
        "lm/tokenizer_config.json": json.dumps(TOKENIZER_CONFIG, indent=2) + "\n",
        "lm/special_tokens_map.json": json.dumps(SPECIAL_TOKENS_MAP, indent=2) + "\n",
        "flamingo.toml": flamingo_toml(m["every"]),
    }
    return m, cfg, files, texts


# ----------------------------------------------------------------------------------------------
# Tokenizer: a byte-level BPE with exactly GPT_NEOX_20B_TOKENIZER_LEN ids
# ----------------------------------------------------------------------------------------------


def bytes_to_unicode():
    """GPT-2's byte -> printable character table (what ByteLevel pre-tokenization produces)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def synthetic_tokenizer_json(repo_root, size=GPT_NEOX_20B_TOKENIZER_LEN):
    """The fixtures' byte-level BPE (tests/fixtures/models/mpt_x1/lm/tokenizer.json: id 0
    <|endoftext|>, 256 byte symbols, 143 trained merges) extended with merges of two byte symbols
    until it has `size` ids, so that len(tokenizer) + OpenFlamingo's 3 tokens = 50280 = the rows
    of the released checkpoints' embeddings. Any text tokenizes; the ids are NOT gpt-neox-20b's."""
    src = os.path.join(repo_root, "tests/fixtures/models/mpt_x1/lm/tokenizer.json")
    with open(src, encoding="utf-8") as f:
        tok = json.load(f)
    model = tok["model"]
    vocab = model["vocab"]
    merges = model["merges"]
    assert model["type"] == "BPE" and vocab.get("<|endoftext|>") == 0, src
    alphabet = bytes_to_unicode()
    # common characters first (letters, digits, the byte symbol of a space 'Ġ'), then the rest
    order = sorted(alphabet, key=lambda c: (not (c.isalnum() and c.isascii()) and c != "Ġ", alphabet.index(c)))
    next_id = max(vocab.values()) + 1
    for a in order:
        for b in order:
            if next_id >= size:
                break
            if a + b in vocab:
                continue
            vocab[a + b] = next_id
            merges.append([a, b])
            next_id += 1
    assert len(vocab) == size and sorted(vocab.values()) == list(range(size)), len(vocab)
    return json.dumps(tok, ensure_ascii=False, separators=(",", ":")) + "\n"


# ----------------------------------------------------------------------------------------------
# Values
# ----------------------------------------------------------------------------------------------


def generator_for(seed, rel, key):
    g = torch.Generator()
    g.manual_seed(zlib.crc32(f"{seed}\0{rel}\0{key}".encode()))
    return g


def chunks(t, seed, rel):
    """The tensor's values, row block by row block, in its dtype, contiguous."""
    if t.init == "tril":
        m = t.shape[-1]
        full = torch.tril(torch.ones((m, m), dtype=torch.bool)).reshape(t.shape)
        yield full
        return
    if t.init == "const":
        yield torch.full(t.shape, t.arg, dtype=torch.float32).to(t.dtype)
        return
    if t.init == "inv_freq":
        dim = 2 * t.shape[0]
        yield (1.0 / (t.arg ** (torch.arange(0, dim, 2).float() / dim))).to(t.dtype)
        return
    g = generator_for(seed, rel, t.key)
    shape = t.shape if t.shape else (1,)
    row = math.prod(shape[1:])
    rows_per = max(1, CHUNK_ELEMS // max(row, 1))
    for r0 in range(0, shape[0], rows_per):
        n = min(rows_per, shape[0] - r0)
        x = torch.randn((n,) + tuple(shape[1:]), generator=g, dtype=torch.float32)
        if t.init == "normal":
            x.mul_(t.arg)
        elif t.init == "norm_weight":
            x.mul_(t.arg).add_(1.0)
        elif t.init in ("bias", "gate"):
            x.mul_(t.arg)
        else:
            raise ValueError(t.init)
        yield x.to(t.dtype).reshape((n,) + tuple(shape[1:]) if t.shape else ())


def raw(x):
    """A contiguous tensor's bytes as a memoryview (no copy for the ones torch/numpy share)."""
    x = x.contiguous().reshape(-1)
    if x.dtype == torch.bool:
        x = x.view(torch.uint8)
    elif x.dtype in (torch.float16, torch.bfloat16):
        x = x.view(torch.int16)
    return memoryview(x.numpy()).cast("B")


# ----------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------


class _Storage:
    def __init__(self, key, dtype, numel):
        self.key, self.dtype, self.numel = key, dtype, numel


class _Tensor:
    """Pickles as torch.save pickles a contiguous tensor:
    torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())."""

    def __init__(self, storage, shape):
        self.storage, self.shape = storage, tuple(shape)

    def __reduce__(self):
        stride, acc = [], 1
        for s in reversed(self.shape):
            stride.append(acc)
            acc *= s
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, self.shape, tuple(reversed(stride)), False, collections.OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", getattr(torch, STORAGE_CLASS[obj.dtype]), obj.key, "cpu", obj.numel)
        return None


def data_pkl(tensors):
    """torch.save's data.pkl for a plain dict {key: tensor} (protocol 2, storages "0", "1", ...)."""
    d = {t.key: _Tensor(_Storage(str(i), t.dtype, t.numel), t.shape) for i, t in enumerate(tensors)}
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(d)
    return buf.getvalue()


def _aligned_entry(zf, name, size):
    """A STORED zip entry whose data starts on a 64-byte boundary, as torch.save aligns them
    (padding in an extra field with id 'FB', like PyTorch's writer)."""
    zi = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    zi.compress_type = zipfile.ZIP_STORED
    zi.file_size = size
    offset = zf.fp.tell()
    pad = (-(offset + 30 + len(name.encode()) + 4)) % 64
    zi.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    return zf.open(zi, "w", force_zip64=size > 0xFFFF0000)


def write_pickle(path, spec, seed, progress):
    """torch.save's zip format, streamed: data.pkl, byteorder, data/0..N-1, version (records under
    the archive name torch.save gives a path: its file name without the extension)."""
    stem = os.path.splitext(os.path.basename(spec.rel))[0]
    with open(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        pkl = data_pkl(spec.tensors)
        for name, data in ((f"{stem}/data.pkl", pkl), (f"{stem}/byteorder", b"little")):
            with _aligned_entry(zf, name, len(data)) as w:
                w.write(data)
        for i, t in enumerate(spec.tensors):
            with _aligned_entry(zf, f"{stem}/data/{i}", t.nbytes) as w:
                for x in chunks(t, seed, spec.rel):
                    w.write(raw(x))
            progress(t)
        with _aligned_entry(zf, f"{stem}/version", 2) as w:
            w.write(b"3\n")


def write_safetensors(path, spec, seed, progress):
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for t in spec.tensors:
        header[t.key] = {"dtype": ST_DTYPE[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + t.nbytes]}
        off += t.nbytes
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((-len(h)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for t in spec.tensors:
            for x in chunks(t, seed, spec.rel):
                f.write(raw(x))
            progress(t)


def check_written(path, spec):
    """Re-open the file (torch.load with mmap: nothing is read but the index) and compare keys,
    order, shapes and dtypes with the spec; spot-check values are finite."""
    want = [(t.key, tuple(t.shape), t.dtype) for t in spec.tensors]
    if spec.fmt == "pickle":
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        got = [(k, tuple(v.shape), v.dtype) for k, v in sd.items()]
    else:
        from safetensors import safe_open

        st_dtypes = {v: k for k, v in ST_DTYPE.items()}
        small = {t.key for t in spec.tensors if t.numel < (1 << 20)}
        with safe_open(path, "pt") as f:
            meta = {k: (tuple(f.get_slice(k).get_shape()), st_dtypes.get(f.get_slice(k).get_dtype())) for k in f.keys()}
            sd = {k: f.get_tensor(k) for k in f.keys() if k in small}
        # safetensors has no key order: compare as a mapping
        got = sorted(((k,) + v for k, v in meta.items()), key=lambda x: x[0])
        want = sorted(want, key=lambda x: x[0])
    if got != want:
        bad = [(a, b) for a, b in zip(got, want) if a != b][:5]
        raise SystemExit(f"{path}: written keys/shapes/dtypes differ from the plan: {bad or (len(got), len(want))}")
    # (masked_bias is -1e9 by construction: -inf in fp16, as in the published fp16 file)
    for t in [t for t in spec.tensors if t.init not in ("const", "tril") and t.key in sd][:: max(1, len(spec.tensors) // 16)]:
        v = sd[t.key]
        if not torch.isfinite(v.reshape(-1)[:4096].float()).all():
            raise SystemExit(f"{path}: {t.key} has non-finite values")
    return len(got)


# ----------------------------------------------------------------------------------------------
# --verify: the reference models on the meta device
# ----------------------------------------------------------------------------------------------


def _import_mosaic_gpt(code_dir):
    """MosaicGPT's remote code (mosaic_gpt.py, attention.py, gpt_blocks.py, ... with relative
    imports) imported as a package from a copy of `code_dir`."""
    import importlib

    tmp = tempfile.mkdtemp(prefix="mosaic_gpt_ref_")
    pkg = os.path.join(tmp, "mosaic_gpt_ref")
    shutil.copytree(code_dir, pkg, ignore=shutil.ignore_patterns("*.bin", "*.safetensors", "__pycache__"))
    open(os.path.join(pkg, "__init__.py"), "a").close()
    sys.path.insert(0, tmp)
    return (importlib.import_module("mosaic_gpt_ref.mosaic_gpt").MosaicGPT,
            importlib.import_module("mosaic_gpt_ref.configuration_mosaic_gpt").MosaicGPTConfig)


def reference_state_dicts(args, m, cfg, texts, tok_json):
    """{file rel path: [(key, shape, dtype)]} from the reference code on torch's meta device:
    open_clip 2.20 `create_model("ViT-L-14")`, the LM class, and open_flamingo 2.0.1's REAL
    `create_model_and_transforms` + `filter_state_dict_to_trainable` with the two loaders it
    calls (open_clip.create_model_and_transforms, AutoModelForCausalLM.from_pretrained)
    returning those meta-device models (nothing else of the factory is replaced)."""
    import types

    sys.modules.setdefault("wandb", types.ModuleType("wandb"))
    import open_clip
    import transformers
    import open_flamingo.src.factory as factory
    from open_flamingo.train.train_utils import filter_state_dict_to_trainable

    transformers.logging.set_verbosity_error()
    out = {}
    clip_name = "ViT-L-14"
    model_cfg = json.loads(texts["clip/open_clip_config.json"])["model_cfg"]
    if args.layers is not None:
        clip_name = f"ViT-L-14-realsize-{args.layers}"
        open_clip.factory._MODEL_CONFIGS[clip_name] = model_cfg
    else:
        assert open_clip.get_model_config("ViT-L-14") == model_cfg, (open_clip.get_model_config("ViT-L-14"), model_cfg)

    def make_clip():
        return open_clip.create_model(clip_name, pretrained=None, device="meta")

    def lm_model():
        if m["family"] == "mosaic_gpt":
            MosaicGPT, MosaicGPTConfig = _import_mosaic_gpt(args.mosaic_code)
            c = dict(cfg)
            c["init_device"] = "meta"
            with torch.device("meta"):
                return MosaicGPT(MosaicGPTConfig(**c))
        c = transformers.GPTNeoXConfig(**cfg)
        with torch.device("meta"):
            return transformers.GPTNeoXForCausalLM(c)

    clip_sd = make_clip().state_dict()
    out["clip"] = [(k, tuple(v.shape), v.dtype) for k, v in clip_sd.items()]
    lm = lm_model()
    out["lm"] = [(k, tuple(v.shape), v.dtype) for k, v in lm.state_dict().items()]

    tok_dir = tempfile.mkdtemp(prefix="realsize_tok_")
    with open(os.path.join(tok_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(tok_json)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        with open(os.path.join(tok_dir, name), "w") as f:
            f.write(texts[f"lm/{name}"])

    class _Auto:
        @staticmethod
        def from_pretrained(path, **kw):
            return lm

    real_auto, real_oc = factory.AutoModelForCausalLM, factory.open_clip.create_model_and_transforms
    factory.AutoModelForCausalLM = _Auto
    factory.open_clip.create_model_and_transforms = lambda name, pretrained=None, **kw: (make_clip(), None, None)
    try:
        with torch.device("meta"):
            model, _, tokenizer = factory.create_model_and_transforms(
                clip_vision_encoder_path=clip_name,
                clip_vision_encoder_pretrained="openai",
                lang_encoder_path=m["lm_repo"],
                tokenizer_path=tok_dir,
                cross_attn_every_n_layers=m["every"],
            )
    finally:
        factory.AutoModelForCausalLM, factory.open_clip.create_model_and_transforms = real_auto, real_oc
    assert len(tokenizer) == GPT_NEOX_20B_TOKENIZER_LEN + FLAMINGO_ADDED_TOKENS, len(tokenizer)
    ck = filter_state_dict_to_trainable(model, model.state_dict())
    out["checkpoint"] = [(k, tuple(v.shape), v.dtype) for k, v in ck.items()]
    shutil.rmtree(tok_dir, ignore_errors=True)
    return out


def verify(args, m, cfg, files, texts, tok_json):
    if m["family"] == "mosaic_gpt" and not args.mosaic_code:
        raise SystemExit("--verify for of3b needs --mosaic-code DIR (MosaicGPT's remote code: see scripts/README-realsize.md)")
    ref = reference_state_dicts(args, m, cfg, texts, tok_json)
    ok = True
    for spec in files:
        mine = [(t.key, tuple(t.shape), t.dtype) for t in spec.tensors]
        want = ref[spec.part]
        # buffers of transformers <= 4.30 (in the published RedPajama file and the released 4B
        # checkpoint: their pickles hold BoolStorage) that today's transformers does not persist
        extra = [x for x in mine if ".attention.bias" in x[0] or ".masked_bias" in x[0] or ".inv_freq" in x[0]]
        mine_cmp = [x for x in mine if x not in extra]
        same_keys = [k for k, _, _ in mine_cmp] == [k for k, _, _ in want]
        same_shapes = [s for _, s, _ in mine_cmp] == [s for _, s, _ in want]
        # the reference is built in fp32: published dtypes are checked against the constants
        ref_dtypes = {d for _, _, d in want}
        line = (f"{spec.rel}: {len(want)} reference tensors; keys in order "
                f"{'EQUAL' if same_keys else 'DIFFER'}, shapes {'EQUAL' if same_shapes else 'DIFFER'}"
                f" (reference dtypes {sorted(map(str, ref_dtypes))})")
        if extra:
            line += f"; plus {len(extra)} transformers<=4.30 persistent buffers not in today's state dict"
        print(line)
        if not (same_keys and same_shapes):
            ok = False
            mk, wk = {k: s for k, s, _ in mine_cmp}, {k: s for k, s, _ in want}
            print("  only in script:", sorted(set(mk) - set(wk))[:10])
            print("  only in reference:", sorted(set(wk) - set(mk))[:10])
            print("  shape differences:", [(k, mk[k], wk[k]) for k in mk if k in wk and mk[k] != wk[k]][:10])
    if not ok:
        raise SystemExit("verification FAILED")
    print("verification passed")


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def human(n):
    for unit, d in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= d:
            return f"{n / d:.2f} {unit}"
    return f"{n} B"


def dtype_name(d):
    return str(d).replace("torch.", "")


def print_plan(m, files, texts, tok_json, only):
    print(f"# {m['name']}  (LM {m['lm_repo']}, cross_attn_every_n_layers = {m['every']})")
    total = 0
    for rel, text in list(texts.items()) + [("lm/tokenizer.json", tok_json)]:
        if "meta" in only:
            print(f"{rel}: {len(text.encode())} bytes (text)")
    for spec in files:
        if spec.part not in only:
            continue
        print(f"{spec.rel}: {spec.fmt}, {len(spec.tensors)} tensors")
        for t in spec.tensors:
            print(f"  {t.key}  {list(t.shape)}  {dtype_name(t.dtype)}  {t.nbytes}")
        n_params = sum(t.numel for t in spec.tensors if t.dtype != torch.bool)
        dts = collections.Counter(dtype_name(t.dtype) for t in spec.tensors)
        print(f"  = {spec.nbytes} bytes of tensor data ({human(spec.nbytes)}; {n_params:,} float elements;"
              f" dtypes {dict(dts)})")
        total += spec.nbytes
    print(f"total tensor data: {total} bytes ({human(total)}); the zip containers add < 1 MiB per file")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), required=True)
    ap.add_argument("--out", required=True, help="model directory to write")
    ap.add_argument("--dry-run", action="store_true", help="print every file, key, shape, dtype and size; write nothing")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype-as-published", dest="dtype", action="store_const", const="published", default="published",
                    help="every file in its published dtype (the default): open_clip file, MosaicGPT and "
                         "checkpoint.pt fp32, RedPajama fp16")
    ap.add_argument("--dtype", dest="dtype", choices=["published"] + sorted(DTYPES), default="published",
                    help="write every float tensor of every file in this dtype instead (not as published)")
    ap.add_argument("--only", default="meta,clip,lm,checkpoint",
                    help="comma-separated parts to write: meta (configs, tokenizer, flamingo.toml), clip, lm, checkpoint")
    ap.add_argument("--layers", type=int, default=None,
                    help="scale-down: N layers in the vision tower, the text tower and the LM (widths, vocab, "
                         "perceiver unchanged; configs say N). Not a released shape: for testing the writer "
                         "and the loader quickly")
    ap.add_argument("--clip-format", choices=["bin", "safetensors"], default="bin",
                    help="open_clip_pytorch_model.bin (default) or open_clip_model.safetensors (the loader takes either)")
    ap.add_argument("--no-legacy-buffers", action="store_true",
                    help="of4b: leave out the transformers<=4.30 persistent GPT-NeoX buffers (attention.bias, "
                         "masked_bias, rotary_emb.inv_freq) from lm/pytorch_model.bin and checkpoint.pt")
    ap.add_argument("--no-check", action="store_true", help="do not re-open the written files to check them")
    ap.add_argument("--verify", action="store_true",
                    help="compare every file's keys/order/shapes with the reference models on the meta device "
                         "(needs /work/refenv's packages)")
    ap.add_argument("--mosaic-code", default=None, help="directory with MosaicGPT's remote code (for --verify of of3b)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: light on a shared machine)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    only = {p.strip() for p in args.only.split(",") if p.strip()}
    bad = only - {"meta", "clip", "lm", "checkpoint"}
    if bad:
        ap.error(f"--only: unknown part(s) {sorted(bad)}")
    m = MODELS[args.model]
    if args.layers is not None and not (1 <= args.layers):
        ap.error("--layers must be >= 1")
    if args.layers is not None and args.layers < m["every"] and "checkpoint" in only:
        print(f"warning: --layers {args.layers} < cross_attn_every_n_layers {m['every']}: checkpoint.pt has no "
              "gated layers (the loader refuses such a directory)", file=sys.stderr)
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    m, cfg, files, texts = plan(args)
    tok_json = synthetic_tokenizer_json(repo_root)

    if args.dry_run:
        print_plan(m, files, texts, tok_json, only)
    if args.verify:
        verify(args, m, cfg, files, texts, tok_json)
    if args.dry_run:
        return

    out = os.path.abspath(args.out)
    for d in ("clip", "lm"):
        os.makedirs(os.path.join(out, d), exist_ok=True)
    if "meta" in only:
        for rel, text in list(texts.items()) + [("lm/tokenizer.json", tok_json)]:
            with open(os.path.join(out, rel), "w", encoding="utf-8") as f:
                f.write(text)
            print(f"wrote {rel} ({len(text.encode())} bytes)")
    for spec in files:
        if spec.part not in only:
            continue
        path = os.path.join(out, spec.rel)
        tmp = path + ".partial"
        t0, done = time.time(), [0]

        def progress(t, spec=spec, t0=t0, done=done):
            done[0] += t.nbytes
            if done[0] == spec.nbytes or t.nbytes > (256 << 20):
                print(f"  {spec.rel}: {human(done[0])} / {human(spec.nbytes)} ({time.time() - t0:.0f} s)", flush=True)

        (write_pickle if spec.fmt == "pickle" else write_safetensors)(tmp, spec, args.seed, progress)
        os.replace(tmp, path)
        size = os.path.getsize(path)
        msg = f"wrote {spec.rel}: {size} bytes ({human(size)}), {len(spec.tensors)} tensors, {time.time() - t0:.1f} s"
        if not args.no_check:
            check_written(path, spec)
            msg += "; re-read (torch.load / safe_open): keys, shapes, dtypes as planned"
        print(msg, flush=True)


if __name__ == "__main__":
    main()
