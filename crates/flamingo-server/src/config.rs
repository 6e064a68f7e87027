//! Server configuration: `config/default.toml` (embedded, documented key by key), then the file
//! given with `--config`, then `FLAMINGO_<SECTION>_<KEY>` environment variables, then flags.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::{Table, Value};

use crate::fetch::FetchConfig;

/// The documented defaults, embedded so the binary needs no files next to it.
pub const DEFAULT_TOML: &str = include_str!("../../../config/default.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("environment variable {var}: {msg}")]
    Env { var: String, msg: String },
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerSection,
    pub model: ModelSection,
    pub limits: Limits,
    pub fetch: FetchSection,
    pub engine: EngineSection,
    pub storage: StorageSection,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSection {
    pub dir: String,
}

impl StorageSection {
    /// The directory demonstration sets are stored under (`dir`, else the per-user default).
    pub fn dir(&self) -> PathBuf {
        if self.dir.is_empty() {
            crate::store::default_dir()
        } else {
            PathBuf::from(&self.dir)
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    pub host: String,
    pub port: u16,
    pub api_keys: Vec<String>,
    pub public_metrics: bool,
    pub served_model_name: String,
    pub log_format: String,
    pub shutdown_grace_seconds: u64,
    pub retry_after_seconds: u64,
    pub client_timeout_seconds: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    pub path: String,
    pub device: String,
    pub dtype: String,
    pub chat_template: String,
    pub quantize: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_images_per_request: usize,
    pub max_video_frames: usize,
    pub max_image_pixels: u64,
    pub max_image_side: u32,
    pub max_prompt_tokens: usize,
    pub max_tokens: usize,
    pub default_max_tokens: usize,
    pub max_n: usize,
    pub max_beams: usize,
    pub max_stop: usize,
    pub max_logprobs: usize,
    pub max_candidates: usize,
    pub max_demonstration_examples: usize,
    pub max_demonstration_sets: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchSection {
    pub allow_http: bool,
    pub timeout_seconds: u64,
    pub max_bytes: usize,
    pub max_redirects: usize,
    pub allow_list: Vec<String>,
    pub file_dir: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineSection {
    pub max_running: usize,
    pub max_batched_tokens: usize,
    pub kv_cache_bytes: usize,
    pub max_waiting: usize,
    pub block_size: usize,
    pub vision_cache_bytes: usize,
    pub prefix_cache_bytes: usize,
    pub pinned_bytes: usize,
}

impl FetchSection {
    pub fn to_fetch_config(&self) -> FetchConfig {
        FetchConfig {
            allow_http: self.allow_http,
            timeout: Duration::from_secs(self.timeout_seconds),
            max_bytes: self.max_bytes,
            max_redirects: self.max_redirects,
            allow_list: self.allow_list.clone(),
            file_dir: (!self.file_dir.is_empty()).then(|| PathBuf::from(&self.file_dir)),
        }
    }
}

impl EngineSection {
    pub fn to_engine_config(&self) -> flamingo_engine::EngineConfig {
        flamingo_engine::EngineConfig {
            max_running: self.max_running,
            max_batched_tokens: self.max_batched_tokens,
            kv_budget_bytes: self.kv_cache_bytes,
            max_waiting: self.max_waiting,
            block_size: self.block_size,
            vision_cache_bytes: self.vision_cache_bytes,
            prefix_cache_bytes: self.prefix_cache_bytes,
            pinned_bytes: self.pinned_bytes,
        }
    }
}

/// Values set on the command line (highest precedence).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub model: Option<String>,
    pub api_keys: Vec<String>,
    pub served_model_name: Option<String>,
    pub log_format: Option<String>,
    pub device: Option<String>,
    pub dtype: Option<String>,
    pub data_dir: Option<String>,
    pub quantize: Option<String>,
}

impl Config {
    /// Defaults only (what tests start from).
    pub fn defaults() -> Self {
        Self::build(None, &|_| None, &Overrides::default()).expect("the embedded default.toml is valid")
    }

    /// Loads the configuration with the documented precedence. `env` looks up a variable.
    pub fn load(file: Option<&Path>, env: &dyn Fn(&str) -> Option<String>, flags: &Overrides) -> Result<Self, ConfigError> {
        Self::build(file, env, flags)
    }

    fn build(file: Option<&Path>, env: &dyn Fn(&str) -> Option<String>, flags: &Overrides) -> Result<Self, ConfigError> {
        let mut table: Table = DEFAULT_TOML.parse().map_err(|e| ConfigError::Invalid(format!("default.toml: {e}")))?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File { path: path.into(), msg: e.to_string() })?;
            let user: Table = text.parse().map_err(|e| ConfigError::File { path: path.into(), msg: format!("invalid TOML: {e}") })?;
            merge(&mut table, &user).map_err(|msg| ConfigError::File { path: path.into(), msg })?;
        }
        apply_env(&mut table, env)?;
        let set = |t: &mut Table, section: &str, key: &str, v: Value| {
            if let Some(Value::Table(s)) = t.get_mut(section) {
                s.insert(key.into(), v);
            }
        };
        if let Some(h) = &flags.host {
            set(&mut table, "server", "host", Value::String(h.clone()));
        }
        if let Some(p) = flags.port {
            set(&mut table, "server", "port", Value::Integer(p.into()));
        }
        if let Some(m) = &flags.model {
            set(&mut table, "model", "path", Value::String(m.clone()));
        }
        if !flags.api_keys.is_empty() {
            set(&mut table, "server", "api_keys", Value::Array(flags.api_keys.iter().cloned().map(Value::String).collect()));
        }
        if let Some(n) = &flags.served_model_name {
            set(&mut table, "server", "served_model_name", Value::String(n.clone()));
        }
        if let Some(f) = &flags.log_format {
            set(&mut table, "server", "log_format", Value::String(f.clone()));
        }
        if let Some(d) = &flags.device {
            set(&mut table, "model", "device", Value::String(d.clone()));
        }
        if let Some(d) = &flags.dtype {
            set(&mut table, "model", "dtype", Value::String(d.clone()));
        }
        if let Some(q) = &flags.quantize {
            set(&mut table, "model", "quantize", Value::String(q.clone()));
        }
        if let Some(d) = &flags.data_dir {
            set(&mut table, "storage", "dir", Value::String(d.clone()));
        }
        let cfg: Config = Value::Table(table).try_into().map_err(|e: toml::de::Error| ConfigError::Invalid(e.to_string()))?;
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.into()));
        if !matches!(self.server.log_format.as_str(), "text" | "json") {
            return bad("server.log_format must be \"text\" or \"json\"");
        }
        if self.server.client_timeout_seconds == 0 {
            return bad("server.client_timeout_seconds must be positive");
        }
        if self.server.api_keys.iter().any(|k| k.trim().is_empty()) {
            return bad("server.api_keys must not contain empty keys");
        }
        if let Err(e) = flamingo_model::nn::Quantization::from_name(&self.model.quantize) {
            return Err(ConfigError::Invalid(format!("model.quantize: {e}")));
        }
        if let Err(e) = crate::template::ChatTemplate::from_name(&self.model.chat_template) {
            return Err(ConfigError::Invalid(format!("model.chat_template: {e}")));
        }
        let l = &self.limits;
        if l.max_tokens == 0 || l.default_max_tokens == 0 || l.max_n == 0 || l.max_beams == 0 || l.max_prompt_tokens == 0 {
            return bad("limits: max_tokens, default_max_tokens, max_n, max_beams and max_prompt_tokens must be positive");
        }
        if l.max_beams > flamingo_engine::MAX_BEAMS {
            return Err(ConfigError::Invalid(format!("limits.max_beams must be at most {}", flamingo_engine::MAX_BEAMS)));
        }
        if self.engine.block_size == 0 || self.engine.max_running == 0 || self.engine.max_batched_tokens == 0 {
            return bad("engine: block_size, max_running and max_batched_tokens must be positive");
        }
        Ok(())
    }
}

