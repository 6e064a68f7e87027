//! Demonstration sets: few-shot examples registered once (`POST /v1/demonstrations`) and used
//! by id in later requests (`"demonstrations": {"id": ..., "k": ...}`).
//!
//! A request that names a set is served exactly as if the set's examples had been sent first:
//! its messages (or raw prompts) are put in front of the request's and the whole prompt goes
//! through the template and tokenizer as usual; only the work is saved. The examples' images
//! are fetched once, at registration, and kept preprocessed; the set's prompt prefix (the
//! tokens every request that uses the whole set shares) and its images' cross-attention K/V
//! are pinned in the engine (outside the LRU caches, within `[engine] pinned_bytes`), so a
//! request computes only its own part.
//!
//! With `k`, the k examples whose (last) image is most similar to the request's last image are
//! used, ordered as OpenFlamingo's `open_flamingo/eval/rices.py` orders them: most similar last.
//! Similarity is the cosine of the vision tower's image embeddings (open_clip's
//! `encode_image`), computed for the examples at registration.
//!
//! Definitions are stored durably through [`crate::store`] (images included), under ids derived
//! from their content, so replicas that share the directory agree on ids and each loads a set
//! it does not know when a request names it. A set deleted through one replica is gone for the
//! others at their next use of it (the stored file is checked on every use).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use flamingo_engine::{Event, PreparedMedia, ValidRequest};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::api::{ChatMessage, ImageRef};
use crate::error::ApiError;
use crate::media::{self, MediaItem};
use crate::state::{AppState, Runtime};
use crate::store::{self, Store, StoredSet};
use crate::template::MediaRef;

/// Metric names of the demonstration sets.
pub const SETS: &str = "flamingo_demonstration_sets";
pub const SKIPPED: &str = "flamingo_demonstration_sets_skipped_total";
pub const SELECTIONS: &str = "flamingo_demonstration_selections_total";

/// Registers the metrics' descriptions.
pub fn describe() {
    metrics::describe_gauge!(SETS, "Demonstration sets loaded and pinned on this server");
    metrics::describe_counter!(SKIPPED, "Stored demonstration sets skipped because they were corrupt or unusable");
    metrics::describe_counter!(SELECTIONS, "Requests whose demonstrations were selected by image similarity (k)");
    metrics::describe_histogram!(crate::routes::CANDIDATES, "Candidates per /v1/score request");
}

/// The URL scheme of a stored image: `blob:<sha256 hex>` (never fetched; only inside stored sets).
const BLOB: &str = "blob:";

/// `"demonstrations"` in a request.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemoRef {
    pub id: String,
    /// Retrieve the k most similar examples (RICES) instead of using all of them.
    #[serde(default, deserialize_with = "crate::jsonint::opt_u64")]
    pub k: Option<u64>,
}

/// `POST /v1/demonstrations`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    #[serde(default)]
    pub name: Option<String>,
    pub examples: Vec<Value>,
}

