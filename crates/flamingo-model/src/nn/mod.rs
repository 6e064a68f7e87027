//! Small building blocks shared by the vision tower, the Perceiver and the language models.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;
use rayon::prelude::*;

pub use candle_nn::RmsNorm;

/// `nn.Linear` with PyTorch's `[out, in]` weight layout.
///
/// On the CPU in f32, up to [`crate::skinny::MAX_ROWS`] rows (a decode step of a few sequences,
/// the short prefill chunk after a prefix-cache hit) go through [`crate::skinny`], which reads
/// each weight row once; 9..=96 rows (a larger decode batch) compute `(W · xᵀ)ᵀ`: candle's CPU
/// gemm packs the transposed weight slowly when `x` is the left operand, and with the weight on
/// the left the same product runs 1.5-3x faster at these sizes. Both measured with candle 0.11
/// on this project's 2-core machine (`examples/linear.rs`, BENCHMARKS.md).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

/// A linear layer's weight: as loaded, or quantized (8-bit blocks, see [`Quantization`]).
#[derive(Debug, Clone)]
enum Weight {
    Dense(Tensor),
    /// An f16 copy of an f32 CPU weight, computed in f32 ([`crate::f16w`]).
    F16(std::sync::Arc<crate::f16w::F16Matrix>),
    Q8(std::sync::Arc<crate::q8::Q8Matrix>),
}

/// How linear-layer weights are stored for the CPU's matmuls (chosen at load, see
/// [`quantize_linear_weights`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quantization {
    /// As loaded (f32, or the load dtype).
    #[default]
    None,
    /// f32 weights stored as f16 (half the bytes), computed in f32: each product's inputs,
    /// accumulation and outputs stay f32.
    F16,
    /// GGML's q8_0: blocks of 32 weights as 32 signed bytes and one scale (9 bits per weight
    /// here: the scale is f32); the matmul quantizes its input rows to the same blocks and
    /// accumulates in integers ([`crate::q8`]). The output head is kept in f16: in q8_0 it
    /// cost the demo model 3 points on one eval task.
    Q8_0,
    /// [`Self::Q8_0`] with the output head in q8_0 too: the fewest bytes per token.
    Q8_0Head,
}

impl Quantization {
    pub fn from_name(name: &str) -> std::result::Result<Self, String> {
        match name {
            "none" | "" => Ok(Self::None),
            "f16" => Ok(Self::F16),
            "q8_0" => Ok(Self::Q8_0),
            "q8_0_head" => Ok(Self::Q8_0Head),
            other => Err(format!("unknown quantization `{other}` (use \"none\", \"f16\", \"q8_0\" or \"q8_0_head\")")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::F16 => "f16",
            Self::Q8_0 => "q8_0",
            Self::Q8_0Head => "q8_0_head",
        }
    }

    /// Bytes per weight of a linear layer, and of the output head, in this precision (f32
    /// weights; q8_0's blocks are 36 bytes per 32 weights).
    pub fn bytes_per_weight(self) -> (f64, f64) {
        match self {
            Self::None => (4.0, 4.0),
            Self::F16 => (2.0, 2.0),
            Self::Q8_0 => (1.125, 2.0),
            Self::Q8_0Head => (1.125, 1.125),
        }
    }
}

thread_local! {
    static QUANTIZE: std::cell::Cell<Quantization> = const { std::cell::Cell::new(Quantization::None) };
}

/// Runs `f` (a model load or build on this thread) with every [`Linear`] it creates stored as
/// `q`: the vision tower's, the Perceiver's, the gated cross-attention's and the language
/// model's linear layers, and the language model's output head (a `Linear` over the
/// unembedding, see [`Linear::new_head`]; a tied embedding table is kept as loaded for the
/// lookups). Embeddings and norms stay as loaded. A weight whose input width is not a multiple of 32, or that is not f32 on the
/// CPU, stays dense.
pub fn quantize_linear_weights<R>(q: Quantization, f: impl FnOnce() -> R) -> R {
    let before = QUANTIZE.with(|c| c.replace(q));
    let out = f();
    QUANTIZE.with(|c| c.set(before));
    out
}

impl Linear {
    /// The language model's output head (no bias): stored as [`Quantization`] says for the
    /// head, which for q8_0 is f16.
    pub fn new_head(weight: Tensor) -> Self {
        let weight = match QUANTIZE.with(|c| c.get()) {
            Quantization::Q8_0Head => q8(&weight).unwrap_or(Weight::Dense(weight)),
            Quantization::F16 | Quantization::Q8_0 => f16(&weight).unwrap_or(Weight::Dense(weight)),
            Quantization::None => Weight::Dense(weight),
        };
        Self { weight, bias: None }
    }

    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        let weight = match QUANTIZE.with(|c| c.get()) {
            Quantization::Q8_0 | Quantization::Q8_0Head => q8(&weight).unwrap_or(Weight::Dense(weight)),
            Quantization::F16 => f16(&weight).unwrap_or(Weight::Dense(weight)),
            Quantization::None => Weight::Dense(weight),
        };
        Self { weight, bias }
    }