/// Overlays `user` on `base`; every key of `user` must exist in `base` with the same type
/// (a typo in a config file is an error, not silently ignored).
fn merge(base: &mut Table, user: &Table) -> Result<(), String> {
    for (section, v) in user {
        let Some(Value::Table(dst)) = base.get_mut(section) else {
            return Err(format!("unknown section [{section}]"));
        };
        let Value::Table(src) = v else {
            return Err(format!("[{section}] must be a table"));
        };
        for (k, val) in src {
            let Some(old) = dst.get(k) else {
                return Err(format!("unknown key {section}.{k}"));
            };
            if old.type_str() != val.type_str() {
                return Err(format!("{section}.{k} must be {} (got {})", old.type_str(), val.type_str()));
            }
            dst.insert(k.clone(), val.clone());
        }
    }
    Ok(())
}

/// Reads `FLAMINGO_<SECTION>_<KEY>` for every key, parsed by the default's type.
fn apply_env(table: &mut Table, env: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
    for (section, v) in table.iter_mut() {
        let Value::Table(s) = v else { continue };
        for (k, val) in s.iter_mut() {
            let var = format!("FLAMINGO_{}_{}", section.to_uppercase(), k.to_uppercase());
            let Some(raw) = env(&var) else { continue };
            let err = |msg: String| ConfigError::Env { var: var.clone(), msg };
            *val = match val {
                Value::String(_) => Value::String(raw),
                Value::Integer(_) => Value::Integer(raw.trim().parse().map_err(|_| err(format!("expected an integer, got {raw:?}")))?),
                Value::Float(_) => Value::Float(raw.trim().parse().map_err(|_| err(format!("expected a number, got {raw:?}")))?),
                Value::Boolean(_) => Value::Boolean(match raw.trim().to_ascii_lowercase().as_str() {
                    "1" | "true" | "yes" | "on" => true,
                    "0" | "false" | "no" | "off" => false,
                    _ => return Err(err(format!("expected true or false, got {raw:?}"))),
                }),
                Value::Array(_) => {
                    Value::Array(raw.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|s| Value::String(s.into())).collect())
                }
                _ => continue,
            };
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse() {
        let c = Config::defaults();
        assert_eq!(c.server.port, 8000);
        assert_eq!(c.server.host, "127.0.0.1");
        assert!(c.server.api_keys.is_empty());
        assert_eq!(c.engine.to_engine_config(), flamingo_engine::EngineConfig::default());
    }

    #[test]
    fn precedence_file_env_flags() {
        let dir = std::env::temp_dir().join(format!("flamingo-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.toml");
        std::fs::write(&f, "[server]\nport = 9001\nhost = \"0.0.0.0\"\n[limits]\nmax_n = 3\n").unwrap();
        let env = |k: &str| match k {
            "FLAMINGO_SERVER_PORT" => Some("9002".to_string()),
            "FLAMINGO_SERVER_API_KEYS" => Some("a, b,".to_string()),
            "FLAMINGO_FETCH_ALLOW_HTTP" => Some("false".to_string()),
            _ => None,
        };
        let c = Config::load(Some(&f), &env, &Overrides::default()).unwrap();
        assert_eq!((c.server.port, c.server.host.as_str(), c.limits.max_n), (9002, "0.0.0.0", 3));
        assert_eq!(c.server.api_keys, vec!["a", "b"]);
        assert!(!c.fetch.allow_http);
        let flags = Overrides { port: Some(9003), api_keys: vec!["k".into()], ..Default::default() };
        let c = Config::load(Some(&f), &env, &flags).unwrap();
        assert_eq!(c.server.port, 9003);
        assert_eq!(c.server.api_keys, vec!["k"]);
    }

    #[test]
    fn mistakes_are_errors() {
        let dir = std::env::temp_dir().join(format!("flamingo-cfg-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (text, want) in [
            ("[server]\nprot = 1\n", "unknown key server.prot"),
            ("[srv]\nport = 1\n", "unknown section [srv]"),
            ("[server]\nport = \"x\"\n", "server.port must be integer"),
        ] {
            let f = dir.join("c.toml");
            std::fs::write(&f, text).unwrap();
            let e = Config::load(Some(&f), &|_| None, &Overrides::default()).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        let env = |k: &str| (k == "FLAMINGO_SERVER_PORT").then(|| "eighty".to_string());
        let e = Config::load(None, &env, &Overrides::default()).unwrap_err().to_string();
        assert!(e.contains("FLAMINGO_SERVER_PORT") && e.contains("integer"), "{e}");
        let flags = Overrides { log_format: Some("xml".into()), ..Default::default() };
        assert!(Config::load(None, &|_| None, &flags).is_err());
    }
}
