//! schemathesis (the property-based tester for OpenAPI services, from PyPI) against
//! `openapi.yaml` and a running server with the default model and an API key: every phase
//! (the spec's examples, coverage, fuzzing, stateful), every check (no 5xx, responses and
//! headers as the spec says, schema-violating requests refused, schema-valid ones accepted,
//! no route served without the key). `tests/schemathesis/hooks.py` gives positive cases the
//! cross-field rules the spec documents but JSON Schema cannot state.
//!
//! The interpreter is `$FLAMINGO_PYTHON` (`.ci/run` makes a virtualenv with
//! tests/schemathesis/requirements.txt), else `python3` if it can import `schemathesis`.
//! Without one, the test fails under CI (`CI` set) and is reported as skipped elsewhere.
//! `FLAMINGO_SCHEMATHESIS_EXAMPLES` sets the examples per operation (CI: 100) and
//! `FLAMINGO_SCHEMATHESIS_SEED` the seed (CI: fixed, so a failure reproduces).

mod common {
    pub mod python;
    pub mod ready;
}

use std::path::PathBuf;

use flamingo_server::config::Config;
use flamingo_server::server::ModelSource;

const KEY: &str = "sk-schemathesis";

/// "`N` generated, `M` passed" (or "... found K unique failures") from the summary.
fn generated(stdout: &str) -> Option<u64> {
    let line = stdout.lines().find(|l| l.contains(" generated, "))?;
    line.split_whitespace().next()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_spec_or_server_failures() {
    let Some(py) =
        common::python::python_with("schemathesis", "schemathesis_finds_no_spec_or_server_failures", "tests/schemathesis/requirements.txt")
    else {
        return;
    };
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut cfg = Config::defaults();
    cfg.server.api_keys = vec![KEY.into()];
    let data = std::env::temp_dir().join(format!("flamingo-schemathesis-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    cfg.storage.dir = data.display().to_string();
    let (handle, base) = common::ready::start_ready(cfg, ModelSource::Embedded).await;

    let examples = std::env::var("FLAMINGO_SCHEMATHESIS_EXAMPLES").unwrap_or_else(|_| "100".into());
    let seed = std::env::var("FLAMINGO_SCHEMATHESIS_SEED").unwrap_or_else(|_| "20261203".into());
    let work = data.join("schemathesis");
    std::fs::create_dir_all(&work).unwrap();
    let spec = repo.join("openapi.yaml");
    let out = tokio::process::Command::new(&py)
        .args(["-m", "schemathesis.cli", "run"])
        .arg(&spec)
        .args(["--url", &base, "-H", &format!("Authorization: Bearer {KEY}"), "--checks", "all"])
        .args(["--max-examples", &examples, "--seed", &seed, "--workers", "1", "--no-color"])
        .args(["--generation-database", "none", "--report-dir"])
        .arg(&work)
        // The hooks module is imported from the working directory; schemathesis's own files
        // (.hypothesis, reports) stay out of the repository.
        .env("SCHEMATHESIS_HOOKS", repo.join("tests/schemathesis/hooks.py"))
        .current_dir(&work)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let cases = generated(&stdout);
    eprintln!(
        "schemathesis: {} cases generated (max {examples} examples per operation, seed {seed})",
        cases.map_or("?".into(), |n| n.to_string())
    );
    assert!(out.status.success(), "schemathesis found failures:\n{stdout}\n{stderr}");
    assert!(stdout.contains("No issues found"), "{stdout}");
    assert!(cases.is_some_and(|n| n >= 500), "too few cases were tried:\n{stdout}");
    // The server is still serving after all of it.
    let health = reqwest::get(format!("{base}/health")).await.unwrap();
    assert_eq!(health.status(), 200);
    handle.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&data);
}
