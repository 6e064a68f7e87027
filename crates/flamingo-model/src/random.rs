//! Random-weight models built in memory from a shape description: for benchmarks of the real
//! architecture at sizes no fixture ships (nothing here is used for numerics tests).

use std::collections::HashMap;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::config::{infer_interval, LmFamily, ResolvedConfig};
use crate::error::Result;
use crate::lm;
use crate::model::Flamingo;
use crate::perceiver::{PerceiverConfig, PerceiverResampler};
use crate::vision::{VisionConfig, VisionTransformer};
use crate::xattn::{GatedCrossAttentionBlock, XattnConfig};

/// Shape of a random OpenFlamingo-style model with an MPT language model.
#[derive(Debug, Clone)]
pub struct RandomSpec {
    pub vision_width: usize,
    pub vision_layers: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub n_layers: usize,
    pub vocab: usize,
    pub cross_attn_every_n_layers: usize,
    pub perceiver_depth: usize,
}

impl RandomSpec {
    /// OpenFlamingo-3B's shapes (open_clip ViT-L/14, the 24-layer 2048-wide MosaicGPT of
    /// mpt-1b-redpajama-200b, a gated block before every layer, a 6-deep Perceiver).
    pub fn openflamingo_3b() -> Self {
        Self {
            vision_width: 1024,
            vision_layers: 24,
            image_size: 224,
            patch_size: 14,
            d_model: 2048,
            n_heads: 16,
            n_layers: 24,
            vocab: 50280,
            cross_attn_every_n_layers: 1,
            perceiver_depth: 6,
        }
    }

    /// OpenFlamingo-9B's shapes (ViT-L/14, MPT-7B's 32 layers of 4096, a gated block before
    /// every 4th layer). About 9 B parameters: 36 GB in f32, for `--quantize` runs.
    pub fn openflamingo_9b() -> Self {
        Self { d_model: 4096, n_heads: 32, n_layers: 32, cross_attn_every_n_layers: 4, ..Self::openflamingo_3b() }
    }

    /// About 0.4 B parameters: a ViT-B/14-sized tower, a 12-layer 1024-wide MPT, cross-attention
    /// every 2 layers, the gpt-neox vocabulary size.
    pub fn mid() -> Self {
        Self {
            vision_width: 768,
            vision_layers: 12,
            image_size: 224,
            patch_size: 14,
            d_model: 1024,
            n_heads: 16,
            n_layers: 12,
            vocab: 50280,
            cross_attn_every_n_layers: 2,
            perceiver_depth: 6,
        }
    }
}

/// Returns N(0, 1/fan_in) for matrices, ones for norm weights, zeros for biases, and 0.5 for
/// the tanh gates.
#[derive(Default)]
pub(crate) struct RandomBackend {
    unchecked: HashMap<String, Vec<usize>>,
}

fn value(name: &str, shape: &Shape, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
    let dims = shape.dims();
    let last = name.rsplit('.').next().unwrap_or("");
    let is_norm =
        ["norm", "ln_", "ln_pre", "ln_post", "norm_1", "norm_2", "norm_f", "norm_media", "norm_latents"].iter().any(|p| name.contains(p))
            || (name.contains(".1.0.") && dims.len() == 1)
            || (name.contains("ff.0.") && dims.len() == 1);
    let t = if last == "attn_gate" || last == "ff_gate" {
        Tensor::full(0.5f32, shape, dev)?
    } else if last == "bias" || last.ends_with("_bias") {
        Tensor::zeros(shape, DType::F32, dev)?
    } else if dims.len() == 1 && is_norm {
        Tensor::ones(shape, DType::F32, dev)?
    } else {
        let fan_in = if dims.len() >= 2 { dims[1..].iter().product::<usize>() } else { dims[0] };
        Tensor::randn(0f32, (1.0 / fan_in as f64).sqrt() as f32, shape, dev)?
    };
    t.to_dtype(dtype)
}

impl SimpleBackend for RandomBackend {
    fn get(&self, s: Shape, name: &str, _h: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        value(name, &s, dtype, dev)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let shape = self.unchecked.get(name).ok_or_else(|| candle_core::Error::Msg(format!("no shape for {name}")))?;
        value(name, &Shape::from(shape.clone()), dtype, dev)
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.unchecked.contains_key(name)
    }
}