    /// Whether the weight is stored in fewer bits than loaded (q8_0 or f16).
    pub fn is_quantized(&self) -> bool {
        !matches!(self.weight, Weight::Dense(_))
    }

    /// Output features (the weight's rows).
    pub fn out_dim(&self) -> usize {
        match &self.weight {
            Weight::Dense(w) => w.dim(0).unwrap_or(0),
            Weight::F16(h) => h.dims().0,
            Weight::Q8(q) => q.dims().0,
        }
    }
}

/// `w` as q8_0, when it can be: a 2-D f32 CPU weight whose rows are whole blocks.
fn q8(w: &Tensor) -> Option<Weight> {
    let [n, k] = *w.dims() else { return None };
    if !k.is_multiple_of(crate::q8::BLOCK) || w.dtype() != DType::F32 || !w.device().is_cpu() {
        return None;
    }
    let w = w.contiguous().ok()?;
    let q = with_f32(&w, |v| crate::q8::Q8Matrix::quantize(&v[..n * k], n, k)).ok()??;
    Some(Weight::Q8(std::sync::Arc::new(q)))
}

/// `w` in f16, when it can be: a 2-D f32 CPU weight whose rows are whole runs of 8.
fn f16(w: &Tensor) -> Option<Weight> {
    let [n, k] = *w.dims() else { return None };
    if !k.is_multiple_of(8) || w.dtype() != DType::F32 || !w.device().is_cpu() {
        return None;
    }
    let w = w.contiguous().ok()?;
    let h = with_f32(&w, |v| crate::f16w::F16Matrix::from_f32(&v[..n * k], n, k)).ok()??;
    Some(Weight::F16(std::sync::Arc::new(h)))
}

/// `x · Wᵀ` for an f16 weight, in f32, through [`crate::f16w`] for any number of rows (for a
/// prefill chunk it was faster than widening the weight and the dense product: 381 against
/// 997 ms for a 92-token 4-shot prompt on the mid-size bench model).
fn f16_matmul(x: &Tensor, h: &crate::f16w::F16Matrix) -> Result<Tensor> {
    let (n, k) = h.dims();
    rows_matmul(x, k, n, |v, m| h.matmul_wt(v, m))
}

/// `x · Wᵀ` through a CPU kernel `f(rows, m)` over `[m, k]` rows: the leading dimensions of
/// `x` flattened into rows, the output `[.., n]`.
fn rows_matmul(x: &Tensor, k: usize, n: usize, f: impl FnOnce(&[f32], usize) -> Vec<f32>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    match dims.last() {
        Some(&last) if last == k => {}
        _ => candle_core::bail!("linear: input {dims:?} does not end in {k}"),
    }
    if x.dtype() != DType::F32 || !x.device().is_cpu() {
        candle_core::bail!("quantized linear: input must be f32 on the CPU");
    }
    let m = x.elem_count() / k.max(1);
    let x = x.contiguous()?;
    let y = with_f32(&x, |v| f(&v[..m * k], m))?;
    let mut out = dims;
    if let Some(last) = out.last_mut() {
        *last = n;
    }
    Tensor::from_vec(y, out, x.device())
}

