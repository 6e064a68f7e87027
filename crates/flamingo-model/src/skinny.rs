//! `x · Wᵀ` for a few rows on the CPU (a decode step of a few sequences, or the short prefill
//! chunk of a prefix-cache hit).
//!
//! With `W` stored `[out, in]` (PyTorch's layout), each output is a dot product of a row of `x`
//! with a row of `W`. For a few rows the product is bound by reading `W` from memory, and a
//! general GEMM spends much of its time packing operands: on this project's 2-core machine
//! candle's gemm takes twice as long for 2-3 rows as for one (BENCHMARKS.md). This kernel reads
//! each weight row once, computes its dot products with every row of `x` (which stays in cache),
//! and splits the output rows across the thread pool.
//!
//! Each output is summed in the same order whatever the number of rows, so a sequence's
//! activations do not depend on which other sequences share its step.

use rayon::prelude::*;

/// Most rows this kernel handles; more go to the general GEMM.
pub const MAX_ROWS: usize = 8;

/// Independent partial sums per dot product (two 8-lane vectors: enough to hide the latency of
/// fused multiply-adds).
const LANES: usize = 16;

/// Output rows per parallel task.
const CHUNK: usize = 32;

/// Rows of `x` multiplied together (2 x GROUP accumulator vectors stay in registers).
const GROUP: usize = 4;

/// `y = x · wᵀ` with `x: [m, k]`, `w: [n, k]` (row-major), returned as `[m, n]`.
///
/// Panics if the slices are shorter than the shapes say, or `m` is 0 or above [`MAX_ROWS`]
/// (callers check the shapes).
pub fn matmul_wt(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
    assert!((1..=MAX_ROWS).contains(&m) && x.len() >= m * k && w.len() >= n * k);
    // Computed transposed ([n, m]) so every task owns a contiguous slice, then transposed back.
    let mut yt = vec![0f32; n * m];
    yt.par_chunks_mut(CHUNK * m).enumerate().for_each(|(c, out)| {
        let first = c * CHUNK;
        let rows = out.len() / m;
        let w = &w[first * k..(first + rows) * k];
        // Rows of x in groups of up to GROUP: the chunk of w stays in cache between groups.
        let mut g = 0;
        while g < m {
            let x = &x[g * k..];
            let out = &mut out[g..];
            match m - g {
                1 => dispatch::<1>(x, w, rows, k, out, m),
                2 => dispatch::<2>(x, w, rows, k, out, m),
                3 => dispatch::<3>(x, w, rows, k, out, m),
                _ => dispatch::<GROUP>(x, w, rows, k, out, m),
            }
            g += GROUP;
        }
    });
    if m == 1 {
        return yt;
    }
    let mut y = vec![0f32; m * n];
    for (j, col) in yt.chunks_exact(m).enumerate() {
        for (r, &v) in col.iter().enumerate() {
            y[r * n + j] = v;
        }
    }
    y
}

/// `out[j * stride + r] = dot(w[j], x[r])` for `j < rows`, `r < M`.
fn dispatch<const M: usize>(x: &[f32], w: &[f32], rows: usize, k: usize, out: &mut [f32], stride: usize) {
    assert!(x.len() >= M * k && w.len() >= rows * k && out.len() > (rows - 1) * stride + M - 1);
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features the function is compiled for.
            unsafe { block_avx2::<M>(x, w, rows, k, out, stride) };
            return;
        }
    }
    block::<M>(x, w, rows, k, out, stride);
}

/// [`block`] with AVX2 fused multiply-adds: lanes `0..8` and `8..16` are two vectors, added
/// together before the horizontal sum.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_avx2<const M: usize>(x: &[f32], w: &[f32], rows: usize, k: usize, out: &mut [f32], stride: usize) {
    use std::arch::x86_64::*;
    let full = k / LANES * LANES;
    for j in 0..rows {
        let wr = &w[j * k..(j + 1) * k];
        let (wp, xp) = (wr.as_ptr(), x.as_ptr());
        let mut a0 = [_mm256_setzero_ps(); M];
        let mut a1 = [_mm256_setzero_ps(); M];
        let mut i = 0;
        while i < full {
            // SAFETY: i + 16 <= full <= k; wr has k elements, x has M rows of k.
            unsafe {
                let w0 = _mm256_loadu_ps(wp.add(i));
                let w1 = _mm256_loadu_ps(wp.add(i + 8));
                for r in 0..M {
                    let xr = xp.add(r * k + i);
                    a0[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), a0[r]);
                    a1[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr.add(8)), a1[r]);
                }
            }
            i += LANES;
        }
        for r in 0..M {
            let mut lanes = [0f32; 8];
            // SAFETY: `lanes` holds 8 floats.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(a0[r], a1[r])) };
            let mut s = 0f32;
            for v in lanes {
                s += v;
            }
            for t in full..k {
                s += wr[t] * x[r * k + t];
            }
            out[j * stride + r] = s;
        }
    }
}

/// `out[j * stride + r] = dot(w[j], x[r])` in a fixed summation order: lane `l` sums elements
/// `l, l + LANES, ...`, lanes `l` and `l + 8` are added, then those eight in order, then the
/// tail.
fn block<const M: usize>(x: &[f32], w: &[f32], rows: usize, k: usize, out: &mut [f32], stride: usize) {
    let full = k / LANES * LANES;
    for j in 0..rows {
        let wr = &w[j * k..(j + 1) * k];
        for r in 0..M {
            let xr = &x[r * k..(r + 1) * k];
            let mut acc = [0f32; LANES];
            for (wc, xc) in wr[..full].chunks_exact(LANES).zip(xr[..full].chunks_exact(LANES)) {
                for l in 0..LANES {
                    acc[l] += wc[l] * xc[l];
                }
            }
            let mut s = 0f32;
            for l in 0..8 {
                s += acc[l] + acc[l + 8];
            }
            for t in full..k {
                s += wr[t] * xr[t];
            }
            out[j * stride + r] = s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0f64; m * n];
        for r in 0..m {
            for j in 0..n {
                y[r * n + j] = (0..k).map(|i| x[r * k + i] as f64 * w[j * k + i] as f64).sum();
            }
        }
        y.into_iter().map(|v| v as f32).collect()
    }

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len as u32).map(|i| ((i.wrapping_mul(2654435761) ^ seed) % 2001) as f32 / 1000.0 - 1.0).collect()
    }

    #[test]
    fn matches_a_float64_product() {
        // k with and without a tail; n not a multiple of the chunk.
        for &(m, n, k) in &[(1, 70, 64), (2, 33, 100), (3, 129, 1024), (8, 65, 37), (5, 1, 16), (7, 40, 48)] {
            let x = data(m * k, 1);
            let w = data(n * k, 2);
            let got = matmul_wt(&x, m, &w, n, k);
            let want = naive(&x, m, &w, n, k);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{m}x{n}x{k}: {g} vs {w}");
            }
        }
    }

    #[test]
    fn a_row_does_not_depend_on_the_other_rows() {
        let (n, k) = (96, 300);
        let w = data(n * k, 3);
        let x = data(MAX_ROWS * k, 4);
        let alone: Vec<Vec<f32>> = (0..MAX_ROWS).map(|r| matmul_wt(&x[r * k..(r + 1) * k], 1, &w, n, k)).collect();
        for m in 2..=MAX_ROWS {
            let all = matmul_wt(&x[..m * k], m, &w, n, k);
            for (r, row) in alone.iter().take(m).enumerate() {
                assert_eq!(&all[r * n..(r + 1) * n], &row[..], "row {r} changed with {m} rows");
            }
        }
    }
}