/// A set as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SetCard {
    pub id: String,
    pub object: &'static str,
    pub name: String,
    pub examples: usize,
    /// Tokens of the pinned prompt prefix (what a request using the whole set has cached).
    pub prompt_tokens: usize,
    /// `chat` (messages) or `raw` (prompt + images).
    pub kind: &'static str,
    pub images: usize,
    pub created: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SetList {
    pub object: &'static str,
    pub data: Vec<SetCard>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Deleted {
    pub id: String,
    pub object: &'static str,
    pub deleted: bool,
}

/// The examples of a set, as they are put in front of a request.
#[derive(Debug, Clone)]
pub enum Examples {
    /// Each example's messages (images as `blob:` URLs).
    Chat(Vec<Vec<ChatMessage>>),
    /// Each example's raw prompt (with its `<image>` markers).
    Raw(Vec<String>),
}

/// A set loaded and pinned.
pub struct DemoSet {
    pub id: String,
    pub name: String,
    pub created: u64,
    pub examples: Examples,
    /// Each example's media, preprocessed, in prompt order.
    pub media: Vec<Vec<PreparedMedia>>,
    /// Each example's normalised image embedding (its last image), when it has one.
    pub embeddings: Vec<Option<Vec<f32>>>,
    pub prompt_tokens: usize,
    /// Bytes of the preprocessed images the set keeps in host memory.
    pub pixel_bytes: usize,
}

impl DemoSet {
    pub fn card(&self) -> SetCard {
        SetCard {
            id: self.id.clone(),
            object: "demonstration_set",
            name: self.name.clone(),
            examples: self.media.len(),
            prompt_tokens: self.prompt_tokens,
            kind: if matches!(self.examples, Examples::Chat(_)) { "chat" } else { "raw" },
            images: self.media.iter().map(Vec::len).sum(),
            created: self.created,
        }
    }

    /// The examples a request uses, in order: all of them, or (with `k`) the k whose image is
    /// most similar to `query`, most similar last (RICES).
    pub fn select(&self, k: Option<u64>, query: Option<&[f32]>) -> Result<Vec<usize>, ApiError> {
        let Some(k) = k else { return Ok((0..self.media.len()).collect()) };
        let n = self.media.len();
        if k == 0 || k > n as u64 {
            return Err(ApiError::bad_request(format!("`demonstrations.k` must be between 1 and {n}, the examples in the set"))
                .param("demonstrations.k"));
        }
        let Some(q) = query else {
            return Err(ApiError::bad_request("`demonstrations.k` selects examples by image similarity: the request needs an image")
                .param("demonstrations.k"));
        };
        let mut sims = Vec::with_capacity(n);
        for (i, e) in self.embeddings.iter().enumerate() {
            let Some(e) = e else {
                return Err(
                    ApiError::bad_request(format!("example {i} of the set has no image, so `k` cannot rank it")).param("demonstrations.k")
                );
            };
            sims.push((i, e.iter().zip(q).map(|(a, b)| a * b).sum::<f32>()));
        }
        metrics::counter!(SELECTIONS).increment(1);
        Ok(rices_order(&sims, k as usize))
    }
}

/// OpenFlamingo's RICES order: the `k` most similar (descending similarity, ties by index),
/// then reversed so the most similar comes last, nearest the query.
pub fn rices_order(sims: &[(usize, f32)], k: usize) -> Vec<usize> {
    let mut order = sims.to_vec();
    order.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    order.truncate(k);
    order.into_iter().rev().map(|(i, _)| i).collect()
}

/// The sets this server knows, and their store.
pub struct Registry {
    store: Store,
    sets: RwLock<HashMap<String, Arc<DemoSet>>>,
    ready: AtomicBool,
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("no demonstration set `{id}`")).param("demonstrations.id")
}

fn storage_error(e: store::StoreError) -> ApiError {
    ApiError::internal(format!("the demonstration store failed: {e}"))
}

impl Registry {
    pub fn new(dir: std::path::PathBuf) -> Self {
        Self { store: Store::new(dir), sets: RwLock::new(HashMap::new()), ready: AtomicBool::new(false) }
    }

    /// Whether the stored sets have been loaded and pinned after start-up.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Host bytes of the known sets' preprocessed images, apart from set `except`.
    fn pixel_bytes(&self, except: &str) -> usize {
        self.sets.read().map(|m| m.values().filter(|s| s.id != except).map(|s| s.pixel_bytes).sum()).unwrap_or(0)
    }

    fn cached(&self, id: &str) -> Option<Arc<DemoSet>> {
        self.sets.read().ok().and_then(|m| m.get(id).cloned())
    }

    fn insert(&self, set: Arc<DemoSet>) {
        if let Ok(mut m) = self.sets.write() {
            m.insert(set.id.clone(), set);
            metrics::gauge!(SETS).set(m.len() as f64);
        }
    }

