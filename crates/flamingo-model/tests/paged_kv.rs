//! The paged K/V path (the batched decode of GPU devices, see `flamingo_model::paged`) run on
//! the CPU device against the reference fixtures and against the CPU's own per-sequence caches
//! and fused kernels, on every LM family (ALiBi, rotary, grouped-query attention): same logits
//! within float error and the same greedy tokens, for ragged batches that mix prefill chunks and
//! decode rows, beams forked mid-generation and prompts restored from prefix blocks.

mod common;

use common::*;
use flamingo_model::candle::{DType, Device, Tensor};
use flamingo_model::{load, Flamingo, Input, Logits, SequenceState};

const REL: f32 = 1e-4;

fn argmax_rows(t: &Tensor) -> Vec<u32> {
    t.argmax(1).unwrap().to_vec1::<u32>().unwrap()
}

struct Case {
    prompts: Vec<Vec<u32>>,
    latents: Vec<Tensor>,
    logits: Vec<Tensor>,
}

fn case_data(case: &str) -> Case {
    let exp = expected_json(case);
    let tensors = expected_tensors(model_dir(case).join("expected.safetensors"));
    let mut c = Case { prompts: Vec::new(), latents: Vec::new(), logits: Vec::new() };
    for p in exp["prompts"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        c.prompts.push(ids(&p["input_ids"]));
        c.latents.push(tensors[&format!("{name}.latents")].clone());
        c.logits.push(tensors[&format!("{name}.logits")].clone());
    }
    c
}

fn models(case: &str) -> (Flamingo, Flamingo) {
    let plain = load(&model_dir(case), &Device::Cpu, DType::F32, &()).unwrap().model;
    let mut paged = load(&model_dir(case), &Device::Cpu, DType::F32, &()).unwrap().model;
    paged.set_paged_kv(true);
    assert!(plain.kv_pool().is_none(), "the CPU keeps per-sequence caches by default");
    (plain, paged)
}

/// Sequences of a ragged run: prompt `p` of the case, fed in chunks of `chunk` tokens, then
/// `steps` greedy tokens; several run at once and start at different steps, so forwards mix
/// prefill chunks and decode rows.
fn ragged_run(m: &Flamingo, c: &Case, plan: &[(usize, usize, usize)], steps: usize) -> (Vec<Vec<u32>>, Vec<Tensor>) {
    let mut states: Vec<SequenceState> = plan
        .iter()
        .map(|&(p, _, _)| {
            let mut st = m.new_state();
            m.attach_media(&mut st, &c.latents[p]).unwrap();
            st
        })
        .collect();
    let mut fed = vec![0usize; plan.len()];
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); plan.len()];
    let mut logits = Vec::new();
    for step in 0..(steps + 40) {
        let mut idx = Vec::new();
        let mut inputs = Vec::new();
        for (i, &(p, chunk, start)) in plan.iter().enumerate() {
            if step < start || out[i].len() >= steps {
                continue;
            }
            let prompt = &c.prompts[p];
            if fed[i] < prompt.len() {
                let end = (fed[i] + chunk).min(prompt.len());
                inputs.push(Input::Prompt(&prompt[fed[i]..end]));
                fed[i] = end;
            } else {
                inputs.push(Input::Generated(*out[i].last().unwrap()));
            }
            idx.push(i);
        }
        if idx.is_empty() {
            break;
        }
        let prompt_done: Vec<bool> = idx.iter().map(|&i| fed[i] >= c.prompts[plan[i].0].len()).collect();
        let mut refs: Vec<&mut SequenceState> = Vec::new();
        {
            let mut rest: &mut [SequenceState] = &mut states;
            let mut base = 0;
            for &i in &idx {
                let (_, tail) = rest.split_at_mut(i - base);
                let (one, tail) = tail.split_at_mut(1);
                refs.push(&mut one[0]);
                rest = tail;
                base = i + 1;
            }
        }
        let l = m.forward(&mut refs, &inputs, Logits::Last).unwrap();
        let next = argmax_rows(&l);
        for (k, &i) in idx.iter().enumerate() {
            if prompt_done[k] {
                out[i].push(next[k]);
            }
        }
        logits.push(l);
    }
    (out, logits)
}

