//! Linear weights in 8 bits and their product with f32 rows on the CPU.
//!
//! The format is GGML's q8_0: each run of 32 weights along a row is stored as 32 signed bytes
//! `q` and one scale `d = max|w| / 127`, with `w ≈ d · q` (the scale is kept in f32 here, not
//! f16: 9 bits per weight instead of 8.5, and no conversion in the inner loop). The product
//! quantizes each input row to the same blocks, multiplies bytes by bytes and sums in 32-bit
//! integers (exact), and scales each block's sum by `d_x`, then `d_w`, into an f32 accumulator.
//!
//! Decoding is bound by reading the weights, so the kernel reads each weight block once per
//! call, in the order it is stored, and meets every input row with it while it is in L1. Rows
//! are stored in groups of [`ROWS`], block by block (block 0 of rows 0-3, block 1 of rows 0-3,
//! ...): a tile of four rows is one sequential stream. (With the rows stored one after another,
//! a tile reads four streams a row apart, and the same kernel reached half the bandwidth.) The
//! output rows are split across the thread pool, as [`crate::skinny`] does for f32. With AVX2 a
//! block's products are `vpmaddubsw` + `vpmaddwd` on the absolute weights and the
//! sign-adjusted inputs; with AVX-512 VNNI one `vpdpbusd` gives the same (exact) sums. Every
//! output is accumulated in the same order whatever the number of rows, so a sequence's
//! activations do not depend on which other sequences share the step.

use rayon::prelude::*;

/// Weights per block.
pub const BLOCK: usize = 32;

/// Weight rows stored interleaved block by block (the tile height).
pub const ROWS: usize = 4;

/// Weight bytes per parallel task, about: each task starts a new stream, and the hardware
/// prefetcher needs a run of pages to get ahead of it.
const TASK_BYTES: usize = 192 * 1024;

/// Output rows per parallel task: about [`TASK_BYTES`] of weights, whole groups, at least 48.
fn chunk_rows(k: usize) -> usize {
    (TASK_BYTES / k.max(1)).max(48) / ROWS * ROWS
}

/// Input rows per group (the widest tile).
const GROUP: usize = 4;

/// Input rows quantized and multiplied per pass (their bytes stay in L2 while the weights
/// stream past).
const PASS: usize = 256;

/// A `[n, k]` weight in q8_0 blocks. The bytes are stored offset by 128 (`q + 128` as `u8`):
/// `vpdpbusd` multiplies unsigned by signed bytes, and the offset's contribution (`128 · Σx`
/// per lane) is taken off with a correction computed once per input row. Rows are stored in
/// groups of [`ROWS`] (the last padded with zero rows): group `g`'s block `b` of row `r` is at
/// `qs[(g * nb + b) * ROWS * 32 + r * 32..]`, its scale at `d[(g * nb + b) * ROWS + r]`.
#[derive(Debug, Clone)]
pub struct Q8Matrix {
    n: usize,
    k: usize,
    qs: Vec<u8>,
    d: Vec<f32>,
}