    fn forget(&self, id: &str) -> bool {
        match self.sets.write() {
            Ok(mut m) => {
                let had = m.remove(id).is_some();
                metrics::gauge!(SETS).set(m.len() as f64);
                had
            }
            Err(_) => false,
        }
    }

    /// Loads and pins every stored set (start-up); a corrupt or unusable one is logged, counted
    /// and skipped. Marks the registry ready.
    pub async fn restore(&self, st: &AppState, rt: &Runtime) {
        let store = self.store.clone();
        let found = tokio::task::spawn_blocking(move || store.scan()).await.unwrap_or_default();
        for entry in found {
            match entry {
                Ok(set) => {
                    let id = set.id.clone();
                    match build(st, rt, set).await {
                        Ok(s) => self.insert(Arc::new(s)),
                        Err(e) => {
                            metrics::counter!(SKIPPED).increment(1);
                            tracing::warn!(id, error = %e.message, "stored demonstration set skipped");
                        }
                    }
                }
                Err(e) => {
                    metrics::counter!(SKIPPED).increment(1);
                    tracing::warn!(error = %e, "stored demonstration set skipped (corrupt)");
                }
            }
        }
        self.ready.store(true, Ordering::SeqCst);
        tracing::info!(sets = self.sets.read().map(|m| m.len()).unwrap_or(0), dir = %self.store.dir().display(), "demonstration sets ready");
    }

    /// A set by id: known here (and still stored), else loaded from the store (a set
    /// registered through another replica).
    pub async fn get(&self, st: &AppState, rt: &Runtime, id: &str) -> Result<Arc<DemoSet>, ApiError> {
        if !store::is_valid_id(id) {
            return Err(not_found(id));
        }
        let store = self.store.clone();
        let key = id.to_string();
        if let Some(s) = self.cached(id) {
            let exists = tokio::task::spawn_blocking(move || store.exists(&key)).await.unwrap_or(true);
            if exists {
                return Ok(s);
            }
            // Deleted through another replica.
            self.forget(id);
            let _ = rt.engine.unpin(id).await;
            return Err(not_found(id));
        }
        let loaded = tokio::task::spawn_blocking(move || store.load(&key)).await.map_err(|e| ApiError::internal(e.to_string()))?;
        match loaded {
            Ok(Some(set)) => {
                let s = Arc::new(build(st, rt, set).await?);
                self.insert(s.clone());
                Ok(s)
            }
            Ok(None) => Err(not_found(id)),
            Err(e @ store::StoreError::Corrupt { .. }) => {
                metrics::counter!(SKIPPED).increment(1);
                tracing::warn!(error = %e, "stored demonstration set is corrupt");
                Err(ApiError::not_found(format!("the demonstration set `{id}` is stored corrupt and cannot be used; register it again"))
                    .param("demonstrations.id"))
            }
            Err(e) => Err(storage_error(e)),
        }
    }

    /// Every set: the store's (loading those not known here) and those known here.
    pub async fn list(&self, st: &AppState, rt: &Runtime) -> Vec<SetCard> {
        let store = self.store.clone();
        let found = tokio::task::spawn_blocking(move || store.scan()).await.unwrap_or_default();
        for set in found.into_iter().flatten() {
            if self.cached(&set.id).is_none() {
                let _ = self.get(st, rt, &set.id.clone()).await;
            }
        }
        let mut cards: Vec<SetCard> = self.sets.read().map(|m| m.values().map(|s| s.card()).collect()).unwrap_or_default();
        cards.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
        cards
    }

