//! `flamingo bench --url`'s load generator against an in-process server with the embedded
//! model: every request completes with its fixed length, the percentiles are filled in, and a
//! server that refuses (a wrong key) is counted as errors, not a crash.

mod common {
    pub mod ready;
}

use flamingo_server::config::Config;
use flamingo_server::loadgen::{run, LoadSpec};
use flamingo_server::server::ModelSource;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_generator_measures_every_request() {
    let mut c = Config::defaults();
    c.server.api_keys = vec!["k".into()];
    c.storage.dir = std::env::temp_dir().join(format!("flamingo-loadgen-{}", std::process::id())).display().to_string();
    let (handle, base) = common::ready::start_ready(c, ModelSource::Embedded).await;
    let spec = LoadSpec { url: base.clone(), api_key: Some("k".into()), requests: 8, concurrency: 4, rate: None, max_tokens: 8, seed: 1 };
    let r = run(&spec).await.unwrap();
    assert_eq!((r.completed, r.errors, r.output_tokens), (8, 0, 64), "{r:?}");
    let (ttft, itl) = (r.ttft.clone().unwrap(), r.itl.clone().unwrap());
    assert!(ttft.p50_ms > 0.0 && ttft.p50_ms <= ttft.p99_ms && itl.p50_ms <= itl.p99_ms, "{r:?}");
    assert!(r.output_throughput > 0.0);
    // Poisson arrivals.
    let r = run(&LoadSpec { rate: Some(50.0), ..spec.clone() }).await.unwrap();
    assert_eq!((r.completed, r.errors), (8, 0), "{r:?}");
    // Refused requests are errors in the report.
    let r = run(&LoadSpec { api_key: Some("wrong".into()), ..spec }).await.unwrap();
    assert_eq!((r.completed, r.errors), (0, 8));
    assert!(r.first_error.as_deref().is_some_and(|e| e.contains("401")), "{r:?}");
    handle.shutdown().await.unwrap();
}