impl Q8Matrix {
    /// Quantizes a row-major `[n, k]` matrix; `None` when `k` is not a multiple of [`BLOCK`] or
    /// `w` is not `n * k` long.
    pub fn quantize(w: &[f32], n: usize, k: usize) -> Option<Self> {
        if !k.is_multiple_of(BLOCK) || w.len() != n.checked_mul(k)? {
            return None;
        }
        let nb = k / BLOCK;
        let groups = n.div_ceil(ROWS);
        let mut qs = vec![0x80u8; groups * ROWS * k];
        let mut d = vec![0f32; groups * ROWS * nb];
        if k > 0 && n > 0 {
            qs.par_chunks_mut(ROWS * k).zip(d.par_chunks_mut(ROWS * nb)).zip(w.par_chunks(ROWS * k)).for_each(|((q, d), w)| {
                let mut signed = vec![0i8; k];
                let mut scales = vec![0f32; nb];
                for (r, row) in w.chunks_exact(k).enumerate() {
                    quantize_row(row, &mut signed, &mut scales);
                    for (b, (s, blk)) in scales.iter().zip(signed.chunks_exact(BLOCK)).enumerate() {
                        d[b * ROWS + r] = *s;
                        for (o, v) in q[(b * ROWS + r) * BLOCK..][..BLOCK].iter_mut().zip(blk) {
                            *o = (*v as u8) ^ 0x80;
                        }
                    }
                }
            });
        }
        Some(Self { n, k, qs, d })
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Bytes held (what a decode step reads).
    pub fn bytes(&self) -> usize {
        self.qs.len() + 4 * self.d.len()
    }

    /// The weights as f32 (`d · q`), row-major `[n, k]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let (n, k, nb) = (self.n, self.k, self.k / BLOCK);
        let mut out = vec![0f32; n * k];
        for (j, row) in out.chunks_exact_mut(k.max(1)).enumerate() {
            let (g, r) = (j / ROWS, j % ROWS);
            for (b, o) in row.chunks_exact_mut(BLOCK).enumerate() {
                let at = (g * nb + b) * ROWS + r;
                for (o, &q) in o.iter_mut().zip(&self.qs[at * BLOCK..][..BLOCK]) {
                    *o = self.d[at] * (q as i32 - 128) as f32;
                }
            }
        }
        out
    }

    /// `y = x · Wᵀ` for `x: [m, k]` row-major, returned as `[m, n]`. Panics if `x` is shorter
    /// than `m * k` (callers check the shapes).
    pub fn matmul_wt(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        assert!(x.len() >= m * k);
        let mut y = vec![0f32; m * n];
        if n == 0 || m == 0 || k == 0 {
            return y;
        }
        let nb = k / BLOCK;
        let kernel = Kernel::detect();
        for (xs, ys) in x[..m * k].chunks(PASS * k).zip(y.chunks_mut(PASS * n)) {
            let rows = ys.len() / n;
            let inputs = Inputs::quantize(xs, rows, k);
            let x = inputs.rows();
            let chunk = chunk_rows(k);
            let mut parts = crate::skinny::column_parts(ys, n, rows, chunk);
            parts.par_chunks_mut(rows).enumerate().for_each(|(c, out)| {
                let first = c * chunk;
                let len = out[0].len();
                let padded = len.div_ceil(ROWS) * ROWS;
                let w = WRows { q: &self.qs[first * k..(first + padded) * k], d: &self.d[first * nb..(first + padded) * nb], k };
                tiles(kernel, &x, rows, &w, len, out);
            });
        }
        y
    }
}

/// Input rows in q8_0 blocks (signed bytes), with each block's offset correction: lane `l`
/// (bytes `4l..4l + 4`) holds `-128 · Σ q` over its four bytes.
struct Inputs {
    q: Vec<i8>,
    d: Vec<f32>,
    c: Vec<i32>,
    k: usize,
}

impl Inputs {
    fn quantize(x: &[f32], rows: usize, k: usize) -> Self {
        let nb = k / BLOCK;
        let mut q = vec![0i8; rows * k];
        let mut d = vec![0f32; rows * nb];
        let mut c = vec![0i32; rows * nb * 8];
        let work = q.chunks_mut(k).zip(d.chunks_mut(nb)).zip(c.chunks_mut(nb * 8)).zip(x.chunks(k));
        if rows > 1 {
            work.par_bridge().for_each(|(((q, d), c), x)| Self::row(x, q, d, c));
        } else {
            work.for_each(|(((q, d), c), x)| Self::row(x, q, d, c));
        }
        Self { q, d, c, k }
    }

    /// One row's blocks and corrections.
    fn row(x: &[f32], q: &mut [i8], d: &mut [f32], c: &mut [i32]) {
        quantize_row(x, q, d);
        for (c, q) in c.chunks_exact_mut(8).zip(q.chunks_exact(BLOCK)) {
            for (l, c) in c.iter_mut().enumerate() {
                *c = -128 * q[4 * l..4 * l + 4].iter().map(|&v| v as i32).sum::<i32>();
            }
        }
    }

