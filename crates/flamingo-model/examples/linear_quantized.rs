//! Micro-benchmark of `x · Wᵀ` for the weight precisions of `--quantize` on the CPU: f32
//! ([`flamingo_model::skinny`]), f16 computed in f32 ([`flamingo_model::f16w`]), q8_0
//! ([`flamingo_model::q8`]) and candle's q8_0 matmul for comparison. Each product reads a
//! different one of several weights (more bytes than the caches hold), so weights come from
//! memory as in a decode step. Times are the best of 5 rounds, in ms per product, with the
//! weight bytes read per second beside them.
//!
//! `cargo run --release -p flamingo-model --example linear_quantized`

use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use flamingo_model::{f16w::F16Matrix, q8::Q8Matrix, skinny};

fn main() -> candle_core::Result<()> {
    let d = Device::Cpu;
    for &(i, o) in &[(1024usize, 3072usize), (1024, 4096), (4096, 1024), (1024, 50280)] {
        let count = if o > 10000 { 4 } else { 24 };
        let ws: Vec<Tensor> = (0..count).map(|_| Tensor::randn(0f32, 1.0, (o, i), &d)).collect::<candle_core::Result<_>>()?;
        let wv: Vec<Vec<f32>> = ws.iter().map(|w| w.flatten_all()?.to_vec1::<f32>()).collect::<candle_core::Result<_>>()?;
        let q8: Vec<Q8Matrix> = wv.iter().filter_map(|w| Q8Matrix::quantize(w, o, i)).collect();
        let h: Vec<F16Matrix> = wv.iter().filter_map(|w| F16Matrix::from_f32(w, o, i)).collect();
        let cq: Vec<QMatMul> =
            ws.iter().map(|w| QMatMul::from_qtensor(QTensor::quantize(w, GgmlDType::Q8_0)?)).collect::<candle_core::Result<_>>()?;
        println!("[m, {i}] x [{i}, {o}]   ms (GB/s of weights): f32 | f16 | q8_0 | candle q8_0");
        for &m in &[1usize, 2, 4, 16, 32] {
            let x = Tensor::randn(0f32, 1.0, (m, i), &d)?;
            let xv = x.flatten_all()?.to_vec1::<f32>()?;
            let mut best = [f64::MAX; 4];
            for _ in 0..5 {
                for (v, b) in best.iter_mut().enumerate() {
                    let t = Instant::now();
                    for k in 0..count {
                        match v {
                            0 => drop(skinny::matmul_wt(&xv, m, &wv[k], o, i)),
                            1 => drop(h[k].matmul_wt(&xv, m)),
                            2 => drop(q8[k].matmul_wt(&xv, m)),
                            _ => drop(cq[k].forward(&x)?),
                        }
                    }
                    *b = b.min(t.elapsed().as_secs_f64() * 1e3 / count as f64);
                }
            }
            let bytes = [4.0, 2.0, 1.125, 1.0625].map(|b| b * (o * i) as f64);
            let cells: Vec<String> = best.iter().zip(bytes).map(|(ms, b)| format!("{ms:7.3} ({:4.1})", b / ms / 1e6)).collect();
            println!("  m = {m:2}   {}", cells.join(" | "));
        }
    }
    Ok(())
}
