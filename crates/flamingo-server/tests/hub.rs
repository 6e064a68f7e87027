//! `flamingo_server::hub` against a fake Hugging Face hub on 127.0.0.1 whose repos are built from
//! the tiny `mosaicgpt_x1` fixture (see `common/fake_hub.rs` for what the fake answers).

mod common {
    pub mod fake_hub;
}

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::fake_hub::{commit_of, fixture, read, release_repos, FakeHub, RepoFiles};
use flamingo_model::candle::{DType, Device};
use flamingo_model::config::Overrides;
use flamingo_model::manifest::Manifest;
use flamingo_model::ModelFiles;
use flamingo_server::hub::{self, HubError, HubOptions};

const CLIP_REPO: &str = "test-org/clip-tiny";
const LM_REPO: &str = "test-org/mosaicgpt-tiny";
const CKPT_REPO: &str = "test-org/flamingo-tiny";
const TOKEN: &str = "hf_test_secret";

/// The fixture's files, relative to the model directory (and to the fixture).
const MODEL_FILES: &[&str] = &[
    "clip/open_clip_config.json",
    "clip/open_clip_pytorch_model.bin",
    "lm/config.json",
    "lm/tokenizer.json",
    "lm/tokenizer_config.json",
    "lm/special_tokens_map.json",
    "lm/pytorch_model.bin",
    "checkpoint.pt",
];

// ---------------------------------------------------------------------------------------------
// Repos, manifests, options.

/// The three repos of the release layout, from the fixture.
fn fixture_repos() -> Vec<(&'static str, RepoFiles)> {
    release_repos(CLIP_REPO, LM_REPO, CKPT_REPO)
}

/// A manifest in the released form pointing at the fake repos. The clip source prefers
/// `open_clip_model.safetensors`, which the fake repo lacks; the checkpoint is pinned to a commit.
fn manifest_text() -> String {
    format!(
        r#"
name = "test-org/Tiny-MosaicGPT"
description = "The mosaicgpt_x1 fixture, served by a fake hub."
lm_family = "mosaic_gpt"
cross_attn_every_n_layers = 1
license = "test"

[sources.clip]
repo = "{CLIP_REPO}"
files = ["open_clip_config.json"]
weights = ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]

[sources.lm]
repo = "{LM_REPO}"
files = ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
weights = ["model.safetensors", "pytorch_model.bin"]

[sources.checkpoint]
repo = "{CKPT_REPO}"
revision = "{}"
weights = ["checkpoint.pt"]

[overrides.vision]
quick_gelu = true

[quality]
coco_cider_4shot = 0.0
vqav2_accuracy_4shot = 0.0
"#,
        commit_of(CKPT_REPO)
    )
}

/// `text` with `from` replaced by `to`; `from` must occur.
fn replaced(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "manifest text has no `{from}`");
    text.replace(from, to)
}

fn parse_manifest(text: &str) -> Manifest {
    Manifest::from_toml_str(text, Path::new("test-manifest.toml")).unwrap_or_else(|e| panic!("manifest: {e}"))
}

/// A directory under Cargo's per-target scratch space, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("hub-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn options(endpoint: &str, tmp: &TempDir, token: Option<&str>) -> HubOptions {
    HubOptions {
        endpoint: endpoint.to_string(),
        cache_dir: tmp.0.join("hf").join("hub"),
        token: token.map(str::to_string),
        progress: false,
    }
}

/// An endpoint nothing listens on.
fn dead_endpoint() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    format!("http://{addr}")
}