    fn rows(&self) -> XRows<'_> {
        XRows { q: &self.q, d: &self.d, c: &self.c, k: self.k }
    }
}

/// q8_0 blocks of one row: `d[i] = max|src[32i..32i+32]| / 127`, `q = round(src / d)` (ties to
/// even). Compiled with AVX2 when the CPU has it (the same values either way).
fn quantize_row(src: &[f32], q: &mut [i8], d: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(src: &[f32], q: &mut [i8], d: &mut [f32]) {
            quantize_row_impl(src, q, d)
        }
        if crate::skinny::has_avx2_fma() {
            // SAFETY: the CPU has the features `avx2` is compiled for.
            unsafe { avx2(src, q, d) };
            return;
        }
    }
    quantize_row_impl(src, q, d)
}

#[inline(always)]
fn quantize_row_impl(src: &[f32], q: &mut [i8], d: &mut [f32]) {
    for ((s, q), d) in src.chunks_exact(BLOCK).zip(q.chunks_exact_mut(BLOCK)).zip(d.iter_mut()) {
        let amax = s.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
        for (q, &v) in q.iter_mut().zip(s) {
            // `as` saturates (and maps NaN to 0); |v · inv| <= 127 for finite rows.
            *q = (v * inv).round_ties_even() as i8;
        }
        *d = scale;
    }
}

/// Whole groups of weight rows in the stored layout (see [`Q8Matrix`]).
struct WRows<'a> {
    q: &'a [u8],
    d: &'a [f32],
    k: usize,
}

/// Input rows: signed bytes, scales and offset corrections (see [`Inputs`]).
struct XRows<'a> {
    q: &'a [i8],
    d: &'a [f32],
    c: &'a [i32],
    k: usize,
}

impl WRows<'_> {
    /// Group `g`.
    fn group(&self, g: usize) -> WRows<'_> {
        let (k, nb) = (self.k, self.k / BLOCK);
        WRows { q: &self.q[g * ROWS * k..(g + 1) * ROWS * k], d: &self.d[g * ROWS * nb..(g + 1) * ROWS * nb], k }
    }
}

impl XRows<'_> {
    fn slice(&self, first: usize, count: usize) -> XRows<'_> {
        let (k, nb) = (self.k, self.k / BLOCK);
        XRows {
            q: &self.q[first * k..(first + count) * k],
            d: &self.d[first * nb..(first + count) * nb],
            c: &self.c[first * nb * 8..(first + count) * nb * 8],
            k,
        }
    }
}

/// The instruction set the tiles run with.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Vnni,
}

impl Kernel {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if crate::skinny::has_avx2_fma() {
                if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl") {
                    return Self::Vnni;
                }
                return Self::Avx2;
            }
        }
        Self::Portable
    }
}

/// `out[r][j] = dot(w[j], x[r])` for `j < rows`, `r < m`: one group of [`ROWS`] weight rows
/// at a time, each against the rows of `x` in groups of up to [`GROUP`].
fn tiles(kernel: Kernel, x: &XRows, m: usize, w: &WRows, rows: usize, out: &mut [&mut [f32]]) {
    assert!(out.len() == m && out.iter().all(|o| o.len() >= rows));
    for g in 0..rows.div_ceil(ROWS) {
        let (wt, j) = (w.group(g), g * ROWS);
        let valid = (rows - j).min(ROWS);
        let mut first = 0;
        while first < m {
            let b = (m - first).min(GROUP);
            let xg = x.slice(first, b);
            let dst = &mut out[first..first + b];
            match b {
                1 => crate::skinny::put_group(dst, j, valid, tile::<1>(kernel, &xg, &wt)),
                2 => crate::skinny::put_group(dst, j, valid, tile::<2>(kernel, &xg, &wt)),
                3 => crate::skinny::put_group(dst, j, valid, tile::<3>(kernel, &xg, &wt)),
                _ => crate::skinny::put_group(dst, j, valid, tile::<GROUP>(kernel, &xg, &wt)),
            }
            first += b;
        }
    }
}

