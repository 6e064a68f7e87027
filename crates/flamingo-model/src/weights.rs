//! A lazy, name-mapped view over the weight files of a model directory.
//!
//! A Flamingo model directory holds three sources (open_clip file, HF LM files, the OpenFlamingo
//! `checkpoint.pt`). [`WeightStore`] opens each file once (safetensors are memory-mapped, pickles
//! are indexed), maps every tensor to the name the model code asks for, and loads a tensor only
//! when a module is built. Later insertions override earlier ones, which is how checkpoint keys
//! override the base LM's. Missing keys and shape mismatches are errors that name the file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

use crate::error::{Error, Result};

enum FileKind {
    Safetensors(candle_core::safetensors::MmapedSafetensors),
    Pickle(candle_core::pickle::PthTensors),
}

struct WeightFile {
    path: PathBuf,
    kind: FileKind,
}

/// Where a family of model-side names is expected to come from, for error messages: names that
/// start with `prefix` (or contain `contains`) are read from `files` as `file_prefix + name`.
struct Home {
    prefix: String,
    contains: Option<String>,
    file_prefix: String,
    files: String,
}

#[derive(Default)]
pub struct WeightStore {
    files: Vec<WeightFile>,
    /// model-side name -> (file index, name inside that file)
    keys: HashMap<String, (usize, String)>,
    homes: Vec<Home>,
}