    /// Registers a set: its images fetched, its definition stored, its prefix pinned. The same
    /// content registered again gets the same id (and `false`: nothing new was made).
    pub async fn register(&self, st: &AppState, rt: &Runtime, req: RegisterRequest) -> Result<(Arc<DemoSet>, bool), ApiError> {
        let l = &st.cfg.limits;
        if req.examples.is_empty() || req.examples.len() > l.max_demonstration_examples {
            return Err(
                ApiError::bad_request(format!("a set needs between 1 and {} examples", l.max_demonstration_examples)).param("examples")
            );
        }
        let (examples, blobs) = normalise(st, rt, &req.examples).await?;
        let stored = StoredSet::new(req.name.unwrap_or_default(), crate::state::now_secs(), examples, blobs)
            .map_err(|e| ApiError::bad_request(format!("the set cannot be stored: {e}")))?;
        if let Some(s) = self.cached(&stored.id) {
            if self.store.exists(&stored.id) {
                return Ok((s, false));
            }
        }
        let known = self.sets.read().map(|m| m.len()).unwrap_or(0);
        if known >= l.max_demonstration_sets {
            return Err(ApiError::bad_request(format!(
                "this server keeps at most {} demonstration sets; delete one first",
                l.max_demonstration_sets
            )));
        }
        let set = Arc::new(build(st, rt, stored.clone()).await?);
        let store = self.store.clone();
        let put = tokio::task::spawn_blocking(move || store.put(&stored)).await.map_err(|e| ApiError::internal(e.to_string()))?;
        if let Err(e) = put {
            let _ = rt.engine.unpin(&set.id).await;
            return Err(ApiError {
                status: axum::http::StatusCode::INSUFFICIENT_STORAGE,
                ..ApiError::internal(format!("the set could not be stored (nothing was registered): {e}"))
            });
        }
        self.insert(set.clone());
        Ok((set, true))
    }

    /// Removes a set: its stored file, its pins, and this replica's copy.
    pub async fn delete(&self, rt: &Runtime, id: &str) -> Result<(), ApiError> {
        if !store::is_valid_id(id) {
            return Err(not_found(id).param("id"));
        }
        let store = self.store.clone();
        let key = id.to_string();
        let removed = tokio::task::spawn_blocking(move || store.remove(&key)).await.map_err(|e| ApiError::internal(e.to_string()))?;
        let removed = removed.map_err(storage_error)?;
        let known = self.forget(id);
        let _ = rt.engine.unpin(id).await;
        if removed || known {
            Ok(())
        } else {
            Err(not_found(id).param("id"))
        }
    }
}

/// The parts of a message that hold media, in the order the template reads them.
fn media_parts(messages: &mut [Value]) -> Vec<&mut Value> {
    let mut out = Vec::new();
    for m in messages.iter_mut() {
        if let Some(Value::Array(parts)) = m.get_mut("content") {
            for p in parts.iter_mut() {
                if matches!(p.get("type").and_then(Value::as_str), Some("image_url" | "video_url")) {
                    out.push(p);
                }
            }
        }
    }
    out
}

/// A media item's part with its URLs replaced by stored blobs.
fn blob_part(source: &MediaRef, keys: &[String]) -> Value {
    let blob = |k: &String| format!("{BLOB}{k}");
    match source {
        MediaRef::Image(_) => json!({"type": "image_url", "image_url": {"url": keys.first().map(blob)}}),
        MediaRef::Animation(_) => json!({"type": "video_url", "video_url": {"url": keys.first().map(blob)}}),
        MediaRef::Video(_) => json!({"type": "video_url", "video_url": {"url": keys.iter().map(blob).collect::<Vec<_>>()}}),
    }
}

