//! Starting an in-process server on a free port and waiting until `/health` says 200.

use std::time::Duration;

use flamingo_server::config::Config;
use flamingo_server::server::{serve, ModelSource, ServerHandle};

/// `cfg` served on a free port (its port is overridden), once the model is loaded and the
/// stored demonstration sets are pinned: the handle and the base URL.
pub async fn start_ready(mut cfg: Config, model: ModelSource) -> (ServerHandle, String) {
    cfg.server.port = 0;
    let handle = serve(cfg, model, false).await.expect("server starts");
    let base = format!("http://{}", handle.addr);
    let http = reqwest::Client::new();
    for _ in 0..800 {
        if http.get(format!("{base}/health")).send().await.is_ok_and(|r| r.status() == 200) {
            return (handle, base);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the server did not become ready");
}