fn is_float(dtype: DType) -> bool {
    matches!(dtype, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
}

impl WeightStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Opens a `.safetensors` file or a PyTorch pickle (`.bin`, `.pt`) and returns its index and
    /// the names of its floating-point tensors (bool/int buffers are skipped).
    pub fn open(&mut self, path: &Path) -> Result<(usize, Vec<String>)> {
        if !path.is_file() {
            return Err(Error::file(path, "file not found"));
        }
        let is_st = path.extension().is_some_and(|e| e == "safetensors");
        let (kind, names) = if is_st {
            // SAFETY: the file is mapped read-only; like every mmap-based loader we rely on the
            // model files not being modified while the process runs.
            let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }
                .map_err(|e| Error::file(path, format!("not a readable safetensors file: {e}")))?;
            let names = st
                .tensors()
                .into_iter()
                .filter(|(_, v)| {
                    matches!(v.dtype(), safetensors_dtype::F16 | safetensors_dtype::BF16 | safetensors_dtype::F32 | safetensors_dtype::F64)
                })
                .map(|(n, _)| n)
                .collect();
            (FileKind::Safetensors(st), names)
        } else {
            let mut pth = crate::pth::read(path, None)?;
            // Some checkpoints wrap the state dict (`{"model_state_dict": {...}}`).
            if pth.tensor_infos().is_empty() {
                for key in ["model_state_dict", "state_dict", "model"] {
                    if let Ok(p) = crate::pth::read(path, Some(key)) {
                        if !p.tensor_infos().is_empty() {
                            pth = p;
                            break;
                        }
                    }
                }
            }
            let names = pth.tensor_infos().iter().filter(|(_, info)| is_float(info.dtype)).map(|(n, _)| n.clone()).collect();
            (FileKind::Pickle(pth), names)
        };
        self.files.push(WeightFile { path: path.to_path_buf(), kind });
        Ok((self.files.len() - 1, names))
    }

    pub fn path(&self, file: usize) -> &Path {
        &self.files[file].path
    }

    /// Maps `model_name` to tensor `file_name` of file `file` (overriding an earlier mapping).
    pub fn insert(&mut self, model_name: String, file: usize, file_name: String) {
        self.keys.insert(model_name, (file, file_name));
    }

    /// Declares that model-side names starting with `prefix` live in `files` under
    /// `file_prefix + rest`, so that a missing key is reported where the user would look.
    pub fn set_home(&mut self, prefix: &str, file_prefix: &str, files: String) {
        self.homes.push(Home { prefix: prefix.into(), contains: None, file_prefix: file_prefix.into(), files });
    }

    /// Like [`Self::set_home`] for names containing `pattern`; these take precedence.
    pub fn set_home_containing(&mut self, pattern: &str, file_prefix: &str, files: String) {
        self.homes.push(Home { prefix: String::new(), contains: Some(pattern.into()), file_prefix: file_prefix.into(), files });
    }

    pub fn contains(&self, name: &str) -> bool {
        self.keys.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(|s| s.as_str())
    }

    fn missing(&self, name: &str) -> Error {
        let home =
            self.homes.iter().find(|h| h.contains.as_ref().is_some_and(|c| name.contains(c.as_str()))).or_else(|| {
                self.homes.iter().filter(|h| h.contains.is_none() && name.starts_with(&h.prefix)).max_by_key(|h| h.prefix.len())
            });
        match home {
            Some(h) => {
                Error::File { path: PathBuf::from(&h.files), msg: format!("missing tensor `{}{}`", h.file_prefix, &name[h.prefix.len()..]) }
            }
            None => Error::Config(format!("missing tensor `{name}`")),
        }
    }

    /// Where a model-side name comes from: (file path, name in file).
    pub fn origin(&self, name: &str) -> Option<(&Path, &str)> {
        self.keys.get(name).map(|(f, n)| (self.files[*f].path.as_path(), n.as_str()))
    }

    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        let (f, n) = self.keys.get(name).ok_or_else(|| self.missing(name))?;
        let file = &self.files[*f];
        match &file.kind {
            FileKind::Safetensors(st) => {
                st.get(n).map(|v| v.shape().to_vec()).map_err(|e| Error::file(&file.path, format!("tensor `{n}`: {e}")))
            }
            FileKind::Pickle(p) => p
                .tensor_infos()
                .get(n)
                .map(|i| i.layout.shape().dims().to_vec())
                .ok_or_else(|| Error::file(&file.path, format!("missing tensor `{n}`"))),
        }
    }

    /// The leading dimension of a tensor of rank `rank` (the rows of a weight matrix), or an
    /// error naming the file and the key when its rank differs.
    pub fn rows(&self, name: &str, rank: usize) -> Result<usize> {
        let shape = self.shape(name)?;
        match shape.first() {
            Some(&rows) if shape.len() == rank => Ok(rows),
            _ => {
                let (f, n) = self.keys.get(name).ok_or_else(|| self.missing(name))?;
                Err(Error::file(&self.files[*f].path, format!("tensor `{n}` has shape {shape:?}, expected {rank} dimensions")))
            }
        }
    }

    /// Loads a tensor by its model-side name, converted to `dtype` on `dev`.
    pub fn load(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let (f, n) = self.keys.get(name).ok_or_else(|| self.missing(name))?;
        let file = &self.files[*f];
        let t = match &file.kind {
            FileKind::Safetensors(st) => st.load(n, &Device::Cpu),
            FileKind::Pickle(p) => p.get(n).and_then(|t| t.ok_or_else(|| candle_core::Error::Msg("not in file".into()))),
        }
        .map_err(|e| Error::file(&file.path, format!("cannot read tensor `{n}`: {e}")))?;
        // Pickled tensors may be views with strides; make them contiguous before use.
        let t = t.contiguous()?;
        let t = if t.dtype() == dtype { t } else { t.to_dtype(dtype)? };
        Ok(t.to_device(dev)?)
    }

    /// Loads a tensor and checks its shape.
    pub fn load_shaped(&self, name: &str, shape: &Shape, dtype: DType, dev: &Device) -> Result<Tensor> {
        let (f, n) = self.keys.get(name).ok_or_else(|| self.missing(name))?;
        let found = self.shape(name)?;
        if found.as_slice() != shape.dims() {
            return Err(Error::file(&self.files[*f].path, format!("tensor `{n}` has shape {found:?}, expected {:?}", shape.dims())));
        }
        self.load(name, dtype, dev)
    }
}

use safetensors::Dtype as safetensors_dtype;

fn to_candle(e: Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

impl SimpleBackend for WeightStore {
    fn get(&self, s: Shape, name: &str, _h: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load_shaped(name, &s, dtype, dev).map_err(to_candle)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dtype, dev).map_err(to_candle)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.contains(name)
    }
}