/// The examples of a registration checked, their media fetched and replaced by blobs: the
/// stored form `{"kind": "chat"|"raw", "examples": [...]}` and the blobs.
async fn normalise(st: &AppState, rt: &Runtime, examples: &[Value]) -> Result<(Value, BTreeMap<String, Vec<u8>>), ApiError> {
    let chat = examples.first().is_some_and(|e| e.get("messages").is_some());
    let mut blobs = BTreeMap::new();
    let mut out = Vec::with_capacity(examples.len());
    for (i, ex) in examples.iter().enumerate() {
        let param = format!("examples[{i}]");
        let Value::Object(obj) = ex else {
            return Err(ApiError::bad_request("each example is an object with `messages` (or `prompt` and `images`)").param(param));
        };
        if chat != obj.contains_key("messages") {
            return Err(ApiError::bad_request("all examples of a set are chat messages, or all are raw prompts").param(param));
        }
        let (items, mut normalised) = if chat {
            if let Some(k) = obj.keys().find(|k| k.as_str() != "messages") {
                return Err(ApiError::bad_request(format!("unknown field `{k}` in a chat example")).param(format!("{param}.{k}")));
            }
            let msgs: Vec<ChatMessage> = serde_json::from_value(obj.get("messages").cloned().unwrap_or(Value::Null))
                .map_err(|e| ApiError::bad_request(format!("invalid messages: {e}")).param(format!("{param}.messages")))?;
            let prompt = rt.template.apply(&msgs).map_err(|e| prefixed(e, &param))?;
            let items: Vec<MediaItem> = prompt
                .media
                .into_iter()
                .zip(prompt.media_params)
                .map(|(source, p)| MediaItem { source, param: format!("{param}.{p}") })
                .collect();
            (items, obj.get("messages").cloned().unwrap_or(Value::Null))
        } else {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Raw {
                prompt: String,
                #[serde(default)]
                images: Vec<ImageRef>,
            }
            let raw: Raw = serde_json::from_value(ex.clone())
                .map_err(|e| ApiError::bad_request(format!("invalid example: {e}")).param(param.clone()))?;
            let ids = rt
                .tokenizer
                .encode_prompt(&raw.prompt)
                .map_err(|e| ApiError::bad_request(format!("cannot tokenize: {e}")).param(format!("{param}.prompt")))?;
            let slots = ids.iter().filter(|&&t| t == rt.tokenizer.media_token_id()).count();
            if slots != raw.images.len() {
                return Err(ApiError::bad_request(format!(
                    "the prompt has {slots} <image> markers but {} images were given",
                    raw.images.len()
                ))
                .param(format!("{param}.images")));
            }
            let items = raw
                .images
                .iter()
                .enumerate()
                .map(|(j, im)| MediaItem { source: MediaRef::Image(im.url().to_string()), param: format!("{param}.images[{j}]") })
                .collect();
            (items, json!({"prompt": raw.prompt, "images": []}))
        };
        for it in &items {
            if media::urls(&it.source).iter().any(|u| u.starts_with(BLOB)) {
                return Err(ApiError::bad_request("`blob:` URLs are not accepted").param(it.param.clone()));
            }
        }
        media::check(&rt.media, &items)?;
        let fetched = media::fetch_all(&st.fetcher, &items).await?;
        // Every item must decode now (a set that cannot be served is not stored).
        media::decode(&rt.media, &items, fetched.clone()).await?;
        let mut parts = Vec::with_capacity(items.len());
        for (it, bytes) in items.iter().zip(fetched) {
            let keys: Vec<String> = bytes
                .into_iter()
                .map(|b| {
                    let k = store::blob_key(&b);
                    blobs.insert(k.clone(), b);
                    k
                })
                .collect();
            parts.push(blob_part(&it.source, &keys));
        }
        if chat {
            if let Value::Array(msgs) = &mut normalised {
                for (slot, part) in media_parts(msgs).into_iter().zip(parts) {
                    *slot = part;
                }
            }
        } else if let Some(v) = normalised.get_mut("images") {
            *v = Value::Array(parts.into_iter().filter_map(|p| p.pointer("/image_url/url").cloned()).collect());
        }
        out.push(normalised);
    }
    Ok((json!({"kind": if chat { "chat" } else { "raw" }, "examples": out}), blobs))
}

fn prefixed(mut e: ApiError, param: &str) -> ApiError {
    e.param = Some(match e.param.take() {
        Some(p) => format!("{param}.{p}"),
        None => param.to_string(),
    });
    e
}

