//! MPT (MosaicML), as transformers' `MptForCausalLM` computes it: ALiBi, no position embedding,
//! pre-LN blocks, fused `Wqkv`, exact-GELU MLP, bias-free layers and LayerNorms, logits through the
//! tied `wte`. OpenFlamingo-9B-vitl-mpt7b uses `anas-awadalla/mpt-7b`.
//!
//! The block implementation here is shared with [`super::mosaic_gpt`] (MPT's predecessor, the LM
//! of OpenFlamingo-3B), which differs only in key names, a flat config, and the q/k LayerNorm.
//! Reference: transformers `models/mpt/modeling_mpt.py`; `shared/reference/MOSAICGPT.md` §3-§4, §8.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::{embed_rows, resize_rows, Batch, DecoderLayer, LanguageModel, SelfAttention};
use crate::nn::{linear, Activation, LayerNorm, Linear};

/// Resolved hyper-parameters of an MPT-style model.
#[derive(Debug, Clone)]
pub struct MptSettings {
    pub d_model: usize,
    pub n_heads: usize,
    pub n_layers: usize,
    pub ffn_hidden: usize,
    pub alibi_bias_max: f64,
    /// MosaicGPT v0.0.4 computes slopes as `2^-(h+1)·max/H` for any H; MPT (HF) pads H to a
    /// power of two and interleaves. Identical when H is a power of two.
    pub mosaic_slopes: bool,
    pub qk_ln: bool,
    pub clip_qkv: Option<f64>,
    pub softmax_scale: Option<f64>,
    pub bias: bool,
    pub eps: f64,
    pub logit_scale: Option<f64>,
}

/// Module names inside a block, as spelled in the checkpoint.
pub struct MptNames {
    pub ln_1: &'static str,
    pub ln_2: &'static str,
    pub ln_f: &'static str,
    pub up: &'static str,
    pub down: &'static str,
}

pub const HF_NAMES: MptNames = MptNames { ln_1: "norm_1", ln_2: "norm_2", ln_f: "norm_f", up: "ffn.up_proj", down: "ffn.down_proj" };

/// ALiBi slopes per head.
pub fn alibi_slopes(n_heads: usize, max_bias: f64, mosaic: bool) -> Vec<f32> {
    let slope = |i: usize, n: usize| 1f32 / 2f32.powf(i as f32 * (max_bias as f32 / n as f32));
    if mosaic {
        return (1..=n_heads).map(|i| slope(i, n_heads)).collect();
    }
    let p2 = n_heads.next_power_of_two();
    let all: Vec<f32> = (1..=p2).map(|i| slope(i, p2)).collect();
    if p2 == n_heads {
        return all;
    }
    all.iter().skip(1).step_by(2).chain(all.iter().step_by(2)).take(n_heads).copied().collect()
}

struct MptBlock {
    ln_1: LayerNorm,
    wqkv: Linear,
    q_ln: Option<LayerNorm>,
    k_ln: Option<LayerNorm>,
    out_proj: Linear,
    ln_2: LayerNorm,
    up: Linear,
    down: Linear,
    attn: SelfAttention,
    clip_qkv: Option<f64>,
    d_model: usize,
}

impl MptBlock {
    fn new(cfg: &MptSettings, names: &MptNames, layer: usize, slopes: &Tensor, vb: VarBuilder) -> Result<Self> {
        let d = cfg.d_model;
        let a = vb.pp("attn");
        let (q_ln, k_ln) = if cfg.qk_ln {
            (Some(LayerNorm::new(d, cfg.eps, cfg.bias, a.pp("q_ln"))?), Some(LayerNorm::new(d, cfg.eps, cfg.bias, a.pp("k_ln"))?))
        } else {
            (None, None)
        };
        let head_dim = d / cfg.n_heads;
        Ok(Self {
            ln_1: LayerNorm::new(d, cfg.eps, cfg.bias, vb.pp(names.ln_1))?,
            wqkv: linear(d, 3 * d, cfg.bias, a.pp("Wqkv"))?,
            q_ln,
            k_ln,
            out_proj: linear(d, d, cfg.bias, a.pp("out_proj"))?,
            ln_2: LayerNorm::new(d, cfg.eps, cfg.bias, vb.pp(names.ln_2))?,
            up: linear(d, cfg.ffn_hidden, cfg.bias, vb.pp(names.up))?,
            down: linear(cfg.ffn_hidden, d, cfg.bias, vb.pp(names.down))?,
            attn: SelfAttention {
                layer,
                heads: cfg.n_heads,
                kv_heads: cfg.n_heads,
                head_dim,
                scale: cfg.softmax_scale.unwrap_or(1.0 / (head_dim as f64).sqrt()),
                alibi: Some(slopes.clone()),
                alibi_host: Some(slopes.to_vec1::<f32>()?),
            },
            clip_qkv: cfg.clip_qkv,
            d_model: d,
        })
    }
}

