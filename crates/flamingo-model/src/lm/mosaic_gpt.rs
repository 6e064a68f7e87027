//! MosaicGPT, the language model of OpenFlamingo-3B-vitl-mpt1b (`mpt-1b-redpajama-200b`, remote
//! code of mosaicml/examples v0.0.4). MPT's math (see [`super::mpt`]) with a flat config, its own
//! key names (`ln_1`, `ln_2`, `ln_f`, `mlp.mlp_up`, `mlp.mlp_down`), no `lm_head` (logits through
//! `wte`), and a LayerNorm over the full-width q and k (`attn.q_ln`, `attn.k_ln`) when
//! `attn_qk_ln` is set. Reference: `shared/reference/MOSAICGPT.md`.

use candle_core::Result;
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::mpt::{eps5, four, parse_logit_scale, yes, MptModel, MptNames, MptSettings};
use super::LanguageModel;

pub const NAMES: MptNames = MptNames { ln_1: "ln_1", ln_2: "ln_2", ln_f: "ln_f", up: "mlp.mlp_up", down: "mlp.mlp_down" };

/// Mirror of MosaicGPT's `config.json` (`model_type: "mosaic_gpt"`).
#[derive(Debug, Deserialize)]
pub struct MosaicGptConfig {
    pub d_model: usize,
    pub n_heads: usize,
    pub n_layers: usize,
    #[serde(default = "four")]
    pub mlp_ratio: f64,
    #[serde(default = "yes")]
    pub alibi: bool,
    #[serde(default)]
    pub alibi_bias_max: Option<f64>,
    #[serde(default)]
    pub attn_qk_ln: bool,
    #[serde(default)]
    pub attn_clip_qkv: Option<f64>,
    #[serde(default)]
    pub softmax_scale: Option<f64>,
    #[serde(default = "yes")]
    pub no_bias: bool,
    #[serde(default)]
    pub logit_scale: Option<serde_json::Value>,
    #[serde(default)]
    pub prefix_lm: bool,
    #[serde(default)]
    pub attn_uses_sequence_id: bool,
    #[serde(default = "eps5")]
    pub layer_norm_epsilon: f64,
}

impl MosaicGptConfig {
    pub fn settings(&self) -> Result<MptSettings> {
        if !self.alibi {
            candle_core::bail!("MosaicGPT without ALiBi (learned positions) is not supported");
        }
        if self.prefix_lm || self.attn_uses_sequence_id {
            candle_core::bail!("MosaicGPT prefix_lm / attn_uses_sequence_id are not supported");
        }
        Ok(MptSettings {
            d_model: self.d_model,
            n_heads: self.n_heads,
            n_layers: self.n_layers,
            ffn_hidden: (self.mlp_ratio * self.d_model as f64) as usize,
            alibi_bias_max: self.alibi_bias_max.unwrap_or(8.0),
            mosaic_slopes: true,
            qk_ln: self.attn_qk_ln,
            clip_qkv: self.attn_clip_qkv,
            softmax_scale: self.softmax_scale,
            bias: !self.no_bias,
            eps: self.layer_norm_epsilon,
            logit_scale: parse_logit_scale(&self.logit_scale, self.d_model)?,
        })
    }
}

pub fn load(config: &serde_json::Value, vocab_rows: usize, vb: VarBuilder) -> Result<Box<dyn LanguageModel>> {
    let cfg: MosaicGptConfig =
        serde_json::from_value(config.clone()).map_err(|e| candle_core::Error::Msg(format!("MosaicGPT config: {e}")))?;
    Ok(Box::new(MptModel::new(&cfg.settings()?, &NAMES, vocab_rows, vb)?))
}