/// A stored set made ready to serve: its examples parsed, its media decoded from the blobs,
/// its embeddings computed and its prefix pinned.
async fn build(st: &AppState, rt: &Runtime, set: StoredSet) -> Result<DemoSet, ApiError> {
    let bad = |m: String| ApiError::bad_request(format!("demonstration set {}: {m}", set.id));
    let kind = set.examples.get("kind").and_then(Value::as_str).unwrap_or("");
    let list = set.examples.get("examples").and_then(Value::as_array).cloned().unwrap_or_default();
    if list.is_empty() {
        return Err(bad("it has no examples".into()));
    }
    let mut media = Vec::with_capacity(list.len());
    let blob = |u: &str| -> Result<Vec<u8>, ApiError> {
        u.strip_prefix(BLOB).and_then(|k| set.blobs.get(k)).cloned().ok_or_else(|| bad(format!("missing image {u}")))
    };
    let examples = match kind {
        "chat" => {
            let mut all = Vec::with_capacity(list.len());
            for ex in &list {
                let msgs: Vec<ChatMessage> = serde_json::from_value(ex.clone()).map_err(|e| bad(e.to_string()))?;
                let prompt = rt.template.apply(&msgs)?;
                let items: Vec<MediaItem> = prompt.media.into_iter().map(|source| MediaItem { source, param: "examples".into() }).collect();
                let fetched = items
                    .iter()
                    .map(|it| media::urls(&it.source).into_iter().map(blob).collect::<Result<Vec<_>, _>>())
                    .collect::<Result<Vec<_>, _>>()?;
                media::check(&rt.media, &items)?;
                media.push(media::decode(&rt.media, &items, fetched).await?);
                all.push(msgs);
            }
            Examples::Chat(all)
        }
        "raw" => {
            let mut all = Vec::with_capacity(list.len());
            for ex in &list {
                let prompt = ex.get("prompt").and_then(Value::as_str).ok_or_else(|| bad("an example has no prompt".into()))?;
                let urls: Vec<&str> =
                    ex.get("images").and_then(Value::as_array).map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
                let items: Vec<MediaItem> =
                    urls.iter().map(|u| MediaItem { source: MediaRef::Image(u.to_string()), param: "examples".into() }).collect();
                let fetched = urls.iter().map(|u| blob(u).map(|b| vec![b])).collect::<Result<Vec<_>, _>>()?;
                media.push(media::decode(&rt.media, &items, fetched).await?);
                all.push(prompt.to_string());
            }
            Examples::Raw(all)
        }
        other => return Err(bad(format!("unknown kind `{other}`"))),
    };
    // Each example's last image, embedded on the engine's thread.
    let lasts: Vec<Option<PreparedMedia>> = media.iter().map(|m: &Vec<PreparedMedia>| m.last().cloned()).collect();
    let wanted: Vec<PreparedMedia> = lasts.iter().flatten().cloned().collect();
    let mut embedded = if wanted.is_empty() {
        Vec::new()
    } else {
        rt.engine.embed(wanted).await.map_err(|e| ApiError::from_engine(&e, st.retry_after()))?
    }
    .into_iter();
    let embeddings = lasts.iter().map(|l| l.as_ref().and_then(|_| embedded.next())).collect();
    // The preprocessed images stay in host memory: they count against the same budget as the
    // pinned K/V (which the engine checks when pinning).
    let pixel_bytes: usize = media.iter().flatten().map(|m| m.pixels.elem_count() * m.pixels.dtype().size_in_bytes()).sum();
    let budget = st.cfg.engine.pinned_bytes;
    let held = st.demos.pixel_bytes(&set.id);
    if held + pixel_bytes > budget {
        return Err(ApiError::bad_request(format!(
            "the set's preprocessed images need {pixel_bytes} bytes; the demonstration sets' images already hold {held} of the {budget} bytes of engine.pinned_bytes"
        )));
    }
    let mut demo = DemoSet {
        id: set.id.clone(),
        name: set.name.clone(),
        created: set.created,
        examples,
        media,
        embeddings,
        prompt_tokens: 0,
        pixel_bytes,
    };
    demo.prompt_tokens = pin(rt, &demo, st.retry_after()).await?;
    Ok(demo)
}

