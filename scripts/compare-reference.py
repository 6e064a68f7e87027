#!/usr/bin/env python3
"""The PyTorch reference and this server on the same weights, prompt, images and thread count,
in one invocation, with the ratios.

Reference: open_flamingo 2.0.1's `create_model_and_transforms` on the directory's clip/ and lm/
(open_clip config from clip/open_clip_config.json, QuickGELU as flamingo.toml says),
`checkpoint.pt` loaded with strict=False as its README does, and `Flamingo.generate` (Hugging
Face `generate`, greedy, `min_new_tokens` = `max_new_tokens` so every reply has the same
length), one request after another: that is how the reference serves. It runs in a child process
so its memory is returned before the server starts.

Server: `flamingo serve --model DIR` on 127.0.0.1, `/v1/completions` with the same prompt and
images as data URLs, greedy, `min_tokens` = `max_tokens` (vLLM's semantics: end tokens masked
until then). The same requests are sent one after another, then all at once.

Both use `--threads` CPU threads (torch.set_num_threads; RAYON_NUM_THREADS for the server).

    /work/refenv/bin/python scripts/compare-reference.py --model /tmp/of4b-l4 \
        [--requests 16] [--max-tokens 32] [--threads 2] [--flamingo target/release/flamingo] [--json out.json]

The directory is a release layout whose LM transformers loads without remote code (GPT-NeoX,
LLaMA, MPT), e.g. `scripts/make_realsize_checkpoint.py --model of4b --layers 4 --dtype f32`.
Not run in CI (it needs the reference venv, see tests/reference/README.md).
"""

import argparse
import base64
import concurrent.futures
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES = ["chelsea.png", "coffee.png", "small.png"]
PROMPT = "<image>Output:"


