"""Schemathesis hooks for flamingo's API (loaded with SCHEMATHESIS_HOOKS=hooks).

A schema says which requests are well formed; a few rules of this API hold between fields or
depend on the world outside the request, so no JSON Schema can state them. `openapi.yaml`
documents each of them as a 400 (see its `BadRequest` response):

- an image URL must be fetchable: CI has no network, so in *positive* cases (the ones
  schemathesis expects to be accepted) every image or video URL becomes a small PNG data URL;
- a video (`video_url`) given as one URL must be an animated GIF, and as a list has at most the
  model's frames (flamingo-mini: 4): positive videos become a 2-frame GIF, or 2 PNG frames;
- at most `limits.max_images_per_request` (16) images and videos in one request (or one
  demonstration example), counted over all messages: positive cases keep the first 16;
- `min_tokens` must not exceed `max_tokens` (or its default): positive cases get it lowered;
- in `/v1/completions`, `/v1/score` and raw demonstration examples, the prompt must have one
  `<image>` marker per entry of `images`: positive cases get exactly that many markers;
- a prompt to generate from or score must have at least one token (every message empty, or an
  empty prompt, is refused): an empty positive case gets the text `Output:`.

Negative cases (schema-violating data, which must be refused) are left as generated, and no
failure is filtered: these hooks only make valid cases valid in the ways the schema cannot say.
"""

import schemathesis

PNG = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAEElEQVR4nGM4IScHRAwQ"
    "CgAfJgQRoo8irwAAAABJRU5ErkJggg=="
)
# Two frames of 2 x 2 pixels: a video given as one URL must be an animated GIF.
GIF = (
    "data:image/gif;base64,R0lGODlhAgACAIEAAMgeHgAAAAAAAAAAACH/C05FVFNDQVBFMi4wAwEAAAAh+QQACgAAACwAAAAAAgACAAAI"
    "BgABCAQQEAAh+QQBCgABACwAAAAAAgACAIEeHsgAAAAAAAAAAAAIBgABCAQQEAA7"
)
MARKER = "<image>"
# `limits.max_images_per_request` in config/default.toml (the run uses the defaults).
MAX_MEDIA = 16
# Completions' `max_tokens` when none is given, and chat's (`limits.default_max_tokens`).
DEFAULT_MAX_TOKENS = {"/v1/completions": 16, "/v1/chat/completions": 256}


def _fetchable_media(value):
    """The same JSON with every image/video URL replaced by the PNG data URL."""
    if isinstance(value, list):
        return [_fetchable_media(v) for v in value]
    if not isinstance(value, dict):
        return value
    out = {}
    for key, v in value.items():
        if key == "image_url" and isinstance(v, dict) and isinstance(v.get("url"), str):
            v = dict(v, url=PNG)
        elif key == "image_url" and isinstance(v, str):
            v = PNG
        elif key == "video_url" and isinstance(v, dict) and "url" in v:
            v = dict(v, url=_video(v["url"]))
        elif key == "video_url" and isinstance(v, (str, list)):
            v = _video(v)
        elif key == "images" and isinstance(v, list):
            v = [PNG if isinstance(i, str) else dict(i, url=PNG) if isinstance(i, dict) and "url" in i else i for i in v]
        out[key] = _fetchable_media(v)
    return out


def _cap_media(obj):
    """At most MAX_MEDIA media in a body or example: later image/video parts are dropped."""
    if not isinstance(obj, dict):
        return obj
    if isinstance(obj.get("images"), list):
        obj = dict(obj, images=obj["images"][:MAX_MEDIA])
    messages = obj.get("messages")
    if isinstance(messages, list):
        seen = 0
        kept = []
        for m in messages:
            if isinstance(m, dict) and isinstance(m.get("content"), list):
                parts = []
                for part in m["content"]:
                    if isinstance(part, dict) and part.get("type") in ("image_url", "video_url"):
                        seen += 1
                        if seen > MAX_MEDIA:
                            continue
                    parts.append(part)
                m = dict(m, content=parts)
            kept.append(m)
        obj = dict(obj, messages=kept)
    return obj


def _video(url):
    """A video the model takes, in the form the case gave it (one URL or a list of frames)."""
    return [PNG, PNG] if isinstance(url, list) else GIF


def _min_within_max(body, path):
    """`min_tokens` lowered to the reply's length limit when it is over it."""
    if not isinstance(body.get("min_tokens"), (int, float)):
        return body
    limit = body.get("max_completion_tokens")
    if not isinstance(limit, (int, float)):
        limit = body.get("max_tokens")
    if not isinstance(limit, (int, float)):
        limit = DEFAULT_MAX_TOKENS.get(path)
    if limit is not None and body["min_tokens"] > limit:
        body = dict(body, min_tokens=limit)
    return body


def _with_markers(prompt, images):
    """`prompt` (a string) with its `<image>` markers made exactly `images` many."""
    text = prompt.replace(MARKER, "")
    return MARKER * images + text


def _chat_is_empty(messages):
    """Whether these messages make an empty prompt (the `openflamingo` template)."""
    for m in messages:
        if not isinstance(m, dict):
            return False
        if m.get("role") == "assistant":
            return False  # " <content><|endofchunk|>" is never empty
        content = m.get("content")
        if isinstance(content, str) and content:
            return False
        if isinstance(content, list):
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or part.get("text"):
                    return False
    return True


def _not_empty(obj):
    """A body (or raw example) whose prompt has at least one token."""
    if not isinstance(obj, dict):
        return obj
    messages = obj.get("messages")
    if isinstance(messages, list) and messages and _chat_is_empty(messages):
        obj = dict(obj, messages=[dict(messages[0], content="Output:")] + messages[1:])
    prompt = obj.get("prompt")
    if prompt == "":
        obj = dict(obj, prompt="Output:")
    elif isinstance(prompt, list):
        obj = dict(obj, prompt=[p if p != "" else "Output:" for p in prompt])
    return obj


def _markers_match(obj):
    """Gives a raw prompt one marker per image (objects with `prompt` and `images`)."""
    if not isinstance(obj, dict) or "prompt" not in obj:
        return obj
    images = obj.get("images")
    n = len(images) if isinstance(images, list) else 0
    prompt = obj["prompt"]
    if isinstance(prompt, str):
        obj = dict(obj, prompt=_with_markers(prompt, n))
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        # Several prompts share the images; each needs the same count.
        obj = dict(obj, prompt=[_with_markers(p, n) for p in prompt])
    return obj


def _make_valid(case):
    """A positive case with the rules above applied (in place)."""
    if not isinstance(case.body, dict):
        return case
    body = _cap_media(_fetchable_media(case.body))
    path = case.operation.path
    if path in ("/v1/completions", "/v1/score"):
        body = _not_empty(_markers_match(body))
    elif path == "/v1/chat/completions":
        body = _not_empty(body)
    elif path == "/v1/demonstrations" and isinstance(body.get("examples"), list):
        body = dict(body, examples=[_markers_match(_cap_media(e)) for e in body["examples"]])
    body = _min_within_max(body, path)
    case.body = body
    return case


@schemathesis.hook
def map_case(context, case):
    """Generated cases (coverage and fuzzing phases): positive ones only."""
    meta = getattr(case, "meta", None)
    if meta is None or not meta.generation.mode.is_positive:
        return case
    return _make_valid(case)


@schemathesis.hook
def before_add_examples(context, examples):
    """The spec's own examples (all positive; the examples phase runs no `map_case`)."""
    for case in examples:
        _make_valid(case)