/// Pins the prompt prefix every request using the whole set shares: the tokens on which the
/// set followed by two different probe queries agree (so whatever the template or the
/// tokenizer does at the boundary, the pinned tokens are a prefix of every such prompt).
/// Returns its length.
async fn pin(rt: &Runtime, set: &DemoSet, retry_after: u64) -> Result<usize, ApiError> {
    let all: Vec<usize> = (0..set.media.len()).collect();
    // A query that starts with text, another text, and one that starts with an image (the
    // probes' tokens are only compared, never run).
    let probe = |parts: Value, text: &str| -> Result<Vec<u32>, ApiError> {
        match &set.examples {
            Examples::Chat(_) => {
                let content: crate::api::MessageContent = serde_json::from_value(parts).map_err(|e| ApiError::internal(e.to_string()))?;
                let q = vec![ChatMessage { role: "user".into(), content: Some(content) }];
                let msgs = set_messages(set, &all, &q);
                let prompt = rt.template.apply(&msgs)?;
                rt.tokenizer.encode_segments(&prompt.segments()).map_err(|e| ApiError::bad_request(e.to_string()))
            }
            Examples::Raw(_) => {
                rt.tokenizer.encode_prompt(&(set_prompt(set, &all) + text)).map_err(|e| ApiError::bad_request(e.to_string()))
            }
        }
    };
    let a = probe(json!("A"), "A")?;
    let b = probe(json!("Zq"), "Zq")?;
    let c = probe(json!([{"type": "image_url", "image_url": {"url": "probe"}}, {"type": "text", "text": "Q"}]), "<image>Q")?;
    let common = [&b, &c].iter().map(|x| a.iter().zip(x.iter()).take_while(|(p, q)| p == q).count()).min().unwrap_or(0);
    if common == 0 {
        return Ok(0);
    }
    let prefix = a[..common].to_vec();
    let images = prefix.iter().filter(|&&t| t == rt.tokenizer.media_token_id()).count();
    let media: Vec<PreparedMedia> = set.media.iter().flatten().take(images).cloned().collect();
    let req = ValidRequest::pin(set.id.clone(), prefix, media, rt.engine.spec()).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let mut events = rt.engine.submit(req).map_err(|e| ApiError::from_engine(&e, retry_after))?;
    while let Some(ev) = events.recv().await {
        match ev {
            Event::Pinned { .. } => return Ok(common),
            Event::Error(e) => return Err(ApiError::from_engine(&e, retry_after)),
            _ => {}
        }
    }
    Err(ApiError::internal("the engine stopped while pinning"))
}

/// The selected examples' messages, then `query`.
pub fn set_messages(set: &DemoSet, selected: &[usize], query: &[ChatMessage]) -> Vec<ChatMessage> {
    let mut out = Vec::new();
    if let Examples::Chat(ex) = &set.examples {
        for &i in selected {
            if let Some(m) = ex.get(i) {
                out.extend(m.iter().cloned());
            }
        }
    }
    out.extend(query.iter().cloned());
    out
}

/// The selected examples' raw prompts, concatenated.
pub fn set_prompt(set: &DemoSet, selected: &[usize]) -> String {
    match &set.examples {
        Examples::Raw(p) => selected.iter().filter_map(|&i| p.get(i)).map(String::as_str).collect(),
        Examples::Chat(_) => String::new(),
    }
}

/// The selected examples' media, in order.
pub fn set_media(set: &DemoSet, selected: &[usize]) -> Vec<PreparedMedia> {
    selected.iter().filter_map(|&i| set.media.get(i)).flatten().cloned().collect()
}

