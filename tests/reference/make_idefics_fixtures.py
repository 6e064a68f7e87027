#!/usr/bin/env python3
"""Golden fixtures for the Rust IDEFICS reimplementation.

Builds tiny, randomly initialised IDEFICS models OFFLINE with transformers'
`IdeficsForVisionText2Text` (4.46.3), writes them in the HF layout a user of idefics-9b has
(`config.json`, `model.safetensors`, tokenizer files, `preprocessor_config.json`,
`generation_config.json`), builds every prompt with the real `IdeficsProcessor`, and records the
reference outputs: input ids, pixel values, the processor's image attention mask, logits at every
position, greedy and beam-3 generations, and the greedy path with blank images.

Run (from the repo root):
    /work/idefenv/bin/python tests/reference/make_idefics_fixtures.py --out tests/fixtures/idefics

Deterministic: every random tensor comes from a seeded torch.Generator, torch runs on one
thread. See tests/reference/README.md and tests/fixtures/README.md.
"""

import argparse
import json
import math
import os
import shutil
import sys

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

import safetensors.torch as st
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    IdeficsConfig,
    IdeficsForVisionText2Text,
    IdeficsImageProcessor,
    IdeficsProcessor,
    LlamaTokenizerFast,
)
from transformers.models.idefics.image_processing_idefics import IDEFICS_STANDARD_MEAN, IDEFICS_STANDARD_STD
from transformers.models.idefics.modeling_idefics import IdeficsRMSNorm

import transformers.models.idefics.processing_idefics as processing_idefics

# transformers 4.46's input-order check (`_validate_images_text_input_order`) rejects the
# interleaved form its own docstring documents (text with PIL images in one list); it only
# swaps arguments for backward compatibility, so it is bypassed and the real prompt building
# below it runs unchanged.
processing_idefics._validate_images_text_input_order = lambda images, text: (images, text)

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGES = os.path.join(HERE, "..", "fixtures", "images")

# name, cross_layer_interval, alpha_type, qk_layer_norms, qk_layer_norms_perceiver, weights file
CASES = [
    ("idefics_x1", 1, "float", True, True, "single"),
    ("idefics_x2", 2, "vector", False, False, "sharded"),
    ("idefics_x2_qk", 2, "float", True, False, "single"),
]

HIDDEN = 64
LAYERS = 4
HEADS = 4
FFN = 128
VIS = 48
VIS_LAYERS = 2
VIS_HEADS = 3
IMAGE_SIZE = 28
PATCH = 14
LATENTS = 8
PERC_DEPTH = 2
PERC_HEADS = 2
PERC_HEAD_DIM = 16

GREEDY_NEW = 10
BEAM_NEW = 8
MIN_MARGIN = 1e-2
MIN_DISTINCT = 3
LM_GAIN = 2.0

# Prompts as IdeficsProcessor takes them: lists of text and images (file names of
# tests/fixtures/images). Text before the first image, two and three images (two of them
# consecutive, sharing a fake token), and `</s>` between turns (the tokens after it attend to no
# image until the next one).
PROMPTS = [
    ("text_first", ["A photo of", "chelsea.png", "a cat on the"]),
    ("two_images", ["chelsea.png", "a cat.", "coffee.png", "a cup of"]),
    ("three_images", ["camera.png", "rgba.png", "two pictures.", "palette.png", "and the"]),
    (
        "eos_turns",
        ["User:", "chelsea.png", "What is it?</s>Assistant: a cat.</s>User: and now", "coffee.png", "It is"],
    ),
]

# A chat as idefics-9b-instruct's model card writes one for IdeficsProcessor (with
# add_end_of_utterance_token=False): the server's `idefics_instruct` template must give the same
# ids. Recorded after a case's seed is chosen (chat.json), so it does not change the models.
CHAT = [
    "User: What is it?",
    "chelsea.png",
    "<end_of_utterance>",
    "\nAssistant: a cat.<end_of_utterance>",
    "\nUser:",
    "coffee.png",
    "And this?<end_of_utterance>",
    "\nAssistant:",
]

CORPUS = """
The cat sat on the warm windowsill and watched the birds in the garden. It was a quiet morning.
A cup of coffee stood on the table next to a plate of bread, butter and a little jar of honey.
User: What is in the image? Assistant: a cat. User: and now? Assistant: a cup of coffee.
A photo of a cat on the sofa. Two pictures of a man with a camera, and the dog is sleeping.
A photograph shows a person standing in a field. The sky is blue and the grass is green.
Describe the image. It is a picture of a black and white photo of a man holding a camera.
What color is the cup? It is white. How many people are there? There are two.
""".strip().split("\n")


