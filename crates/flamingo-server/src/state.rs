//! What the server holds: the configuration, the model once it is loaded (the engine, the
//! tokenizer, the media settings), the Prometheus recorder and the in-flight count that a
//! graceful shutdown waits on.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use flamingo_engine::Engine;
use flamingo_model::preprocess::ImageLimits;
use flamingo_model::FlamingoTokenizer;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::sync::Notify;

use crate::config::Config;
use crate::error::ApiError;
use crate::fetch::Fetcher;
use crate::media::MediaSpec;

/// Where the model comes from.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// flamingo-mini, the model embedded in the binary.
    Embedded,
    /// A model directory.
    Dir(PathBuf),
    /// A name from `config/models/`, downloaded to the HF cache.
    Hub(String),
}

impl ModelSource {
    /// `model.path` of the configuration: empty = embedded; an existing directory; else a name.
    pub fn from_config(path: &str) -> Self {
        if path.is_empty() {
            ModelSource::Embedded
        } else if std::path::Path::new(path).is_dir() {
            ModelSource::Dir(path.into())
        } else {
            ModelSource::Hub(path.into())
        }
    }

    /// The id clients use when none is configured.
    pub fn default_name(&self) -> String {
        match self {
            ModelSource::Embedded => crate::embedded::NAME.into(),
            ModelSource::Dir(d) => {
                let d = d.canonicalize().unwrap_or_else(|_| d.clone());
                d.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "flamingo".into())
            }
            ModelSource::Hub(n) => n.clone(),
        }
    }

    /// The model directory: the embedded model written out, the directory itself, or a
    /// released checkpoint downloaded and laid out (blocking).
    pub fn resolve(&self) -> anyhow::Result<PathBuf> {
        use anyhow::Context;
        Ok(match self {
            ModelSource::Embedded => crate::embedded::materialize(&std::env::temp_dir()).context("writing the embedded model")?,
            ModelSource::Dir(d) => d.clone(),
            ModelSource::Hub(name) => {
                let opts = crate::hub::HubOptions::from_env();
                crate::hub::resolve(name, &opts).with_context(|| format!("getting model {name}"))?
            }
        })
    }
}

/// The loaded model as the handlers use it.
pub struct Runtime {
    pub engine: Engine,
    pub tokenizer: FlamingoTokenizer,
    /// Ids that end every generation (`<|endofchunk|>` and the LM's eos).
    pub stop_ids: Vec<u32>,
    pub media: Arc<MediaSpec>,
    /// How chat messages become this model's prompt.
    pub template: crate::template::ChatTemplate,
}

impl Runtime {
    /// Loads the model in `dir` (blocking) and starts its engine.
    pub fn load(dir: &std::path::Path, cfg: &Config, progress: &dyn flamingo_model::loader::LoadProgress) -> anyhow::Result<Self> {
        Self::load_with(dir, cfg, progress, |model| model)
    }

    /// [`Runtime::load`], with the engine running `backend(model)` (tests wrap the model, e.g.
    /// to inject faults).
    pub fn load_with<B: flamingo_engine::Backend>(
        dir: &std::path::Path,
        cfg: &Config,
        progress: &dyn flamingo_model::loader::LoadProgress,
        backend: impl FnOnce(flamingo_model::Flamingo) -> B,
    ) -> anyhow::Result<Self> {
        use anyhow::Context;
        let device = flamingo_model::device::parse_device(&cfg.model.device)?;
        let dtype = flamingo_model::device::dtype_for(&cfg.model.dtype, &device)?;
        flamingo_model::device::check_supported(&device, dtype)?;
        let quantize = flamingo_model::nn::Quantization::from_name(&cfg.model.quantize).map_err(anyhow::Error::msg)?;
        let loaded = flamingo_model::nn::quantize_linear_weights(quantize, || flamingo_model::load(dir, &device, dtype, progress))
            .with_context(|| format!("loading model {}", dir.display()))?;
        let family = loaded.model.config().model_family;
        let l = &cfg.limits;
        let limits = ImageLimits { max_pixels: l.max_image_pixels, max_side: l.max_image_side };
        let media = Arc::new(MediaSpec::of_model(&loaded.model, limits, l.max_video_frames));
        let stop_ids = loaded.tokenizer.stop_token_ids();
        let engine_cfg = cfg.engine.to_engine_config();
        if let Some(pool) = loaded.model.kv_pool() {
            // The engine admits at most its K/V budget: the paged pool gets it at start, so no
            // step waits for the pool to grow (and an oversized budget fails here, not later).
            let blocks = engine_cfg.kv_budget_bytes.div_ceil(pool.block_bytes().max(1));
            pool.reserve(blocks)
                .with_context(|| format!("allocating {} MiB of K/V on {}", engine_cfg.kv_budget_bytes >> 20, cfg.model.device))?;
        }
        let engine = Engine::start(backend(loaded.model), engine_cfg);
        let template = crate::template::ChatTemplate::from_name(&cfg.model.chat_template)
            .map_err(anyhow::Error::msg)?
            .unwrap_or_else(|| crate::template::ChatTemplate::for_model(family, loaded.tokenizer.has_end_of_utterance()));
        tracing::info!(template = template.name(), family = family.name(), "chat template");
        Ok(Self { engine, tokenizer: loaded.tokenizer, stop_ids, media, template })
    }
}