/// Dot products of a group's [`ROWS`] weight rows with the `B` input rows.
#[inline(always)]
fn tile<const B: usize>(kernel: Kernel, x: &XRows, w: &WRows) -> [[f32; B]; ROWS] {
    let (k, nb) = (w.k, w.k / BLOCK);
    assert!(
        x.k == k && x.q.len() >= B * k && w.q.len() >= ROWS * k && x.d.len() >= B * nb && w.d.len() >= ROWS * nb && x.c.len() >= B * nb * 8
    );
    match kernel {
        // SAFETY: the variant is chosen only when the CPU has its features; the slices hold
        // a group and `B` rows (checked above).
        #[cfg(target_arch = "x86_64")]
        Kernel::Vnni => unsafe { x86::tile_vnni::<B>(x, w) },
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => unsafe { x86::tile_avx2::<B>(x, w) },
        Kernel::Portable => tile_portable::<B>(x, w),
    }
}

/// The same sums without SIMD: lane `l` of each block is the exact integer dot product of its
/// bytes `4l..4l + 4`, times `d_x`, times `d_w`, added to the pair's lane (multiply and add
/// separate here, fused in the vector code), then [`finish`].
fn tile_portable<const B: usize>(x: &XRows, w: &WRows) -> [[f32; B]; ROWS] {
    let (k, nb) = (w.k, w.k / BLOCK);
    let mut out = [[0f32; B]; ROWS];
    for (a, row) in out.iter_mut().enumerate() {
        for (b, o) in row.iter_mut().enumerate() {
            let mut lanes = [0f32; 8];
            for blk in 0..nb {
                let at = blk * ROWS + a;
                let wq = &w.q[at * BLOCK..][..BLOCK];
                let xq = &x.q[b * k + blk * BLOCK..][..BLOCK];
                let (dw, dx) = (w.d[at], x.d[b * nb + blk]);
                for (l, lane) in lanes.iter_mut().enumerate() {
                    let p: i32 = (4 * l..4 * l + 4).map(|i| (wq[i] as i32 - 128) * xq[i] as i32).sum();
                    *lane += (p as f32 * dx) * dw;
                }
            }
            *o = finish(&lanes);
        }
    }
    out
}

