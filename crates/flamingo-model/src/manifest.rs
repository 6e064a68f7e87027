//! Manifests of released checkpoints (`config/models/*.toml`): where each of a model
//! directory's sources comes from (OpenFlamingo's three; IDEFICS' one HF repository), the LM
//! family, the cross-attention interval, overrides to write to `flamingo.toml`, and published
//! quality. The server's download path reads these.

use std::path::Path;

use serde::Deserialize;

use crate::config::{LmFamily, Overrides};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// Hugging Face repository id.
    pub repo: String,
    /// Files that must all be fetched.
    #[serde(default)]
    pub files: Vec<String>,
    /// Weight files, alternatives in order of preference (the first that exists is used; a
    /// `*.index.json` also brings the shards it names).
    pub weights: Vec<String>,
    #[serde(default)]
    pub revision: Option<String>,
}

/// OpenFlamingo's three sources (`clip`, `lm`, `checkpoint`), or one `model` repository whose
/// files go to the directory's root (IDEFICS).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sources {
    #[serde(default)]
    pub clip: Option<Source>,
    #[serde(default)]
    pub lm: Option<Source>,
    #[serde(default)]
    pub checkpoint: Option<Source>,
    #[serde(default)]
    pub model: Option<Source>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quality {
    pub coco_cider_4shot: f64,
    pub vqav2_accuracy_4shot: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    pub description: String,
    /// `openflamingo` (the default) or `idefics`: which sources and layout the model has.
    #[serde(default = "openflamingo")]
    pub family: String,
    /// `model_type` of the LM (`mosaic_gpt`, `mpt`, `gpt_neox`, `llama`).
    pub lm_family: String,
    pub cross_attn_every_n_layers: usize,
    pub license: String,
    pub sources: Sources,
    /// Written to the model directory's `flamingo.toml`.
    #[serde(default)]
    pub overrides: Option<toml::Table>,
    /// Published few-shot quality, where the release states it in these terms.
    #[serde(default)]
    pub quality: Option<Quality>,
}

fn openflamingo() -> String {
    "openflamingo".into()
}

impl Manifest {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
        Self::from_toml_str(&text, path)
    }

    /// Parses and validates a manifest from TOML text; `origin` names it in errors.
    pub fn from_toml_str(text: &str, origin: &Path) -> Result<Self> {
        let m: Manifest = toml::from_str(text).map_err(|e| Error::file(origin, e))?;
        if LmFamily::from_model_type(&m.lm_family).is_none() {
            return Err(Error::file(origin, format!("unknown lm_family `{}`", m.lm_family)));
        }
        if m.cross_attn_every_n_layers == 0 {
            return Err(Error::file(origin, "cross_attn_every_n_layers must be >= 1"));
        }
        let src = &m.sources;
        match m.family.as_str() {
            "openflamingo" if src.clip.is_some() && src.lm.is_some() && src.checkpoint.is_some() && src.model.is_none() => {}
            "openflamingo" => {
                return Err(Error::file(
                    origin,
                    "an openflamingo model needs [sources.clip], [sources.lm] and [sources.checkpoint] (and no [sources.model])",
                ))
            }
            "idefics" if src.model.is_some() && src.clip.is_none() && src.lm.is_none() && src.checkpoint.is_none() => {
                if m.overrides.is_some() {
                    return Err(Error::file(origin, "an idefics model takes no [overrides] (its directory's config.json says everything)"));
                }
            }
            "idefics" => return Err(Error::file(origin, "an idefics model needs [sources.model] only")),
            other => return Err(Error::file(origin, format!("unknown family `{other}` (openflamingo or idefics)"))),
        }
        // The overrides must be a valid flamingo.toml.
        let _: Overrides = toml::from_str(&m.flamingo_toml()).map_err(|e| Error::file(origin, format!("overrides: {e}")))?;
        Ok(m)
    }

    /// Whether the model is one HF repository laid out at the directory's root (IDEFICS).
    pub fn single_repo(&self) -> bool {
        self.sources.model.is_some()
    }

    /// The `flamingo.toml` to write into a model directory built from this manifest (IDEFICS
    /// directories have none: their `config.json` says everything).
    pub fn flamingo_toml(&self) -> String {
        let mut t = self.overrides.clone().unwrap_or_default();
        t.insert("cross_attn_every_n_layers".into(), toml::Value::Integer(self.cross_attn_every_n_layers as i64));
        toml::to_string(&t).unwrap_or_default()
    }

    /// All manifests in a directory, sorted by name.
    pub fn load_dir(dir: &Path) -> Result<Vec<Manifest>> {
        let mut out = Vec::new();
        let entries = std::fs::read_dir(dir).map_err(|e| Error::file(dir, e))?;
        for e in entries {
            let p = e.map_err(|e| Error::file(dir, e))?.path();
            if p.extension().is_some_and(|x| x == "toml") {
                out.push(Manifest::from_file(&p)?);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_checkpoint_manifests_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/models");
        let all = Manifest::load_dir(&dir).unwrap();
        assert_eq!(all.len(), 9);
        let names: Vec<&str> = all.iter().map(|m| m.name.as_str()).collect();
        assert!(names.contains(&"openflamingo/OpenFlamingo-3B-vitl-mpt1b"));
        for n in ["idefics-9b", "idefics-9b-instruct", "idefics-80b", "idefics-80b-instruct"] {
            let m = all.iter().find(|m| m.name == format!("HuggingFaceM4/{n}")).unwrap_or_else(|| panic!("{n} listed"));
            assert_eq!((m.family.as_str(), m.lm_family.as_str(), m.cross_attn_every_n_layers), ("idefics", "llama", 4));
            let src = m.sources.model.as_ref().expect("one repository");
            assert_eq!(src.repo, m.name);
            for f in ["config.json", "tokenizer.json", "preprocessor_config.json"] {
                assert!(src.files.iter().any(|x| x == f), "{n}: {f}");
            }
        }
        for m in all.iter().filter(|m| m.family == "openflamingo") {
            let o: Overrides = toml::from_str(&m.flamingo_toml()).unwrap();
            assert_eq!(o.cross_attn_every_n_layers, Some(m.cross_attn_every_n_layers));
            assert_eq!(o.vision.quick_gelu, Some(true), "{}: OpenAI CLIP uses QuickGELU", m.name);
        }
    }
}
