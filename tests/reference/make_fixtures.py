#!/usr/bin/env python3
"""Golden fixtures for the Rust OpenFlamingo reimplementation.

Builds tiny, randomly initialised OpenFlamingo models OFFLINE with the real reference code
(open_flamingo 2.0.1 `create_model_and_transforms`, open_clip 2.20.0, transformers), writes them
in the layout a user has for a released model (open_clip dir, HF causal-LM dir, `checkpoint.pt`),
and records the reference outputs (pixels, vision tokens, perceiver latents, logits, greedy and
beam-search generations).

Run (from the repo root):
    /work/refenv/bin/python tests/reference/make_fixtures.py --out tests/fixtures

Deterministic: every random tensor comes from an explicitly seeded torch.Generator, torch runs on
one thread. See tests/reference/README.md and tests/fixtures/README.md.
"""

import argparse
import copy
import json
import math
import os
import shutil
import sys
import tempfile
import types

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

import safetensors
import safetensors.torch as st
import tokenizers
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LogitsProcessor,
    LogitsProcessorList,
    MptConfig,
    MptForCausalLM,
    PreTrainedTokenizerFast,
)

import open_clip
import open_flamingo
from open_flamingo import create_model_and_transforms
from open_flamingo.src.helpers import PerceiverResampler

# open_flamingo/train/train_utils.py imports wandb at module level (only used for logging);
# stub it so that we can use the REAL filter_state_dict_to_trainable.
sys.modules.setdefault("wandb", types.ModuleType("wandb"))
from open_flamingo.train.train_utils import filter_state_dict_to_trainable  # noqa: E402

try:
    from importlib.metadata import version as _pkg_version
except ImportError:  # pragma: no cover
    _pkg_version = None

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()

# --------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------

D_MODEL = 64
N_LAYERS = 4
N_HEADS = 4
VIS_WIDTH = 64
LM_GAIN = 2.0  # LM Linear weights ~ N(0, (2/sqrt(fan_in))^2): less degenerate (repetitive) greedy text
CENTER = True  # LM Linear weights with zero-sum rows (see reinit_)
CLIP_SEED = 4000
PERCEIVER_SEED = 1000
XATTN_SEED = 2000  # + decoder layer index
MOSAIC_EXTRA_ROWS = 13  # MosaicGPT LM file has more wte rows than the tokenizer (truncated by OF)

CASES = [
    # name,            family,      xattn_every, lm weights format,   clip file format, quick_gelu, ckpt format
    ("mosaicgpt_x1", "mosaicgpt", 1, "bin", "bin", False, "pt"),
    ("mosaicgpt_x2", "mosaicgpt", 2, "safetensors", "safetensors", False, "pt"),
    ("mpt_x1", "mpt", 1, "safetensors", "safetensors", True, "pt"),
    ("mpt_x2", "mpt", 2, "sharded_safetensors", "safetensors", False, "pt"),
    ("gptneox_x1", "gptneox", 1, "safetensors", "safetensors", False, "pt"),
    ("gptneox_x2", "gptneox", 2, "sharded_bin", "bin", True, "pt"),
    ("llama_x1", "llama", 1, "safetensors", "safetensors", False, "pt"),
    ("llama_x2", "llama", 2, "safetensors", "safetensors", False, "safetensors"),
]

PROMPTS = [
    ("one_image", "<image>Output:", ["chelsea.png"]),
    (
        "three_images",
        "A few examples. <image>Output: a cat.<|endofchunk|><image>Output: a cup of coffee."
        "<|endofchunk|><image>Output:",
        ["chelsea.png", "coffee.png", "camera.png"],
    ),
]

GREEDY_NEW = 12
BEAM_NEW = 8
MIN_MARGIN = 1e-2
EOC_BOOST = 2.5  # output row of <|endofchunk|> scaled up so that beams sometimes finish early
MIN_DISTINCT = 3  # distinct ids required in each greedy output (random LMs love loops)
BEAM_NOISE = 2e-3  # beams must not change when N(0, BEAM_NOISE^2) is added to the log-probs

# English text for training the byte-level BPE (written for this fixture).
CORPUS = """
The cat sat on the warm windowsill and watched the birds in the garden. It was a quiet morning,
and the house smelled of fresh coffee. A cup of coffee stood on the table next to a plate of
bread, butter and a little jar of honey. The old camera on the shelf had not been used for years.
Output: a cat. Output: a cup of coffee. Output: a man with a camera.
A photograph shows a person standing in a field. The sky is blue and the grass is green.
Two dogs are playing with a red ball near the river. A woman is reading a book under a tree.
There is a small boat on the lake, and the water is calm. Children are running on the beach.
A bowl of fruit: apples, oranges and bananas. The kitchen is clean and bright.
An astronaut in a white suit floats above the earth. The rocket launched at dawn.
Question: What is the cat doing? Short answer: sleeping. Question: What color is the cup?
Short answer: white. Question: How many people are there? Short answer: two.
The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore.
In the city, the streets are full of cars, buses and bicycles. People walk to work in the rain.
A train crosses the bridge over the valley. The mountains are covered with snow in winter.
The model looks at the image and writes a short caption that describes what it sees.
A few examples are given first, then a new image, and the model answers in the same style.
This is a picture of a black and white photo of a man holding a camera on a tripod.
The coffee is hot, the milk is cold, and the sugar is sweet. Breakfast is ready.
""".strip().split("\n")

# --------------------------------------------------------------------------------------------
# Utilities
# --------------------------------------------------------------------------------------------


def gen(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def randn(shape, g, std=1.0, mean=0.0):
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32) * std + mean


def _is_norm(m):
    n = type(m).__name__.lower()
    return isinstance(m, nn.LayerNorm) or "rmsnorm" in n or n == "layernorm"