/// Adds the 8 lanes in a fixed tree.
#[inline(always)]
fn finish(l: &[f32; 8]) -> f32 {
    let q = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    (q[0] + q[2]) + (q[1] + q[3])
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{finish, WRows, XRows, BLOCK, ROWS};
    use std::arch::x86_64::*;

    /// The tile body. Per block, `$prep(wu)` prepares a weight row's offset bytes (once per
    /// tile row) and `$dot(w, xv, c)` gives the eight exact 32-bit sums of four signed byte
    /// products each (`c` is the input's offset correction); each sum is scaled by `d_x`, then
    /// added times `d_w` to the pair's accumulator. (Macro arguments, not closures: a closure
    /// does not inherit the function's target features and is not inlined.)
    macro_rules! tile_body {
        ($x:ident, $wr:ident, |$wu:ident| $prep:expr, |$wv:ident, $xv:ident, $c:ident| $dot:expr) => {{
            let (k, nb) = ($wr.k, $wr.k / BLOCK);
            let (wq, xq, wd, xd, xc) = ($wr.q.as_ptr(), $x.q.as_ptr(), $wr.d.as_ptr(), $x.d.as_ptr(), $x.c.as_ptr());
            let mut acc = [[_mm256_setzero_ps(); B]; ROWS];
            for blk in 0..nb {
                // SAFETY (all pointer reads): blk < nb and the caller checked that the slices
                // hold a group of `ROWS` rows and `B` rows of `k` bytes, `nb` scales each and
                // `8 nb` corrections.
                let mut wv = [_mm256_setzero_si256(); ROWS];
                let mut dw = [_mm256_setzero_ps(); ROWS];
                for a in 0..ROWS {
                    let $wu = unsafe { _mm256_loadu_si256(wq.add((blk * ROWS + a) * BLOCK) as *const __m256i) };
                    wv[a] = $prep;
                    dw[a] = _mm256_set1_ps(unsafe { *wd.add(blk * ROWS + a) });
                }
                for b in 0..B {
                    let $xv = unsafe { _mm256_loadu_si256(xq.add(b * k + blk * BLOCK) as *const __m256i) };
                    let dx = _mm256_set1_ps(unsafe { *xd.add(b * nb + blk) });
                    let $c = unsafe { _mm256_loadu_si256(xc.add((b * nb + blk) * 8) as *const __m256i) };
                    for a in 0..ROWS {
                        let $wv = wv[a];
                        let p = $dot;
                        let t = _mm256_mul_ps(_mm256_cvtepi32_ps(p), dx);
                        acc[a][b] = _mm256_fmadd_ps(t, dw[a], acc[a][b]);
                    }
                }
            }
            let mut out = [[0f32; B]; ROWS];
            for a in 0..ROWS {
                for b in 0..B {
                    let mut lanes = [0f32; 8];
                    // SAFETY: `lanes` holds 8 floats.
                    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[a][b]) };
                    out[a][b] = finish(&lanes);
                }
            }
            out
        }};
    }

    /// AVX2: the weight bytes back to signed (`xor 0x80`), then `vpmaddubsw` on |w| and
    /// sign(x, w) (pairs of at most 2·128·127, no saturation) and `vpmaddwd` with ones.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::needless_range_loop)]
    pub(super) unsafe fn tile_avx2<const B: usize>(x: &XRows, w: &WRows) -> [[f32; B]; ROWS] {
        let (ones, flip) = (_mm256_set1_epi16(1), _mm256_set1_epi8(-128));
        tile_body!(x, w, |wu| _mm256_xor_si256(wu, flip), |wv, xv, c| {
            let _ = c;
            let p = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
            _mm256_madd_epi16(p, ones)
        })
    }

    /// AVX-512 VNNI on 256-bit registers: `vpdpbusd` of the offset bytes with the signed
    /// inputs, starting from the correction, gives the same integers as the AVX2 path in one
    /// instruction.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512vnni")]
    #[allow(clippy::needless_range_loop)]
    pub(super) unsafe fn tile_vnni<const B: usize>(x: &XRows, w: &WRows) -> [[f32; B]; ROWS] {
        tile_body!(x, w, |wu| wu, |wv, xv, c| _mm256_dpbusd_epi32(c, wv, xv))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len as u32).map(|i| ((i.wrapping_mul(2654435761) ^ seed) % 2001) as f32 / 1000.0 - 1.0).collect()
    }

    /// The product of the dequantized weights with the dequantized inputs, in f64: what the
    /// kernel computes up to f32 rounding.
    fn reference(q: &Q8Matrix, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = q.dims();
        let w = q.dequantize();
        let xs: Vec<f32> = x.chunks(k).flat_map(|r| Q8Matrix::quantize(r, 1, k).map(|q| q.dequantize()).unwrap_or_default()).collect();
        let mut y = vec![0f32; m * n];
        for r in 0..m {
            for j in 0..n {
                y[r * n + j] = (0..k).map(|i| xs[r * k + i] as f64 * w[j * k + i] as f64).sum::<f64>() as f32;
            }
        }
        y
    }

    #[test]
    fn quantize_rounds_to_blocks_of_32() {
        let mut w = vec![0f32; 64];
        w[0] = 1.27;
        w[1] = -0.5;
        w[2] = 0.004; // below half a step: 0
        w[40] = -3.0; // second block: scale 3/127
        let q = Q8Matrix::quantize(&w, 1, 64).expect("quantizes");
        assert_eq!(q.d.len(), 2 * ROWS);
        assert!((q.d[0] - 0.01).abs() < 1e-7 && (q.d[ROWS] - 3.0 / 127.0).abs() < 1e-7);
        // Stored offset by 128, the one row padded to a group of ROWS with zero rows; block 1
        // of row 0 follows block 0 of every row of the group.
        assert_eq!(&q.qs[..3], &[255, 78, 128]);
        assert!(q.qs[3..ROWS * BLOCK].iter().all(|&v| v == 128));
        let second = &q.qs[ROWS * BLOCK..(ROWS + 1) * BLOCK];
        assert_eq!(second[8], 1);
        assert!(second.iter().enumerate().all(|(i, &v)| i == 8 || v == 128));
        assert_eq!(q.dequantize().len(), 64);
        assert!(Q8Matrix::quantize(&w[..48], 1, 48).is_none(), "k not a multiple of 32");
        assert!(Q8Matrix::quantize(&w, 2, 64).is_none(), "wrong length");
    }

    #[test]
    fn every_kernel_matches_the_dequantized_product() {
        let mut kernels = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if crate::skinny::has_avx2_fma() {
                kernels.push(Kernel::Avx2);
            }
            if Kernel::detect() == Kernel::Vnni {
                kernels.push(Kernel::Vnni);
            }
        }
        for &(m, n, k) in &[(1, 70, 64), (2, 33, 96), (3, 129, 1024), (8, 65, 32), (5, 1, 256), (13, 97, 128), (40, 50, 64)] {
            let w = data(n * k, 2);
            let x = data(m * k, 1);
            let q = Q8Matrix::quantize(&w, n, k).expect("quantizes");
            let want = reference(&q, &x, m);
            let got = q.matmul_wt(&x, m);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{m}x{n}x{k}: {g} vs {w}");
            }
            // Each instruction set gives the same sums up to f32 rounding (the vector paths fuse
            // the multiply-add; AVX2 and VNNI give the same bits).
            let inputs = Inputs::quantize(&x, m, k);
            let (xr, wr) = (inputs.rows(), WRows { q: &q.qs, d: &q.d, k });
            let firsts: Vec<[[f32; 1]; ROWS]> = kernels.iter().map(|&kn| tile::<1>(kn, &xr, &wr.group(0))).collect();
            for f in &firsts {
                for (a, v) in f.iter().enumerate() {
                    assert!((v[0] - firsts[0][a][0]).abs() <= 1e-5 * (1.0 + v[0].abs()), "{firsts:?}");
                }
            }
            if kernels.len() == 3 {
                assert_eq!(firsts[1], firsts[2], "AVX2 and VNNI sums differ");
            }
        }
    }

    #[test]
    fn a_row_does_not_depend_on_the_other_rows() {
        let (n, k) = (96, 320);
        let q = Q8Matrix::quantize(&data(n * k, 3), n, k).expect("quantizes");
        let rows = 40;
        let x = data(rows * k, 4);
        let alone: Vec<Vec<f32>> = (0..rows).map(|r| q.matmul_wt(&x[r * k..(r + 1) * k], 1)).collect();
        for m in [2, 3, 5, 16, 32, 40] {
            let all = q.matmul_wt(&x[..m * k], m);
            for (r, row) in alone.iter().take(m).enumerate() {
                assert_eq!(&all[r * n..(r + 1) * n], &row[..], "row {r} changed with {m} rows");
            }
        }
    }

    #[test]
    fn close_to_the_float_product() {
        // Quantization error only: ~0.3% of the output's scale for Gaussian-like rows.
        let (m, n, k) = (4, 64, 512);
        let w = data(n * k, 5);
        let x = data(m * k, 6);
        let q = Q8Matrix::quantize(&w, n, k).expect("quantizes");
        let got = q.matmul_wt(&x, m);
        let exact = crate::skinny::matmul_wt(&x, m, &w, n, k);
        let rms = |v: &[f32]| (v.iter().map(|a| (*a as f64).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
        let err: Vec<f32> = got.iter().zip(&exact).map(|(a, b)| a - b).collect();
        assert!(rms(&err) < 0.01 * rms(&exact), "rms error {} of {}", rms(&err), rms(&exact));
    }
}