/// Builds a random model (token ids: `<image>` = vocab-2, `<|endofchunk|>` = vocab-3).
pub fn build(spec: &RandomSpec, device: &Device, dtype: DType) -> Result<Flamingo> {
    let mut unchecked = HashMap::new();
    unchecked.insert("transformer.wte.weight".to_string(), vec![spec.vocab, spec.d_model]);
    let vb = VarBuilder::from_backend(Box::new(RandomBackend { unchecked }), dtype, device.clone());
    let lm_cfg = serde_json::json!({
        "model_type": "mpt", "d_model": spec.d_model, "n_heads": spec.n_heads, "n_layers": spec.n_layers,
        "expansion_ratio": 4, "max_seq_len": 2048, "vocab_size": spec.vocab,
        "attn_config": {"alibi": true, "alibi_bias_max": 8}, "no_bias": true,
    });
    let lm = lm::mpt::load(&lm_cfg, spec.vocab, vb.clone())?;
    let vision = VisionConfig {
        image_size: spec.image_size,
        patch_size: spec.patch_size,
        width: spec.vision_width,
        layers: spec.vision_layers,
        heads: spec.vision_width / 64,
        mlp_width: spec.vision_width * 4,
        quick_gelu: true,
        ln_post_on_tokens: false,
        keep_cls: false,
        ln_eps: 1e-5,
    };
    let perceiver = PerceiverConfig {
        dim: spec.vision_width,
        depth: spec.perceiver_depth,
        heads: 8,
        dim_head: 64,
        num_latents: 64,
        ff_mult: 4,
        max_num_frames: None,
        max_num_media: None,
    };
    let xattn_cfg = XattnConfig { dim: spec.d_model, dim_visual: spec.vision_width, heads: 8, dim_head: 64, ff_mult: 4 };
    let n = spec.cross_attn_every_n_layers;
    let gated: Vec<usize> = (0..spec.n_layers).filter(|i| (i + 1) % n == 0).collect();
    let mut xattn: Vec<Option<GatedCrossAttentionBlock>> = (0..spec.n_layers).map(|_| None).collect();
    for &i in &gated {
        xattn[i] = Some(GatedCrossAttentionBlock::new(&xattn_cfg, vb.pp(format!("transformer.blocks.{i}.gated_cross_attn_layer")))?);
    }
    let config = ResolvedConfig {
        model_family: crate::config::ModelFamily::OpenFlamingo,
        family: LmFamily::Mpt,
        vision: vision.clone(),
        perceiver: perceiver.clone(),
        xattn: xattn_cfg,
        resize: crate::preprocess::Resize::Crop,
        media_rule: crate::config::MediaRule::Cumulative { media: (spec.vocab - 2) as u32 },
        cross_attn_every_n_layers: infer_interval(&gated, spec.n_layers),
        gated_layers: gated,
        media_token_id: (spec.vocab - 2) as u32,
        eoc_token_id: (spec.vocab - 3) as u32,
        eos_token_id: None,
        vocab_rows: spec.vocab,
    };
    let mut model = Flamingo {
        vision: VisionTransformer::new(&vision, vb.pp("visual"))?,
        perceiver: PerceiverResampler::new(&perceiver, vb.pp("perceiver"))?,
        xattn,
        lm,
        config,
        device: device.clone(),
        dtype,
        kv_pool: None,
    };
    model.set_paged_kv(Flamingo::default_paged(device));
    Ok(model)
}

impl Flamingo {
    /// Number of parameters (weights of all components).
    pub fn describe_size(spec: &RandomSpec) -> usize {
        let (d, v, w) = (spec.d_model, spec.vocab, spec.vision_width);
        let lm = spec.n_layers * 12 * d * d + v * d;
        let vision = spec.vision_layers * 12 * w * w + 3 * spec.patch_size * spec.patch_size * w;
        let perceiver = spec.perceiver_depth * (w * 512 * 2 + w * 1024 + 8 * w * w);
        let blocks = spec.n_layers / spec.cross_attn_every_n_layers;
        let xattn = blocks * (d * 512 * 2 + w * 1024 + 8 * d * d);
        lm + vision + perceiver + xattn
    }
}