/// `x · Wᵀ` for a q8_0 weight.
fn q8_matmul(x: &Tensor, q: &crate::q8::Q8Matrix) -> Result<Tensor> {
    let (n, k) = q.dims();
    rows_matmul(x, k, n, |v, m| q.matmul_wt(v, m))
}

/// `x · Wᵀ` for a `[out, in]` weight, choosing the faster method (see [`Linear`]): up to
/// [`crate::skinny::MAX_ROWS`] rows of f32 on the CPU go through [`crate::skinny`].
pub fn matmul_wt(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if let Some(y) = skinny_wt(x, w)? {
        return Ok(y);
    }
    match *x.dims() {
        [m, _] if (2..=96).contains(&m) && x.device().is_cpu() => w.matmul(&x.t()?)?.t()?.contiguous(),
        [_, _] => x.matmul(&w.t()?),
        _ => x.broadcast_matmul(&w.t()?),
    }
}

/// [`crate::skinny::matmul_wt`] when it applies: f32 on the CPU, `x: [m, k]` with
/// `1 <= m <= MAX_ROWS`, `w: [n, k]` contiguous.
fn skinny_wt(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    let ([m, k], [n, kw]) = (x.dims(), w.dims()) else {
        return Ok(None);
    };
    let (m, k, n) = (*m, *k, *n);
    if k != *kw
        || !(1..=crate::skinny::MAX_ROWS).contains(&m)
        || !x.device().is_cpu()
        || x.dtype() != DType::F32
        || w.dtype() != DType::F32
        || !w.is_contiguous()
    {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let y = with_f32(&x, |xv| with_f32(w, |wv| crate::skinny::matmul_wt(xv, m, wv, n, k)))??;
    Ok(Some(Tensor::from_vec(y, (m, n), x.device())?))
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            Weight::Dense(w) => matmul_wt(x, w)?,
            Weight::F16(w) => f16_matmul(x, w)?,
            Weight::Q8(q) => q8_matmul(x, q)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// Runs `f` on the f32 contents of a contiguous CPU tensor, from its start offset.
#[inline(always)]
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    if !layout.is_contiguous() {
        candle_core::bail!("fused CPU kernels need contiguous buffers");
    }
    match &*storage {
        candle_core::Storage::Cpu(cpu) => {
            let s = cpu.as_slice::<f32>()?;
            Ok(f(&s[layout.start_offset()..]))
        }
        _ => candle_core::bail!("fused CPU kernels run on the CPU"),
    }
}

/// The body of a function that calls the `#[inline(always)]` function `$f` with its own
/// arguments, compiled with AVX2 and FMA enabled when the CPU has them (so `$f`'s plain-Rust
/// loops are vectorised 8 wide), else as it is. The values are the same either way: Rust does
/// not contract `a * b + c` into fused multiply-adds. (A generic wrapper taking a closure does
/// not work: the closure need not be inlined into the AVX2 function, and was not.)
macro_rules! with_avx2 {
    ($f:ident($($arg:ident: $ty:ty),*)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2($($arg: $ty),*) {
                $f($($arg),*)
            }
            if crate::skinny::has_avx2_fma() {
                // SAFETY: the CPU has the features `avx2` is compiled for.
                unsafe { avx2($($arg),*) };
                return;
            }
        }
        $f($($arg),*)
    }};
}

mod activation;
pub use activation::Activation;

