//! A weight file as a model directory holds one: safetensors (memory-mapped) or a PyTorch
//! checkpoint (a zip holding a pickle and the tensors' storages), opened, every floating-point
//! tensor's shape read and the tensor loaded as f32. Whatever the bytes, the answer is tensors
//! or an error naming the file; no allocation is sized by a header the file's own size does
//! not back.
//!
//! The first byte's low bit chooses the format; the rest is the file.

use flamingo_model::candle::{DType, Device};
use flamingo_model::weights::WeightStore;

pub fn run(data: &[u8]) {
    let Some((&kind, file)) = data.split_first() else { return };
    // One input at a time in a process (the replay test runs tests on several threads).
    static BUSY: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _busy = BUSY.lock().unwrap_or_else(|p| p.into_inner());
    let ext = if kind & 1 == 0 { "safetensors" } else { "pt" };
    let path = crate::scratch("weights").join(format!("weights.{ext}"));
    if let Err(e) = std::fs::write(&path, file) {
        panic!("cannot write {}: {e}", path.display());
    }
    let mut store = WeightStore::new();
    let Ok((index, names)) = store.open(&path) else { return };
    for name in names {
        store.insert(name.clone(), index, name.clone());
        let _ = store.shape(&name);
        let _ = store.load(&name, DType::F32, &Device::Cpu);
    }
}