impl DecoderLayer for MptBlock {
    fn kv_heads(&self) -> usize {
        self.attn.kv_heads
    }
    fn forward(&self, x: &Tensor, batch: &mut Batch) -> Result<Tensor> {
        let d = self.d_model;
        let mut qkv = self.wqkv.forward(&self.ln_1.forward(x)?)?;
        if let Some(c) = self.clip_qkv {
            qkv = qkv.clamp(-c, c)?;
        }
        let mut q = qkv.narrow(1, 0, d)?;
        let mut k = qkv.narrow(1, d, d)?;
        let v = qkv.narrow(1, 2 * d, d)?;
        // MosaicGPT: LayerNorm over the full-width q and k, before the head split.
        if let (Some(q_ln), Some(k_ln)) = (&self.q_ln, &self.k_ln) {
            q = q_ln.forward(&q)?;
            k = k_ln.forward(&k)?;
        }
        let a = self.attn.forward(&q, &k, &v, batch)?;
        let x = (x + self.out_proj.forward(&a)?)?;
        let h = self.up.forward(&self.ln_2.forward(&x)?)?;
        let h = self.down.forward(&Activation::Gelu.forward(&h)?)?;
        x + h
    }
}

/// An MPT-style decoder (MPT or MosaicGPT).
pub struct MptModel {
    wte: Tensor,
    /// The tied unembedding (`wte`; its own copy when quantized).
    head: crate::nn::Linear,
    blocks: Vec<MptBlock>,
    ln_f: LayerNorm,
    logit_scale: Option<f64>,
    d_model: usize,
}

impl MptModel {
    /// `vb` points at the model root (keys `transformer.*`); `vocab_rows` is the tokenizer length.
    pub fn new(cfg: &MptSettings, names: &MptNames, vocab_rows: usize, vb: VarBuilder) -> Result<Self> {
        super::head_dim(cfg.d_model, cfg.n_heads, "d_model / n_heads")?;
        let t = vb.pp("transformer");
        let wte = t.get_unchecked("wte.weight")?;
        if wte.dims2()?.1 != cfg.d_model {
            candle_core::bail!("transformer.wte.weight has shape {:?}, expected [_, {}]", wte.dims(), cfg.d_model);
        }
        let wte = resize_rows(wte, vocab_rows)?;
        let slopes = alibi_slopes(cfg.n_heads, cfg.alibi_bias_max, cfg.mosaic_slopes);
        let slopes = Tensor::new(slopes.as_slice(), vb.device())?;
        let blocks =
            (0..cfg.n_layers).map(|i| MptBlock::new(cfg, names, i, &slopes, t.pp(format!("blocks.{i}")))).collect::<Result<_>>()?;
        Ok(Self {
            head: crate::nn::Linear::new_head(wte.clone()),
            wte,
            blocks,
            ln_f: LayerNorm::new(cfg.d_model, cfg.eps, cfg.bias, t.pp(names.ln_f))?,
            logit_scale: cfg.logit_scale,
            d_model: cfg.d_model,
        })
    }
}

impl LanguageModel for MptModel {
    fn embed(&self, ids: &Tensor, _positions: &[u32]) -> Result<Tensor> {
        embed_rows(&self.wte, ids)
    }
    fn num_layers(&self) -> usize {
        self.blocks.len()
    }
    fn layer(&self, i: usize) -> &dyn DecoderLayer {
        &self.blocks[i]
    }
    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.ln_f.forward(x)?;
        let l = candle_core::Module::forward(&self.head, &h)?;
        match self.logit_scale {
            Some(s) => l * s,
            None => Ok(l),
        }
    }
    fn hidden_size(&self) -> usize {
        self.d_model
    }
    fn vocab_size(&self) -> usize {
        self.wte.dim(0).unwrap_or(0)
    }
}

