//! `x · Wᵀ` for a few rows on the CPU (a decode step of a few sequences, or the short prefill
//! chunk of a prefix-cache hit).
//!
//! With `W` stored `[out, in]` (PyTorch's layout), each output is a dot product of a row of `x`
//! with a row of `W`. For a few rows the product is bound by reading `W` from memory, and a
//! general GEMM spends much of its time packing operands: on this project's 2-core machine
//! candle's gemm takes twice as long for 2-3 rows as for one (BENCHMARKS.md). This kernel reads
//! each weight row once, computes its dot products with every row of `x` (which stays in cache),
//! and splits the output rows across the thread pool. Tiles of 3 weight rows by up to 4 rows of
//! `x` keep 12 accumulators in AVX2 registers, so for 8-32 rows, where the product becomes
//! compute-bound, it still does not pack `W`; there the next tile's weights are prefetched while
//! the current one meets every group of rows (at 16 rows, from memory, 0.67-0.82x the time of
//! candle's gemm; BENCHMARKS.md).
//!
//! Each output is summed in the same order whatever the number of rows, so in steps of up to
//! [`MAX_ROWS`] rows a sequence's activations do not depend on which other sequences share the
//! step.

use rayon::prelude::*;

/// Most rows this kernel handles; more go to the general GEMM.
pub const MAX_ROWS: usize = 32;

/// Partial sums per dot product (one 8-lane vector).
const LANES: usize = 8;

/// Output rows (rows of `W`) per parallel task, a multiple of every tile height below.
const CHUNK: usize = 48;

/// Rows of `x` per group (the widest tile).
const GROUP: usize = 4;

/// With two or more groups of `x` rows, each tile prefetches the weights of the tile this many
/// tiles ahead, spread over its group passes. Hardware prefetch does not run ahead into the next
/// tile's rows (new pages), so without it each tile's first pass waits for memory while the
/// others only compute, and the time is close to the sum of the two. With it the weight stream
/// overlaps the computation: 16-sequence decode 180/179 -> 201/202 tokens/s on the mid-size
/// bench model (1 tile ahead; 2 and 4 tiles gave less: 191-197 and 188-195).
const PREFETCH_AHEAD: usize = 1;

/// `y = x · wᵀ` with `x: [m, k]`, `w: [n, k]` (row-major), returned as `[m, n]`.
///
/// Panics if the slices are shorter than the shapes say, or `m` is 0 or above [`MAX_ROWS`]
/// (callers check the shapes).
pub fn matmul_wt(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
    assert!((1..=MAX_ROWS).contains(&m) && x.len() >= m * k && w.len() >= n * k);
    let mut y = vec![0f32; m * n];
    if n == 0 {
        return y;
    }
    let mut parts = column_parts(&mut y, n, m, CHUNK);
    let avx2 = has_avx2_fma();
    parts.par_chunks_mut(m).enumerate().for_each(|(c, out)| {
        let first = c * CHUNK;
        let rows = out[0].len();
        let w = &w[first * k..(first + rows) * k];
        // Weight rows outermost: a tile of A rows is read from memory once (one sequential
        // stream over the chunk) and meets every group of x rows while it is in L1.
        if m <= 2 {
            tiles::<6>(avx2, x, m, w, rows, k, out);
        } else {
            tiles::<3>(avx2, x, m, w, rows, k, out);
        }
    });
    y
}

/// Splits a row-major `[m, n]` output into tasks that each own the columns
/// `first..first + chunk` of every row, to be written in place (computing `[n, m]` and
/// transposing it afterwards cost a quarter of the product at 16 rows: the transpose's writes
/// are scattered over the whole output). Task-major: the pieces of task `t` are
/// `parts[t * m..(t + 1) * m]`, one per output row. `n` and `m` must be at least 1.
pub(crate) fn column_parts(y: &mut [f32], n: usize, m: usize, chunk: usize) -> Vec<&mut [f32]> {
    let mut rows: Vec<_> = y.chunks_mut(n).map(|row| row.chunks_mut(chunk)).collect();
    let mut parts: Vec<&mut [f32]> = Vec::with_capacity(n.div_ceil(chunk) * m);
    while let Some(first) = rows[0].next() {
        parts.push(first);
        parts.extend(rows[1..].iter_mut().filter_map(Iterator::next));
    }
    parts
}

