//! The Perceiver Resampler with frame and media-time embeddings (video, as in the paper) against
//! open_flamingo's `PerceiverResampler(dim=64, max_num_media=4, max_num_frames=3)`.

mod common;

use common::*;
use flamingo_model::candle::{DType, Device};
use flamingo_model::candle_nn::VarBuilder;
use flamingo_model::perceiver::{PerceiverConfig, PerceiverResampler};

#[test]
fn video_perceiver_matches_reference() {
    let dir = fixtures().join("perceiver_video");
    let w = expected_tensors(dir.join("weights.safetensors"));
    let e = expected_tensors(dir.join("expected.safetensors"));
    let vb = VarBuilder::from_tensors(w, DType::F32, &Device::Cpu);
    let cfg = PerceiverConfig {
        dim: 64,
        depth: 6,
        heads: 8,
        dim_head: 64,
        num_latents: 64,
        ff_mult: 4,
        max_num_frames: Some(3),
        max_num_media: Some(4),
    };
    let p = PerceiverResampler::new(&cfg, vb.pp("perceiver")).unwrap();
    assert!(p.supports_video());
    let x = e["x"].squeeze(0).unwrap(); // [T=2, F=3, v=20, d]
    let out = p.forward(&x, 0).unwrap();
    assert_close("video latents", &out, &e["out"].squeeze(0).unwrap(), 1e-4);
    // More frames than frame embeddings: a clear error.
    let too_many = flamingo_model::candle::Tensor::cat(&[&x, &x], 1).unwrap();
    let err = p.forward(&too_many, 0).unwrap_err().to_string();
    assert!(err.contains("6 frames"), "{err}");
}

#[test]
fn frames_without_frame_embeddings_are_rejected() {
    // The released checkpoints have no frame embeddings: several frames per media must be an
    // error, not silently flattened as the reference would.
    let m = flamingo_model::load(&model_dir("mpt_x1"), &Device::Cpu, DType::F32, &()).unwrap();
    assert!(!m.model.supports_video());
    let px = flamingo_model::candle::Tensor::zeros((1, 2, 3, 224, 224), DType::F32, &Device::Cpu).unwrap();
    let err = m.model.encode_media(&px, 0).unwrap_err().to_string();
    assert!(err.contains("no frame embeddings"), "{err}");
}
