#!/usr/bin/env python3
"""Train flamingo-mini with the Flamingo paper's recipe, on the shapes world.

Stages (each writes under --work and is skipped when its output exists, so a run resumes):
  data       `flamingo shapes` writes the training examples and a held-out set (the world's one
             definition is the Rust generator; this script only reads its files)
  tokenizer  a byte-level BPE trained with the `tokenizers` package on the world's text
  pixels     every image and video frame preprocessed once (stretch to 96 x 96, PIL bicubic)
  clip       (a) contrastive pretraining of the open_clip ViT + text tower on image/caption pairs
  lm         (b) pretraining the MPT causal LM on the world's text
  features   the frozen ViT's patch tokens of every image and frame (the vision tower is frozen
             from here on, so they are computed once)
  flamingo   (c) both towers frozen; only the Perceiver Resampler (with frame embeddings), the
             gated cross-attention blocks and the new token embeddings (<image>, <|endofchunk|>)
             are trained, on interleaved sequences: questions, captions, videos, few-shot episodes
  export     the release layout (clip/, lm/, checkpoint.pt, flamingo.toml) and the reference's
             own greedy answers on held-out prompts (for the Rust exactness test)

Seeded (torch, numpy, the data); AdamW, linear warmup + cosine decay, gradient clipping,
progress bars. Run it through training/train.sh.
"""

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from multiprocessing import Pool

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mini  # noqa: E402

import open_clip  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import MptConfig, MptForCausalLM, PreTrainedTokenizerFast, get_cosine_schedule_with_warmup  # noqa: E402


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def optimizer_for(named_params, lr, wd, steps, warmup_frac, wd_filter=lambda n: True):
    decay = [p for n, p in named_params if p.requires_grad and p.ndim >= 2 and wd_filter(n)]
    rest = [p for n, p in named_params if p.requires_grad and not (p.ndim >= 2 and wd_filter(n))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98), eps=1e-6)
    sched = get_cosine_schedule_with_warmup(opt, max(1, int(warmup_frac * steps)), steps)
    return opt, sched


# ---- data -------------------------------------------------------------------------------------


def stage_data(a):
    for split, n, out in (("train", a.examples, "data"), ("eval", a.heldout, "heldout")):
        d = os.path.join(a.work, out)
        if os.path.exists(os.path.join(d, "examples.jsonl")):
            continue
        log(f"data: {split} -> {d}")
        subprocess.run([a.flamingo, "shapes", "--out", d, "--split", split, "--n", str(n), "--seed", str(a.seed)], check=True)


def media_index(examples):
    """Every media file once, in order of first use."""
    files, kinds, captions = [], [], []
    seen = {}
    for ex in examples:
        for m in ex["media"]:
            if m["file"] not in seen:
                seen[m["file"]] = len(files)
                files.append(m["file"])
                kinds.append(m["kind"])
                captions.append(m["caption"])
    return files, kinds, captions, seen


# ---- tokenizer ----------------------------------------------------------------------------------


