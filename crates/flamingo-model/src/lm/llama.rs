//! LLaMA (OpenFlamingo-9B v1 used LLaMA-7B): RMSNorm, rotary embedding on the whole head,
//! grouped-query attention, SwiGLU MLP, untied `lm_head` unless `tie_word_embeddings`.
//! Reference: transformers `models/llama/modeling_llama.py`.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::{embed_rows, resize_rows, Batch, DecoderLayer, LanguageModel, Rotary, SelfAttention};
use crate::nn::{linear, rms_norm, Activation, Linear, RmsNorm};

/// Mirror of a LLaMA `config.json`.
#[derive(Debug, Deserialize)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    pub num_hidden_layers: usize,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "eps6")]
    pub rms_norm_eps: f64,
    #[serde(default = "theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "silu")]
    pub hidden_act: String,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
}

fn eps6() -> f64 {
    1e-6
}
fn theta() -> f64 {
    10000.0
}
fn silu() -> String {
    "silu".into()
}

struct Layer {
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    act: Activation,
    attn: SelfAttention,
    rotary: std::sync::Arc<Rotary>,
}

impl DecoderLayer for Layer {
    fn kv_heads(&self) -> usize {
        self.attn.kv_heads
    }
    fn forward(&self, x: &Tensor, batch: &mut Batch) -> Result<Tensor> {
        let h = self.input_layernorm.forward(x)?;
        let q = batch.rotate(&self.rotary, &self.q_proj.forward(&h)?, self.attn.heads)?;
        let k = batch.rotate(&self.rotary, &self.k_proj.forward(&h)?, self.attn.kv_heads)?;
        let v = self.v_proj.forward(&h)?;
        let x = (x + self.o_proj.forward(&self.attn.forward(&q, &k, &v, batch)?)?)?;
        let h = self.post_attention_layernorm.forward(&x)?;
        let m = (self.act.forward(&self.gate_proj.forward(&h)?)? * self.up_proj.forward(&h)?)?;
        x + self.down_proj.forward(&m)?
    }
}

pub struct Llama {
    kv_width: usize,
    embed_tokens: Tensor,
    lm_head: crate::nn::Linear,
    layers: Vec<Layer>,
    norm: RmsNorm,
    hidden: usize,
}

impl LanguageModel for Llama {
    fn embed(&self, ids: &Tensor, _positions: &[u32]) -> Result<Tensor> {
        embed_rows(&self.embed_tokens, ids)
    }
    fn num_layers(&self) -> usize {
        self.layers.len()
    }
    fn layer(&self, i: usize) -> &dyn DecoderLayer {
        &self.layers[i]
    }
    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        candle_core::Module::forward(&self.lm_head, &self.norm.forward(x)?)
    }
    fn hidden_size(&self) -> usize {
        self.hidden
    }
    fn vocab_size(&self) -> usize {
        self.lm_head.out_dim()
    }
    fn kv_width(&self) -> usize {
        self.kv_width
    }
}

pub fn load(config: &serde_json::Value, vocab_rows: usize, vb: VarBuilder) -> Result<Box<dyn LanguageModel>> {
    let cfg = parse(config)?;
    let embed_tokens = resize_rows(vb.pp("model").get_unchecked("embed_tokens.weight")?, vocab_rows)?;
    let lm_head =
        if cfg.tie_word_embeddings { embed_tokens.clone() } else { resize_rows(vb.get_unchecked("lm_head.weight")?, vocab_rows)? };
    build(&cfg, embed_tokens, lm_head, vb)
}

/// IDEFICS' LLaMA: the same decoder, with decoupled embedding and head (`embed_tokens.weight`
/// then `embed_tokens.additional_embedding.weight` rows; `lm_head.weight` then
/// `lm_head.additional_fc.weight` outputs), read from the IDEFICS `config.json` (LLaMA's fields
/// at its top level).
pub fn load_idefics(config: &serde_json::Value, vocab: usize, additional: usize, vb: VarBuilder) -> Result<Box<dyn LanguageModel>> {
    let cfg = parse(config)?;
    let d = cfg.hidden_size;
    let m = vb.pp("model");
    let table = |base: Tensor, extra: &str, vb: &VarBuilder| -> Result<Tensor> {
        if additional == 0 {
            return Ok(base);
        }
        Tensor::cat(&[&base, &vb.get((additional, d), extra)?], 0)
    };
    let embed_tokens = table(m.get((vocab, d), "embed_tokens.weight")?, "embed_tokens.additional_embedding.weight", &m)?;
    let lm_head = if cfg.tie_word_embeddings {
        embed_tokens.clone()
    } else {
        table(vb.get((vocab, d), "lm_head.weight")?, "lm_head.additional_fc.weight", &vb)?
    };
    build(&cfg, embed_tokens, lm_head, vb)
}