/// `attn_config` of an MPT `config.json`.
#[derive(Debug, Deserialize, Default)]
#[serde(default)]
pub struct AttnConfig {
    pub alibi_bias_max: Option<f64>,
    pub qk_ln: bool,
    pub clip_qkv: Option<f64>,
    pub softmax_scale: Option<f64>,
    pub prefix_lm: Option<bool>,
    pub attn_uses_sequence_id: Option<bool>,
}

/// Mirror of an MPT `config.json` (HF `MptConfig`, the same names as MosaicML's remote code).
#[derive(Debug, Deserialize)]
pub struct MptConfig {
    pub d_model: usize,
    pub n_heads: usize,
    pub n_layers: usize,
    #[serde(default = "four")]
    pub expansion_ratio: f64,
    #[serde(default)]
    pub attn_config: AttnConfig,
    #[serde(default = "yes")]
    pub no_bias: bool,
    #[serde(default)]
    pub logit_scale: Option<serde_json::Value>,
    #[serde(default = "eps5")]
    pub layer_norm_epsilon: f64,
}

pub(crate) fn four() -> f64 {
    4.0
}
pub(crate) fn yes() -> bool {
    true
}
pub(crate) fn eps5() -> f64 {
    1e-5
}

pub(crate) fn parse_logit_scale(v: &Option<serde_json::Value>, d_model: usize) -> Result<Option<f64>> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Number(n)) => Ok(n.as_f64()),
        Some(serde_json::Value::String(s)) if s == "inv_sqrt_d_model" => Ok(Some(1.0 / (d_model as f64).sqrt())),
        Some(other) => candle_core::bail!("unsupported logit_scale {other}"),
    }
}

impl MptConfig {
    pub fn settings(&self) -> Result<MptSettings> {
        if self.attn_config.prefix_lm == Some(true) || self.attn_config.attn_uses_sequence_id == Some(true) {
            candle_core::bail!("MPT prefix_lm / attn_uses_sequence_id are not supported");
        }
        Ok(MptSettings {
            d_model: self.d_model,
            n_heads: self.n_heads,
            n_layers: self.n_layers,
            ffn_hidden: (self.expansion_ratio * self.d_model as f64) as usize,
            alibi_bias_max: self.attn_config.alibi_bias_max.unwrap_or(8.0),
            mosaic_slopes: false,
            qk_ln: self.attn_config.qk_ln,
            clip_qkv: self.attn_config.clip_qkv,
            softmax_scale: self.attn_config.softmax_scale,
            bias: !self.no_bias,
            eps: self.layer_norm_epsilon,
            logit_scale: parse_logit_scale(&self.logit_scale, self.d_model)?,
        })
    }
}

pub fn load(config: &serde_json::Value, vocab_rows: usize, vb: VarBuilder) -> Result<Box<dyn LanguageModel>> {
    let cfg: MptConfig = serde_json::from_value(config.clone()).map_err(|e| candle_core::Error::Msg(format!("MPT config: {e}")))?;
    Ok(Box::new(MptModel::new(&cfg.settings()?, &HF_NAMES, vocab_rows, vb)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alibi_slopes_of_the_released_models() {
        // MOSAICGPT.md §4: 16 heads, max 8 -> 2^-(h+1)/2.
        let s = alibi_slopes(16, 8.0, true);
        assert!((s[0] - 0.70710677).abs() < 1e-6 && (s[15] - 0.00390625).abs() < 1e-9);
        assert_eq!(alibi_slopes(16, 8.0, false), s);
        // Non power of two: HF interleaves the slopes of the next power of two.
        let hf = alibi_slopes(12, 8.0, false);
        let p2 = alibi_slopes(16, 8.0, false);
        assert_eq!(hf[0], p2[1]);
        assert_eq!(hf[8], p2[0]);
    }
}