def gen(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def randn(shape, g, std=1.0, mean=0.0):
    return torch.randn(shape, generator=g) * std + mean


def reinit_(model, g, alpha_type):
    """Every parameter re-initialised so that activations are O(1) and images move the logits:
    Linear/Conv N(0, gain^2/fan_in) (gain 2 with zero-sum rows in the decoder layers, 1
    elsewhere), biases N(0, 0.1^2), norm weights 1 + N(0, 0.1^2), norm biases N(0, 0.1^2),
    embeddings N(0, 1), class/position embeddings N(0, 0.5^2), latents N(0, 1), alphas
    +-U(0.5, 1.5) (one per gate or one per channel)."""
    seen = set()
    for mname, m in model.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mname}.{pname}" if mname else pname
            shape = p.shape
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                assert pname in ("weight", "bias"), full
                if pname == "bias":
                    v = randn(shape, g, 0.1)
                else:
                    fan_in = p[0].numel()
                    decoder = ".layers." in f".{mname}" and "vision_model" not in mname
                    gain = LM_GAIN if decoder else 1.0
                    v = randn(shape, g, gain / math.sqrt(fan_in))
                    if decoder and v.dim() == 2:
                        v = (v - v.mean(dim=1, keepdim=True)) * math.sqrt(fan_in / max(fan_in - 1, 1))
            elif isinstance(m, (nn.LayerNorm, IdeficsRMSNorm)):
                v = randn(shape, g, 0.1, 1.0) if pname == "weight" else randn(shape, g, 0.1)
            elif isinstance(m, nn.Embedding):
                v = randn(shape, g, 0.5 if "position_embedding" in mname else 1.0)
            elif pname == "class_embedding":
                v = randn(shape, g, 0.5)
            elif pname == "latents":
                v = randn(shape, g, 1.0)
            elif pname in ("alpha_cross_attn", "alpha_dense"):
                mag = torch.rand(shape, generator=g) + 0.5
                sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
                v = mag * sign
            else:
                raise RuntimeError(f"unexpected parameter {full} {tuple(shape)}")
            with torch.no_grad():
                p.copy_(v.to(p.dtype))
    if alpha_type == "vector":
        assert model.model.gated_cross_attn_layers[0].alpha_dense.shape == (1, 1, HIDDEN)


