"""flamingo-mini: the model's shape and the pieces every training stage shares.

The architecture is OpenFlamingo's, built from the reference packages themselves:
- vision: an open_clip `CLIP` (ViT image tower + text tower), registered as a local config;
- language: a transformers `MptForCausalLM` (ALiBi, tied embeddings; OpenFlamingo-3B/9B's family);
- bridge: open_flamingo 2.0.1's `Flamingo` from `create_model_and_transforms`, with its
  `PerceiverResampler` and `GatedCrossAttentionBlock` at this model's sizes (the reference
  classes, other constructor arguments), and `_encode_vision_x` extended to several frames per
  media (the one place the reference stops: it asserts F == 1; the perceiver's frame
  embeddings are the paper's learnt temporal embeddings for video).
"""

import copy
import json
import os
import sys
import types

import numpy as np
import torch
import torch.nn as nn
from einops import rearrange
from PIL import Image, ImageSequence

import open_clip

# open_flamingo/train/train_utils.py imports wandb at module level (only for logging); an
# empty stub lets the real filter_state_dict_to_trainable be imported.
sys.modules.setdefault("wandb", types.ModuleType("wandb"))
from open_flamingo import create_model_and_transforms  # noqa: E402
from open_flamingo.src.flamingo import Flamingo  # noqa: E402
from open_flamingo.src.helpers import GatedCrossAttentionBlock, PerceiverResampler  # noqa: E402
from open_flamingo.train.train_utils import filter_state_dict_to_trainable  # noqa: E402

# ---- sizes ----------------------------------------------------------------------------------

IMAGE_SIZE = 96
PATCH = 12  # 8 x 8 = 64 patch tokens per image
VIS_WIDTH = 128
VIS_LAYERS = 4
TEXT_CONTEXT = 24
LM_VOCAB = 512
D_MODEL = 128
LM_LAYERS = 4
LM_HEADS = 4
PERCEIVER = dict(depth=3, dim_head=32, heads=4, num_latents=16, max_num_frames=4)
XATTN = dict(dim_head=32, heads=4)
CROSS_ATTN_EVERY = 1
FRAMES = 4

# open_clip's OpenAI normalisation (its default for a config without its own).
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)

CLIP_NAME = "flamingo-mini-clip"


def clip_config():
    return {
        "embed_dim": 128,
        "quick_gelu": False,
        "vision_cfg": {
            "image_size": IMAGE_SIZE,
            "layers": VIS_LAYERS,
            "width": VIS_WIDTH,
            "head_width": 32,
            "mlp_ratio": 4.0,
            "patch_size": PATCH,
        },
        # The text tower reads the LM tokenizer's ids plus one end-of-text id (the largest, so
        # that open_clip's argmax pooling finds it).
        "text_cfg": {"context_length": TEXT_CONTEXT, "vocab_size": LM_VOCAB + 1, "width": 128, "heads": 4, "layers": 3},
    }


def register_clip():
    open_clip.factory._MODEL_CONFIGS[CLIP_NAME] = copy.deepcopy(clip_config())


# ---- preprocessing (what the server does for a model with `resize = "stretch"`) -------------


def pixels(img):
    """A PIL image -> (3, S, S) float tensor: the whole image resized to S x S (PIL bicubic, no
    crop, so shapes near the edges of a non-square image stay in view), /255, normalised."""
    a = np.asarray(img.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC), dtype=np.float32) / 255.0
    a = (a - MEAN) / STD
    return torch.from_numpy(a.transpose(2, 0, 1).copy())


def frames_of(path):
    """The frames of a PNG (one) or animated GIF (each), as RGB PIL images."""
    with Image.open(path) as im:
        return [f.convert("RGB") for f in ImageSequence.Iterator(im)]


def media_pixels(path):
    """(F, 3, S, S) for a media file."""
    return torch.stack([pixels(f) for f in frames_of(path)])


# ---- examples ---------------------------------------------------------------------------------


def read_examples(data_dir):
    with open(os.path.join(data_dir, "examples.jsonl")) as f:
        return [json.loads(line) for line in f]


def training_text(ex):
    """The sequence the model is trained on: the chat's prompt and the reply, as the
    `openflamingo` template renders an assistant turn (a space, the text, <|endofchunk|>)."""
    return ex["prompt"] + " " + ex["answer"] + "<|endofchunk|>"


def plain_text(ex):
    """The same example as plain text for LM pretraining (no images, no new tokens): chunks
    on their own lines."""
    t = training_text(ex).replace("<image>", "")
    return t.replace("<|endofchunk|>", "\n").strip()


# ---- the Flamingo -------------------------------------------------------------------------


class VideoFlamingo(Flamingo):
    """open_flamingo's Flamingo with several frames per media: every frame through the vision
    encoder, the perceiver (with frame embeddings) over all of a media's frames. For F == 1 this
    is exactly the reference `_encode_vision_x`."""

    def _encode_vision_x(self, vision_x):
        assert vision_x.ndim == 6, "vision_x should be of shape (b, T_img, F, C, H, W)"
        b, T, F = vision_x.shape[:3]
        vision_x = rearrange(vision_x, "b T F c h w -> (b T F) c h w")
        with torch.no_grad():
            vision_x = self.vision_encoder(vision_x)[1]
        vision_x = rearrange(vision_x, "(b T F) v d -> b T F v d", b=b, T=T, F=F)
        self.condition_on_features(vision_x)

    def condition_on_features(self, feats):
        """The rest of `_encode_vision_x` from the vision encoder's tokens (b, T, F, v, d):
        training caches those, since the vision encoder is frozen."""
        latents = self.perceiver(feats)
        for layer in self.lang_encoder._get_decoder_layers():
            layer.condition_vis_x(latents)


def build_flamingo(clip_dir, lm_dir):
    """The Flamingo as OpenFlamingo's factory builds it from the frozen towers, with this
    model's perceiver and cross-attention sizes, and the reference's trainable set."""
    register_clip()
    model, _, tokenizer = create_model_and_transforms(
        clip_vision_encoder_path=CLIP_NAME,
        clip_vision_encoder_pretrained=os.path.join(clip_dir, "open_clip_pytorch_model.bin"),
        lang_encoder_path=lm_dir,
        tokenizer_path=lm_dir,
        cross_attn_every_n_layers=CROSS_ATTN_EVERY,
        use_local_files=True,
    )
    model.__class__ = VideoFlamingo
    model.perceiver = PerceiverResampler(dim=VIS_WIDTH, **PERCEIVER)
    le = model.lang_encoder
    le.gated_cross_attn_layers = nn.ModuleList(
        [
            GatedCrossAttentionBlock(dim=D_MODEL, dim_visual=VIS_WIDTH, **XATTN) if (i + 1) % CROSS_ATTN_EVERY == 0 else None
            for i in range(len(le.old_decoder_blocks))
        ]
    )
    le.init_flamingo_layers(False)
    # The factory's trainable set: perceiver, gated cross-attention, input embeddings (whose
    # gradient is then masked to the new tokens' rows, as open_flamingo's train loop does).
    model.requires_grad_(False)
    model.perceiver.requires_grad_(True)
    le.gated_cross_attn_layers.requires_grad_(True)
    le.get_input_embeddings().requires_grad_(True)
    return model, tokenizer


def checkpoint_of(model):
    """checkpoint.pt's contents, by open_flamingo's own filter."""
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    return filter_state_dict_to_trainable(model, sd)