fn parse(config: &serde_json::Value) -> Result<LlamaConfig> {
    serde_json::from_value(config.clone()).map_err(|e| candle_core::Error::Msg(format!("LLaMA config: {e}")))
}

fn build(cfg: &LlamaConfig, embed_tokens: Tensor, lm_head: Tensor, vb: VarBuilder) -> Result<Box<dyn LanguageModel>> {
    if let Some(s) = cfg.rope_scaling.as_ref().filter(|v| !v.is_null()) {
        let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(|v| v.as_str());
        if kind != Some("default") {
            candle_core::bail!("LLaMA rope_scaling {s} is not supported");
        }
    }
    let act = Activation::from_hf_name(&cfg.hidden_act)
        .ok_or_else(|| candle_core::Error::Msg(format!("unsupported hidden_act {}", cfg.hidden_act)))?;
    let d = cfg.hidden_size;
    let heads = cfg.num_attention_heads;
    let kv_heads = cfg.num_key_value_heads.unwrap_or(heads);
    // Grouped queries: each K/V head serves `heads / kv_heads` query heads.
    if heads == 0 {
        candle_core::bail!("num_attention_heads must be positive");
    }
    super::head_dim(heads, kv_heads, "num_attention_heads / num_key_value_heads")?;
    let head_dim = match cfg.head_dim {
        Some(h) if h > 0 => h,
        Some(_) => candle_core::bail!("head_dim must be positive"),
        None => super::head_dim(d, heads, "hidden_size / num_attention_heads")?,
    };
    let rotary = std::sync::Arc::new(Rotary::new(head_dim, cfg.rope_theta));
    let m = vb.pp("model");
    let layers = (0..cfg.num_hidden_layers)
        .map(|i| {
            let l = m.pp(format!("layers.{i}"));
            let a = l.pp("self_attn");
            let p = l.pp("mlp");
            Ok(Layer {
                input_layernorm: rms_norm(d, cfg.rms_norm_eps, l.pp("input_layernorm"))?,
                post_attention_layernorm: rms_norm(d, cfg.rms_norm_eps, l.pp("post_attention_layernorm"))?,
                q_proj: linear(d, heads * head_dim, cfg.attention_bias, a.pp("q_proj"))?,
                k_proj: linear(d, kv_heads * head_dim, cfg.attention_bias, a.pp("k_proj"))?,
                v_proj: linear(d, kv_heads * head_dim, cfg.attention_bias, a.pp("v_proj"))?,
                o_proj: linear(heads * head_dim, d, cfg.attention_bias, a.pp("o_proj"))?,
                gate_proj: linear(d, cfg.intermediate_size, cfg.mlp_bias, p.pp("gate_proj"))?,
                up_proj: linear(d, cfg.intermediate_size, cfg.mlp_bias, p.pp("up_proj"))?,
                down_proj: linear(cfg.intermediate_size, d, cfg.mlp_bias, p.pp("down_proj"))?,
                act,
                attn: SelfAttention {
                    layer: i,
                    heads,
                    kv_heads,
                    head_dim,
                    scale: 1.0 / (head_dim as f64).sqrt(),
                    alibi: None,
                    alibi_host: None,
                },
                rotary: rotary.clone(),
            })
        })
        .collect::<Result<_>>()?;
    for (name, t) in [("model.embed_tokens.weight", &embed_tokens), ("lm_head.weight", &lm_head)] {
        if t.dim(1)? != d {
            candle_core::bail!("{name} has shape {:?}, expected [_, {d}]", t.dims());
        }
    }
    Ok(Box::new(Llama {
        kv_width: kv_heads * head_dim,
        embed_tokens,
        lm_head: crate::nn::Linear::new_head(lm_head),
        layers,
        norm: rms_norm(d, cfg.rms_norm_eps, m.pp("norm"))?,
        hidden: d,
    }))
}
