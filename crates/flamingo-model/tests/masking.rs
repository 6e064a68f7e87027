//! The masking rule's consequences, checked on a real (tiny) model: a token depends only on the
//! tokens and images before it. This is what makes prefix-KV and vision caching exact.

mod common;

use common::*;
use flamingo_model::candle::{DType, Device, Tensor};
use flamingo_model::{load, Input, Logits};

fn logits(model: &flamingo_model::Flamingo, ids: &[u32], latents: &Tensor) -> Vec<Vec<f32>> {
    let mut st = model.new_state();
    model.attach_media(&mut st, latents).unwrap();
    model.forward(&mut [&mut st], &[Input::Prompt(ids)], Logits::All).unwrap().to_vec2().unwrap()
}

#[test]
fn tokens_do_not_see_later_images() {
    for case in ["mpt_x1", "gptneox_x2"] {
        let exp = expected_json(case);
        let t = expected_tensors(model_dir(case).join("expected.safetensors"));
        let m = load(&model_dir(case), &Device::Cpu, DType::F32, &()).unwrap();
        let p = &exp["prompts"][1];
        assert_eq!(p["name"], "three_images");
        let ids = ids(&p["input_ids"]);
        let lat = &t["three_images.latents"];
        let base = logits(&m.model, &ids, lat);
        let media = m.tokenizer.media_token_id();
        let pos: Vec<usize> = ids.iter().enumerate().filter(|(_, &x)| x == media).map(|(i, _)| i).collect();
        assert_eq!(pos.len(), 3);
        assert!(pos[0] > 0, "the fixture has text before the first image");
        for k in 0..3 {
            // Replace image k: rows before its <image> token must not change; rows from it on must.
            let mut imgs: Vec<Tensor> = (0..3).map(|i| lat.get(i).unwrap()).collect();
            imgs[k] = (imgs[k].clone() * -1.0).unwrap();
            let changed = logits(&m.model, &ids, &Tensor::stack(&imgs, 0).unwrap());
            for (r, (a, b)) in base.iter().zip(&changed).enumerate() {
                if r < pos[k] {
                    assert_eq!(a, b, "{case}: row {r} changed when image {k} changed");
                } else if r == pos[k] {
                    assert_ne!(a, b, "{case}: row {r} (the <image> token of image {k}) must see it");
                }
            }
        }
    }
}