/// The query's media prepared, and the examples chosen for it (`k`: by the similarity of the
/// query's last image).
async fn choose(
    st: &AppState,
    rt: &Runtime,
    d: &DemoRef,
    query: Vec<MediaItem>,
) -> Result<(Arc<DemoSet>, Vec<usize>, Vec<PreparedMedia>), ApiError> {
    let set = st.demos.get(st, rt, &d.id).await?;
    let qmedia = media::prepare(&st.fetcher, &rt.media, query).await?;
    let embedding = match (d.k, qmedia.last()) {
        (Some(_), Some(last)) => {
            rt.engine.embed(vec![last.clone()]).await.map_err(|e| ApiError::from_engine(&e, st.retry_after()))?.into_iter().next()
        }
        _ => None,
    };
    let selected = set.select(d.k, embedding.as_deref())?;
    Ok((set, selected, qmedia))
}

/// A chat with a demonstration set: the token ids of the set's (selected) examples' messages
/// followed by `messages`, and every media item of that prompt, prepared, in order.
pub async fn chat_prompt(
    st: &AppState,
    rt: &Runtime,
    messages: &[ChatMessage],
    d: &DemoRef,
) -> Result<(Vec<u32>, Vec<PreparedMedia>), ApiError> {
    let (ids, media, _) = chat_parts(st, rt, messages, d).await?;
    Ok((ids, media))
}

/// [`chat_prompt`], and the whole message list (for scoring, which appends a reply to it).
pub async fn chat_parts(
    st: &AppState,
    rt: &Runtime,
    messages: &[ChatMessage],
    d: &DemoRef,
) -> Result<(Vec<u32>, Vec<PreparedMedia>, Vec<ChatMessage>), ApiError> {
    let query = rt.template.apply(messages)?;
    let items: Vec<MediaItem> =
        query.media.into_iter().zip(query.media_params).map(|(source, param)| MediaItem { source, param }).collect();
    let (set, selected, qmedia) = choose(st, rt, d, items).await?;
    if !matches!(set.examples, Examples::Chat(_)) {
        return Err(ApiError::bad_request("this demonstration set holds raw prompts: use it with /v1/completions or a raw /v1/score")
            .param("demonstrations.id"));
    }
    let all = set_messages(&set, &selected, messages);
    let prompt = rt.template.apply(&all)?;
    let ids = rt
        .tokenizer
        .encode_segments(&prompt.segments())
        .map_err(|e| ApiError::bad_request(format!("cannot tokenize the messages: {e}")))?;
    let mut media = set_media(&set, &selected);
    media.extend(qmedia);
    if media.len() != prompt.media.len() {
        return Err(ApiError::internal(format!("{} media for {} image slots", media.len(), prompt.media.len())));
    }
    Ok((ids, media, all))
}

/// A raw prompt with a raw demonstration set: the token ids of the set's (selected) example
/// prompts concatenated in front of `prompt`, and every image, prepared, in order.
pub async fn raw_prompt(
    st: &AppState,
    rt: &Runtime,
    prompt: &str,
    images: &[ImageRef],
    d: &DemoRef,
) -> Result<(Vec<u32>, Vec<PreparedMedia>), ApiError> {
    let items = images
        .iter()
        .enumerate()
        .map(|(i, im)| MediaItem { source: MediaRef::Image(im.url().to_string()), param: format!("images[{i}]") })
        .collect();
    let (set, selected, qmedia) = choose(st, rt, d, items).await?;
    if !matches!(set.examples, Examples::Raw(_)) {
        return Err(ApiError::bad_request(
            "this demonstration set holds chat messages: use it with /v1/chat/completions or a chat /v1/score",
        )
        .param("demonstrations.id"));
    }
    let text = set_prompt(&set, &selected) + prompt;
    let ids = rt.tokenizer.encode_prompt(&text).map_err(|e| ApiError::bad_request(format!("cannot tokenize the prompt: {e}")))?;
    let mut media = set_media(&set, &selected);
    media.extend(qmedia);
    let slots = ids.iter().filter(|&&t| t == rt.tokenizer.media_token_id()).count();
    if slots != media.len() {
        return Err(
            ApiError::bad_request(format!("the prompt has {slots} <image> markers but {} images were given", media.len())).param("images")
        );
    }
    Ok((ids, media))
}