/// The keys and values one row attends to, inside flat buffers: head `h` reads key/value head
/// `h / rep`, whose `n` rows of `d` start at `base + (h / rep) * head_stride`.
pub(crate) struct Keys<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub base: usize,
    pub head_stride: usize,
    pub n: usize,
    pub rep: usize,
}

/// `out[h] = softmax_j(q_h · k_j · scale + slope_h · (j − (n − 1))) · v_j` for every head `h`
/// (no bias without `slopes`), in f32: the fused attention of one row, as the batched path
/// computes it. Compiled with AVX2 when the CPU has it (the values are the same either way:
/// Rust does not contract `a * b + c` into fused multiply-adds).
pub(crate) fn attend_row(q: &[f32], keys: &Keys, heads: usize, d: usize, scale: f32, slopes: Option<&[f32]>, out: &mut [f32]) {
    with_avx2!(attend_row_impl(q: &[f32], keys: &Keys, heads: usize, d: usize, scale: f32, slopes: Option<&[f32]>, out: &mut [f32]))
}

#[inline(always)]
fn attend_row_impl(q: &[f32], keys: &Keys, heads: usize, d: usize, scale: f32, slopes: Option<&[f32]>, out: &mut [f32]) {
    let n = keys.n;
    let mut scores = vec![0f32; n];
    for h in 0..heads {
        let qh = &q[h * d..(h + 1) * d];
        let base = keys.base + (h / keys.rep) * keys.head_stride;
        let (kh, vh) = (&keys.k[base..base + n * d], &keys.v[base..base + n * d]);
        let mut max = f32::NEG_INFINITY;
        for (j, sc) in scores.iter_mut().enumerate() {
            let mut x = dot(qh, &kh[j * d..(j + 1) * d]) * scale;
            if let Some(sl) = slopes {
                x += sl[h] * (j as f32 - (n - 1) as f32);
            }
            *sc = x;
            max = max.max(x);
        }
        let mut sum = 0f32;
        for sc in scores.iter_mut() {
            *sc = (*sc - max).exp();
            sum += *sc;
        }
        let oh = &mut out[h * d..(h + 1) * d];
        oh.fill(0.0);
        for (j, &p) in scores.iter().enumerate() {
            let p = p / sum;
            for (o, &x) in oh.iter_mut().zip(&vh[j * d..(j + 1) * d]) {
                *o += p * x;
            }
        }
    }
}

/// Dot product with independent partial sums (so it vectorises).
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let full = n / 8 * 8;
    let mut acc = [0f32; 8];
    for (ca, cb) in a[..full].chunks_exact(8).zip(b[..full].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += ca[l] * cb[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in full..n {
        s += a[i] * b[i];
    }
    s
}

/// `nn.Linear(in, out, bias)` with PyTorch's `[out, in]` weight layout.
pub fn linear(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let w = vb.get((out_dim, in_dim), "weight")?;
    let b = if bias { Some(vb.get(out_dim, "bias")?) } else { None };
    Ok(Linear::new(w, b))
}

/// LayerNorm over the last dimension (biased variance), optionally without bias.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Option<Tensor>,
    eps: f64,
}

impl LayerNorm {
    pub fn new(dim: usize, eps: f64, bias: bool, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get(dim, "weight")?;
        let bias = if bias { Some(vb.get(dim, "bias")?) } else { None };
        Ok(Self { weight, bias, eps })
    }
}