/// Writes a tile of `R` weight rows by `B` input rows (see [`crate::q8`], [`crate::f16w`]):
/// its dot products with input row `b` at `dst[b][j..j + valid]` (padding rows past `valid`
/// are dropped).
#[inline(always)]
pub(crate) fn put_group<const R: usize, const B: usize>(dst: &mut [&mut [f32]], j: usize, valid: usize, d: [[f32; B]; R]) {
    for (b, row) in dst.iter_mut().enumerate().take(B) {
        for (a, col) in d.iter().enumerate().take(valid) {
            row[j + a] = col[b];
        }
    }
}

/// Whether the CPU has AVX2, FMA and F16C (every AVX2 CPU has F16C; [`crate::f16w`] needs it).
pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `out[r][j] = dot(w[j], x[r])` for `j < rows`, `r < m`: tiles of `A` weight rows (then the
/// remaining rows one at a time), each against the rows of `x` in groups of up to [`GROUP`].
fn tiles<const A: usize>(avx2: bool, x: &[f32], m: usize, w: &[f32], rows: usize, k: usize, out: &mut [&mut [f32]]) {
    assert!(x.len() >= m * k && w.len() >= rows * k && out.len() == m && out.iter().all(|o| o.len() >= rows));
    let groups = m.div_ceil(GROUP);
    let mut j = 0;
    while j < rows {
        let a = if j + A <= rows { A } else { 1 };
        let wt = &w[j * k..(j + a) * k];
        let ahead = j + PREFETCH_AHEAD * A;
        let later: &[f32] = if groups > 1 && ahead + A <= rows { &w[ahead * k..(ahead + A) * k] } else { &[] };
        let mut g = 0;
        let mut gi = 0;
        while g < m {
            let b = (m - g).min(GROUP);
            let xg = &x[g * k..(g + b) * k];
            let pf = &later[gi * later.len() / groups..(gi + 1) * later.len() / groups];
            let dst = &mut out[g..g + b];
            match (a == A, b) {
                (true, 1) => put(dst, j, tile::<A, 1>(avx2, xg, wt, k, pf)),
                (true, 2) => put(dst, j, tile::<A, 2>(avx2, xg, wt, k, pf)),
                (true, 3) => put(dst, j, tile::<A, 3>(avx2, xg, wt, k, pf)),
                (true, _) => put(dst, j, tile::<A, GROUP>(avx2, xg, wt, k, pf)),
                (false, 1) => put(dst, j, tile::<1, 1>(avx2, xg, wt, k, pf)),
                (false, 2) => put(dst, j, tile::<1, 2>(avx2, xg, wt, k, pf)),
                (false, 3) => put(dst, j, tile::<1, 3>(avx2, xg, wt, k, pf)),
                (false, _) => put(dst, j, tile::<1, GROUP>(avx2, xg, wt, k, pf)),
            }
            g += b;
            gi += 1;
        }
        j += a;
    }
}

/// Writes a tile's results: its dot products with row `b` of the group at `dst[b][j..j + A]`.
#[inline(always)]
fn put<const A: usize, const B: usize>(dst: &mut [&mut [f32]], j: usize, d: [[f32; B]; A]) {
    for (b, row) in dst.iter_mut().enumerate().take(B) {
        for (a, col) in d.iter().enumerate() {
            row[j + a] = col[b];
        }
    }
}

/// Dot products of `A` rows of `w` with `B` rows of `x` (both `k` long), prefetching `pf` on
/// the way (AVX2 path only; a hint that changes no result).
#[inline(always)]
fn tile<const A: usize, const B: usize>(avx2: bool, x: &[f32], w: &[f32], k: usize, pf: &[f32]) -> [[f32; B]; A] {
    #[cfg(target_arch = "x86_64")]
    {
        if avx2 {
            // SAFETY: `avx2` is true only when the CPU has AVX2 and FMA; the slices hold
            // `B` and `A` rows of `k` (checked by the caller).
            return unsafe { tile_avx2::<A, B>(x, w, k, pf) };
        }
    }
    let _ = (avx2, pf);
    tile_portable::<A, B>(x, w, k)
}

/// [`tile_portable`] with AVX2 fused multiply-adds: one vector of partial sums per output.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)]
unsafe fn tile_avx2<const A: usize, const B: usize>(x: &[f32], w: &[f32], k: usize, pf: &[f32]) -> [[f32; B]; A] {
    use std::arch::x86_64::*;
    let full = k / LANES * LANES;
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    let mut acc = [[_mm256_setzero_ps(); B]; A];
    // One 64-byte line of `pf` every `gap` steps (as evenly as whole steps allow).
    let lines = pf.len().div_ceil(16);
    let gap = (full / LANES / lines.max(1)).max(1);
    let (mut line, mut wait) = (0, 0);
    let mut i = 0;
    while i < full {
        if line < lines {
            if wait == 0 {
                // SAFETY: line * 16 < pf.len(); a prefetch never faults or changes memory.
                unsafe { _mm_prefetch(pf.as_ptr().add(line * 16) as *const i8, _MM_HINT_T0) };
                line += 1;
                wait = gap;
            }
            wait -= 1;
        }
        // SAFETY: i + 8 <= full <= k, and w, x hold A and B rows of k.
        unsafe {
            let mut wv = [_mm256_setzero_ps(); A];
            for (a, v) in wv.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(wp.add(a * k + i));
            }
            for b in 0..B {
                let xv = _mm256_loadu_ps(xp.add(b * k + i));
                for a in 0..A {
                    acc[a][b] = _mm256_fmadd_ps(wv[a], xv, acc[a][b]);
                }
            }
        }
        i += LANES;
    }
    let mut out = [[0f32; B]; A];
    for a in 0..A {
        for b in 0..B {
            let mut lanes = [0f32; LANES];
            // SAFETY: `lanes` holds 8 floats.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[a][b]) };
            out[a][b] = finish(&lanes, &w[a * k..(a + 1) * k], &x[b * k..(b + 1) * k], full);
        }
    }
    out
}

