//! Activation functions by their config names, and the vectorised exact GELU the CPU runs
//! (`erf` by Abramowitz & Stegun, `exp` without a libm call).

use candle_core::{DType, Module, Result, Tensor};
use rayon::prelude::*;

use super::with_f32;

/// Activation functions by the names used in the configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Exact (erf) GELU, `nn.GELU()`.
    Gelu,
    /// tanh-approximated GELU, `gelu_new` / `gelu_pytorch_tanh`.
    GeluTanh,
    /// open_clip's QuickGELU: `x * sigmoid(1.702 x)`.
    QuickGelu,
    Silu,
    Relu,
}

impl Activation {
    pub fn from_hf_name(name: &str) -> Option<Self> {
        Some(match name {
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "quick_gelu" => Self::QuickGelu,
            "silu" | "swish" => Self::Silu,
            "relu" => Self::Relu,
            _ => return None,
        })
    }
}

/// GELU, `x·0.5·(1 + erf(x/√2))` (`nn.GELU()`), for f32 on the CPU: split over rayon's pool
/// (candle runs large element-wise ops on a second, spinning pool, which on 2 cores competes
/// with rayon's workers) and vectorised, with `erf` by Abramowitz & Stegun 7.1.26 (absolute
/// error below 1.5e-7). PyTorch's CPU GELU, which made the fixtures, is not correctly rounded
/// either and this agrees with it more often than a correctly rounded `erf` does: 82% vs 48% of
/// 200k points in [-6, 6] bitwise equal to torch 2.15's; within 4.6e-7 of the exact value,
/// torch within 3.7e-7 (see `gelu_matches_the_definition`).
fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        return x.gelu_erf();
    }
    let x = x.contiguous()?;
    let y = with_f32(&x, |xs| {
        let xs = &xs[..x.elem_count()];
        let mut y = vec![0f32; xs.len()];
        if xs.len() >= GELU_PAR_MIN {
            y.par_chunks_mut(GELU_CHUNK).zip(xs.par_chunks(GELU_CHUNK)).for_each(|(o, i)| gelu_slice(i, o));
        } else {
            gelu_slice(xs, &mut y);
        }
        y
    })?;
    Tensor::from_vec(y, x.shape(), x.device())
}

/// [`gelu_erf`] over a slice, compiled with AVX2 when the CPU has it (same values either way).
fn gelu_slice(x: &[f32], y: &mut [f32]) {
    with_avx2!(gelu_loop(x: &[f32], y: &mut [f32]))
}

#[inline(always)]
fn gelu_loop(x: &[f32], y: &mut [f32]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o = v * 0.5 * (1.0 + erf_as(v * std::f32::consts::FRAC_1_SQRT_2));
    }
}

/// `erf(v)` by Abramowitz & Stegun 7.1.26: `1 − (a1·t + … + a5·t⁵)·e^(−v²)` with
/// `t = 1 / (1 + p·|v|)`, odd in `v`; absolute error below 1.5e-7.
#[inline(always)]
pub(crate) fn erf_as(v: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    // The coefficients as published (the nearest f32 is what runs).
    #[allow(clippy::excessive_precision)]
    const A: [f32; 5] = [0.254_829_592, -0.284_496_736, 1.421_413_741, -1.453_152_027, 1.061_405_429];
    let a = v.abs();
    let t = 1.0 / (1.0 + P * a);
    let r = ((((A[4] * t + A[3]) * t + A[2]) * t + A[1]) * t + A[0]) * t;
    (1.0 - r * exp_neg(a * a)).copysign(v)
}

/// `e^(−z)` for `z >= 0` in f32 without a libm call (so loops over it vectorise): `2^n·e^r`
/// with `n = round(−z·log2 e)`, `r = −z − n·ln 2` in two parts (Cody-Waite), `e^r` by its
/// degree-6 minimax polynomial (Cephes' `expf` coefficients); relative error about 1 ulp,
/// flushed to 0 below e^−87.
#[inline(always)]
pub(crate) fn exp_neg(z: f32) -> f32 {
    let x = -z;
    if x < -87.0 {
        return 0.0;
    }
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let r2 = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1) * r + 0.5;
    let e = p * r2 + r + 1.0;
    e * pow2(n)
}