impl LayerNorm {
    /// The same computation in one pass per row for f32 on the CPU (rows in parallel when
    /// there are many): the candle-ops version below allocates a tensor per operation, about a
    /// dozen per call. Sums are accumulated in f64.
    fn forward_cpu(&self, x: &Tensor) -> Result<Option<Tensor>> {
        if !x.device().is_cpu()
            || x.dtype() != DType::F32
            || self.weight.dtype() != DType::F32
            || !self.weight.is_contiguous()
            || self.bias.as_ref().is_some_and(|b| b.dtype() != DType::F32 || !b.is_contiguous())
        {
            return Ok(None);
        }
        let x = x.contiguous()?;
        let dim = x.dim(D::Minus1)?;
        if dim == 0 || self.weight.elem_count() != dim {
            return Ok(None);
        }
        let eps = self.eps as f32;
        let y = with_f32(&x, |xs| {
            with_f32(&self.weight, |w| {
                let w = &w[..dim];
                let run = |b: Option<&[f32]>| {
                    let xs = &xs[..x.elem_count()];
                    let mut y = vec![0f32; xs.len()];
                    if xs.len() >= LN_PAR_MIN {
                        y.par_chunks_mut(dim).zip(xs.par_chunks(dim)).for_each(|(o, xr)| norm_row(xr, o, w, b, eps));
                    } else {
                        y.chunks_mut(dim).zip(xs.chunks(dim)).for_each(|(o, xr)| norm_row(xr, o, w, b, eps));
                    }
                    y
                };
                match &self.bias {
                    Some(b) => with_f32(b, |b| run(Some(&b[..dim]))),
                    None => Ok(run(None)),
                }
            })
        })???;
        Ok(Some(Tensor::from_vec(y, x.shape(), x.device())?))
    }
}

/// One row of [`LayerNorm::forward_cpu`]: `(x − mean) / √(var + eps) · w (+ b)`, with the mean
/// and the biased variance summed in f64. Compiled with AVX2 when the CPU has it (the same
/// values either way).
fn norm_row(x: &[f32], out: &mut [f32], w: &[f32], b: Option<&[f32]>, eps: f32) {
    with_avx2!(norm_row_impl(x: &[f32], out: &mut [f32], w: &[f32], b: Option<&[f32]>, eps: f32))
}

#[inline(always)]
fn norm_row_impl(x: &[f32], out: &mut [f32], w: &[f32], b: Option<&[f32]>, eps: f32) {
    let dim = x.len() as f64;
    let mean = (sum_f64(x, |v| v as f64) / dim) as f32;
    let var = (sum_f64(x, |v| {
        let c = (v - mean) as f64;
        c * c
    }) / dim) as f32;
    let den = (var + eps).sqrt();
    match b {
        Some(b) => {
            for (((o, &v), &w), &b) in out.iter_mut().zip(x).zip(w).zip(b) {
                *o = (v - mean) / den * w + b;
            }
        }
        None => {
            for ((o, &v), &w) in out.iter_mut().zip(x).zip(w) {
                *o = (v - mean) / den * w;
            }
        }
    }
}

