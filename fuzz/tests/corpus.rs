//! Every committed input of every fuzz target, replayed: the corpus (`corpus/<target>/`, the
//! inputs that reach the code's branches) and the regressions (`regressions/<target>/`, each
//! an input that once crashed, aborted or over-allocated, named after the bug). Under the same
//! capped allocator as the fuzzers.

use std::path::Path;

#[global_allocator]
static ALLOC: flamingo_fuzz::alloc::Capped = flamingo_fuzz::alloc::Capped;

fn inputs(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = match std::fs::read_dir(dir) {
        Ok(d) => d.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_file()).collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    files
}

#[test]
fn every_corpus_and_regression_input_runs_clean() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (name, run) in flamingo_fuzz::TARGETS {
        let corpus = inputs(&root.join("corpus").join(name));
        assert!(corpus.len() >= 3, "the `{name}` target has a corpus ({} inputs)", corpus.len());
        let regressions = inputs(&root.join("regressions").join(name));
        for path in corpus.iter().chain(&regressions) {
            let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            eprintln!("{name}: {}", path.display());
            run(&data);
        }
        eprintln!("{name}: {} corpus inputs, {} regressions", corpus.len(), regressions.len());
    }
}

/// The seed weight files are real ones: each opens and every tensor in it loads (so the
/// fuzzer starts from inputs that reach past the formats' headers).
#[test]
fn weight_seeds_load() {
    use flamingo_model::candle::{DType, Device};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/weights");
    let scratch = std::env::temp_dir().join(format!("flamingo-fuzz-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    for (seed, tensors) in [("seed-safetensors", 4), ("seed-torch", 4), ("seed-torch-wrapped", 4)] {
        let data = std::fs::read(dir.join(seed)).unwrap();
        let path = scratch.join(if data[0] == 0 { "w.safetensors" } else { "w.pt" });
        std::fs::write(&path, &data[1..]).unwrap();
        let mut store = flamingo_model::weights::WeightStore::new();
        let (file, names) = store.open(&path).unwrap_or_else(|e| panic!("{seed}: {e}"));
        assert_eq!(names.len(), tensors, "{seed}: {names:?}");
        for n in &names {
            store.insert(n.clone(), file, n.clone());
            let t = store.load(n, DType::F32, &Device::Cpu).unwrap_or_else(|e| panic!("{seed} {n}: {e}"));
            assert_eq!(t.dims(), store.shape(n).unwrap().as_slice());
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
}

/// The seed configuration files (`seed-*`) are the fixtures' own: with each in place the model
/// loads.
#[test]
fn model_dir_seeds_load() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/model_dir");
    let seeds: Vec<_> =
        inputs(&dir).into_iter().filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("seed-"))).collect();
    assert!(seeds.len() >= 20);
    for path in seeds {
        let data = std::fs::read(&path).unwrap();
        if let Err(e) = flamingo_fuzz::model_dir::load(&data) {
            panic!("{} does not load: {e}", path.display());
        }
    }
}