@torch.no_grad()
def reinit_(module, g, tied_embedding_std=1.0, linear_gain=1.0, center_rows=False):
    """Re-initialise EVERY parameter of `module` so that activations are O(1).

    Linear/Conv: N(0, 1/fan_in); bias N(0, 0.1^2); norm weight 1 + N(0, 0.1^2), norm bias
    N(0, 0.1^2); embeddings N(0, 1) (N(0, tied_embedding_std^2) for nn.Embedding when the model
    ties it to the output head); positional/class embeddings N(0, 0.5^2); perceiver latents
    N(0, 1); frame/media time embeddings N(0, 0.5^2); gates +-U(0.5, 1.5).
    Parameters shared between modules (tied weights) are initialised once (first owner).
    """
    seen = set()
    for mname, m in module.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mname}.{pname}" if mname else pname
            shape = p.shape
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                if pname == "weight":
                    fan_in = p[0].numel()
                    v = randn(shape, g, linear_gain / math.sqrt(fan_in))
                    if center_rows and v.dim() == 2:
                        # zero-sum rows: W @ 1 = 0, so the non-zero mean of GELU/SiLU outputs
                        # does not add one fixed direction to every position (which makes a
                        # random LM repeat a single "dominant" token forever)
                        v = (v - v.mean(dim=1, keepdim=True)) * math.sqrt(fan_in / max(fan_in - 1, 1))
                elif pname == "bias":
                    v = randn(shape, g, 0.1)
                else:
                    raise RuntimeError(f"unexpected param {full}")
            elif _is_norm(m):
                if pname == "weight":
                    v = randn(shape, g, 0.1, 1.0)
                elif pname == "bias":
                    v = randn(shape, g, 0.1)
                else:
                    raise RuntimeError(f"unexpected param {full}")
            elif isinstance(m, nn.Embedding):
                v = randn(shape, g, tied_embedding_std)
            elif isinstance(m, nn.MultiheadAttention):
                if pname == "in_proj_weight":
                    v = randn(shape, g, 1.0 / math.sqrt(shape[1]))
                elif pname == "in_proj_bias":
                    v = randn(shape, g, 0.1)
                else:
                    raise RuntimeError(f"unexpected param {full}")
            elif pname in ("class_embedding", "positional_embedding"):
                v = randn(shape, g, 0.5)
            elif pname in ("proj", "text_projection"):
                v = randn(shape, g, 1.0 / math.sqrt(shape[0]))
            elif pname == "logit_scale":
                v = torch.full(shape, math.log(1 / 0.07))
            elif pname == "latents":
                v = randn(shape, g, 1.0)
            elif pname in ("frame_embs", "media_time_embs"):
                v = randn(shape, g, 0.5)
            elif pname in ("attn_gate", "ff_gate"):
                mag = torch.rand(shape, generator=g) + 0.5
                sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
                v = mag * sign
            else:
                raise RuntimeError(f"no init rule for {full} ({type(m).__name__})")
            p.copy_(v.to(p.dtype))


def file_size_tree(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")


def pkg_version(name):
    try:
        return _pkg_version(name)
    except Exception:
        return None


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------

IMAGE_FILES = ["chelsea.png", "coffee.png", "camera.png", "coffee.jpg", "rgba.png", "palette.png", "small.png"]


def make_images(img_dir):
    from skimage import data

    os.makedirs(img_dir, exist_ok=True)
    chelsea = Image.fromarray(data.chelsea())  # 451x300 RGB
    assert chelsea.size == (451, 300) and chelsea.mode == "RGB"
    chelsea.save(os.path.join(img_dir, "chelsea.png"))

    coffee_full = Image.fromarray(data.coffee())  # 600x400 RGB
    coffee = coffee_full.resize((360, 240), Image.LANCZOS)
    coffee.save(os.path.join(img_dir, "coffee.png"))
    coffee.save(os.path.join(img_dir, "coffee.jpg"), quality=90)

    camera = Image.fromarray(data.camera()).resize((256, 256), Image.LANCZOS)
    assert camera.mode == "L"
    camera.save(os.path.join(img_dir, "camera.png"))

    astro = Image.fromarray(data.astronaut()).resize((300, 200), Image.LANCZOS)
    w, h = astro.size
    xs = np.arange(w)[None, :].astype(np.float64)
    ys = np.arange(h)[:, None].astype(np.float64)
    alpha = np.clip((xs + 0.5 * ys - 40.0) * 255.0 / 260.0, 0, 255).round().astype(np.uint8)
    assert (alpha == 0).any() and (alpha == 255).any()
    rgba = astro.convert("RGBA")
    rgba.putalpha(Image.fromarray(alpha, mode="L"))
    rgba.save(os.path.join(img_dir, "rgba.png"))

    pal = coffee_full.resize((320, 213), Image.LANCZOS).quantize(colors=64)
    assert pal.mode == "P"
    pal.save(os.path.join(img_dir, "palette.png"))

    small = chelsea.resize((150, 100), Image.LANCZOS)
    small.save(os.path.join(img_dir, "small.png"))

    # sanity: modes of the saved files as re-opened
    modes = {f: Image.open(os.path.join(img_dir, f)).mode for f in IMAGE_FILES}
    assert modes == {
        "chelsea.png": "RGB",
        "coffee.png": "RGB",
        "camera.png": "L",
        "coffee.jpg": "RGB",
        "rgba.png": "RGBA",
        "palette.png": "P",
        "small.png": "RGB",
    }, modes
    return modes


def compute_pixels(img_dir, preprocess):
    out = {}
    for f in IMAGE_FILES:
        with Image.open(os.path.join(img_dir, f)) as im:
            t = preprocess(im)
        assert t.shape == (3, 224, 224) and t.dtype == torch.float32
        out[f] = t.contiguous()
    return out


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def build_tokenizer(llama):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>"] + (["<s>"] if llama else [])
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    if llama:
        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
        )
    else:
        tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=True)
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<|endoftext|>",
            eos_token="<|endoftext|>",
            unk_token="<|endoftext|>",
        )
    assert fast.pad_token is None
    return fast


# --------------------------------------------------------------------------------------------
# Language models
# --------------------------------------------------------------------------------------------


