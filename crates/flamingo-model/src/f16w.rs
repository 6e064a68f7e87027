//! Linear weights in f16, computed in f32 on the CPU: half the bytes of f32 per decode step,
//! converted to f32 as they are loaded (F16C's `vcvtph2ps`), with f32 inputs, products and
//! sums.
//!
//! As in [`crate::q8`], rows are stored in groups of [`ROWS`], interleaved by runs of 8 (the
//! first 8 values of rows 0-3, then the next 8 of rows 0-3, ...), so that a tile of four rows is
//! one sequential stream and keeps four independent accumulators per input row. (Stored row
//! after row, a one-row tile has a single chain of dependent multiply-adds, and a six-row tile
//! reads six streams a row apart: both reached only 55-59% of the bandwidth roofline on the
//! mid-size bench model, against 74-81% for f32.) Every output is summed in the same order
//! whatever the number of rows, as in [`crate::skinny`].

use half::f16;
use rayon::prelude::*;

/// Weight rows stored interleaved (the tile height).
pub const ROWS: usize = 4;

/// Values per run (one 8-lane vector).
const LANES: usize = 8;

/// Input rows per group (the widest tile: 4 x 2 accumulators and 4 weight vectors fit AVX2's
/// 16 registers).
const GROUP: usize = 2;

/// Weight bytes per parallel task, about (see [`crate::q8`]).
const TASK_BYTES: usize = 192 * 1024;

/// A `[n, k]` weight in f16, `k` a multiple of 8, rows in groups of [`ROWS`] (the last padded
/// with zero rows): run `b` of row `r` of group `g` is at `v[((g * k / 8 + b) * ROWS + r) * 8..]`.
#[derive(Debug, Clone)]
pub struct F16Matrix {
    n: usize,
    k: usize,
    v: Vec<f16>,
}

impl F16Matrix {
    /// Rounds a row-major `[n, k]` f32 matrix to f16; `None` when `k` is not a multiple of 8 or
    /// `w` is not `n * k` long.
    pub fn from_f32(w: &[f32], n: usize, k: usize) -> Option<Self> {
        if !k.is_multiple_of(LANES) || w.len() != n.checked_mul(k)? {
            return None;
        }
        let mut v = vec![f16::ZERO; n.div_ceil(ROWS) * ROWS * k];
        if k > 0 && n > 0 {
            v.par_chunks_mut(ROWS * k).zip(w.par_chunks(ROWS * k)).for_each(|(dst, src)| {
                for (r, row) in src.chunks_exact(k).enumerate() {
                    for (b, run) in row.chunks_exact(LANES).enumerate() {
                        for (o, &x) in dst[(b * ROWS + r) * LANES..][..LANES].iter_mut().zip(run) {
                            *o = f16::from_f32(x);
                        }
                    }
                }
            });
        }
        Some(Self { n, k, v })
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Bytes held (what a decode step reads).
    pub fn bytes(&self) -> usize {
        2 * self.v.len()
    }

    /// The weights as f32, row-major `[n, k]`.
    pub fn to_f32(&self) -> Vec<f32> {
        let (n, k, runs) = (self.n, self.k, self.k / LANES);
        let mut out = vec![0f32; n * k];
        for (j, row) in out.chunks_exact_mut(k.max(1)).enumerate() {
            let (g, r) = (j / ROWS, j % ROWS);
            for (b, o) in row.chunks_exact_mut(LANES).enumerate() {
                for (o, x) in o.iter_mut().zip(&self.v[((g * runs + b) * ROWS + r) * LANES..][..LANES]) {
                    *o = x.to_f32();
                }
            }
        }
        out
    }

    /// `y = x · Wᵀ` for `x: [m, k]` row-major, returned as `[m, n]`. Panics if `x` is shorter
    /// than `m * k`.
    pub fn matmul_wt(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        assert!(x.len() >= m * k);
        let mut y = vec![0f32; m * n];
        if n == 0 || m == 0 || k == 0 {
            return y;
        }
        let x = &x[..m * k];
        let avx2 = crate::skinny::has_avx2_fma();
        let chunk = (TASK_BYTES / (2 * k)).max(48) / ROWS * ROWS;
        let mut parts = crate::skinny::column_parts(&mut y, n, m, chunk);
        parts.par_chunks_mut(m).enumerate().for_each(|(c, out)| {
            let first = c * chunk;
            let rows = out[0].len();
            let w = &self.v[first * k..(first + rows.div_ceil(ROWS) * ROWS) * k];
            for g in 0..rows.div_ceil(ROWS) {
                let wt = &w[g * ROWS * k..(g + 1) * ROWS * k];
                let (j, valid) = (g * ROWS, (rows - g * ROWS).min(ROWS));
                let mut r = 0;
                while r < m {
                    let b = (m - r).min(GROUP);
                    let xg = &x[r * k..(r + b) * k];
                    let dst = &mut out[r..r + b];
                    match b {
                        1 => crate::skinny::put_group(dst, j, valid, tile::<1>(avx2, xg, wt, k)),
                        _ => crate::skinny::put_group(dst, j, valid, tile::<GROUP>(avx2, xg, wt, k)),
                    }
                    r += b;
                }
            }
        });
        y
    }
}

/// Dot products of a group's rows with `B` input rows of `k`.
#[inline(always)]
fn tile<const B: usize>(avx2: bool, x: &[f32], w: &[f16], k: usize) -> [[f32; B]; ROWS] {
    assert!(x.len() >= B * k && w.len() >= ROWS * k && k.is_multiple_of(LANES));
    #[cfg(target_arch = "x86_64")]
    {
        if avx2 {
            // SAFETY: `avx2` is true only when the CPU has AVX2, FMA and F16C; the slices
            // hold the rows (checked above).
            return unsafe { tile_avx2::<B>(x, w, k) };
        }
    }
    let _ = avx2;
    tile_portable::<B>(x, w, k)
}

/// Lane `l` of each pair sums the products of elements `l, l + 8, ...` (multiply and add
/// separate here, fused in [`tile_avx2`]), then [`finish`].
fn tile_portable<const B: usize>(x: &[f32], w: &[f16], k: usize) -> [[f32; B]; ROWS] {
    let mut out = [[0f32; B]; ROWS];
    for (a, row) in out.iter_mut().enumerate() {
        for (b, o) in row.iter_mut().enumerate() {
            let mut lanes = [0f32; LANES];
            for run in 0..k / LANES {
                let wr = &w[(run * ROWS + a) * LANES..][..LANES];
                let xr = &x[b * k + run * LANES..][..LANES];
                for l in 0..LANES {
                    lanes[l] += wr[l].to_f32() * xr[l];
                }
            }
            *o = finish(&lanes);
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)]
unsafe fn tile_avx2<const B: usize>(x: &[f32], w: &[f16], k: usize) -> [[f32; B]; ROWS] {
    use std::arch::x86_64::*;
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    let mut acc = [[_mm256_setzero_ps(); B]; ROWS];
    for run in 0..k / LANES {
        // SAFETY: run < k / 8, and the caller checked that w holds a group of k-long rows and
        // x holds B rows of k.
        unsafe {
            let mut wv = [_mm256_setzero_ps(); ROWS];
            for (a, v) in wv.iter_mut().enumerate() {
                *v = _mm256_cvtph_ps(_mm_loadu_si128(wp.add((run * ROWS + a) * LANES) as *const __m128i));
            }
            for b in 0..B {
                let xv = _mm256_loadu_ps(xp.add(b * k + run * LANES));
                for a in 0..ROWS {
                    acc[a][b] = _mm256_fmadd_ps(wv[a], xv, acc[a][b]);
                }
            }
        }
    }
    let mut out = [[0f32; B]; ROWS];
    for a in 0..ROWS {
        for b in 0..B {
            let mut lanes = [0f32; LANES];
            // SAFETY: `lanes` holds 8 floats.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[a][b]) };
            out[a][b] = finish(&lanes);
        }
    }
    out
}

/// Adds the lanes in a fixed tree.
#[inline(always)]
fn finish(l: &[f32; LANES]) -> f32 {
    let q = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    (q[0] + q[2]) + (q[1] + q[3])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len as u32).map(|i| ((i.wrapping_mul(2654435761) ^ seed) % 2001) as f32 / 1000.0 - 1.0).collect()
    }