fn assert_same_as_fixture(dir: &Path, cache_dir: &Path) {
    let cache = std::fs::canonicalize(cache_dir).expect("cache dir exists");
    for rel in MODEL_FILES {
        let got = dir.join(rel);
        assert_eq!(read(&got), read(&fixture().join(rel)), "{rel} differs from the fixture");
        if cfg!(unix) {
            let meta = std::fs::symlink_metadata(&got).expect("metadata");
            assert!(meta.file_type().is_symlink(), "{rel} is a symlink");
            let target = std::fs::canonicalize(&got).expect("link resolves");
            assert!(target.starts_with(&cache), "{rel} points into the hub cache, not {}", target.display());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[test]
fn download_lays_out_a_loadable_model_and_a_second_run_uses_the_cache() {
    let hub = FakeHub::start(fixture_repos(), None);
    let tmp = TempDir::new("download");
    let opts = options(&hub.url, &tmp, None);
    let manifest = parse_manifest(&manifest_text());

    let dir = hub::download(&manifest, &opts).unwrap_or_else(|e| panic!("download: {e}"));
    assert_eq!(dir, tmp.0.join("hf/flamingo/models/test-org--Tiny-MosaicGPT"));
    assert_eq!(dir, opts.model_dir(&manifest));
    assert_same_as_fixture(&dir, &opts.cache_dir);

    // The normal hub cache layout, with the pinned revision as its own ref.
    let clip_ref = opts.cache_dir.join("models--test-org--clip-tiny/refs/main");
    assert_eq!(String::from_utf8(read(&clip_ref)).expect("utf-8 ref"), hub.commit(CLIP_REPO));
    let ckpt_commit = hub.commit(CKPT_REPO);
    assert!(opts.cache_dir.join("models--test-org--flamingo-tiny/refs").join(&ckpt_commit).is_file());

    // The preferred clip weights were asked for, missing, and the next alternative was used.
    let log = hub.requests();
    assert!(log.iter().any(|r| r == "GET /test-org/clip-tiny/resolve/main/open_clip_model.safetensors"), "{log:?}");
    assert!(!dir.join("clip/open_clip_model.safetensors").exists());
    assert!(!dir.join("lm/model.safetensors").exists());
    assert!(log.iter().any(|r| r == &format!("GET /test-org/flamingo-tiny/resolve/{ckpt_commit}/checkpoint.pt")));
    assert!(log.iter().any(|r| r.starts_with("GET /cdn/")), "weights came through the LFS redirect: {log:?}");

    // flamingo.toml from the manifest's overrides, and the loader honours it (the fixture's
    // open_clip config says quick_gelu = false).
    let text = String::from_utf8(read(&dir.join("flamingo.toml"))).expect("utf-8 flamingo.toml");
    let overrides: Overrides = toml::from_str(&text).expect("valid flamingo.toml");
    assert_eq!(overrides.cross_attn_every_n_layers, Some(1));
    assert_eq!(overrides.vision.quick_gelu, Some(true));
    let loaded = flamingo_model::load(&dir, &Device::Cpu, DType::F32, &()).unwrap_or_else(|e| panic!("load: {e}"));
    assert!(loaded.model.config().vision.quick_gelu);
    assert_eq!(loaded.model.config().cross_attn_every_n_layers, Some(1));
    let flamingo_model::LoadedFiles::OpenFlamingo(files) = &loaded.files else { panic!("loaded as another layout") };
    assert_eq!(files.checkpoint, dir.join("checkpoint.pt"));
    assert_eq!(files.clip_weights, dir.join("clip/open_clip_pytorch_model.bin"));
    assert_eq!(files.lm_weights, vec![dir.join("lm/pytorch_model.bin")]);
    drop(loaded);

    // Second run: same directory, no request at all.
    let before = hub.requests().len();
    assert!(before >= MODEL_FILES.len() * 2, "each file needs a metadata and a content request");
    let again = hub::download(&manifest, &opts).unwrap_or_else(|e| panic!("second download: {e}"));
    assert_eq!(again, dir);
    assert_eq!(hub.requests().len(), before, "second download made requests: {:?}", &hub.requests()[before..]);
    assert_same_as_fixture(&dir, &opts.cache_dir);

    // A removed model directory is rebuilt from the cache, still offline; stale entries go.
    std::fs::write(dir.join("clip/stale.bin"), b"stale").expect("write stale file");
    std::fs::remove_dir_all(dir.join("lm")).expect("remove lm/");
    let rebuilt = hub::download(&manifest, &opts).unwrap_or_else(|e| panic!("rebuild: {e}"));
    assert_eq!(rebuilt, dir);
    assert_eq!(hub.requests().len(), before);
    assert!(!dir.join("clip/stale.bin").exists());
    assert_same_as_fixture(&dir, &opts.cache_dir);
    ModelFiles::resolve(&dir).unwrap_or_else(|e| panic!("resolve: {e}"));

    // resolve: by a name variant (downloads, here from the cache), and a directory as is.
    let by_name = hub::resolve_with("TEST-ORG/tiny-mosaicgpt", std::slice::from_ref(&manifest), &opts)
        .unwrap_or_else(|e| panic!("resolve by name: {e}"));
    assert_eq!(by_name, dir);
    let dir_arg = dir.to_str().expect("utf-8 path");
    assert_eq!(hub::resolve_with(dir_arg, &[], &opts).expect("resolve a directory"), dir);
    assert_eq!(hub.requests().len(), before);
}

#[test]
fn an_index_alternative_brings_the_shards_it_names() {
    let index = serde_json::json!({
        "metadata": { "total_size": 20 },
        "weight_map": {
            "a.weight": "model-00001-of-00002.safetensors",
            "b.weight": "model-00002-of-00002.safetensors",
            "c.weight": "model-00002-of-00002.safetensors",
        }
    });
    let mut repos = fixture_repos();
    for (name, files) in &mut repos {
        if *name == LM_REPO {
            files.push(("model.safetensors.index.json".into(), index.to_string().into_bytes()));
            files.push(("model-00001-of-00002.safetensors".into(), b"first shard".to_vec()));
            files.push(("model-00002-of-00002.safetensors".into(), b"second shard".to_vec()));
        }
    }
    let evil_index = serde_json::json!({ "weight_map": { "x": "../../../escaped.bin" } });
    repos.push(("test-org/evil-lm", vec![("model.safetensors.index.json".into(), evil_index.to_string().into_bytes())]));
    let hub = FakeHub::start(repos, None);
    let tmp = TempDir::new("index");
    let opts = options(&hub.url, &tmp, None);

    let text = replaced(
        &manifest_text(),
        r#"weights = ["model.safetensors", "pytorch_model.bin"]"#,
        r#"weights = ["model.safetensors.index.json", "pytorch_model.bin"]"#,
    );
    let dir = hub::download(&parse_manifest(&text), &opts).unwrap_or_else(|e| panic!("download: {e}"));
    assert_eq!(read(&dir.join("lm/model.safetensors.index.json")), index.to_string().into_bytes());
    assert_eq!(read(&dir.join("lm/model-00001-of-00002.safetensors")), b"first shard");
    assert_eq!(read(&dir.join("lm/model-00002-of-00002.safetensors")), b"second shard");
    assert!(!dir.join("lm/pytorch_model.bin").exists(), "only the chosen alternative is laid out");
    assert!(!hub.requests().iter().any(|r| r.ends_with("/pytorch_model.bin")), "the index alternative came first");
    let files = ModelFiles::resolve(&dir).unwrap_or_else(|e| panic!("resolve: {e}"));
    assert_eq!(files.lm_weights, vec![dir.join("lm/model-00001-of-00002.safetensors"), dir.join("lm/model-00002-of-00002.safetensors")]);

    // Shard names from the hub never escape the cache or the model directory.
    let evil = replaced(&text, &format!(r#"repo = "{LM_REPO}""#), r#"repo = "test-org/evil-lm""#);
    let evil =
        replaced(&evil, r#"files = ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]"#, "files = []");
    match hub::download(&parse_manifest(&evil), &opts) {
        Err(HubError::InvalidFileName { repo, file, .. }) => {
            assert_eq!(repo, "test-org/evil-lm");
            assert_eq!(file, "../../../escaped.bin");
        }
        other => panic!("expected InvalidFileName, got {other:?}"),
    }
    assert!(!hub.requests().iter().any(|r| r.contains("escaped")));
}

#[test]
fn missing_repos_revisions_and_files_are_reported_by_name() {
    let mut repos = fixture_repos();
    for (name, files) in &mut repos {
        if *name == LM_REPO {
            files.retain(|(f, _)| f != "special_tokens_map.json");
        }
    }
    let hub = FakeHub::start(repos, None);
    let tmp = TempDir::new("missing");
    let opts = options(&hub.url, &tmp, None);
    let text = manifest_text();

    let manifest = parse_manifest(&text);
    match hub::download(&manifest, &opts) {
        Err(e @ HubError::FileNotFound { .. }) => {
            let msg = e.to_string();
            let HubError::FileNotFound { repo, file, revision, .. } = e else { unreachable!() };
            assert_eq!((repo.as_str(), file.as_str(), revision.as_str()), (LM_REPO, "special_tokens_map.json", "main"));
            assert!(msg.contains("special_tokens_map.json") && msg.contains(LM_REPO), "{msg}");
        }
        other => panic!("expected FileNotFound, got {other:?}"),
    }
    assert!(!opts.model_dir(&manifest).exists(), "no model directory after a failed download");

    // No weights alternative on the hub: all are named.
    let no_weights = replaced(
        &text,
        r#"weights = ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]"#,
        r#"weights = ["open_clip_model.safetensors", "open_clip_other.bin"]"#,
    );
    match hub::download(&parse_manifest(&no_weights), &opts) {
        Err(e @ HubError::NoWeights { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("open_clip_model.safetensors") && msg.contains("open_clip_other.bin"), "{msg}");
            assert!(msg.contains(CLIP_REPO), "{msg}");
        }
        other => panic!("expected NoWeights, got {other:?}"),
    }

    let no_repo = replaced(&text, &format!(r#"repo = "{CLIP_REPO}""#), r#"repo = "test-org/nope""#);
    match hub::download(&parse_manifest(&no_repo), &opts) {
        Err(e @ HubError::RepoNotFound { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("test-org/nope") && msg.contains("HF_TOKEN"), "{msg}");
        }
        other => panic!("expected RepoNotFound, got {other:?}"),
    }

    let no_rev = replaced(&text, &commit_of(CKPT_REPO), "v9.9");
    let no_rev = replaced(
        &no_rev,
        r#"files = ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]"#,
        r#"files = ["config.json"]"#,
    );
    match hub::download(&parse_manifest(&no_rev), &opts) {
        Err(e @ HubError::RevisionNotFound { .. }) => assert!(e.to_string().contains("v9.9"), "{e}"),
        other => panic!("expected RevisionNotFound, got {other:?}"),
    }
}

#[test]
fn a_hub_requiring_a_token_says_so_and_accepts_the_right_one() {
    let hub = FakeHub::start(fixture_repos(), Some(TOKEN));
    let manifest = parse_manifest(&manifest_text());

    let tmp = TempDir::new("auth-none");
    match hub::download(&manifest, &options(&hub.url, &tmp, None)) {
        Err(e @ HubError::Auth { status: 401, token_sent: false, .. }) => {
            assert!(e.to_string().contains("HF_TOKEN"), "{e}");
        }
        other => panic!("expected Auth without token, got {other:?}"),
    }
    match hub::download(&manifest, &options(&hub.url, &tmp, Some("hf_wrong"))) {
        Err(e @ HubError::Auth { status: 401, token_sent: true, .. }) => {
            assert!(e.to_string().contains("HF_TOKEN"), "{e}");
        }
        other => panic!("expected Auth with a wrong token, got {other:?}"),
    }

    let tmp = TempDir::new("auth-ok");
    let opts = options(&hub.url, &tmp, Some(TOKEN));
    let dir = hub::download(&manifest, &opts).unwrap_or_else(|e| panic!("download with token: {e}"));
    assert_same_as_fixture(&dir, &opts.cache_dir);
}

#[test]
fn an_unreachable_hub_is_a_network_error_naming_hf_endpoint() {
    let tmp = TempDir::new("network");
    let endpoint = dead_endpoint();
    let opts = options(&endpoint, &tmp, None);
    match hub::download(&parse_manifest(&manifest_text()), &opts) {
        Err(e @ HubError::Network { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("HF_ENDPOINT") && msg.contains(&endpoint), "{msg}");
            assert!(msg.contains("open_clip_config.json") && msg.contains(CLIP_REPO), "{msg}");
        }
        other => panic!("expected Network, got {other:?}"),
    }
}

#[test]
fn embedded_manifests_and_lookup_by_name() {
    let on_disk = Manifest::load_dir(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../config/models"))
        .unwrap_or_else(|e| panic!("config/models: {e}"));
    let embedded = hub::manifests().unwrap_or_else(|e| panic!("embedded manifests: {e}"));
    let names = |v: &[Manifest]| v.iter().map(|m| m.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&embedded), names(&on_disk), "every config/models/*.toml is embedded");
    assert_eq!(embedded.len(), 9);
    for short in ["idefics-9b", "IDEFICS-80B-instruct", "huggingfacem4/idefics-9b-instruct"] {
        let found = hub::find_manifest(&embedded, short).map(|m| m.name.to_ascii_lowercase());
        assert_eq!(found, Some(format!("huggingfacem4/{}", short.trim_start_matches("huggingfacem4/").to_ascii_lowercase())), "{short}");
    }

    let want = "openflamingo/OpenFlamingo-3B-vitl-mpt1b";
    for variant in [want, "OpenFlamingo-3B-vitl-mpt1b", "openflamingo-3b-vitl-mpt1b", "OPENFLAMINGO/openflamingo-3B-VITL-mpt1b"] {
        let found = hub::find_manifest(&embedded, variant).map(|m| m.name.as_str());
        assert_eq!(found, Some(want), "{variant}");
        assert_eq!(hub::manifest(variant).map(|m| m.name).ok().as_deref(), Some(want), "{variant}");
    }
    assert_eq!(
        hub::find_manifest(&embedded, "OpenFlamingo-3B-vitl-mpt1b-langinstruct").map(|m| m.name.as_str()),
        Some("openflamingo/OpenFlamingo-3B-vitl-mpt1b-langinstruct")
    );
    for no in ["OpenFlamingo-3B", "other/OpenFlamingo-3B-vitl-mpt1b", ""] {
        assert!(hub::find_manifest(&embedded, no).is_none(), "{no}");
    }

    // Unknown names list the known ones; nothing is fetched.
    let tmp = TempDir::new("names");
    let opts = options(&dead_endpoint(), &tmp, None);
    match hub::resolve("no-such-model", &opts) {
        Err(e @ HubError::UnknownModel { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("no-such-model") && msg.contains("not found"), "{msg}");
            for m in &embedded {
                assert!(msg.contains(&m.name), "{msg}");
            }
        }
        other => panic!("expected UnknownModel, got {other:?}"),
    }
    assert!(matches!(hub::manifest("no-such-model"), Err(HubError::UnknownModel { .. })));

    // Model directories are named after the manifest, sanitized.
    let m = hub::manifest("OpenFlamingo-9B-vitl-mpt7b").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(opts.model_dir(&m), tmp.0.join("hf/flamingo/models/openflamingo--OpenFlamingo-9B-vitl-mpt7b"));
    let mut odd = m.clone();
    odd.name = "../we ird/..".into();
    let odd_dir = opts.model_dir(&odd);
    assert_eq!(odd_dir.parent(), Some(opts.models_dir().as_path()), "{}", odd_dir.display());
    assert!(!odd_dir.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')), "{}", odd_dir.display());

    // File names in a manifest must be plain relative paths; checked before any request.
    for bad in ["../config.json", "/etc/passwd", "a/./b", "a\\b", ""] {
        let text = replaced(&manifest_text(), r#"files = ["open_clip_config.json"]"#, &format!("files = [{bad:?}]"));
        match hub::download(&parse_manifest(&text), &opts) {
            Err(HubError::InvalidFileName { file, .. }) => assert_eq!(file, bad),
            other => panic!("{bad:?}: expected InvalidFileName, got {other:?}"),
        }
    }
}

#[test]
fn options_from_environment_variables() {
    let vars = |pairs: &[(&str, &str)]| {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |key: &str| map.get(key).cloned()
    };

    let o = HubOptions::from_vars(vars(&[("HOME", "/home/u")]));
    assert_eq!(o.endpoint, "https://huggingface.co");
    assert_eq!(o.cache_dir, PathBuf::from("/home/u/.cache/huggingface/hub"));
    assert_eq!(o.models_dir(), PathBuf::from("/home/u/.cache/huggingface/flamingo/models"));
    assert_eq!(o.token, None);
    assert!(o.progress);

    let o = HubOptions::from_vars(vars(&[("HOME", "/home/u"), ("XDG_CACHE_HOME", "/xdg")]));
    assert_eq!(o.cache_dir, PathBuf::from("/xdg/huggingface/hub"));

    // HF_HOME with a token file; HF_ENDPOINT without its trailing slash.
    let tmp = TempDir::new("env");
    let hf_home = tmp.0.join("hf-home");
    std::fs::create_dir_all(&hf_home).expect("mkdir");
    std::fs::write(hf_home.join("token"), "hf_from_file\n").expect("write token");
    let home = hf_home.to_str().expect("utf-8 path");
    let o = HubOptions::from_vars(vars(&[
        ("HOME", "/home/u"),
        ("HF_HOME", home),
        ("HF_ENDPOINT", "http://mirror.local:8080/"),
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
    ]));
    assert_eq!(o.endpoint, "http://mirror.local:8080");
    assert_eq!(o.cache_dir, hf_home.join("hub"));
    assert_eq!(o.models_dir(), hf_home.join("flamingo/models"));
    assert_eq!(o.token.as_deref(), Some("hf_from_file"));
    assert!(!o.progress);

    // HF_TOKEN wins over the file; HF_HUB_CACHE moves the cache; empty values count as unset.
    let o = HubOptions::from_vars(vars(&[
        ("HF_HOME", home),
        ("HF_TOKEN", "hf_from_env"),
        ("HF_HUB_CACHE", "/data/hub-cache"),
        ("HF_ENDPOINT", ""),
    ]));
    assert_eq!(o.token.as_deref(), Some("hf_from_env"));
    assert_eq!(o.cache_dir, PathBuf::from("/data/hub-cache"));
    assert_eq!(o.endpoint, "https://huggingface.co");

    // No token file, no variable: no token.
    let o = HubOptions::from_vars(vars(&[("HF_HOME", tmp.0.to_str().expect("utf-8 path"))]));
    assert_eq!(o.token, None);
}

/// A single-repository model (IDEFICS): the embedded idefics-9b-instruct manifest's file list,
/// pointed at a fake repo holding the sharded `idefics_x2` fixture, lays out the repository at
/// the directory's root (index + every shard it names, no flamingo.toml) and loads as IDEFICS;
/// the short name without the organisation finds it.
#[test]
fn an_idefics_repository_downloads_to_the_directory_root_and_loads() {
    const REPO: &str = "HuggingFaceM4/idefics-9b-instruct";
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/idefics/idefics_x2");
    let mut files: RepoFiles = Vec::new();
    for e in std::fs::read_dir(&src).expect("fixture dir") {
        let p = e.expect("entry").path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if !name.starts_with("expected") && !name.starts_with("chat") {
            files.push((name, read(&p)));
        }
    }
    let shards = files.iter().filter(|(n, _)| n.starts_with("model-")).count();
    assert!(shards > 1, "the fixture is sharded");
    let hub = FakeHub::start(vec![(REPO, files)], None);
    let tmp = TempDir::new("idefics");
    let opts = options(&hub.url, &tmp, None);
    let all = hub::manifests().expect("embedded manifests");
    let manifest = hub::find_manifest(&all, "idefics-9b-instruct").expect("found by its short name").clone();
    assert_eq!(manifest.name, REPO);
    let dir = hub::download(&manifest, &opts).unwrap_or_else(|e| panic!("download: {e}"));
    assert!(dir.join("model.safetensors.index.json").is_file() && dir.join("config.json").is_file());
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("model-")).count(),
        shards
    );
    assert!(!dir.join("flamingo.toml").exists());
    let log = hub.requests();
    assert!(log.iter().any(|r| r == &format!("GET /{REPO}/resolve/main/model.safetensors.index.json")), "{log:?}");
    let loaded = flamingo_model::load(&dir, &Device::Cpu, DType::F32, &()).unwrap_or_else(|e| panic!("load: {e}"));
    assert!(matches!(loaded.files, flamingo_model::LoadedFiles::Idefics(_)));
    assert_eq!(loaded.model.config().model_family, flamingo_model::ModelFamily::Idefics);
}
