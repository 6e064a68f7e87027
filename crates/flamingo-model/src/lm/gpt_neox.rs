//! GPT-NeoX, the LM of OpenFlamingo-4B (RedPajama-INCITE-Base-3B-v1): fused per-head
//! `query_key_value`, partial rotary embedding (`rotary_pct` of each head), parallel residual
//! (`x + attn(ln1(x)) + mlp(ln2(x))`), untied `embed_out`.
//! Reference: transformers `models/gpt_neox/modeling_gpt_neox.py`.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::{embed_rows, resize_rows, Batch, DecoderLayer, LanguageModel, Rotary, SelfAttention};
use crate::nn::{linear, Activation, LayerNorm, Linear};

/// Mirror of a GPT-NeoX `config.json`.
#[derive(Debug, Deserialize)]
pub struct GptNeoXConfig {
    pub hidden_size: usize,
    pub num_attention_heads: usize,
    pub num_hidden_layers: usize,
    pub intermediate_size: usize,
    #[serde(default)]
    pub rotary_pct: Option<f64>,
    #[serde(default)]
    pub rotary_emb_base: Option<f64>,
    /// Newer transformers write these too; when present they are what the model uses.
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default = "super::mpt::yes")]
    pub use_parallel_residual: bool,
    #[serde(default = "super::mpt::eps5")]
    pub layer_norm_eps: f64,
    #[serde(default = "gelu")]
    pub hidden_act: String,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "super::mpt::yes")]
    pub attention_bias: bool,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
}

fn gelu() -> String {
    "gelu".into()
}

struct Layer {
    input_layernorm: LayerNorm,
    post_attention_layernorm: LayerNorm,
    query_key_value: Linear,
    dense: Linear,
    dense_h_to_4h: Linear,
    dense_4h_to_h: Linear,
    act: Activation,
    attn: SelfAttention,
    rotary: std::sync::Arc<Rotary>,
    parallel: bool,
}

impl Layer {
    fn mlp(&self, x: &Tensor) -> Result<Tensor> {
        self.dense_4h_to_h.forward(&self.act.forward(&self.dense_h_to_4h.forward(x)?)?)
    }
}

impl DecoderLayer for Layer {
    fn kv_heads(&self) -> usize {
        self.attn.kv_heads
    }
    fn forward(&self, x: &Tensor, batch: &mut Batch) -> Result<Tensor> {
        let (n, _) = x.dims2()?;
        let (h, d) = (self.attn.heads, self.attn.head_dim);
        // [n, h, 3d]: per head q | k | v.
        let qkv = self.query_key_value.forward(&self.input_layernorm.forward(x)?)?.reshape((n, h, 3 * d))?;
        let q = qkv.narrow(2, 0, d)?.reshape((n, h * d))?;
        let k = qkv.narrow(2, d, d)?.reshape((n, h * d))?;
        let v = qkv.narrow(2, 2 * d, d)?.reshape((n, h * d))?;
        let q = batch.rotate(&self.rotary, &q, h)?;
        let k = batch.rotate(&self.rotary, &k, h)?;
        let a = self.dense.forward(&self.attn.forward(&q, &k, &v, batch)?)?;
        if self.parallel {
            let m = self.mlp(&self.post_attention_layernorm.forward(x)?)?;
            (m + a)? + x
        } else {
            let a = (a + x)?;
            let m = self.mlp(&self.post_attention_layernorm.forward(&a)?)?;
            m + a
        }
    }
}

pub struct GptNeoX {
    embed_in: Tensor,
    embed_out: crate::nn::Linear,
    layers: Vec<Layer>,
    final_layer_norm: LayerNorm,
    hidden: usize,
}

impl LanguageModel for GptNeoX {
    fn embed(&self, ids: &Tensor, _positions: &[u32]) -> Result<Tensor> {
        embed_rows(&self.embed_in, ids)
    }
    fn num_layers(&self) -> usize {
        self.layers.len()
    }
    fn layer(&self, i: usize) -> &dyn DecoderLayer {
        &self.layers[i]
    }
    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        candle_core::Module::forward(&self.embed_out, &self.final_layer_norm.forward(x)?)
    }
    fn hidden_size(&self) -> usize {
        self.hidden
    }
    fn vocab_size(&self) -> usize {
        self.embed_out.out_dim()
    }
}

pub fn load(config: &serde_json::Value, vocab_rows: usize, vb: VarBuilder) -> Result<Box<dyn LanguageModel>> {
    let cfg: GptNeoXConfig =
        serde_json::from_value(config.clone()).map_err(|e| candle_core::Error::Msg(format!("GPT-NeoX config: {e}")))?;
    if cfg.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
        candle_core::bail!("GPT-NeoX rope_scaling is not supported");
    }
    let act = Activation::from_hf_name(&cfg.hidden_act)
        .ok_or_else(|| candle_core::Error::Msg(format!("unsupported hidden_act {}", cfg.hidden_act)))?;
    let (d, heads) = (cfg.hidden_size, cfg.num_attention_heads);
    let head_dim = super::head_dim(d, heads, "hidden_size / num_attention_heads")?;
    let pct = cfg.partial_rotary_factor.or(cfg.rotary_pct).unwrap_or(0.25);
    let base = cfg.rope_theta.or(cfg.rotary_emb_base).unwrap_or(10000.0);
    let rot_dims = (head_dim as f64 * pct) as usize;
    let rotary = std::sync::Arc::new(Rotary::new(rot_dims, base));
    let g = vb.pp("gpt_neox");
    let bias = cfg.attention_bias;
    let layers = (0..cfg.num_hidden_layers)
        .map(|i| {
            let l = g.pp(format!("layers.{i}"));
            Ok(Layer {
                input_layernorm: LayerNorm::new(d, cfg.layer_norm_eps, true, l.pp("input_layernorm"))?,
                post_attention_layernorm: LayerNorm::new(d, cfg.layer_norm_eps, true, l.pp("post_attention_layernorm"))?,
                query_key_value: linear(d, 3 * d, bias, l.pp("attention.query_key_value"))?,
                dense: linear(d, d, bias, l.pp("attention.dense"))?,
                dense_h_to_4h: linear(d, cfg.intermediate_size, true, l.pp("mlp.dense_h_to_4h"))?,
                dense_4h_to_h: linear(cfg.intermediate_size, d, true, l.pp("mlp.dense_4h_to_h"))?,
                act,
                attn: SelfAttention {
                    layer: i,
                    heads,
                    kv_heads: heads,
                    head_dim,
                    scale: 1.0 / (head_dim as f64).sqrt(),
                    alibi: None,
                    alibi_host: None,
                },
                rotary: rotary.clone(),
                parallel: cfg.use_parallel_residual,
            })
        })
        .collect::<Result<_>>()?;
    let embed_in = resize_rows(g.get_unchecked("embed_in.weight")?, vocab_rows)?;
    let embed_out =
        if cfg.tie_word_embeddings { embed_in.clone() } else { resize_rows(vb.get_unchecked("embed_out.weight")?, vocab_rows)? };
    for (name, t) in [("gpt_neox.embed_in.weight", &embed_in), ("embed_out.weight", &embed_out)] {
        if t.dim(1)? != d {
            candle_core::bail!("{name} has shape {:?}, expected [_, {d}]", t.dims());
        }
    }
    Ok(Box::new(GptNeoX {
        embed_in,
        embed_out: crate::nn::Linear::new_head(embed_out),
        layers,
        final_layer_norm: LayerNorm::new(d, cfg.layer_norm_eps, true, g.pp("final_layer_norm"))?,
        hidden: d,
    }))
}