    #[test]
    fn matches_the_product_of_the_rounded_weights() {
        for &(m, n, k) in &[(1, 70, 64), (2, 33, 96), (3, 129, 1024), (5, 1, 8), (13, 97, 40), (33, 9, 16)] {
            let w = data(n * k, 2);
            let x = data(m * k, 1);
            let h = F16Matrix::from_f32(&w, n, k).expect("converts");
            let wide = h.to_f32();
            assert!(wide.iter().zip(&w).all(|(a, b)| *a == f16::from_f32(*b).to_f32()));
            let got = h.matmul_wt(&x, m);
            for r in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k).map(|i| x[r * k + i] as f64 * wide[j * k + i] as f64).sum();
                    let g = got[r * n + j];
                    assert!((g as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()), "{m}x{n}x{k}: {g} vs {want}");
                }
            }
            // The portable path sums in the same lanes (unfused): equal to f32 rounding.
            let x1 = &x[..k];
            let fast = tile::<1>(crate::skinny::has_avx2_fma(), x1, &h.v[..ROWS * k], k);
            let slow = tile_portable::<1>(x1, &h.v[..ROWS * k], k);
            for (f, s) in fast.iter().zip(&slow) {
                assert!((f[0] - s[0]).abs() <= 1e-5 * (1.0 + s[0].abs()));
            }
        }
        assert!(F16Matrix::from_f32(&[0.0; 12], 1, 12).is_none());
    }

    #[test]
    fn a_row_does_not_depend_on_the_other_rows() {
        let (n, k) = (50, 96);
        let h = F16Matrix::from_f32(&data(n * k, 3), n, k).expect("converts");
        let x = data(40 * k, 4);
        let alone: Vec<Vec<f32>> = (0..40).map(|r| h.matmul_wt(&x[r * k..(r + 1) * k], 1)).collect();
        for m in [2, 3, 5, 32, 40] {
            let all = h.matmul_wt(&x[..m * k], m);
            for (r, row) in alone.iter().take(m).enumerate() {
                assert_eq!(&all[r * n..(r + 1) * n], &row[..], "row {r} changed with {m} rows");
            }
        }
    }
}