fn check(case: &str) {
    let c = case_data(case);
    let (plain, paged) = models(case);

    // Whole prompts and chunked prefill against the reference's logits.
    for (p, ids) in c.prompts.iter().enumerate() {
        let mut st = paged.new_state();
        assert!(st.is_paged());
        paged.attach_media(&mut st, &c.latents[p]).unwrap();
        let l = paged.forward(&mut [&mut st], &[Input::Prompt(ids)], Logits::All).unwrap();
        assert_close(&format!("{case}/{p}: paged logits"), &l, &c.logits[p], REL);
        let mut st = paged.new_state();
        paged.attach_media(&mut st, &c.latents[p]).unwrap();
        let rows: Vec<Tensor> = ids.chunks(3).map(|ch| paged.forward(&mut [&mut st], &[Input::Prompt(ch)], Logits::All).unwrap()).collect();
        assert_close(&format!("{case}/{p}: paged chunked logits"), &Tensor::cat(&rows, 0).unwrap(), &c.logits[p], REL);
    }

    // A ragged batch: four sequences over both prompts, different chunk sizes and start steps.
    let last = c.prompts.len() - 1;
    let plan = [(0, 2, 0), (last, 5, 0), (last, 7, 2), (0, 1, 5)];
    let (want, want_logits) = ragged_run(&plain, &c, &plan, 12);
    let (got, got_logits) = ragged_run(&paged, &c, &plan, 12);
    assert_eq!(got, want, "{case}: greedy tokens, paged vs per-sequence caches");
    assert_eq!(got_logits.len(), want_logits.len());
    for (s, (g, w)) in got_logits.iter().zip(&want_logits).enumerate() {
        assert_close(&format!("{case}: ragged step {s}"), g, w, REL);
    }
    assert!(paged.kv_pool().unwrap().bytes().unwrap() > 0);
}

/// Forked sequences write their own blocks; prefix blocks read from the pool restore exactly.
fn fork_and_restore(case: &str) {
    let c = case_data(case);
    let (plain, paged) = models(case);
    let p = c.prompts.len() - 1;
    let ids = &c.prompts[p];
    let run = |m: &Flamingo| {
        let mut a = m.new_state();
        m.attach_media(&mut a, &c.latents[p]).unwrap();
        m.forward(&mut [&mut a], &[Input::Prompt(ids)], Logits::Last).unwrap();
        let mut b = a.fork().unwrap();
        let la = m.forward(&mut [&mut a], &[Input::Generated(3)], Logits::Last).unwrap();
        let lb = m.forward(&mut [&mut b], &[Input::Generated(5)], Logits::Last).unwrap();
        let la2 = m.forward(&mut [&mut a, &mut b], &[Input::Generated(7), Input::Generated(7)], Logits::Last).unwrap();
        // A prefix block of the prompt, restored into a fresh state, continues identically.
        let split = ids.len() / 2;
        let block = a.kv_block(0, split, ids[..split].iter().filter(|&&t| t == m.config().media_token_id).count()).unwrap();
        let mut r = m.new_state();
        m.attach_media(&mut r, &c.latents[p]).unwrap();
        m.restore_prefix(&mut r, &[&block], &ids[..split], ids.len() + 4).unwrap();
        let lr = m.forward(&mut [&mut r], &[Input::Prompt(&ids[split..])], Logits::All).unwrap();
        (la, lb, la2, lr, a.kv_bytes() > 0)
    };
    let (pa, pb, pa2, pr, pbytes) = run(&paged);
    let (qa, qb, qa2, qr, qbytes) = run(&plain);
    assert!(pbytes && qbytes);
    assert_close(&format!("{case}: parent after fork"), &pa, &qa, REL);
    assert_close(&format!("{case}: forked child"), &pb, &qb, REL);
    assert_close(&format!("{case}: both after fork"), &pa2, &qa2, REL);
    let n = ids.len() - ids.len() / 2;
    let want = c.logits[p].narrow(0, ids.len() / 2, n).unwrap();
    assert_close(&format!("{case}: restored prefix (paged)"), &pr, &want, REL);
    assert_close(&format!("{case}: restored prefix (plain)"), &qr, &want, REL);
}

#[test]
fn blocks_return_to_the_pool() {
    let c = case_data("mpt_x1");
    let (_, paged) = models("mpt_x1");
    let pool = paged.kv_pool().unwrap().clone();
    let mut st = paged.new_state();
    paged.attach_media(&mut st, &c.latents[0]).unwrap();
    paged.forward(&mut [&mut st], &[Input::Prompt(&c.prompts[0])], Logits::Last).unwrap();
    let held = pool.bytes().unwrap();
    assert!(st.kv_bytes() > 0 && st.kv_bytes() <= held);
    drop(st);
    // The freed blocks are reused: a new sequence of the same length does not grow the pool.
    for _ in 0..3 {
        let mut st = paged.new_state();
        paged.attach_media(&mut st, &c.latents[0]).unwrap();
        paged.forward(&mut [&mut st], &[Input::Prompt(&c.prompts[0])], Logits::Last).unwrap();
    }
    assert_eq!(pool.bytes().unwrap(), held);
}

macro_rules! cases {
    ($($name:ident),*) => {$(
        mod $name {
            #[test]
            fn ragged_batches_match() {
                super::check(stringify!($name));
            }
            #[test]
            fn fork_and_prefix_restore_match() {
                super::fork_and_restore(stringify!($name));
            }
        }
    )*};
}

cases!(mosaicgpt_x1, mosaicgpt_x2, mpt_x1, mpt_x2, gptneox_x1, gptneox_x2, llama_x1, llama_x2);