def build_tokenizer():
    """A byte-level BPE with LLaMA's special tokens (<unk> 0, <s> 1, </s> 2) and
    `<end_of_utterance>` in the base vocabulary, then IDEFICS's two added tokens
    `<fake_token_around_image>` and `<image>` at ids vocab_size and vocab_size + 1 (the
    decoupled embedding's additional rows), as in the released tokenizers."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>", "<end_of_utterance>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    vocab = tok.get_vocab_size()
    fast = LlamaTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        add_bos_token=True,
        add_eos_token=False,
    )
    fast.add_special_tokens({"additional_special_tokens": ["<end_of_utterance>", "<fake_token_around_image>", "<image>"]})
    assert fast.convert_tokens_to_ids("<fake_token_around_image>") == vocab
    assert fast.convert_tokens_to_ids("<image>") == vocab + 1
    return fast, vocab


def build_config(case, vocab):
    _, interval, alpha_type, qk, qk_perc, _ = case
    return IdeficsConfig(
        vocab_size=vocab,
        additional_vocab_size=2,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        rms_norm_eps=1e-6,
        cross_layer_interval=interval,
        qk_layer_norms=qk,
        alpha_initializer="zeros",
        alpha_type=alpha_type,
        use_resampler=True,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        vision_config=dict(
            embed_dim=VIS,
            image_size=IMAGE_SIZE,
            patch_size=PATCH,
            num_hidden_layers=VIS_LAYERS,
            num_attention_heads=VIS_HEADS,
            intermediate_size=2 * VIS,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
        ),
        perceiver_config=dict(
            resampler_depth=PERC_DEPTH,
            resampler_n_heads=PERC_HEADS,
            resampler_head_dim=PERC_HEAD_DIM,
            resampler_n_latents=LATENTS,
            qk_layer_norms_perceiver=qk_perc,
        ),
    )


def image_processor(size):
    """As in the released `preprocessor_config.json` (the class's own defaults leave mean and std
    unset, which normalises to NaN)."""
    return IdeficsImageProcessor(image_size=size, image_mean=IDEFICS_STANDARD_MEAN, image_std=IDEFICS_STANDARD_STD)


def processor_inputs(processor, items, **kw):
    sample = [Image.open(os.path.join(IMAGES, x)) if x.endswith(".png") else x for x in items]
    return processor(text=[sample], return_tensors="pt", **kw)


@torch.no_grad()
def generate(model, inp, **kw):
    out = model.generate(
        input_ids=inp["input_ids"],
        attention_mask=inp["attention_mask"],
        pixel_values=inp["pixel_values"],
        image_attention_mask=inp["image_attention_mask"],
        do_sample=False,
        pad_token_id=0,
        **kw,
    )
    return out[0, inp["input_ids"].shape[1]:].tolist()


@torch.no_grad()
def forward_logits(model, ids, pixel_values, image_mask):
    return model(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=pixel_values,
        image_attention_mask=image_mask,
        use_cache=False,
    ).logits[0]


@torch.no_grad()
def greedy_margins(model, inp, gen_ids, pixel_values):
    """Per generated token: its logit minus the best other one, from a full recompute over prompt
    + generated ids with the generated tokens attending as generate() makes them (the last prompt
    row of the image mask repeated). Negative means the recompute disagrees."""
    if not gen_ids:
        return []
    ids = inp["input_ids"]
    full = torch.cat([ids, torch.tensor([gen_ids[:-1]], dtype=ids.dtype)], dim=1)
    mask = inp["image_attention_mask"]
    extra = mask[:, -1:, :].repeat(1, len(gen_ids) - 1, 1)
    logits = forward_logits(model, full, pixel_values, torch.cat([mask, extra], dim=1))
    t = ids.shape[1]
    out = []
    for k, tid in enumerate(gen_ids):
        row = logits[t - 1 + k].clone()
        chosen = float(row[tid])
        row[tid] = -float("inf")
        out.append(chosen - float(row.max()))
    return out


def try_case(case, case_dir, seed, tokenizer, vocab):
    name, interval, alpha_type, qk, qk_perc, weights = case
    config = build_config(case, vocab)
    torch.manual_seed(0)
    model = IdeficsForVisionText2Text(config).eval()
    reinit_(model, gen(seed), alpha_type)
    processor = IdeficsProcessor(image_processor(IMAGE_SIZE), tokenizer)
    problems = []
    prompts = {}
    tensors = {}
    for pname, items in PROMPTS:
        inp = processor_inputs(processor, items)
        ids = inp["input_ids"]
        pv = inp["pixel_values"]
        mask = inp["image_attention_mask"]
        logits = forward_logits(model, ids, pv, mask)
        greedy = generate(model, inp, max_new_tokens=GREEDY_NEW)
        margins = greedy_margins(model, inp, greedy, pv)
        blank = dict(inp)
        blank["pixel_values"] = torch.zeros_like(pv)
        greedy_blank = generate(model, blank, max_new_tokens=GREEDY_NEW)
        margins_blank = greedy_margins(model, blank, greedy_blank, blank["pixel_values"])
        beam = generate(model, inp, max_new_tokens=BEAM_NEW, num_beams=3, length_penalty=1.0, early_stopping=False)
        if min(margins + margins_blank, default=0) < MIN_MARGIN:
            problems.append(f"{pname}: greedy margin {min(margins + margins_blank):.4f}")
        if greedy == greedy_blank:
            problems.append(f"{pname}: blank images do not change the greedy ids")
        if len(greedy) < 4 or len(set(greedy)) < MIN_DISTINCT:
            problems.append(f"{pname}: degenerate greedy output {greedy}")
        # the image mask as media indices (-1: no image), what the Rust side derives itself
        media = [int(r.argmax()) if bool(r.any()) else -1 for r in mask[0]]
        text = processor.tokenizer.decode(ids[0], skip_special_tokens=False)
        prompts[pname] = {
            "items": items,
            "text": text,
            "input_ids": ids[0].tolist(),
            "media": media,
            "greedy": greedy,
            "greedy_margin_min": min(margins),
            "greedy_blank": greedy_blank,
            "greedy_blank_margin_min": min(margins_blank),
            "beam3": beam,
        }
        tensors[f"{pname}.logits"] = logits.contiguous()
        tensors[f"{pname}.pixel_values"] = pv[0].contiguous()
    if problems:
        return problems, None
    return [], (model, processor, prompts, tensors)


def write_case(case, case_dir, seed, model, processor, prompts, tensors, vocab):
    name, interval, alpha_type, qk, qk_perc, weights = case
    if os.path.exists(case_dir):
        shutil.rmtree(case_dir)
    os.makedirs(case_dir)
    if weights == "sharded":
        model.save_pretrained(case_dir, safe_serialization=True, max_shard_size="300KB")
    else:
        model.save_pretrained(case_dir, safe_serialization=True)
    processor.save_pretrained(case_dir)
    # The vision tower's and perceiver's outputs of the first prompt's images, stage by stage.
    with torch.no_grad():
        pv = tensors[f"{PROMPTS[0][0]}.pixel_values"]
        hidden = model.model.vision_model(pixel_values=pv).last_hidden_state
        latents = model.model.perceiver_resampler(hidden)
    tensors["vision.last_hidden_state"] = hidden.contiguous()
    tensors["perceiver.latents"] = latents.contiguous()
    st.save_file(tensors, os.path.join(case_dir, "expected.safetensors"))
    expected = {
        "case": name,
        "seed": seed,
        "cross_layer_interval": interval,
        "alpha_type": alpha_type,
        "qk_layer_norms": qk,
        "qk_layer_norms_perceiver": qk_perc,
        "weights": weights,
        "vocab_size": vocab,
        "image_token_id": processor.tokenizer.convert_tokens_to_ids("<image>"),
        "fake_token_id": processor.tokenizer.convert_tokens_to_ids("<fake_token_around_image>"),
        "end_of_utterance_id": processor.tokenizer.convert_tokens_to_ids("<end_of_utterance>"),
        "greedy_max_new_tokens": GREEDY_NEW,
        "beam": {"num_beams": 3, "max_new_tokens": BEAM_NEW, "length_penalty": 1.0, "early_stopping": False},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "prompts": prompts,
    }
    with open(os.path.join(case_dir, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
        f.write("\n")
    # The instruct chat (not part of the seed search).
    inp = processor_inputs(processor, CHAT, add_end_of_utterance_token=False)
    greedy = generate(model, inp, max_new_tokens=GREEDY_NEW)
    margins = greedy_margins(model, inp, greedy, inp["pixel_values"])
    assert min(margins) >= MIN_MARGIN, f"{name}: chat greedy margin {min(margins)}"
    chat = {
        "items": CHAT,
        "text": processor.tokenizer.decode(inp["input_ids"][0], skip_special_tokens=False),
        "input_ids": inp["input_ids"][0].tolist(),
        "greedy": greedy,
        "greedy_margin_min": min(margins),
    }
    with open(os.path.join(case_dir, "chat.json"), "w") as f:
        json.dump(chat, f, indent=1, sort_keys=True)
        f.write("\n")


def write_pixels(out_dir):
    """IdeficsImageProcessor at the released size (224) on every fixture image: alpha composited
    on white, straight bicubic resize, CLIP normalisation."""
    proc = image_processor(224)
    out = {}
    for n in sorted(os.listdir(IMAGES)):
        if n.endswith((".png", ".jpg")):
            out[n] = proc([Image.open(os.path.join(IMAGES, n))], return_tensors="pt")[0].contiguous()
    st.save_file(out, os.path.join(out_dir, "pixels.safetensors"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    write_pixels(args.out)
    tokenizer, vocab = build_tokenizer()
    for idx, case in enumerate(CASES):
        seed = 100 * (idx + 1)
        while True:
            problems, built = try_case(case, os.path.join(args.out, case[0]), seed, tokenizer, vocab)
            if not problems:
                break
            print(f"{case[0]} seed {seed}: {'; '.join(problems)}", file=sys.stderr)
            seed += 1
            if seed > 100 * (idx + 1) + 60:
                raise SystemExit(f"{case[0]}: no seed passed the checks")
        model, processor, prompts, tensors = built
        write_case(case, os.path.join(args.out, case[0]), seed, model, processor, prompts, tensors, vocab)
        for p, v in prompts.items():
            print(f"{case[0]} seed {seed} {p}: greedy {v['greedy']} blank {v['greedy_blank']} beam {v['beam3']}")


if __name__ == "__main__":
    main()