/// `Σ f(x_i)` in f64 with eight partial sums (lane `l` takes elements `l, l + 8, ...`, added in
/// a fixed tree, then the tail), so that the loop vectorises: a single running f64 sum is one
/// chain of dependent additions, which made LayerNorm over 16 rows of 1024 cost ~37 µs.
#[inline(always)]
fn sum_f64(x: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut acc = [0f64; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for l in 0..8 {
            acc[l] += f(c[l]);
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
    for &v in chunks.remainder() {
        s += f(v);
    }
    s
}

/// Elements from which [`LayerNorm::forward_cpu`] normalises rows in parallel.
const LN_PAR_MIN: usize = 32 * 1024;

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.forward_cpu(x)? {
            return Ok(y);
        }
        // Statistics in f32 whatever the activation dtype (as torch's layer_norm does on CPU/GPU).
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let dim = xf.dim(D::Minus1)?;
        let mean = (xf.sum_keepdim(D::Minus1)? / dim as f64)?;
        let xc = xf.broadcast_sub(&mean)?;
        let var = (xc.sqr()?.sum_keepdim(D::Minus1)? / dim as f64)?;
        let y = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?.to_dtype(dtype)?;
        let y = y.broadcast_mul(&self.weight)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

pub fn rms_norm(dim: usize, eps: f64, vb: VarBuilder) -> Result<RmsNorm> {
    Ok(RmsNorm::new(vb.get(dim, "weight")?, eps))
}

/// `softmax(q kᵀ · scale + bias)` v for one sequence: q `[h, t, d]`, k/v `[h, s, d]`,
/// `bias` broadcastable to `[h, t, s]`. Scores are computed in f32.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, bias: Option<&Tensor>) -> Result<Tensor> {
    let dtype = q.dtype();
    let q = q.to_dtype(DType::F32)?;
    let k = k.to_dtype(DType::F32)?;
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let scores = match bias {
        Some(b) => scores.broadcast_add(b)?,
        None => scores,
    };
    let p = candle_nn::ops::softmax_last_dim(&scores)?;
    p.matmul(&v.to_dtype(DType::F32)?)?.to_dtype(dtype)
}

/// Additive causal mask `[t, s]` for `t` new queries after `past` cached keys (`s = past + t`):
/// query `i` sees keys `0..=past+i`.
pub fn causal_mask(t: usize, past: usize, device: &candle_core::Device) -> Result<Option<Tensor>> {
    if t == 1 {
        return Ok(None);
    }
    let s = past + t;
    let mask: Vec<f32> = (0..t).flat_map(|i| (0..s).map(move |j| if j <= past + i { 0.0 } else { f32::NEG_INFINITY })).collect();
    Ok(Some(Tensor::from_vec(mask, (t, s), device)?))
}

/// Splits rows `[n, h*d]` into heads `[h, n, d]` (contiguous).
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (n, hd) = x.dims2()?;
    if n == 1 {
        // [1, h*d] and [h, 1, d] have the same memory order.
        return x.contiguous()?.reshape((heads, 1, hd / heads));
    }
    x.reshape((n, heads, hd / heads))?.transpose(0, 1)?.contiguous()
}

/// Merges heads `[h, n, d]` back into rows `[n, h*d]`.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (h, n, d) = x.dims3()?;
    if n == 1 {
        return x.contiguous()?.reshape((1, h * d));
    }
    x.transpose(0, 1)?.contiguous()?.reshape((n, h * d))
}

/// Repeats key/value heads for grouped-query attention: `[h_kv, s, d]` -> `[h_kv*rep, s, d]`.
pub fn repeat_kv(x: &Tensor, rep: usize) -> Result<Tensor> {
    if rep == 1 {
        return Ok(x.clone());
    }
    let (h, s, d) = x.dims3()?;
    x.unsqueeze(1)?.expand((h, rep, s, d))?.reshape((h * rep, s, d))
}