/// `2^n` for a whole number `n` in [-126, 127], from its biased exponent `n + 127`:
/// `n + 127 + 2^23` is exact and its low mantissa bits are `n + 127`. The same bits as
/// `(n as i32 + 127) << 23`, whose saturating cast compiles to eight scalar conversions per
/// vector (GELU was ~1.5x slower with it).
#[inline(always)]
fn pow2(n: f32) -> f32 {
    f32::from_bits(((n + (127.0 + 8_388_608.0)).to_bits() & 0xff) << 23)
}

/// Elements from which [`gelu_erf`] runs in parallel, and per task.
const GELU_PAR_MIN: usize = 16 * 1024;
const GELU_CHUNK: usize = 4 * 1024;

impl Module for Activation {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Gelu => gelu_erf(x),
            Self::GeluTanh => x.gelu(),
            Self::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            Self::Silu => x.silu(),
            Self::Relu => x.relu(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn pow2_sets_the_exponent() {
        for n in -126..=127 {
            assert_eq!(pow2(n as f32).to_bits(), ((n + 127) as u32) << 23, "2^{n}");
            assert_eq!(pow2(n as f32) as f64, 2f64.powi(n), "2^{n}");
        }
    }

    #[test]
    fn gelu_matches_the_definition() {
        // exp_neg: relative error of about an ulp over the range GELU uses.
        for i in 0..=20_000 {
            let z = i as f32 * 0.004_35; // 0 ..= 87 (below e^-87 it flushes to 0)
            let want = (-(z as f64)).exp();
            let got = exp_neg(z) as f64;
            assert!((got - want).abs() <= 3e-7 * want + 1e-38, "exp(-{z}): {got} vs {want}");
        }
        // erf: the approximation's bound (1.5e-7) plus its evaluation in f32, whose polynomial
        // terms reach 1.45 in magnitude with alternating signs (a few ulp of 1.45, ~1.5e-7 each):
        // up to 3.6e-7 near |x| = 0.2, where GELU scales it by 0.5·|x|. A wrong coefficient or
        // formula errs by 1e-3 or more.
        let erf64 = |x: f64| -> f64 {
            // erf by its Taylor series (|x| <= 3) or 1 - erfc's continued fraction, in f64.
            if x.abs() <= 3.0 {
                let mut sum = 0f64;
                let mut term = x;
                let mut k = 0f64;
                while term.abs() > 1e-17 {
                    sum += term / (2.0 * k + 1.0);
                    k += 1.0;
                    term *= -x * x / k;
                }
                sum * 2.0 / std::f64::consts::PI.sqrt()
            } else {
                let a = x.abs();
                let mut f = 0f64;
                for n in (1..60).rev() {
                    f = (n as f64 / 2.0) / (a + f);
                }
                let erfc = (-a * a).exp() / std::f64::consts::PI.sqrt() / (a + f);
                (1.0 - erfc).copysign(x)
            }
        };
        let dev = Device::Cpu;
        let xs: Vec<f32> = (0..=40_000).map(|i| -10.0 + i as f32 * 0.0005).collect();
        for &v in xs.iter().step_by(7) {
            let want = erf64(v as f64);
            assert!((erf_as(v) as f64 - want).abs() < 5e-7, "erf({v}): {} vs {want}", erf_as(v));
        }
        // GELU itself, serial and parallel paths (a [16, 4096] tensor takes the parallel one),
        // within the error of PyTorch's own CPU GELU (3.7e-7 over [-6, 6] for torch 2.15).
        let big: Vec<f32> = (0..65_536).map(|i| -8.0 + i as f32 * (16.0 / 65_536.0)).collect();
        for data in [xs, big] {
            let t = Tensor::from_vec(data.clone(), data.len(), &dev).unwrap();
            let y = Activation::Gelu.forward(&t).unwrap().to_vec1::<f32>().unwrap();
            for (&v, &g) in data.iter().zip(&y) {
                let v64 = v as f64;
                let want = 0.5 * v64 * (1.0 + erf64(v64 / std::f64::consts::SQRT_2));
                assert!((g as f64 - want).abs() < 5e-7 * (1.0 + v64.abs()), "gelu({v}): {g} vs {want}");
            }
        }
    }
}