def build_lm(family, vocab, tok, g):
    bos = tok.bos_token_id
    eos = tok.eos_token_id
    if family in ("mpt", "mosaicgpt"):
        cfg = MptConfig(
            d_model=D_MODEL,
            n_heads=N_HEADS,
            n_layers=N_LAYERS,
            expansion_ratio=4,
            max_seq_len=256,
            vocab_size=vocab,
            no_bias=True,
            layer_norm_epsilon=1e-5,
            attn_config={"alibi": True, "alibi_bias_max": 8, "attn_pdrop": 0.0, "clip_qkv": None,
                         "softmax_scale": None, "qk_ln": False},
            emb_pdrop=0.0,
            resid_pdrop=0.0,
            bos_token_id=bos,
            eos_token_id=eos,
        )
        model = MptForCausalLM(cfg)
        assert model.lm_head.weight is model.transformer.wte.weight
        emb_std = 0.3  # tied: logits = LN(h) . wte, keep them O(few)
    elif family == "gptneox":
        cfg = GPTNeoXConfig(
            vocab_size=vocab,
            hidden_size=D_MODEL,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=N_HEADS,
            intermediate_size=4 * D_MODEL,
            hidden_act="gelu",
            rotary_pct=0.25,
            rotary_emb_base=10000,
            max_position_embeddings=256,
            layer_norm_eps=1e-5,
            use_parallel_residual=True,
            tie_word_embeddings=False,
            bos_token_id=bos,
            eos_token_id=eos,
        )
        model = GPTNeoXForCausalLM(cfg)
        emb_std = 1.0
    elif family == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab,
            hidden_size=D_MODEL,
            intermediate_size=160,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=N_HEADS,
            num_key_value_heads=2,
            max_position_embeddings=256,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            tie_word_embeddings=False,
            hidden_act="silu",
            bos_token_id=bos,
            eos_token_id=eos,
        )
        model = LlamaForCausalLM(cfg)
        emb_std = 1.0
    else:
        raise ValueError(family)
    reinit_(model, g, tied_embedding_std=emb_std, linear_gain=LM_GAIN, center_rows=CENTER)
    model.eval()
    return model


def save_hf_lm(model, lm_dir, fmt):
    kw = {}
    if fmt in ("sharded_safetensors", "sharded_bin"):
        total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        kw["max_shard_size"] = int(total * 0.6)
    safe = fmt in ("safetensors", "sharded_safetensors")
    model.save_pretrained(lm_dir, safe_serialization=safe, **kw)
    files = sorted(os.listdir(lm_dir))
    if fmt == "safetensors":
        assert "model.safetensors" in files, files
    elif fmt == "bin":
        assert "pytorch_model.bin" in files, files
    elif fmt == "sharded_safetensors":
        assert "model.safetensors.index.json" in files and "model-00002-of-00002.safetensors" in files, files
    elif fmt == "sharded_bin":
        assert "pytorch_model.bin.index.json" in files and "pytorch_model-00002-of-00002.bin" in files, files


HF_TO_MOSAIC = [
    (".norm_1.", ".ln_1."),
    (".norm_2.", ".ln_2."),
    (".ffn.up_proj.", ".mlp.mlp_up."),
    (".ffn.down_proj.", ".mlp.mlp_down."),
    ("transformer.norm_f.", "transformer.ln_f."),
]


def write_mosaicgpt_dir(hf_model, lm_dir, fmt, qk_ln, g, tok):
    """Write the LM in MosaicGPT's own format (MOSAICGPT.md sections 1, 2, 8).

    Returns {layer index: (q_ln weight, k_ln weight)} if qk_ln else {}."""
    cfg = hf_model.config
    sd = {}
    for k, v in hf_model.state_dict().items():
        if k == "lm_head.weight":
            continue  # MosaicGPT has no lm_head (logits use wte)
        nk = k
        for a, b in HF_TO_MOSAIC:
            nk = nk.replace(a, b)
        sd[nk] = v.detach().clone().contiguous()
    # rows >= len(base tokenizer) are spare rows of the LM file; after OpenFlamingo appends its
    # tokens, row len(tok) is <|endofchunk|>: scale it (tied output row) like the other families.
    sd["transformer.wte.weight"][len(tok)] *= EOC_BOOST
    qk = {}
    if qk_ln:
        for i in range(cfg.n_layers):
            qw = randn([cfg.d_model], g, 0.1, 1.0)
            kw = randn([cfg.d_model], g, 0.1, 1.0)
            sd[f"transformer.blocks.{i}.attn.q_ln.weight"] = qw
            sd[f"transformer.blocks.{i}.attn.k_ln.weight"] = kw
            qk[i] = (qw, kw)
    # order keys like the real file (per block: ln_1, attn.Wqkv, q_ln, k_ln, out_proj, ln_2, mlp)
    def order(k):
        if k == "transformer.wte.weight":
            return (0, 0, 0)
        if k.startswith("transformer.blocks."):
            i = int(k.split(".")[2])
            rest = ".".join(k.split(".")[3:])
            sub = ["ln_1.weight", "attn.Wqkv.weight", "attn.q_ln.weight", "attn.k_ln.weight",
                   "attn.out_proj.weight", "ln_2.weight", "mlp.mlp_up.weight", "mlp.mlp_down.weight"]
            return (1, i, sub.index(rest))
        return (2, 0, 0)
    sd = {k: sd[k] for k in sorted(sd, key=order)}
    expected = {"transformer.wte.weight", "transformer.ln_f.weight"}
    for i in range(cfg.n_layers):
        for s in ["ln_1.weight", "attn.Wqkv.weight", "attn.out_proj.weight", "ln_2.weight",
                  "mlp.mlp_up.weight", "mlp.mlp_down.weight"] + (
                      ["attn.q_ln.weight", "attn.k_ln.weight"] if qk_ln else []):
            expected.add(f"transformer.blocks.{i}.{s}")
    assert set(sd) == expected, sorted(set(sd) ^ expected)

    os.makedirs(lm_dir, exist_ok=True)
    if fmt == "bin":
        torch.save(sd, os.path.join(lm_dir, "pytorch_model.bin"))
    elif fmt == "safetensors":
        st.save_file(sd, os.path.join(lm_dir, "model.safetensors"), metadata={"format": "pt"})
    else:
        raise ValueError(fmt)
    mcfg = {
        "architectures": ["MosaicGPT"],
        "alibi": True,
        "alibi_bias_max": 8,
        "attn_clip_qkv": None,
        "attn_impl": "torch",
        "attn_pdrop": 0.0,
        "attn_qk_ln": bool(qk_ln),
        "attn_uses_sequence_id": False,
        "auto_map": {
            "AutoConfig": "configuration_mosaic_gpt.MosaicGPTConfig",
            "AutoModelForCausalLM": "mosaic_gpt.MosaicGPT",
        },
        "d_model": cfg.d_model,
        "emb_init_std": None,
        "emb_init_uniform_lim": None,
        "emb_pdrop": 0.0,
        "embedding_fraction": 1.0,
        "fan_mode": "fan_in",
        "init_device": "cpu",
        "init_div_is_residual": True,
        "init_gain": 0,
        "init_nonlinearity": "leaky_relu",
        "init_std": 0.02,
        "logit_scale": None,
        "low_precision_layernorm": True,
        "max_seq_len": cfg.max_seq_len,
        "mlp_ratio": cfg.expansion_ratio,
        "model_type": "mosaic_gpt",
        "n_heads": cfg.n_heads,
        "n_layers": cfg.n_layers,
        "no_bias": True,
        "param_init_fn": "kaiming_normal_",
        "prefix_lm": False,
        "resid_pdrop": 0.0,
        "softmax_scale": None,
        "tokenizer_name": "EleutherAI/gpt-neox-20b",
        "torch_dtype": "float32",
        "transformers_version": "4.27.4",
        "use_cache": False,
        "verbose": 0,
        "vocab_size": cfg.vocab_size,
    }
    write_json(os.path.join(lm_dir, "config.json"), mcfg)
    return qk


