#!/usr/bin/env python3
"""Golden fixture for the "stretch" preprocessing (`[preprocess] resize = "stretch"` in a model
directory's flamingo.toml): the whole image converted to RGB, resized to S x S with PIL's
bicubic filter (no crop, aspect ratio not kept), then open_clip's /255 and mean/std
normalisation.

Writes small procedural PNGs of varied sizes, aspect ratios and modes (up- and down-scaling on
each axis) and their stretched 96 x 96 pixels:

    tests/fixtures/stretch/<name>.png
    tests/fixtures/stretch/pixels.safetensors   key = file name, value [3, 96, 96] float32
    tests/fixtures/stretch/crop.safetensors     portrait_120x300.png through open_clip's own
                                                validation transform at 96 (the crop path)

Pillow runs the vertical pass of a resize first when the image shrinks vertically by more than
twice what it shrinks horizontally (each pass rounds to 8 bits, so the order shows in the
pixels); `tall_64x128.png` (stretch) and `portrait_120x300.png` (both paths) take that order,
which the script checks.

Run (from the repo root):
    /work/refenv/bin/python tests/reference/make_stretch_fixture.py --out tests/fixtures

Deterministic: the images are pure functions of their size (no random numbers). Only Pillow,
numpy, torch, torchvision and safetensors are needed (no model). See tests/fixtures/README.md.
"""

import argparse
import os

import numpy as np
import PIL
import safetensors.torch as st
import torch
import torchvision
from PIL import Image
from torchvision import transforms

from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.transform import image_transform

SIZE = 96

# name, (width, height), PIL mode as saved, what it exercises
IMAGES = [
    ("tall_64x128.png", (64, 128), "RGBA", "1:2; width up, height down; alpha dropped by convert('RGB') before the resize"),
    ("wide_300x200.png", (300, 200), "RGB", "3:2; both axes down"),
    ("odd_97x61.png", (97, 61), "L", "odd sizes; width down, height up; greyscale replicated before the resize"),
    ("long_512x256.png", (512, 256), "RGB", "2:1; both axes down by large factors"),
    ("small_40x30.png", (40, 30), "RGB", "4:3; both axes up"),
    ("portrait_120x300.png", (120, 300), "RGB", "2:5; both axes down, the vertical pass first (also under the crop)"),
]


def pattern(w, h):
    """An RGB uint8 image: smooth gradients (compress well as PNG), a checkerboard (high
    frequency), and saturated shapes with sharp edges (bicubic overshoot clips at 0 and 255)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    u, v = x / max(w - 1, 1), y / max(h - 1, 1)
    r = 127.5 + 127.5 * np.sin(2 * np.pi * (1.5 * u + 0.5 * v))
    g = 255.0 * v
    b = 127.5 + 127.5 * np.cos(2 * np.pi * 3.0 * u * v)
    img = np.stack([r, g, b], axis=-1)
    # checkerboard in the top-left quarter (cells of 3 px)
    cb = ((x // 3 + y // 3) % 2 == 0) & (u < 0.5) & (v < 0.5)
    img[cb] = [250, 250, 250]
    img[~cb & (u < 0.5) & (v < 0.5)] = [5, 5, 5]
    # a saturated red disc and a blue bar with sharp edges
    disc = (u - 0.7) ** 2 + (v - 0.35) ** 2 < 0.04
    img[disc] = [255, 0, 0]
    bar = (u > 0.15) & (u < 0.85) & (v > 0.72) & (v < 0.82)
    img[bar] = [0, 0, 255]
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def make_image(w, h, mode):
    rgb = pattern(w, h)
    if mode == "RGB":
        return Image.fromarray(rgb, "RGB")
    if mode == "L":
        return Image.fromarray(rgb, "RGB").convert("L")
    if mode == "RGBA":
        y, x = np.mgrid[0:h, 0:w]
        alpha = np.clip((x + 0.5 * y) * 255.0 / (w + 0.5 * h), 0, 255).astype(np.uint8)
        alpha[: h // 4, : w // 4] = 0  # colour under alpha 0 must survive (no premultiplying)
        return Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    raise ValueError(mode)


def stretch(img):
    """What a server loading a `resize = "stretch"` model must compute."""
    to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD)])
    return to_tensor(img.convert("RGB").resize((SIZE, SIZE), Image.BICUBIC)).contiguous()


def vertical_pass_first(img, size):
    """Whether PIL's resize of `img` to `size` equals vertical-then-horizontal and not the
    other order."""
    w, h = img.size
    W, H = size
    out = np.asarray(img.resize(size, Image.BICUBIC))
    hv = np.asarray(img.resize((W, h), Image.BICUBIC).resize(size, Image.BICUBIC))
    vh = np.asarray(img.resize((w, H), Image.BICUBIC).resize(size, Image.BICUBIC))
    return np.array_equal(out, vh) and not np.array_equal(out, hv)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/fixtures", help="the fixtures directory (stretch/ is written under it)")
    args = ap.parse_args()
    out = os.path.join(args.out, "stretch")
    os.makedirs(out, exist_ok=True)
    pixels = {}
    crop = {}
    open_clip_val = image_transform(SIZE, is_train=False)
    for name, (w, h), mode, what in IMAGES:
        path = os.path.join(out, name)
        make_image(w, h, mode).save(path, optimize=True)
        # Read back as a user's file is read.
        with Image.open(path) as im:
            assert im.mode == mode and im.size == (w, h), (name, im.mode, im.size)
            px = stretch(im)
            if name in ("tall_64x128.png", "portrait_120x300.png"):
                assert vertical_pass_first(im.convert("RGB"), (SIZE, SIZE)), name
            if name == "portrait_120x300.png":
                assert vertical_pass_first(im, (SIZE, SIZE * h // w)), name
                crop[name] = open_clip_val(im).contiguous()
        assert px.shape == (3, SIZE, SIZE) and px.dtype == torch.float32
        pixels[name] = px
        print(f"{name}: {mode} {w}x{h} ({what}), {os.path.getsize(path)} bytes")
    st.save_file(pixels, os.path.join(out, "pixels.safetensors"), metadata={"format": "pt"})
    st.save_file(crop, os.path.join(out, "crop.safetensors"), metadata={"format": "pt"})
    for f in ("pixels.safetensors", "crop.safetensors"):
        os.chmod(os.path.join(out, f), 0o644)  # safetensors writes 0600
    print(f"pixels.safetensors: {os.path.getsize(os.path.join(out, 'pixels.safetensors'))} bytes")
    print(f"Pillow {PIL.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}")


if __name__ == "__main__":
    main()