#[cfg(test)]
mod tests {
    #[test]
    fn q8_0_linear_is_the_dense_product_to_quantization_error() {
        use candle_core::{Device, Module, Tensor};
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (96, 128), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 96, &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (5, 128), &dev).unwrap();
        let dense = super::Linear::new(w.clone(), Some(b.clone()));
        let q = super::quantize_linear_weights(super::Quantization::Q8_0, || super::Linear::new(w.clone(), Some(b.clone())));
        assert!(q.is_quantized() && !dense.is_quantized());
        let (yd, yq) = (dense.forward(&x).unwrap(), q.forward(&x).unwrap());
        assert_eq!(yq.dims(), &[5, 96]);
        // Leading dimensions are rows.
        let y3 = q.forward(&x.unsqueeze(0).unwrap()).unwrap();
        assert_eq!(y3.dims(), &[1, 5, 96]);
        assert_eq!(y3.squeeze(0).unwrap().to_vec2::<f32>().unwrap(), yq.to_vec2::<f32>().unwrap());
        // 8-bit weights and inputs: about 0.5% of the output's scale (sqrt(128) ~ 11) per value.
        let err = (yd.clone() - yq).unwrap().sqr().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
        let scale = yd.sqr().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
        assert!(err < 0.01 * scale, "rms error {err} for outputs of rms {scale}");
        assert!(err > 0.0, "quantized outputs should not be bit-identical");
        // f16 weights: the product of their f32 values, to f32 rounding, for few rows (the
        // f16-reading kernel) and many (converted first).
        let h = super::quantize_linear_weights(super::Quantization::F16, || super::Linear::new(w.clone(), Some(b.clone())));
        assert!(h.is_quantized());
        let wide =
            super::Linear::new(w.to_dtype(candle_core::DType::F16).unwrap().to_dtype(candle_core::DType::F32).unwrap(), Some(b.clone()));
        assert!(!wide.is_quantized());
        for rows in [5, 40] {
            let x = Tensor::randn(0f32, 1.0, (rows, 128), &dev).unwrap();
            let (yh, yw) = (h.forward(&x).unwrap(), wide.forward(&x).unwrap());
            let diff = (yh - yw).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-4, "{rows} rows: f16 weights differ from their f32 values by {diff}");
        }
        // Outside the scope, and for widths that are not whole blocks, weights stay dense.
        assert!(!super::Linear::new(w.clone(), None).is_quantized());
        let odd = Tensor::randn(0f32, 1.0, (4, 40), &dev).unwrap();
        assert!(!super::quantize_linear_weights(super::Quantization::Q8_0, || super::Linear::new(odd, None)).is_quantized());
    }

    use super::*;
    use candle_core::Device;

    #[test]
    fn causal_mask_after_cache() {
        // Regression guard: with cached keys, query i must see exactly past+i+1 keys.
        let m = causal_mask(2, 3, &Device::Cpu).unwrap().unwrap();
        let v = m.to_vec2::<f32>().unwrap();
        assert_eq!(v[0], vec![0.0, 0.0, 0.0, 0.0, f32::NEG_INFINITY]);
        assert_eq!(v[1], vec![0.0; 5]);
        assert!(causal_mask(1, 7, &Device::Cpu).unwrap().is_none());
    }

    #[test]
    fn layer_norm_cpu_pass_matches_tensor_ops() {
        let dev = Device::Cpu;
        for (rows, dim, bias) in [(3usize, 40usize, true), (40, 1024, false), (1, 7, true)] {
            let x = (Tensor::randn(0f32, 3.0, (rows, dim), &dev).unwrap() + 5.0).unwrap();
            let weight = Tensor::randn(0f32, 1.0, dim, &dev).unwrap();
            let b = bias.then(|| Tensor::randn(0f32, 1.0, dim, &dev).unwrap());
            let ln = LayerNorm { weight, bias: b, eps: 1e-5 };
            let fused = ln.forward_cpu(&x).unwrap().expect("f32 on the CPU").to_vec2::<f32>().unwrap();
            // The tensor-ops path, run on an f64 copy.
            let ln64 = LayerNorm {
                weight: ln.weight.to_dtype(DType::F64).unwrap(),
                bias: ln.bias.as_ref().map(|b| b.to_dtype(DType::F64).unwrap()),
                eps: 1e-5,
            };
            let want = ln64.forward(&x.to_dtype(DType::F64).unwrap()).unwrap().to_vec2::<f64>().unwrap();
            for (fr, wr) in fused.iter().zip(&want) {
                for (a, b) in fr.iter().zip(wr) {
                    assert!((*a as f64 - b).abs() < 1e-5 * (1.0 + b.abs()), "{rows}x{dim}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn layer_norm_matches_definition() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1f32, 2., 4., 9.]], &dev).unwrap();
        let ln = LayerNorm { weight: Tensor::new(&[1f32, 2., 1., 1.], &dev).unwrap(), bias: None, eps: 1e-5 };
        let y = ln.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        let mean = 4.0f32;
        let var = ((9.0 + 4.0 + 0.0 + 25.0) / 4.0f32) + 1e-5;
        let want = [-3.0 / var.sqrt(), -2.0 * 2.0 / var.sqrt(), 0.0, 5.0 / var.sqrt()];
        for (a, b) in y[0].iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b} (mean {mean})");
        }
    }
}