pub struct AppState {
    pub(crate) cfg: Config,
    pub(crate) served_name: String,
    runtime: OnceLock<Runtime>,
    shutting_down: AtomicBool,
    inflight: AtomicUsize,
    idle: Notify,
    pub(crate) fetcher: Fetcher,
    pub(crate) prometheus: PrometheusHandle,
    pub(crate) started: u64,
    /// Registered demonstration sets.
    pub(crate) demos: crate::demos::Registry,
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A random id: `prefix` and 24 hex digits.
pub(crate) fn random_id(prefix: &str) -> String {
    use rand::Rng;
    let mut r = rand::thread_rng();
    format!("{prefix}{:016x}{:08x}", r.gen::<u64>(), r.gen::<u32>())
}

/// The process-wide Prometheus recorder (installed once; later servers in the same process share it).
fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let buckets = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
            let recorder = PrometheusBuilder::new()
                .set_buckets(&buckets)
                .map(|b| b.build_recorder())
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
            let handle = recorder.handle();
            // Fails only if another recorder is installed (then that one receives the metrics).
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

struct LogProgress;

impl flamingo_model::loader::LoadProgress for LogProgress {
    fn stage(&self, message: &str) {
        tracing::info!("{message}");
    }
}

impl AppState {
    pub fn new(cfg: Config, served_name: String) -> anyhow::Result<Arc<Self>> {
        let fetcher = Fetcher::new(cfg.fetch.to_fetch_config()).map_err(|e| anyhow::anyhow!("[fetch] configuration: {e}"))?;
        let prometheus = prometheus();
        crate::middleware::describe_metrics();
        crate::demos::describe();
        let demos = crate::demos::Registry::new(cfg.storage.dir());
        Ok(Arc::new(Self {
            cfg,
            served_name,
            runtime: OnceLock::new(),
            shutting_down: AtomicBool::new(false),
            inflight: AtomicUsize::new(0),
            idle: Notify::new(),
            fetcher,
            prometheus,
            started: now_secs(),
            demos,
        }))
    }

    /// Loads the model (blocking: call from a blocking thread) and starts the engine.
    pub fn load(&self, source: &ModelSource) -> anyhow::Result<()> {
        let dir = source.resolve()?;
        tracing::info!(dir = %dir.display(), device = %self.cfg.model.device, dtype = %self.cfg.model.dtype, "loading model");
        let t = Instant::now();
        let rt = Runtime::load(&dir, &self.cfg, &LogProgress)?;
        self.install(rt)?;
        tracing::info!(seconds = t.elapsed().as_secs_f64(), model = %self.served_name, "model ready");
        Ok(())
    }

    /// Serves `rt` (a model loaded by the caller) from now on.
    pub fn install(&self, rt: Runtime) -> anyhow::Result<()> {
        if self.runtime.set(rt).is_err() {
            anyhow::bail!("the model is already loaded");
        }
        Ok(())
    }

    /// Loads and pins the stored demonstration sets (after the model; `/health` is 503 until
    /// they are).
    pub async fn restore_demonstrations(&self) {
        if let Some(rt) = self.runtime.get() {
            self.demos.restore(self, rt).await;
        }
    }

    /// Whether the model is loaded and the stored demonstration sets are pinned.
    pub fn is_ready(&self) -> bool {
        self.is_loaded() && self.demos.is_ready()
    }

    /// The engine's counters, once the model is loaded.
    pub fn engine_stats(&self) -> Option<&flamingo_engine::EngineStats> {
        self.runtime.get().map(|r| r.engine.stats())
    }

    pub fn is_loaded(&self) -> bool {
        self.runtime.get().is_some()
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Seconds a client is told to wait (`Retry-After`) when refused for load.
    pub fn retry_after(&self) -> u64 {
        self.cfg.server.retry_after_seconds
    }

    /// A 503 with this server's `Retry-After`.
    pub fn unavailable(&self, message: &str) -> ApiError {
        ApiError::unavailable(message, self.retry_after())
    }

    /// The loaded model, also while the server shuts down (for requests already in flight).
    pub fn model(&self) -> Option<&Runtime> {
        self.runtime.get()
    }

    /// The loaded model, or 503 while it loads or the server shuts down.
    pub fn runtime(&self) -> Result<&Runtime, ApiError> {
        if self.is_shutting_down() {
            return Err(self.unavailable("the server is shutting down"));
        }
        self.runtime.get().ok_or_else(|| self.unavailable("the model is still loading"))
    }

    /// From now on new requests get 503; waits (up to `grace`) until in-flight ones finish.
    /// Returns the requests still in flight.
    pub(crate) async fn drain(&self, grace: std::time::Duration) -> usize {
        self.shutting_down.store(true, Ordering::SeqCst);
        let wait = async {
            while self.inflight.load(Ordering::SeqCst) > 0 {
                let n = self.idle.notified();
                if self.inflight.load(Ordering::SeqCst) == 0 {
                    break;
                }
                let _ = tokio::time::timeout(std::time::Duration::from_millis(200), n).await;
            }
        };
        let _ = tokio::time::timeout(grace, wait).await;
        self.inflight()
    }

    pub(crate) fn inflight(&self) -> usize {
        self.inflight.load(Ordering::SeqCst)
    }
}

/// Counts a request as in flight until dropped (held by handlers and by SSE tasks).
pub struct Inflight(Arc<AppState>);

impl Inflight {
    pub fn new(st: &Arc<AppState>) -> Self {
        st.inflight.fetch_add(1, Ordering::SeqCst);
        Self(st.clone())
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        if self.0.inflight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}
