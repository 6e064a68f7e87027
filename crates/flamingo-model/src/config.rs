//! Model configuration: what is read from the three sources, what is inferred from the weights,
//! and the optional `flamingo.toml` overrides.

use serde::Deserialize;

use crate::perceiver::PerceiverConfig;
use crate::preprocess::Resize;
use crate::vision::VisionConfig;
use crate::xattn::XattnConfig;

/// The language-model families, by `model_type` in `lm/config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LmFamily {
    MosaicGpt,
    Mpt,
    GptNeoX,
    Llama,
}

impl LmFamily {
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        Some(match model_type {
            "mosaic_gpt" => Self::MosaicGpt,
            "mpt" => Self::Mpt,
            "gpt_neox" => Self::GptNeoX,
            "llama" => Self::Llama,
            _ => return None,
        })
    }

    pub const SUPPORTED: &'static str = "mosaic_gpt, mpt, gpt_neox, llama";

    /// Where the decoder layers sit in the HF module tree (and so in `checkpoint.pt`).
    pub fn decoder_layers_path(self) -> &'static str {
        match self {
            Self::MosaicGpt | Self::Mpt => "transformer.blocks",
            Self::GptNeoX => "gpt_neox.layers",
            Self::Llama => "model.layers",
        }
    }
}

/// The model families: what a model directory's layout and components are. The engine and the
/// server never branch on it; everything that differs is described by the loaded model
/// ([`ResolvedConfig`], the tokenizer, the preprocessing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelFamily {
    /// OpenFlamingo: `clip/` (open_clip) + `lm/` (HF causal LM) + `checkpoint.pt`.
    OpenFlamingo,
    /// HF IDEFICS: one HF directory (`config.json` with `model_type: idefics`).
    Idefics,
}

impl ModelFamily {
    pub fn name(self) -> &'static str {
        match self {
            Self::OpenFlamingo => "openflamingo",
            Self::Idefics => "idefics",
        }
    }
}

/// Which image each text token attends to in the gated cross-attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaRule {
    /// OpenFlamingo's `only_attend_immediate_media`: the latest `<image>` at or before the
    /// token (none before the first); a generated `<image>` restarts the count at one (see
    /// [`crate::xattn`]).
    Cumulative { media: u32 },
    /// IDEFICS' processor mask: the latest `<image>` at or before the token, but none for the
    /// tokens after an `eos` until the next `<image>`; generated tokens attend as the last prompt
    /// token does (`generate` repeats the mask's last row).
    ResetAfterEos { media: u32, eos: u32 },
}

/// Optional `DIR/flamingo.toml`: overrides for what is otherwise read or inferred.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    /// Place a gated block before decoder layer `i` iff `(i+1) % n == 0` (must match the
    /// checkpoint's keys). Inferred from the checkpoint when absent.
    pub cross_attn_every_n_layers: Option<usize>,
    #[serde(default)]
    pub vision: VisionOverrides,
    #[serde(default)]
    pub perceiver: HeadOverrides,
    #[serde(default)]
    pub xattn: HeadOverrides,
    #[serde(default)]
    pub preprocess: PreprocessOverrides,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreprocessOverrides {
    /// `"crop"` (default: open_clip's shortest side to the image size and centre crop),
    /// `"stretch"` (the whole image resized to image size x image size) or `"stretch_on_white"`
    /// (transparency composited on white first, IDEFICS' preprocessing).
    pub resize: Option<Resize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VisionOverrides {
    /// Apply `ln_post` to the patch tokens (open_clip >= 2.23 behaviour). Default false, as the
    /// released checkpoints were trained.
    pub ln_post_on_tokens: Option<bool>,
    /// Override open_clip's `quick_gelu`.
    pub quick_gelu: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadOverrides {
    /// Width of one attention head (default 64, as in OpenFlamingo); heads = inner / dim_head.
    pub dim_head: Option<usize>,
}

/// Everything the model was built with, after inference and overrides.
#[derive(Debug, Clone)]
pub struct ResolvedConfig {
    pub model_family: ModelFamily,
    pub family: LmFamily,
    pub vision: VisionConfig,
    pub perceiver: PerceiverConfig,
    pub xattn: XattnConfig,
    /// How images (and video frames) are brought to `vision.image_size` (`[preprocess] resize`).
    pub resize: Resize,
    /// Which image each token attends to.
    pub media_rule: MediaRule,
    /// Decoder layers that have a gated cross-attention block before them.
    pub gated_layers: Vec<usize>,
    /// The interval of the gated layers: OpenFlamingo's `(i+1) % n == 0` rule when they follow
    /// it, IDEFICS' `cross_layer_interval` (`i % n == 0`).
    pub cross_attn_every_n_layers: Option<usize>,
    pub media_token_id: u32,
    pub eoc_token_id: u32,
    pub eos_token_id: Option<u32>,
    pub vocab_rows: usize,
}

/// The interval `n` such that `gated == {i : (i+1) % n == 0}`, if any.
pub fn infer_interval(gated: &[usize], num_layers: usize) -> Option<usize> {
    (1..=num_layers).find(|&n| {
        let want: Vec<usize> = (0..num_layers).filter(|i| (i + 1) % n == 0).collect();
        want == gated
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_from_layers() {
        assert_eq!(infer_interval(&[0, 1, 2, 3], 4), Some(1));
        assert_eq!(infer_interval(&[1, 3], 4), Some(2));
        assert_eq!(infer_interval(&[3, 7, 11, 15, 19, 23, 27, 31], 32), Some(4));
        assert_eq!(infer_interval(&[0, 2], 4), None);
    }
}