def stage_tokenizer(a, examples):
    out = os.path.join(a.work, "tokenizer")
    if os.path.exists(os.path.join(out, "tokenizer.json")):
        return PreTrainedTokenizerFast.from_pretrained(out)
    log("tokenizer: byte-level BPE")
    corpus = [mini.plain_text(ex) for ex in examples] + [m["caption"] for ex in examples for m in ex["media"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=mini.LM_VOCAB, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    assert tok.get_vocab_size() <= mini.LM_VOCAB, tok.get_vocab_size()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.save_pretrained(out)
    return fast


# ---- pixels -----------------------------------------------------------------------------------


def _resized(path):
    return np.stack([np.asarray(f.resize((mini.IMAGE_SIZE, mini.IMAGE_SIZE), mini.Image.BICUBIC), dtype=np.uint8) for f in mini.frames_of(path)])


def stage_pixels(a, data_dir, files, name):
    """uint8 (N_frames, S, S, 3) of every frame, and each media's first frame index and count."""
    out = os.path.join(a.work, f"{name}_pixels.npz")
    if os.path.exists(out):
        z = np.load(out)
        return z["pixels"], z["start"], z["count"]
    log(f"pixels: {len(files)} media of {name}")
    paths = [os.path.join(data_dir, f) for f in files]
    with Pool(a.workers) as pool:
        arrays = list(tqdm(pool.imap(_resized, paths, chunksize=64), total=len(paths), desc="pixels", mininterval=5))
    count = np.array([x.shape[0] for x in arrays], dtype=np.int64)
    start = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
    pixels = np.concatenate(arrays)
    np.savez(out, pixels=pixels, start=start, count=count)
    return pixels, start, count


def normalise(u8):
    """uint8 (N, S, S, 3) -> float (N, 3, S, S), as mini.pixels does."""
    x = torch.from_numpy(u8).float() / 255.0
    x = (x - torch.from_numpy(mini.MEAN)) / torch.from_numpy(mini.STD)
    return x.permute(0, 3, 1, 2).contiguous()


# ---- (a) CLIP --------------------------------------------------------------------------------


def clip_text_ids(tok, captions):
    eot = mini.LM_VOCAB  # the text tower's extra, largest id
    ids = torch.zeros(len(captions), mini.TEXT_CONTEXT, dtype=torch.long)
    for i, c in enumerate(captions):
        t = tok.encode(c)[: mini.TEXT_CONTEXT - 1] + [eot]
        ids[i, : len(t)] = torch.tensor(t)
    return ids


def frame_captions(kinds, captions, count):
    """A caption per frame: a video frame shows its one shape (the caption without the motion)."""
    out = []
    for k, c, n in zip(kinds, captions, count):
        out += [c.split(" moving ")[0] if k == "video" else c] * int(n)
    return out


def stage_clip(a, tok, pixels, frame_caps):
    out = os.path.join(a.work, "clip")
    path = os.path.join(out, "open_clip_pytorch_model.bin")
    mini.register_clip()
    if os.path.exists(path):
        clip = open_clip.create_model(mini.CLIP_NAME, pretrained=None)
        clip.load_state_dict(torch.load(path, map_location="cpu"))
        return clip
    seed_all(a.seed)
    clip = open_clip.create_model(mini.CLIP_NAME, pretrained=None)
    clip.train()
    text = clip_text_ids(tok, frame_caps)
    n = pixels.shape[0]
    opt, sched = optimizer_for(list(clip.named_parameters()), a.clip_lr, 0.1, a.clip_steps, 0.05, wd_filter=lambda n: "logit_scale" not in n)
    g = torch.Generator().manual_seed(a.seed)
    bar = tqdm(range(a.clip_steps), desc="(a) clip", mininterval=10)
    for step in bar:
        idx = torch.randint(0, n, (a.clip_batch,), generator=g)
        img = normalise(pixels[idx.numpy()])
        fi, ft, scale = clip(img, text[idx])
        logits = scale * fi @ ft.T
        # Identical captions in a batch are positives of each other.
        same = (text[idx][:, None, :] == text[idx][None, :, :]).all(-1).float()
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean() + torch.sum(-target * F.log_softmax(logits.T, 1), 1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))
        if step % 50 == 0:
            acc = (logits.argmax(1) == torch.arange(len(idx))).float().mean().item()
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.2f}")
    clip.eval()
    os.makedirs(out, exist_ok=True)
    torch.save({k: v.detach().clone().contiguous() for k, v in clip.state_dict().items()}, path)
    with open(os.path.join(out, "open_clip_config.json"), "w") as f:
        json.dump(mini.clip_config(), f, indent=2)
    return clip


# ---- (b) LM -----------------------------------------------------------------------------------


def lm_config(tok):
    return MptConfig(
        d_model=mini.D_MODEL,
        n_heads=mini.LM_HEADS,
        n_layers=mini.LM_LAYERS,
        expansion_ratio=4,
        max_seq_len=256,
        vocab_size=mini.LM_VOCAB,
        no_bias=True,
        layer_norm_epsilon=1e-5,
        attn_config={"alibi": True, "alibi_bias_max": 8, "attn_pdrop": 0.0, "clip_qkv": None, "softmax_scale": None, "qk_ln": False},
        emb_pdrop=0.0,
        resid_pdrop=0.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )


