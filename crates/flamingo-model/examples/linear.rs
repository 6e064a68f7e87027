//! Micro-benchmark of `x · Wᵀ` for a few rows on the CPU, as the language model's layers run it
//! (weights `[out, in]`, f32): the skinny kernel against candle's gemm with either operand order.
//! Each product reads a different one of 24 weights, so weights come from memory as in a real
//! forward pass. Times are the best of 5 rounds, in ms per product.
//!
//! `cargo run --release -p flamingo-model --example linear`

use std::time::Instant;

use candle_core::{Device, Tensor};

fn main() -> candle_core::Result<()> {
    let d = Device::Cpu;
    for &(i, o) in &[(1024usize, 3072usize), (1024, 1024), (1024, 4096), (4096, 1024)] {
        let ws: Vec<Tensor> = (0..24).map(|_| Tensor::randn(0f32, 1.0, (o, i), &d)).collect::<candle_core::Result<_>>()?;
        println!("[m, {i}] x [{i}, {o}]   skinny | gemm (W.x^T)^T | gemm x.W^T");
        for &m in &[1usize, 2, 3, 4, 8, 16, 32, 64] {
            let x = Tensor::randn(0f32, 1.0, (m, i), &d)?;
            let xv = x.flatten_all()?.to_vec1::<f32>()?;
            let wv: Vec<Vec<f32>> = ws.iter().map(|w| w.flatten_all()?.to_vec1::<f32>()).collect::<candle_core::Result<_>>()?;
            let mut best = [f64::MAX; 3];
            for _ in 0..5 {
                for (v, b) in best.iter_mut().enumerate() {
                    if v == 0 && m > flamingo_model::skinny::MAX_ROWS {
                        continue;
                    }
                    let t = Instant::now();
                    for (w, wv) in ws.iter().zip(&wv) {
                        match v {
                            0 => drop(flamingo_model::skinny::matmul_wt(&xv, m, wv, o, i)),
                            1 => drop(w.matmul(&x.t()?)?.t()?.contiguous()?),
                            _ => drop(x.matmul(&w.t()?)?),
                        }
                    }
                    *b = b.min(t.elapsed().as_secs_f64() * 1e3 / ws.len() as f64);
                }
            }
            let skinny = if best[0] == f64::MAX { "     -".to_string() } else { format!("{:6.3}", best[0]) };
            println!("  m = {m:2}   {skinny} | {:6.3} | {:6.3}", best[1], best[2]);
        }
    }
    Ok(())
}
