//! The official `openai` Python client (tests/openai_client/check.py) against a server on a real
//! port. The interpreter is `$FLAMINGO_PYTHON` (`.ci/run` makes a virtualenv with
//! tests/openai_client/requirements.txt), else `python3` if it can import `openai`. Without one,
//! the test fails under CI (`CI` set) and is reported as skipped elsewhere.

use std::path::PathBuf;
use std::time::Duration;

use flamingo_server::config::Config;
use flamingo_server::server::{serve, ModelSource};

mod common {
    pub mod python;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_openai_python_client() {
    let Some(py) = common::python::python_with("openai", "official_openai_python_client", "tests/openai_client/requirements.txt") else {
        return;
    };
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut cfg = Config::defaults();
    cfg.server.port = 0;
    cfg.server.api_keys = vec!["sk-flamingo-test".into()];
    cfg.server.served_model_name = "flamingo-tiny-reference".into();
    let data = std::env::temp_dir().join(format!("flamingo-openai-client-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    cfg.storage.dir = data.display().to_string();
    let handle = serve(cfg, ModelSource::Dir(repo.join("tests/fixtures/models/mosaicgpt_x1")), false).await.unwrap();
    let base = format!("http://{}", handle.addr);
    let http = reqwest::Client::new();
    for _ in 0..200 {
        if http.get(format!("{base}/health")).send().await.is_ok_and(|r| r.status() == 200) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let script = repo.join("tests/openai_client/check.py");
    let image = repo.join("tests/fixtures/images/small.png");
    let out = tokio::process::Command::new(&py)
        .arg(&script)
        .args([&base, "sk-flamingo-test", "flamingo-tiny-reference"])
        .arg(&image)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "check.py failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("all checks passed"), "{stdout}");
    handle.shutdown().await.unwrap();
}
