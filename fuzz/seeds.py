#!/usr/bin/env python3
"""Writes the fuzz targets' seed inputs (fuzz/corpus/<target>/seed-*): a few valid and
near-valid inputs of every form each target reads, for libFuzzer to mutate from.

Needs Pillow (`pip install pillow==11.0.0`). PyTorch checkpoints are written without torch:
the same zip layout (`archive/data.pkl`, `archive/data/<key>`, `archive/version`) and the same
pickle (protocol 2, `torch._utils._rebuild_tensor_v2` over persistent storage ids) that
`torch.save` writes, from stand-in modules.

    python3 fuzz/seeds.py
"""

import base64
import collections
import io
import json
import pickle
import struct
import sys
import types
import zipfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"


def write(target, name, data):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / f"seed-{name}").write_bytes(data if isinstance(data, bytes) else data.encode())


# ---------------------------------------------------------------------------------------------
# request: bodies of the four POST routes.

PNG_URL = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="


def requests():
    user = lambda content: {"role": "user", "content": content}
    img = {"type": "image_url", "image_url": {"url": PNG_URL}}
    bodies = {
        "chat-text": {"messages": [user("Hello")]},
        "chat-image": {"model": "flamingo-mini", "messages": [user([img, {"type": "text", "text": "Output:"}])], "max_tokens": 8},
        "chat-few-shot": {
            "messages": [user([img, {"type": "text", "text": "Output:"}]), {"role": "assistant", "content": "a cat."},
                         user([img, {"type": "text", "text": "Output:"}])],
            "temperature": 0.7, "top_p": 0.9, "top_k": 40, "seed": 3, "n": 2, "stop": ["."], "logprobs": True, "top_logprobs": 2,
        },
        "chat-video": {"messages": [user([{"type": "video_url", "video_url": {"url": [PNG_URL, PNG_URL]}}])], "stream": True,
                       "stream_options": {"include_usage": True}},
        "chat-beams": {"messages": [user("x")], "num_beams": 3, "length_penalty": 1.5, "max_completion_tokens": 5.0},
        "chat-demos": {"messages": [user("x")], "demonstrations": {"id": "demo-0123456789abcdef01234567", "k": 2}},
        "chat-eos": {"messages": [user("x <image> <|endofchunk|>")], "min_tokens": 2, "ignore_eos": True, "repetition_penalty": 1.1},
        "completion": {"prompt": "<image>Output:", "images": [PNG_URL], "max_tokens": 4, "return_token_ids": True},
        "completion-echo": {"prompt": "A photo of", "echo": True, "logprobs": 3, "max_tokens": 0},
        "completion-list": {"prompt": ["one"], "images": [{"url": PNG_URL}], "suffix": ""},
        "score": {"prompt": "<image>Output:", "images": [PNG_URL], "candidates": [" a cat.", " a dog."], "top_logprobs": 1},
        "score-chat": {"messages": [user("x")], "candidates": ["a", "b"], "include_end": True, "rank_by": "normalized_logprob"},
        "register": {"name": "set", "examples": [{"messages": [user([img]), {"role": "assistant", "content": "a."}]}]},
        "bad-types": {"messages": "x", "max_tokens": -1, "temperature": "hot"},
    }
    for name, body in bodies.items():
        write("request", name, json.dumps(body))
    write("request", "not-json", b"{\"messages\": [")


# ---------------------------------------------------------------------------------------------
# media: a mode byte (resize % 3, form / 3 % 4: image, animation, frames, data URL), then the item.

def image_bytes(img, fmt, **kw):
    b = io.BytesIO()
    img.save(b, format=fmt, **kw)
    return b.getvalue()


def media():
    rgb = Image.new("RGB", (9, 7), (200, 30, 60))
    for x in range(9):
        rgb.putpixel((x, x % 7), (10, 220, 40))
    files = {
        "png-rgb": image_bytes(rgb, "PNG"),
        "png-rgba": image_bytes(rgb.convert("RGBA"), "PNG"),
        "png-palette": image_bytes(rgb.convert("P"), "PNG"),
        "png-gray16": image_bytes(rgb.convert("I;16"), "PNG"),
        "png-la": image_bytes(rgb.convert("LA"), "PNG"),
        "jpeg-rgb": image_bytes(rgb, "JPEG", quality=80),
        "jpeg-gray": image_bytes(rgb.convert("L"), "JPEG"),
        "jpeg-cmyk": image_bytes(rgb.convert("CMYK"), "JPEG"),
        "webp": image_bytes(rgb, "WEBP", lossless=True),
        "bmp": image_bytes(rgb, "BMP"),
        "gif-still": image_bytes(rgb.convert("P"), "GIF"),
    }
    frames = [Image.new("P", (8, 8), i) for i in range(3)]
    files["gif-animated"] = image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    for name, data in files.items():
        write("media", f"image-{name}", bytes([0]) + data)
        write("media", f"stretch-{name}", bytes([1]) + data)
    write("media", "animation", bytes([3]) + files["gif-animated"])
    write("media", "animation-white", bytes([5]) + files["gif-animated"])
    write("media", "frames", bytes([6, 128]) + files["png-rgb"] + files["png-palette"])
    b64 = base64.b64encode(files["png-rgb"]).decode()
    write("media", "data-url", bytes([9]) + f"image/png;base64,{b64}".encode())
    write("media", "data-url-urlsafe", bytes([9]) + f"image/webp;base64,{base64.urlsafe_b64encode(files['webp']).decode().rstrip('=')}".encode())
    write("media", "data-url-spaces", bytes([10]) + f";base64, {b64[:20]}\n{b64[20:]}".encode())