class QKLNWqkv(nn.Module):
    """MosaicGPT's attn_qk_ln expressed around HF Mpt's fused Wqkv:
    out = Wqkv(x); q, k, v = out.chunk(3, -1); q = q_ln(q); k = k_ln(k) (full d_model width)."""

    def __init__(self, lin, d_model, q_w, k_w):
        super().__init__()
        self.lin = lin
        self.q_ln = nn.LayerNorm(d_model, eps=1e-5, bias=False)
        self.k_ln = nn.LayerNorm(d_model, eps=1e-5, bias=False)
        with torch.no_grad():
            self.q_ln.weight.copy_(q_w)
            self.k_ln.weight.copy_(k_w)

    def forward(self, x):
        q, k, v = self.lin(x).chunk(3, dim=-1)
        return torch.cat([self.q_ln(q), self.k_ln(k), v], dim=-1)


def mosaic_to_hf_dir(lm_dir, hf_dir, tok, fmt):
    """Rebuild an HF-Mpt directory from the MosaicGPT files (so that the reference runs on exactly
    the weights in lm_dir). Returns {i: (q_ln, k_ln)} read from the file."""
    with open(os.path.join(lm_dir, "config.json")) as f:
        mc = json.load(f)
    if fmt == "bin":
        sd = torch.load(os.path.join(lm_dir, "pytorch_model.bin"), map_location="cpu")
    else:
        sd = st.load_file(os.path.join(lm_dir, "model.safetensors"))
    cfg = MptConfig(
        d_model=mc["d_model"],
        n_heads=mc["n_heads"],
        n_layers=mc["n_layers"],
        expansion_ratio=mc["mlp_ratio"],
        max_seq_len=mc["max_seq_len"],
        vocab_size=mc["vocab_size"],
        no_bias=mc["no_bias"],
        layer_norm_epsilon=1e-5,
        attn_config={"alibi": mc["alibi"], "alibi_bias_max": mc["alibi_bias_max"], "attn_pdrop": 0.0,
                     "clip_qkv": mc["attn_clip_qkv"], "softmax_scale": mc["softmax_scale"]},
        emb_pdrop=0.0,
        resid_pdrop=0.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    hf = MptForCausalLM(cfg)
    hsd = {}
    qk = {}
    for k, v in sd.items():
        if ".attn.q_ln." in k or ".attn.k_ln." in k:
            i = int(k.split(".")[2])
            qk.setdefault(i, [None, None])[0 if ".q_ln." in k else 1] = v
            continue
        nk = k
        for a, b in HF_TO_MOSAIC:
            nk = nk.replace(b, a)
        hsd[nk] = v
    missing, unexpected = hf.load_state_dict(hsd, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected, (missing, unexpected)
    hf.save_pretrained(hf_dir, safe_serialization=True)
    tok.save_pretrained(hf_dir)
    return {i: tuple(v) for i, v in qk.items()}


# --------------------------------------------------------------------------------------------
# open_clip
# --------------------------------------------------------------------------------------------


def clip_config(quick_gelu):
    return {
        "embed_dim": 32,
        "quick_gelu": bool(quick_gelu),
        "vision_cfg": {
            "image_size": 224,
            "layers": 2,
            "width": VIS_WIDTH,
            "head_width": 16,
            "mlp_ratio": 4.0,
            "patch_size": 14,
        },
        "text_cfg": {"context_length": 16, "vocab_size": 96, "width": 32, "heads": 2, "layers": 1},
    }


def register_clip(name, cfg):
    open_clip.factory._MODEL_CONFIGS[name] = copy.deepcopy(cfg)


def write_clip_dir(name, cfg, clip_dir, fmt, g):
    register_clip(name, cfg)
    clip = open_clip.create_model(name, pretrained=None)
    reinit_(clip, g)
    sd = {k: v.detach().clone().contiguous() for k, v in clip.state_dict().items()}
    os.makedirs(clip_dir, exist_ok=True)
    write_json(os.path.join(clip_dir, "open_clip_config.json"), cfg)
    if fmt == "bin":
        path = os.path.join(clip_dir, "open_clip_pytorch_model.bin")
        torch.save(sd, path)
    else:
        path = os.path.join(clip_dir, "open_clip_model.safetensors")
        st.save_file(sd, path, metadata={"format": "pt"})
    return path


# --------------------------------------------------------------------------------------------
# Flamingo assembly
# --------------------------------------------------------------------------------------------


def build_flamingo(case, case_dir, tmp_root):
    """Build the reference Flamingo from the files in case_dir (as a user would), WITHOUT the
    checkpoint. Returns (model, image_processor, tokenizer, info)."""
    name, family, every, lm_fmt, clip_fmt, quick_gelu, _ = case
    clip_dir = os.path.join(case_dir, "clip")
    lm_dir = os.path.join(case_dir, "lm")
    with open(os.path.join(clip_dir, "open_clip_config.json")) as f:
        ccfg = json.load(f)
    clip_name = f"of-fixture-{name}"
    register_clip(clip_name, ccfg)
    clip_path = os.path.join(
        clip_dir, "open_clip_pytorch_model.bin" if clip_fmt == "bin" else "open_clip_model.safetensors"
    )
    qk = {}
    if family == "mosaicgpt":
        hf_dir = tempfile.mkdtemp(dir=tmp_root)
        tok0 = PreTrainedTokenizerFast.from_pretrained(lm_dir)
        qk = mosaic_to_hf_dir(lm_dir, hf_dir, tok0, lm_fmt)
        lang_path = hf_dir
    else:
        lang_path = lm_dir
    # .bin clip files go through open_clip's own loader (pretrained=<file>, strict load of the
    # full CLIP state dict); safetensors (open_clip 2.20 cannot read them) are loaded below.
    model, image_processor, tokenizer = create_model_and_transforms(
        clip_vision_encoder_path=clip_name,
        clip_vision_encoder_pretrained=clip_path if clip_fmt == "bin" else None,
        lang_encoder_path=lang_path,
        tokenizer_path=lm_dir,
        cross_attn_every_n_layers=every,
        use_local_files=True,
    )
    if clip_fmt != "bin":
        sd = st.load_file(clip_path)
        # a full CLIP must load strictly (checks the file holds the text tower too)
        register_clip(clip_name, ccfg)
        full = open_clip.create_model(clip_name, pretrained=None)
        full.load_state_dict(sd, strict=True)
        vis = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
        model.vision_encoder.load_state_dict(vis, strict=True)
    if family == "mosaicgpt" and qk:
        for i, layer in enumerate(model.lang_encoder.transformer.blocks):
            attn = layer.decoder_layer.attn
            attn.Wqkv = QKLNWqkv(attn.Wqkv, D_MODEL, qk[i][0], qk[i][1])
            attn.Wqkv.requires_grad_(False)  # part of the frozen LM
    model.eval()
    return model, image_processor, tokenizer


def lm_file_vocab(case_dir, family):
    with open(os.path.join(case_dir, "lm", "config.json")) as f:
        return json.load(f)["vocab_size"]


def apply_new_lm_head_rows_rule(model, family, orig_rows):
    """llama: lm_head is untied and not in the checkpoint; OpenFlamingo's resize gives its new rows
    random values. Rule used by the fixtures (and the Rust loader): new rows = mean of the
    original rows."""
    if family != "llama":
        return None
    w = model.lang_encoder.lm_head.weight
    with torch.no_grad():
        if w.shape[0] > orig_rows:
            w[orig_rows:] = w[:orig_rows].mean(dim=0, keepdim=True)
    return "mean"


class NoiseLogits(LogitsProcessor):
    def __init__(self, seed, scale):
        self.g = gen(seed)
        self.scale = scale

    def __call__(self, input_ids, scores):
        return scores + torch.randn(scores.shape, generator=self.g, dtype=scores.dtype) * self.scale


@torch.no_grad()
def run_generate(model, vision_x, ids, mask, **kw):
    out = model.generate(vision_x=vision_x, lang_x=ids, attention_mask=mask, do_sample=False, **kw)
    return out[0, ids.shape[1]:].tolist()


@torch.no_grad()
def greedy_margins(model, vision_x, ids, gen_ids):
    """Full-recompute check of a greedy path: per step, logit of the generated id minus the best
    other logit, from a plain Flamingo.forward over prompt+generated (negative = disagreement)."""
    if not gen_ids:
        return []
    full = torch.cat([ids, torch.tensor([gen_ids[:-1]], dtype=ids.dtype)], dim=1)
    logits = model(vision_x=vision_x, lang_x=full).logits[0]
    T = ids.shape[1]
    margins = []
    for k, tid in enumerate(gen_ids):
        row = logits[T - 1 + k].clone()
        chosen = float(row[tid])
        row[tid] = -float("inf")
        # top-1 minus top-2 when the full recompute agrees with generate(); negative otherwise
        margins.append(chosen - float(row.max()))
    return margins


# --------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------


def build_case_files(case, case_dir, tmp_root, seed, tokenizers_by_kind):
    name, family, every, lm_fmt, clip_fmt, quick_gelu, ckpt_fmt = case
    g = gen(seed)
    if os.path.exists(case_dir):
        shutil.rmtree(case_dir)
    os.makedirs(case_dir)
    # --- clip/: the same CLIP weights in every case (seed CLIP_SEED); only the file format and
    # quick_gelu differ. Identical files are stored once by git.
    write_clip_dir(f"of-fixture-{name}", clip_config(quick_gelu), os.path.join(case_dir, "clip"), clip_fmt,
                   gen(CLIP_SEED))
    # --- lm/
    tok = tokenizers_by_kind["llama" if family == "llama" else "bpe"]
    lm_dir = os.path.join(case_dir, "lm")
    base = len(tok)
    vocab = base + (MOSAIC_EXTRA_ROWS if family == "mosaicgpt" else 0)
    lm = build_lm(family, vocab, tok, g)
    if family == "mosaicgpt":
        write_mosaicgpt_dir(lm, lm_dir, lm_fmt, qk_ln=(every == 1), g=g, tok=tok)
    else:
        save_hf_lm(lm, lm_dir, lm_fmt)
    tok.save_pretrained(lm_dir)
    return g


def flamingo_new_params_reinit(model, family, orig_rows, g_case):
    # perceiver and gated xattn: seeded independently of the case (per layer index), so the
    # byte-identical tensors across cases delta-compress in git. Still distinct per layer.
    reinit_(model.perceiver, gen(PERCEIVER_SEED))
    for i, layer in enumerate(model.lang_encoder.gated_cross_attn_layers):
        if layer is not None:
            # zero-sum rows here too: otherwise the cross-attention FF adds one fixed direction
            # to every text position and greedy decoding locks onto one token
            reinit_(layer, gen(XATTN_SEED + i), center_rows=True)
    # new rows of the resized embeddings (the 3 added tokens) -> go to the checkpoint
    emb = model.lang_encoder.get_input_embeddings().weight
    n = emb.shape[0]
    eoc = model.eoc_token_id
    with torch.no_grad():
        if n > orig_rows:
            std = 0.3 if family in ("mpt",) else 1.0
            emb[orig_rows:] = randn([n - orig_rows, emb.shape[1]], g_case, std)
            if family == "mpt":  # tied: the input row is also the output row
                emb[eoc] *= EOC_BOOST
        if family == "gptneox":
            out = model.lang_encoder.embed_out.weight
            if out.shape[0] > orig_rows:
                out[orig_rows:] = randn([out.shape[0] - orig_rows, out.shape[1]], g_case,
                                        LM_GAIN / math.sqrt(out.shape[1]))
                out[eoc] *= EOC_BOOST


def make_checkpoint(model, family):
    sd = model.state_dict()
    ck = filter_state_dict_to_trainable(model, sd)
    if family == "mosaicgpt":
        # The HF-Mpt stand-in has an `lm_head` alias of wte that MosaicGPT does not have.
        ck.pop("lang_encoder.lm_head.weight", None)
    return ck


def save_checkpoint(ck, case_dir, ckpt_fmt):
    if ckpt_fmt == "pt":
        path = os.path.join(case_dir, "checkpoint.pt")
        torch.save(ck, path)
    else:
        path = os.path.join(case_dir, "checkpoint.safetensors")
        out = {}
        for k, v in ck.items():
            if v.dtype == torch.bool:
                continue
            out[k] = v.detach().clone().contiguous()
        st.save_file(out, path, metadata={"format": "pt"})
    return path


def load_checkpoint_file(path):
    if path.endswith(".safetensors"):
        return st.load_file(path)
    return torch.load(path, map_location="cpu")


def state_dicts_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    if set(sa) != set(sb):
        return False, sorted(set(sa) ^ set(sb))[:10]
    bad = [k for k in sa if sa[k].shape != sb[k].shape or not torch.equal(sa[k], sb[k])]
    return not bad, bad[:10]


def try_case(case, out_dir, tmp_root, seed, tokenizers_by_kind, pixels):
    name, family, every, lm_fmt, clip_fmt, quick_gelu, ckpt_fmt = case
    case_dir = os.path.join(out_dir, "models", name)
    g_case = build_case_files(case, case_dir, tmp_root, seed, tokenizers_by_kind)
    orig_rows = lm_file_vocab(case_dir, family)

    # ---- A: build from files, init the new (trainable) parts, write the checkpoint
    torch.manual_seed(seed)
    model_a, image_processor, tokenizer = build_flamingo(case, case_dir, tmp_root)
    tok_len = len(tokenizer)
    flamingo_new_params_reinit(model_a, family, orig_rows, g_case)
    rule = apply_new_lm_head_rows_rule(model_a, family, orig_rows)
    ck = make_checkpoint(model_a, family)
    ckpt_path = save_checkpoint(ck, case_dir, ckpt_fmt)

    # ---- B: what a user does: files + checkpoint (strict=False), + the lm_head rule
    torch.manual_seed(seed + 777)
    model, image_processor, tokenizer = build_flamingo(case, case_dir, tmp_root)
    loaded = load_checkpoint_file(ckpt_path)
    res = model.load_state_dict(loaded, strict=False)
    assert not res.unexpected_keys, res.unexpected_keys
    apply_new_lm_head_rows_rule(model, family, orig_rows)
    ok, diff = state_dicts_equal(model_a, model)
    assert ok, f"{name}: model rebuilt from fixture files differs from the original: {diff}"
    del model_a

    # ---- facts
    media_id = tokenizer.encode("<image>")[-1]
    eoc_id = tokenizer.encode("<|endofchunk|>")[-1]
    assert model.media_token_id == media_id and model.eoc_token_id == eoc_id
    emb_rows = model.lang_encoder.get_input_embeddings().weight.shape[0]
    assert emb_rows == tok_len
    if family == "mosaicgpt":
        assert orig_rows == tok_len - 3 + MOSAIC_EXTRA_ROWS
        assert ck["lang_encoder.transformer.wte.weight"].shape[0] == tok_len
        # truncation keeps the first len(tokenizer) rows of the LM file
        lm_sd = (torch.load(os.path.join(case_dir, "lm", "pytorch_model.bin"))
                 if lm_fmt == "bin" else st.load_file(os.path.join(case_dir, "lm", "model.safetensors")))
        assert torch.equal(lm_sd["transformer.wte.weight"][:tok_len], ck["lang_encoder.transformer.wte.weight"])

    # ---- preprocess check: the transform returned here equals the shared pixels
    for f, t in pixels.items():
        with Image.open(os.path.join(out_dir, "images", f)) as im:
            assert torch.equal(image_processor(im), t), f

    expected_tensors = {}
    prompts_out = []
    problems = []
    for pname, text, imgs in PROMPTS:
        enc = tokenizer([text], return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        assert (ids == media_id).sum().item() == len(imgs)
        vx = torch.stack([pixels[f] for f in imgs], dim=0)  # [N,3,224,224]
        vision_x = vx[None, :, None]  # (1, N, 1, 3, 224, 224)
        with torch.no_grad():
            vtok = model.vision_encoder(vx)[1]
            lat = model.perceiver(vtok[None, :, None])[0]
            logits = model(vision_x=vision_x, lang_x=ids).logits[0]
        assert vtok.shape == (len(imgs), 256, VIS_WIDTH) and lat.shape == (len(imgs), 64, VIS_WIDTH)
        assert logits.shape == (ids.shape[1], tok_len)
        expected_tensors[f"{pname}.vision_x"] = vx.contiguous()
        expected_tensors[f"{pname}.vision_tokens"] = vtok.contiguous()
        expected_tensors[f"{pname}.latents"] = lat.contiguous()
        expected_tensors[f"{pname}.logits"] = logits.contiguous()

        # phase 1 (cheap checks first): greedy with the images and with blank images
        greedy = run_generate(model, vision_x, ids, mask, max_new_tokens=GREEDY_NEW, num_beams=1)
        margins = greedy_margins(model, vision_x, ids, greedy)
        blank_vx = torch.zeros_like(vision_x)
        blank = run_generate(model, blank_vx, ids, mask, max_new_tokens=GREEDY_NEW, num_beams=1)
        blank_margins = greedy_margins(model, blank_vx, ids, blank)
        min_margin = min(margins) if margins else float("inf")
        blank_min = min(blank_margins) if blank_margins else float("inf")
        if min_margin < MIN_MARGIN:
            problems.append(f"{pname}: greedy min margin {min_margin:.3g}")
        if blank_min < MIN_MARGIN:
            problems.append(f"{pname}: blank greedy min margin {blank_min:.3g}")
        if blank == greedy:
            problems.append(f"{pname}: blank images give the same greedy ids {greedy}")
        if len(greedy) < 4 or len(set(greedy)) < MIN_DISTINCT:
            problems.append(f"{pname}: greedy too short or repetitive: {greedy}")
        prompts_out.append({
            "name": pname,
            "text": text,
            "images": imgs,
            "input_ids": ids[0].tolist(),
            "greedy": {"max_new_tokens": GREEDY_NEW, "ids": greedy, "min_margin": min_margin,
                       "margins": margins},
            "beam3": None,
            "beam3_lp0": None,
            "blank_greedy_ids": blank,
            "blank_greedy_min_margin": blank_min,
            "_blank_vx": blank_vx,
            "_vision_x": vision_x,
            "_ids": ids,
            "_mask": mask,
        })
        if problems:
            return None, problems

    # phase 2: beam search, and its robustness under small noise on the log-probs
    for p in prompts_out:
        vision_x, ids, mask = p["_vision_x"], p["_ids"], p["_mask"]
        beam = run_generate(model, vision_x, ids, mask, max_new_tokens=BEAM_NEW, num_beams=3, length_penalty=1.0)
        beam0 = run_generate(model, vision_x, ids, mask, max_new_tokens=BEAM_NEW, num_beams=3, length_penalty=0.0)
        p["beam3"] = {"num_beams": 3, "max_new_tokens": BEAM_NEW, "length_penalty": 1.0, "ids": beam}
        p["beam3_lp0"] = {"num_beams": 3, "max_new_tokens": BEAM_NEW, "length_penalty": 0.0, "ids": beam0}
        for trial in range(3):
            for lp, ref in ((1.0, beam), (0.0, beam0)):
                noisy = run_generate(
                    model, vision_x, ids, mask, max_new_tokens=BEAM_NEW, num_beams=3, length_penalty=lp,
                    logits_processor=LogitsProcessorList([NoiseLogits(seed * 10 + trial, BEAM_NOISE)]),
                )
                if noisy != ref:
                    problems.append(f"{p['name']}: beam lp={lp} unstable under {BEAM_NOISE} noise")
                    return None, problems
    if family != "llama" and all(p["beam3"]["ids"] == p["beam3_lp0"]["ids"] for p in prompts_out):
        # llama's <|endofchunk|> output row is the mean row (not trained), it never wins
        problems.append("length_penalty 1.0 and 0.0 give the same beams for every prompt")
        return None, problems

    if problems:
        return None, problems

    # ---- float64 re-run: same ids (guards against fp-fragile fixtures). transformers' Mpt
    # cannot run in float64 (its causal-mask helper overflows), so this is best effort.
    model64 = model.double()
    f64_note = "float64 generations identical"
    try:
        _float64_check(model64, prompts_out, problems)
    except RuntimeError as e:
        f64_note = f"skipped (float64 forward fails in this transformers: {str(e)[:80]})"
    if problems:
        return None, problems
    for p in prompts_out:
        for k in [k for k in p if k.startswith("_")]:
            del p[k]
    return _finish_case(case, case_dir, seed, tokenizer, tok_len, orig_rows, emb_rows, rule, quick_gelu,
                        ckpt_path, ck, expected_tensors, prompts_out, media_id, eoc_id, f64_note)


def _float64_check(model64, prompts_out, problems):
    for p in prompts_out:
        vx64 = p["_vision_x"].double()
        ids, mask = p["_ids"], p["_mask"]
        g64 = run_generate(model64, vx64, ids, mask, max_new_tokens=GREEDY_NEW, num_beams=1)
        b64 = run_generate(model64, vx64, ids, mask, max_new_tokens=BEAM_NEW, num_beams=3, length_penalty=1.0)
        b064 = run_generate(model64, vx64, ids, mask, max_new_tokens=BEAM_NEW, num_beams=3, length_penalty=0.0)
        bl64 = run_generate(model64, p["_blank_vx"].double(), ids, mask, max_new_tokens=GREEDY_NEW, num_beams=1)
        if (g64, b64, b064, bl64) != (p["greedy"]["ids"], p["beam3"]["ids"], p["beam3_lp0"]["ids"],
                                       p["blank_greedy_ids"]):
            problems.append(f"{p['name']}: float64 generations differ from float32")


def _finish_case(case, case_dir, seed, tokenizer, tok_len, orig_rows, emb_rows, rule, quick_gelu,
                 ckpt_path, ck, expected_tensors, prompts_out, media_id, eoc_id, f64_note):
    name, family, every, lm_fmt, clip_fmt, _, ckpt_fmt = case
    st.save_file(expected_tensors, os.path.join(case_dir, "expected.safetensors"), metadata={"format": "pt"})
    ck_keys = {k: [list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in ck.items()}
    expected = {
        "case": name,
        "family": family,
        "cross_attn_every_n_layers": every,
        "seed": seed,
        "media_token_id": media_id,
        "eoc_token_id": eoc_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "tokenizer_len": tok_len,
        "lm_file_vocab_rows": orig_rows,
        "vocab_rows": emb_rows,
        "new_lm_head_rows": rule,
        "quick_gelu": quick_gelu,
        "files": {
            "lm_weights": lm_fmt,
            "clip_weights": clip_fmt,
            "checkpoint": os.path.basename(ckpt_path),
        },
        "blank_images": "vision_x replaced by torch.zeros_like(vision_x) (zeros AFTER normalisation)",
        "transformers_version": transformers.__version__,
        "open_clip_version": pkg_version("open_clip_torch"),
        "open_flamingo_version": pkg_version("open-flamingo"),
        "torch_version": torch.__version__,
        "float64_check": f64_note,
        "checkpoint_keys": ck_keys,
        "prompts": prompts_out,
    }
    write_json(os.path.join(case_dir, "expected.json"), expected)
    return expected, []


# --------------------------------------------------------------------------------------------
# Perceiver with video embeddings
# --------------------------------------------------------------------------------------------


def make_perceiver_video(out_dir):
    d = os.path.join(out_dir, "perceiver_video")
    os.makedirs(d, exist_ok=True)
    torch.manual_seed(0)
    p = PerceiverResampler(dim=64, max_num_media=4, max_num_frames=3)
    # layers/latents/norm: the same values as the perceiver of the model cases (PERCEIVER_SEED);
    # frame_embs / media_time_embs: their own seed, N(0, 0.5^2)
    base = PerceiverResampler(dim=64)
    reinit_(base, gen(PERCEIVER_SEED))
    res = p.load_state_dict(base.state_dict(), strict=False)
    assert sorted(res.missing_keys) == ["frame_embs", "media_time_embs"] and not res.unexpected_keys, res
    g = gen(3000)
    with torch.no_grad():
        p.frame_embs.copy_(randn(p.frame_embs.shape, g, 0.5))
        p.media_time_embs.copy_(randn(p.media_time_embs.shape, g, 0.5))
    p.eval()
    weights = {f"perceiver.{k}": v.detach().clone().contiguous() for k, v in p.state_dict().items()}
    st.save_file(weights, os.path.join(d, "weights.safetensors"), metadata={"format": "pt"})
    x = randn([1, 2, 3, 20, 64], gen(3001))
    with torch.no_grad():
        out = p(x)
    assert out.shape == (1, 2, 64, 64)
    # check that both temporal embeddings matter
    with torch.no_grad():
        q = copy.deepcopy(p)
        q.frame_embs.zero_()
        assert (q(x) - out).abs().max() > 1e-2
        q = copy.deepcopy(p)
        q.media_time_embs.zero_()
        assert (q(x) - out).abs().max() > 1e-2
    st.save_file({"x": x.contiguous(), "out": out.contiguous()}, os.path.join(d, "expected.safetensors"),
                 metadata={"format": "pt"})
    return sorted(weights)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", default=None, help="comma separated case names (debug)")
    args = ap.parse_args()
    out_dir = args.out
    os.makedirs(out_dir, exist_ok=True)
    tmp_root = tempfile.mkdtemp(prefix="of-fixtures-")
    try:
        # images
        img_dir = os.path.join(out_dir, "images")
        make_images(img_dir)
        register_clip("of-fixture-preprocess", clip_config(False))
        _, _, preprocess = open_clip.create_model_and_transforms("of-fixture-preprocess", pretrained=None)
        pixels = compute_pixels(img_dir, preprocess)
        st.save_file(pixels, os.path.join(img_dir, "pixels.safetensors"), metadata={"format": "pt"})

        # tokenizers
        toks = {"bpe": build_tokenizer(False), "llama": build_tokenizer(True)}

        summary = {}
        cases = CASES
        if args.only:
            want = set(args.only.split(","))
            cases = [c for c in CASES if c[0] in want]
        for ci, case in enumerate(cases):
            name = case[0]
            base_seed = 100 * (CASES.index(case) + 1)
            for attempt in range(100):
                seed = base_seed + attempt
                exp, problems = try_case(case, out_dir, tmp_root, seed, toks, pixels)
                if exp is not None:
                    break
                print(f"[{name}] seed {seed} rejected: {problems}", flush=True)
            else:
                raise RuntimeError(f"{name}: no seed satisfied the checks")
            mm = {p["name"]: (p["greedy"]["min_margin"], p["blank_greedy_min_margin"]) for p in exp["prompts"]}
            summary[name] = {"seed": exp["seed"], "min_margin": mm}
            print(f"[{name}] seed {exp['seed']} OK; min margins (greedy, blank): {mm}", flush=True)
            for p in exp["prompts"]:
                print(f"    {p['name']}: greedy {p['greedy']['ids']} | beam3 {p['beam3']['ids']} | "
                      f"beam3_lp0 {p['beam3_lp0']['ids']} | blank {p['blank_greedy_ids']}", flush=True)

        pv_keys = make_perceiver_video(out_dir)
        print(f"perceiver_video: {len(pv_keys)} weight tensors")

        total = file_size_tree(out_dir)
        print("sizes:")
        for sub in sorted(os.listdir(out_dir)):
            p = os.path.join(out_dir, sub)
            if os.path.isdir(p):
                print(f"  {sub}: {file_size_tree(p) / 1e6:.2f} MB")
                if sub == "models":
                    for c in sorted(os.listdir(p)):
                        print(f"    {c}: {file_size_tree(os.path.join(p, c)) / 1e6:.2f} MB")
        print(f"TOTAL fixture size: {total} bytes ({total / 1e6:.2f} MB)")
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)


if __name__ == "__main__":
    main()
