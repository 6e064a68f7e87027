#!/usr/bin/env python3
"""A 4-shot chat request by demonstration-set id against the same request with the four
examples inline (base64 images): request bytes and time to first token, against a running
server (`flamingo serve`, by default the embedded flamingo-mini model).

    target/release/flamingo serve --port 8000 --data-dir /tmp/flamingo-bench &
    python3 scripts/bench-demonstrations.py --url http://127.0.0.1:8000 --rounds 30

Both forms build the same prompt. The set's prefix and its images' cross-attention K/V are
pinned when it is registered, so both reuse them; what differs is what the request carries
(and the server decodes, hashes and preprocesses): four images, or an id. Rounds alternate the
two forms; the time to first token is measured on streamed responses (first content chunk).
Only the standard library is used.
"""

import argparse
import base64
import json
import os
import statistics
import time
import urllib.request

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
# The demo model's own 64x64 scenes, or (--photos) the larger photographs of the test fixtures.
SCENES = (os.path.join(FIXTURES, "flamingo-mini", "media"), ["0000000.png", "0000040.png", "0000080.png", "0000120.png"], "0000280.png")
PHOTOS = (os.path.join(FIXTURES, "images"), ["chelsea.png", "coffee.png", "camera.png", "coffee.jpg"], "small.png")
MEDIA, SHOTS, QUERY = SCENES
QUESTION = "Question: What colour is the shape? Answer:"


def data_url(name):
    with open(os.path.join(MEDIA, name), "rb") as f:
        mime = "image/jpeg" if name.endswith(".jpg") else "image/png"
        return f"data:{mime};base64," + base64.b64encode(f.read()).decode()


def user(url):
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]}


def post(base, path, body):
    data = json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read()), len(data)


def ttft(base, body):
    """Seconds to the first streamed content chunk, and the request's size in bytes."""
    data = json.dumps(body).encode()
    req = urllib.request.Request(base + "/v1/chat/completions", data=data, headers={"content-type": "application/json"})
    t = time.perf_counter()
    with urllib.request.urlopen(req) as r:
        for line in r:
            if line.startswith(b"data: ") and b'"content":"' in line and b'"content":""' not in line:
                first = time.perf_counter() - t
                r.read()
                return first, len(data)
    raise RuntimeError("no content chunk")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--photos", action="store_true", help="the fixtures' photographs (up to 512x512) instead of 64x64 scenes")
    a = ap.parse_args()
    global MEDIA, SHOTS, QUERY
    MEDIA, SHOTS, QUERY = PHOTOS if a.photos else SCENES
    answers = ["a red square.", "a blue circle.", "a green triangle.", "a yellow star."]
    examples = [{"messages": [user(data_url(n)), {"role": "assistant", "content": ans}]} for n, ans in zip(SHOTS, answers)]
    card, _ = post(a.url, "/v1/demonstrations", {"name": "bench-4-shot", "examples": examples})
    query = [user(data_url(QUERY))]
    inline = [m for e in examples for m in e["messages"]] + query
    common = {"max_tokens": 8, "stream": True}
    by_id = {"messages": query, "demonstrations": {"id": card["id"]}, **common}
    full = {"messages": inline, **common}
    ttft(a.url, by_id), ttft(a.url, full)  # warm-up
    t_id, t_inline = [], []
    for _ in range(a.rounds):
        s, b_id = ttft(a.url, by_id)
        t_id.append(s)
        s, b_inline = ttft(a.url, full)
        t_inline.append(s)
    med = statistics.median
    print(f"set {card['id']}: {card['examples']} examples, {card['prompt_tokens']} pinned prompt tokens")
    print(f"{'':>8} {'request bytes':>14} {'TTFT p50 ms':>12} {'TTFT p90 ms':>12}")
    q = lambda v: sorted(v)[int(0.9 * (len(v) - 1))]
    print(f"{'by id':>8} {b_id:>14} {med(t_id) * 1e3:>12.1f} {q(t_id) * 1e3:>12.1f}")
    print(f"{'inline':>8} {b_inline:>14} {med(t_inline) * 1e3:>12.1f} {q(t_inline) * 1e3:>12.1f}")
    print(f"ratio inline/by-id: bytes {b_inline / b_id:.1f}x, TTFT p50 {med(t_inline) / med(t_id):.2f}x")


if __name__ == "__main__":
    main()