# ---------------------------------------------------------------------------------------------
# prompt: bytes for arbitrary's structured messages.

def prompt():
    write("prompt", "zeros", bytes(64))
    write("prompt", "counting", bytes(range(256)))
    write("prompt", "text", b"\x02\x00\x01" + b"Output: <image> a cat.<|endofchunk|>" * 3)
    write("prompt", "mixed", bytes([1, 0, 3, 2, 1, 0, 0, 5, 7, 1, 1, 2, 3, 255, 4, 9, 1, 0]) * 8)


# ---------------------------------------------------------------------------------------------
# weights: a format byte (0: safetensors, 1: PyTorch zip), then the file.

def safetensors(tensors):
    header, data = {}, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def fake_torch():
    """Stand-ins for the names torch's pickles refer to, so pickle can write them."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")
    torch._utils = utils
    sys.modules["torch"], sys.modules["torch._utils"] = torch, utils

    def _rebuild_tensor_v2(*args):
        raise NotImplementedError

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    storages = {}
    for name in ["FloatStorage", "HalfStorage", "BFloat16Storage", "LongStorage", "DoubleStorage"]:
        cls = type(name, (), {})
        cls.__module__ = "torch"
        cls.__qualname__ = name
        setattr(torch, name, cls)
        storages[name] = cls
    return _rebuild_tensor_v2, storages


class Storage:
    def __init__(self, pid):
        self.pid = pid


class Tensor:
    def __init__(self, rebuild, storage, offset, size, stride):
        self.rebuild, self.storage, self.offset, self.size, self.stride = rebuild, storage, offset, size, stride

    def __reduce__(self):
        return (self.rebuild, (self.storage, self.offset, tuple(self.size), tuple(self.stride), False, collections.OrderedDict()))


class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, Storage) else None


def torch_zip(state, storages_raw, wrap=None):
    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(state if wrap is None else {wrap: state})
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        for key, raw in storages_raw.items():
            z.writestr(f"archive/data/{key}", raw)
        z.writestr("archive/version", "3\n")
    return out.getvalue()


def weights():
    f32 = struct.pack("<6f", 1, 2, 3, 4, 5, 6)
    write("weights", "safetensors", bytes([0]) + safetensors({
        "a.weight": ("F32", [2, 3], f32),
        "b.bias": ("F16", [2], struct.pack("<2e", 0.5, -1.0)),
        "c": ("BF16", [1], b"\x80\x3f"),
        "ids": ("I64", [1], struct.pack("<q", 7)),
        "scalar": ("F32", [], struct.pack("<f", 1.0)),
    }))
    write("weights", "safetensors-empty", bytes([0]) + safetensors({}))
    rebuild, st = fake_torch()
    raw = {"0": f32, "1": struct.pack("<2e", 0.5, -1.0), "2": struct.pack("<q", 7)}
    state = collections.OrderedDict([
        ("a.weight", Tensor(rebuild, Storage(("storage", st["FloatStorage"], "0", "cpu", 6)), 0, [2, 3], [3, 1])),
        ("a.t", Tensor(rebuild, Storage(("storage", st["FloatStorage"], "0", "cpu", 6)), 0, [3, 2], [1, 3])),
        ("a.tail", Tensor(rebuild, Storage(("storage", st["FloatStorage"], "0", "cpu", 6)), 2, [4], [1])),
        ("b.bias", Tensor(rebuild, Storage(("storage", st["HalfStorage"], "1", "cpu", 2)), 0, [2], [1])),
        ("ids", Tensor(rebuild, Storage(("storage", st["LongStorage"], "2", "cpu", 1)), 0, [1], [1])),
    ])
    write("weights", "torch", bytes([1]) + torch_zip(state, raw))
    write("weights", "torch-wrapped", bytes([1]) + torch_zip(state, raw, wrap="state_dict"))


# ---------------------------------------------------------------------------------------------
# model_dir: a selector byte (fixture % 5, file / 5 % 5), then the file's text.

def model_dir():
    fixtures = ["models/mpt_x1", "models/mosaicgpt_x1", "models/llama_x1", "models/gptneox_x1", "idefics/idefics_x1"]
    openflamingo = ["flamingo.toml", "lm/config.json", "clip/open_clip_config.json", "lm/special_tokens_map.json",
                    "lm/tokenizer_config.json"]
    idefics = ["flamingo.toml", "config.json", "preprocessor_config.json", "special_tokens_map.json", "tokenizer_config.json"]
    for i, fixture in enumerate(fixtures):
        files = idefics if fixture.startswith("idefics") else openflamingo
        for j, name in enumerate(files):
            path = ROOT / "tests/fixtures" / fixture / name
            if name == "flamingo.toml":
                text = "[perceiver]\ndim_head = 16\n\n[xattn]\ndim_head = 16\n\n[preprocess]\nresize = \"stretch\"\n" if not path.is_file() else path.read_text()
            elif path.is_file():
                text = path.read_text()
            else:
                continue
            write("model_dir", f"{fixture.split('/')[-1]}-{name.replace('/', '-')}", bytes([i + 5 * j]) + text.encode())


if __name__ == "__main__":
    requests()
    media()
    prompt()
    weights()
    model_dir()
    for d in sorted(CORPUS.iterdir()):
        print(d.name, len(list(d.iterdir())))