def images_for(n):
    """Request i's image: the fixture photographs in turn, each request a distinct PNG (the
    photograph flipped or rotated), so no request reuses another's image."""
    from PIL import Image

    out = []
    for i in range(n):
        im = Image.open(os.path.join(REPO, "tests/fixtures/images", IMAGES[i % len(IMAGES)])).convert("RGB")
        im = im.rotate(90 * (i // len(IMAGES) % 4), expand=True)
        if i // (4 * len(IMAGES)) % 2:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


# ------------------------------------------------------------------------------------------
# The reference (child process)
# ------------------------------------------------------------------------------------------


def reference(args):
    import torch
    from PIL import Image

    torch.set_num_threads(args.threads)
    import open_clip
    from open_flamingo import create_model_and_transforms

    d = args.model
    with open(os.path.join(d, "clip", "open_clip_config.json")) as f:
        ccfg = json.load(f)
    quick_gelu = False
    toml_path = os.path.join(d, "flamingo.toml")
    every = 1
    if os.path.exists(toml_path):
        import tomllib

        with open(toml_path, "rb") as f:
            t = tomllib.load(f)
        quick_gelu = bool(t.get("vision", {}).get("quick_gelu", False))
        every = int(t.get("cross_attn_every_n_layers", 1))
    cfg = dict(ccfg["model_cfg"])
    cfg["quick_gelu"] = quick_gelu
    open_clip.factory._MODEL_CONFIGS["compare-reference"] = cfg
    clip_file = os.path.join(d, "clip", "open_clip_pytorch_model.bin")
    t0 = time.perf_counter()
    model, image_processor, tokenizer = create_model_and_transforms(
        clip_vision_encoder_path="compare-reference",
        clip_vision_encoder_pretrained=clip_file,
        lang_encoder_path=os.path.join(d, "lm"),
        tokenizer_path=os.path.join(d, "lm"),
        cross_attn_every_n_layers=every,
        use_local_files=True,
    )
    sd = torch.load(os.path.join(d, "checkpoint.pt"), map_location="cpu", weights_only=False)
    res = model.load_state_dict(sd, strict=False)
    # the released checkpoints carry old transformers' attention buffers (causal mask,
    # masked_bias, rotary inv_freq), which current transformers computes instead
    legacy = ("attention.bias", "attention.masked_bias", "rotary_emb.inv_freq")
    unexpected = [k for k in res.unexpected_keys if not k.endswith(legacy)]
    assert not unexpected, unexpected[:5]
    del sd
    model.eval()
    load_s = time.perf_counter() - t0
    tokenizer.padding_side = "left"
    pngs = images_for(args.requests)
    results = []
    with torch.no_grad():
        # one untimed request first (allocator and kernels warm), as the server's first is
        warm = True
        for i, png in enumerate([pngs[0]] + pngs):
            vx = image_processor(Image.open(io.BytesIO(png)).convert("RGB"))[None, None, None]
            enc = tokenizer([PROMPT], return_tensors="pt")
            t = time.perf_counter()
            out = model.generate(
                vision_x=vx,
                lang_x=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                max_new_tokens=args.max_tokens,
                min_new_tokens=args.max_tokens,
                num_beams=1,
                do_sample=False,
            )
            dt = time.perf_counter() - t
            new = out[0, enc["input_ids"].shape[1]:].tolist()
            if warm:
                warm = False
                continue
            results.append({"seconds": dt, "ids": new, "text": tokenizer.decode(new)})
            print(f"  reference request {i}/{args.requests}: {dt:.2f} s, {len(new)} tokens", file=sys.stderr, flush=True)
    with open(args.ref_out, "w") as f:  # not stdout: open_flamingo prints there
        json.dump({"load_s": load_s, "results": results, "torch": torch.__version__}, f)


# ------------------------------------------------------------------------------------------
# The server
# ------------------------------------------------------------------------------------------


def post(url, body, timeout=3600):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise SystemExit(f"{url}: {e.code} {e.read().decode(errors='replace')[:500]}")


def server(args, pngs):
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    port = args.port
    cmd = [args.flamingo, "serve", "--model", args.model, "--port", str(port), "--quantize", args.quantize]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"flamingo serve exited: {proc.stderr.read()[-2000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except Exception:
                time.sleep(0.5)
        load_s = time.perf_counter() - t0
        with urllib.request.urlopen(base + "/v1/models", timeout=10) as r:
            model_id = json.loads(r.read())["data"][0]["id"]

        def one(png):
            url = "data:image/png;base64," + base64.b64encode(png).decode()
            body = {
                "model": model_id, "prompt": PROMPT, "images": [url], "max_tokens": args.max_tokens,
                "min_tokens": args.max_tokens, "temperature": 0,
            }
            t = time.perf_counter()
            r = post(base + "/v1/completions", body)
            return time.perf_counter() - t, r

        one(pngs[0])  # warm-up, untimed
        seq = []
        for i, png in enumerate(pngs):
            dt, r = one(png)
            seq.append({"seconds": dt, "text": r["choices"][0]["text"], "tokens": r["usage"]["completion_tokens"]})
            print(f"  server request {i + 1}/{len(pngs)} (one after another): {dt:.2f} s", file=sys.stderr, flush=True)
        t = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(len(pngs)) as ex:
            conc = list(ex.map(one, pngs))
        conc_wall = time.perf_counter() - t
        rss = None
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        rss = int(line.split()[1]) * 1024
        except OSError:
            pass
        return {
            "load_s": load_s,
            "sequential": seq,
            "concurrent_wall_s": conc_wall,
            "concurrent_texts": [r["choices"][0]["text"] for _, r in conc],
            "concurrent_tokens": sum(r["usage"]["completion_tokens"] for _, r in conc),
            "peak_rss_bytes": rss,
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--flamingo", default=os.path.join(REPO, "target/release/flamingo"))
    ap.add_argument("--quantize", default="none", help="the server's --quantize (the reference is f32)")
    ap.add_argument("--port", type=int, default=18731)
    ap.add_argument("--json", default=None)
    ap.add_argument("--phase", default="all", choices=["all", "reference"], help=argparse.SUPPRESS)
    ap.add_argument("--ref-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase == "reference":
        reference(args)
        return
    print(f"reference: {sys.executable} (open_flamingo 2.0.1 + HF generate), {args.threads} threads", file=sys.stderr)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "reference.json")
        subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--phase", "reference", "--model", args.model, "--requests", str(args.requests),
             "--max-tokens", str(args.max_tokens), "--threads", str(args.threads), "--ref-out", out],
            stdout=sys.stderr, check=True,
        )
        with open(out) as f:
            ref = json.load(f)
    pngs = images_for(args.requests)
    print(f"server: {args.flamingo} serve --model {args.model} --quantize {args.quantize}, {args.threads} threads", file=sys.stderr)
    srv = server(args, pngs)

    n, T = args.requests, args.max_tokens
    ref_total = sum(r["seconds"] for r in ref["results"])
    seq_total = sum(r["seconds"] for r in srv["sequential"])
    same_seq = sum(a["text"] == b["text"] for a, b in zip(ref["results"], srv["sequential"]))
    same_conc = sum(a == b["text"] for a, b in zip(srv["concurrent_texts"], srv["sequential"]))
    rows = [
        ("reference, one after another", ref_total, n * T / ref_total, 1.0),
        ("server, one after another", seq_total, n * T / seq_total, ref_total / seq_total),
        (f"server, {n} at once", srv["concurrent_wall_s"], srv["concurrent_tokens"] / srv["concurrent_wall_s"], ref_total / srv["concurrent_wall_s"]),
    ]
    print(f"\n{n} requests of `{PROMPT}` + one 224 px image, {T} new tokens each (greedy, fixed length), {args.threads} threads\n")
    print("| run | wall time | tokens/s | speed-up over the reference |")
    print("|---|---:|---:|---:|")
    for name, wall, tps, ratio in rows:
        print(f"| {name} | {wall:.1f} s | {tps:.1f} | {ratio:.1f}x |")
    print(f"\nload: reference {ref['load_s']:.1f} s, server {srv['load_s']:.1f} s (to /health 200); server peak RSS "
          f"{(srv['peak_rss_bytes'] or 0) / 1e9:.2f} GB")
    print(f"replies equal to the reference's text: {same_seq}/{n}; concurrent replies equal to the sequential ones: {same_conc}/{n}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"reference": ref, "server": srv, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