def pad_batch(seqs, pad):
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def stage_lm(a, tok, examples):
    out = os.path.join(a.work, "lm")
    if os.path.exists(os.path.join(out, "config.json")):
        return
    seed_all(a.seed + 1)
    lm = MptForCausalLM(lm_config(tok))
    lm.train()
    eos = tok.eos_token_id
    docs = [tok.encode(mini.plain_text(ex)) + [eos] for ex in examples]
    opt, sched = optimizer_for(list(lm.named_parameters()), a.lm_lr, 0.1, a.lm_steps, 0.05)
    g = torch.Generator().manual_seed(a.seed + 1)
    bar = tqdm(range(a.lm_steps), desc="(b) lm", mininterval=10)
    for step in bar:
        idx = torch.randint(0, len(docs), (a.lm_batch,), generator=g).tolist()
        ids, mask = pad_batch([docs[i] for i in idx], eos)
        labels = ids.masked_fill(mask == 0, -100)
        loss = lm(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    lm.eval()
    lm.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


# ---- features -----------------------------------------------------------------------------


@torch.no_grad()
def stage_features(a, clip, pixels, name):
    out = os.path.join(a.work, f"{name}_features.npy")
    if os.path.exists(out):
        return torch.from_numpy(np.load(out, mmap_mode="r")[:])
    visual = clip.visual
    visual.output_tokens = True
    visual.eval()
    n = pixels.shape[0]
    feats = torch.empty((n, (mini.IMAGE_SIZE // mini.PATCH) ** 2, mini.VIS_WIDTH), dtype=torch.float32)
    for s in tqdm(range(0, n, 256), desc=f"features {name}", mininterval=10):
        feats[s : s + 256] = visual(normalise(pixels[s : s + 256]))[1]
    np.save(out, feats.numpy())
    return feats


# ---- (c) Flamingo -------------------------------------------------------------------------------


def encode_examples(tok, examples, seen):
    out = []
    for ex in examples:
        ids = tok.encode(mini.training_text(ex))
        answer_ids = tok.encode(" " + ex["answer"] + "<|endofchunk|>")
        out.append((ids, [seen[m["file"]] for m in ex["media"]], len(answer_ids)))
    return out


def buckets_of(encoded, kinds):
    b = {}
    for i, (_, media, _) in enumerate(encoded):
        key = (len(media), kinds[media[0]])
        b.setdefault(key, []).append(i)
    return b


def batch_inputs(items, feats, start, count, pad, media_id):
    seqs = [it[0] for it in items]
    ids, mask = pad_batch(seqs, pad)
    labels = ids.masked_fill(mask == 0, -100).masked_fill(ids == media_id, -100)
    nf = int(count[items[0][1][0]])
    vis = torch.stack([torch.stack([feats[int(start[m]) : int(start[m]) + nf] for m in it[1]]) for it in items])
    return ids, mask, labels, vis  # vis: (B, T, F, v, d)


def flamingo_loss(model, ids, mask, labels, vis):
    model.condition_on_features(vis)
    model._condition_media_locations(input_ids=ids)
    out = model.lang_encoder(input_ids=ids, attention_mask=mask, labels=labels)
    logits = out.logits
    model.lang_encoder.clear_conditioned_layers()
    return out.loss, logits


@torch.no_grad()
def answer_accuracy(model, tok, encoded, examples, kinds, feats, start, count, batch=64):
    """Teacher-forced exact match of the reply (its tokens and <|endofchunk|>): equal to greedy
    decoding's exact match. Per task and shots."""
    media_id = tok.convert_tokens_to_ids("<image>")
    res = {}
    by = buckets_of(encoded, kinds)
    for key, idxs in by.items():
        for s in range(0, len(idxs), batch):
            chunk = idxs[s : s + batch]
            items = [encoded[i] for i in chunk]
            ids, mask, labels, vis = batch_inputs(items, feats, start, count, tok.pad_token_id, media_id)
            _, logits = flamingo_loss(model, ids, mask, labels, vis)
            pred = logits.argmax(-1)
            for j, i in enumerate(chunk):
                L = len(items[j][0])
                na = items[j][2]
                ok = bool((pred[j, L - na - 1 : L - 1] == ids[j, L - na : L]).all())
                ex = examples[i]
                row = ex["task"] if ex["shots"] is None else f"{ex['shots']}-shot"
                if ex["shots"] is None and ex["question"]:
                    row = "paraphrases"
                r = res.setdefault(row, [0, 0])
                r[0] += ok
                r[1] += 1
    return {k: (v[0] / v[1], v[1]) for k, v in sorted(res.items())}


def stage_flamingo(a, tok, examples, files, kinds, seen, feats, start, count, held):
    out = os.path.join(a.work, "flamingo.pt")
    seed_all(a.seed + 2)
    model, ftok = mini.build_flamingo(os.path.join(a.work, "clip"), os.path.join(a.work, "lm"))
    if os.path.exists(out):
        model.load_state_dict(torch.load(out, map_location="cpu"), strict=False)
        model.eval()
        return model, ftok
    media_id = ftok.convert_tokens_to_ids("<image>")
    eoc_id = ftok.convert_tokens_to_ids("<|endofchunk|>")
    encoded = encode_examples(ftok, examples, seen)
    buckets = buckets_of(encoded, kinds)
    keys = sorted(buckets)
    # Videos are a tenth of the examples but the hardest task (motion is a relation between
    # frames): their batches are drawn more often.
    weights = np.array([len(buckets[k]) * (a.video_weight if k[1] == "video" else 1.0) for k in keys], dtype=np.float64)
    weights /= weights.sum()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt, sched = optimizer_for(named, a.flamingo_lr, 0.1, a.flamingo_steps, 0.05, wd_filter=lambda n: "gated_cross_attn" in n)
    emb = model.lang_encoder.get_input_embeddings().weight
    keep = torch.zeros(emb.shape[0], 1)
    keep[media_id] = 1
    keep[eoc_id] = 1
    rng = np.random.default_rng(a.seed + 2)
    model.train()
    bar = tqdm(range(a.flamingo_steps), desc="(c) flamingo", mininterval=10)
    for step in bar:
        key = keys[rng.choice(len(keys), p=weights)]
        pool = buckets[key]
        # Fewer sequences per batch when each has more media (about the same work per step).
        bs = max(4, a.flamingo_batch // max(1, key[0] if key[1] == "image" else 4))
        chunk = rng.choice(len(pool), size=min(bs, len(pool)), replace=False)
        items = [encoded[pool[i]] for i in chunk]
        ids, mask, labels, vis = batch_inputs(items, feats, start, count, ftok.pad_token_id, media_id)
        loss, _ = flamingo_loss(model, ids, mask, labels, vis)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # Only the new tokens' embedding rows learn (open_flamingo's train loop).
        emb.grad.mul_(keep)
        torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.save(trainable, out)
    return model, ftok


# ---- export --------------------------------------------------------------------------------


TOML = """# flamingo-mini: what the loader cannot read off the weights.
# Heads of 32 (the reference classes' default is 64) in the perceiver and cross-attention.
[perceiver]
dim_head = {pd}

[xattn]
dim_head = {xd}

# Trained on whole images stretched to 96 x 96 (no centre crop).
[preprocess]
resize = "stretch"
"""


def chat_messages(ex):
    """The example as OpenAI chat messages (media as {"media": index} placeholders): the
    inverse of the `openflamingo` template on the world's prompts."""
    msgs = []
    chunks = ex["prompt"].split("<|endofchunk|>")
    for i, chunk in enumerate(chunks):
        assert chunk.startswith("<image>"), chunk
        kind = ex["media"][i]["kind"]
        part = {"type": "video_url" if kind == "video" else "image_url", "media": i}
        body = chunk[len("<image>") :]
        if i + 1 < len(chunks):
            user, reply = body.split(" ", 1)
            msgs += [{"role": "user", "content": [part, {"type": "text", "text": user}]}, {"role": "assistant", "content": reply}]
        else:
            msgs.append({"role": "user", "content": [part, {"type": "text", "text": body}]})
    return msgs


def pick_reference_prompts(held):
    """A few held-out prompts for the exactness test: one per question task, and few-shot."""
    want = [("colour", None), ("shape", None), ("count", None), ("describe", None), ("motion", None), ("colour", 2), ("describe", 2)]
    out = []
    for task, shots in want:
        for ex in held:
            if ex["task"] == task and ex["shots"] == shots and (shots is not None or ex["question"] == 0):
                out.append(ex)
                break
    return out


@torch.no_grad()
def stage_export(a, model, ftok, held, held_dir):
    out = a.out
    os.makedirs(out, exist_ok=True)
    shutil.copytree(os.path.join(a.work, "clip"), os.path.join(out, "clip"), dirs_exist_ok=True)
    shutil.copytree(os.path.join(a.work, "lm"), os.path.join(out, "lm"), dirs_exist_ok=True)
    torch.save(mini.checkpoint_of(model), os.path.join(out, "checkpoint.pt"))
    with open(os.path.join(out, "flamingo.toml"), "w") as f:
        f.write(TOML.format(pd=mini.PERCEIVER["dim_head"], xd=mini.XATTN["dim_head"]))
    # The reference's own greedy answers, from the files as a user has them: rebuild from the
    # exported directory and load checkpoint.pt as OpenFlamingo's users do.
    ref, rtok = mini.build_flamingo(os.path.join(out, "clip"), os.path.join(out, "lm"))
    missing = ref.load_state_dict(torch.load(os.path.join(out, "checkpoint.pt"), map_location="cpu"), strict=False)
    assert not missing.unexpected_keys, missing.unexpected_keys
    ref.eval()
    fx = a.fixtures
    os.makedirs(os.path.join(fx, "media"), exist_ok=True)
    cases = []
    for ex in pick_reference_prompts(held):
        files = []
        for m in ex["media"]:
            name = os.path.basename(m["file"])
            shutil.copy(os.path.join(held_dir, m["file"]), os.path.join(fx, "media", name))
            files.append("media/" + name)
        vision_x = torch.stack([mini.media_pixels(os.path.join(held_dir, m["file"])) for m in ex["media"]]).unsqueeze(0)
        ids = rtok(ex["prompt"], return_tensors="pt")
        gen = ref.generate(
            vision_x=vision_x,
            lang_x=ids["input_ids"],
            attention_mask=ids["attention_mask"],
            max_new_tokens=20,
            num_beams=1,
            do_sample=False,
            pad_token_id=rtok.pad_token_id,
        )
        new = gen[0, ids["input_ids"].shape[1] :].tolist()
        text = rtok.decode(new)
        cases.append(
            {
                "task": ex["task"],
                "shots": ex["shots"],
                "media": files,
                "prompt": ex["prompt"],
                "messages": chat_messages(ex),
                "prompt_ids": ids["input_ids"][0].tolist(),
                "greedy_ids": new,
                "text": text,
                "answer": ex["answer"],
            }
        )
        log(f"reference: {ex['prompt']!r} -> {text!r} (want {ex['answer']!r})")
    with open(os.path.join(fx, "expected.json"), "w") as f:
        json.dump({"max_new_tokens": 20, "cases": cases}, f, indent=1)


# ---- main -----------------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="working directory (data, caches, stage outputs)")
    p.add_argument("--out", default="models/flamingo-mini")
    p.add_argument("--fixtures", default="tests/fixtures/flamingo-mini")
    p.add_argument("--flamingo", default="target/release/flamingo", help="the flamingo binary (for `flamingo shapes`)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--examples", type=int, default=60000)
    p.add_argument("--heldout", type=int, default=40, help="held-out examples per evaluation row")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--clip-steps", type=int, default=1000)
    p.add_argument("--clip-batch", type=int, default=128)
    p.add_argument("--clip-lr", type=float, default=1e-3)
    p.add_argument("--lm-steps", type=int, default=1200)
    p.add_argument("--lm-batch", type=int, default=64)
    p.add_argument("--lm-lr", type=float, default=1e-3)
    p.add_argument("--flamingo-steps", type=int, default=8000)
    p.add_argument("--video-weight", type=float, default=1.0, help="how much more often video batches are drawn in stage (c)")
    p.add_argument("--flamingo-batch", type=int, default=32)
    p.add_argument("--flamingo-lr", type=float, default=1e-3)
    p.add_argument("--stop-after", default=None, help="stop after this stage")
    a = p.parse_args()
    torch.set_num_threads(a.workers)
    os.makedirs(a.work, exist_ok=True)
    t0 = time.time()

    def done(stage):
        log(f"{stage} done ({time.time() - t0:.0f} s)")
        if a.stop_after == stage:
            sys.exit(0)

    stage_data(a)
    data_dir, held_dir = os.path.join(a.work, "data"), os.path.join(a.work, "heldout")
    examples, held = mini.read_examples(data_dir), mini.read_examples(held_dir)
    done("data")
    tok = stage_tokenizer(a, examples)
    done("tokenizer")
    files, kinds, captions, seen = media_index(examples)
    pixels, start, count = stage_pixels(a, data_dir, files, "train")
    hfiles, hkinds, _, hseen = media_index(held)
    hpixels, hstart, hcount = stage_pixels(a, held_dir, hfiles, "heldout")
    done("pixels")
    clip = stage_clip(a, tok, pixels, frame_captions(kinds, captions, count))
    done("clip")
    stage_lm(a, tok, examples)
    done("lm")
    feats = stage_features(a, clip, pixels, "train")
    hfeats = stage_features(a, clip, hpixels, "heldout")
    del pixels
    done("features")
    model, ftok = stage_flamingo(a, tok, examples, files, kinds, seen, feats, start, count, held)
    acc = answer_accuracy(model, ftok, encode_examples(ftok, held, hseen), held, hkinds, hfeats, hstart, hcount)
    for k, (v, n) in acc.items():
        log(f"held-out {k:>12}: {100 * v:5.1f}% of {n}")
    with open(os.path.join(a.work, "heldout_accuracy.json"), "w") as f:
        json.dump(acc, f, indent=1)
    done("flamingo")
    stage_export(a, model, ftok, held, held_dir)
    done("export")


if __name__ == "__main__":
    main()
