//! Device and dtype selection from user-facing names. The `cuda` feature is the only place GPU
//! support is switched on; without it asking for CUDA is a clear error.

use candle_core::{DType, Device};

use crate::error::{Error, Result};

/// `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        _ if name == "cuda" || name.starts_with("cuda:") => {
            let ordinal = match name.strip_prefix("cuda:") {
                Some(n) => n.parse::<usize>().map_err(|_| Error::Invalid(format!("bad device `{name}`")))?,
                None => 0,
            };
            cuda_device(ordinal)
        }
        _ => Err(Error::Invalid(format!("unknown device `{name}` (use cpu, cuda or cuda:N)"))),
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> Result<Device> {
    Ok(Device::new_cuda(ordinal)?)
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_ordinal: usize) -> Result<Device> {
    Err(Error::Unsupported("this build has no CUDA support (rebuild with `--features cuda`)".into()))
}

/// `f32`, `bf16` or `f16`.
pub fn parse_dtype(name: &str) -> Result<DType> {
    match name {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        _ => Err(Error::Invalid(format!("unknown dtype `{name}` (use auto, f32, bf16 or f16)"))),
    }
}

/// [`parse_dtype`], plus `auto`: bf16 on CUDA (half the bytes per decode step of f32, and the
/// dtype the released checkpoints were trained in), f32 on the CPU (exact against the reference
/// and the fastest there).
pub fn dtype_for(name: &str, device: &Device) -> Result<DType> {
    match name {
        "auto" => Ok(if device.is_cuda() { DType::BF16 } else { DType::F32 }),
        _ => parse_dtype(name),
    }
}

/// Rejects dtypes the device cannot compute in (candle's CPU matmul has no bf16).
pub fn check_supported(device: &Device, dtype: DType) -> Result<()> {
    if device.is_cpu() && dtype == DType::BF16 {
        return Err(Error::Unsupported("bf16 is not supported on the CPU (use f32 or f16 there; bf16 on CUDA)".into()));
    }
    Ok(())
}