/// The dot products in a fixed order: lane `l` sums elements `l, l + 8, ...` (multiply and add
/// separately here; fused in [`tile_avx2`]), then [`finish`].
fn tile_portable<const A: usize, const B: usize>(x: &[f32], w: &[f32], k: usize) -> [[f32; B]; A] {
    let full = k / LANES * LANES;
    let mut out = [[0f32; B]; A];
    for a in 0..A {
        let wr = &w[a * k..(a + 1) * k];
        for b in 0..B {
            let xr = &x[b * k..(b + 1) * k];
            let mut lanes = [0f32; LANES];
            for (wc, xc) in wr[..full].chunks_exact(LANES).zip(xr[..full].chunks_exact(LANES)) {
                for l in 0..LANES {
                    lanes[l] += wc[l] * xc[l];
                }
            }
            out[a][b] = finish(&lanes, wr, xr, full);
        }
    }
    out
}

/// Adds the lanes pairwise (`(0+4) + (2+6)` ... in a fixed tree) and the tail `full..k`.
#[inline(always)]
fn finish(lanes: &[f32; LANES], w: &[f32], x: &[f32], full: usize) -> f32 {
    let q = [lanes[0] + lanes[4], lanes[1] + lanes[5], lanes[2] + lanes[6], lanes[3] + lanes[7]];
    let mut s = (q[0] + q[2]) + (q[1] + q[3]);
    for t in full..w.len().min(x.len()) {
        s += w[t] * x[t];
    }
    s
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
        for &(m, n, k) in
            &[(3, 0, 8), (1, 70, 64), (2, 33, 100), (3, 129, 1024), (8, 65, 37), (5, 1, 16), (7, 40, 48), (13, 97, 33), (32, 50, 24)]
        {
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
