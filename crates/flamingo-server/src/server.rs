//! Serving: bind, load the model in the background, serve until a signal or
//! [`ServerHandle::shutdown`], then drain in-flight requests within the grace period.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::config::Config;
pub use crate::routes::router;
pub use crate::state::{AppState, ModelSource};

/// A running server (tests start one in-process on a real port).
pub struct ServerHandle {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    shutdown: Arc<Notify>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl ServerHandle {
    /// Waits until the server stops (after a signal, or when the model fails to load).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await?
    }

    /// Starts graceful shutdown (as SIGTERM does) and waits for the server to stop.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.shutdown.notify_one();
        self.task.await?
    }
}

/// Binds, starts loading the model in the background (/health says 503 until it is ready)
/// and serves until `shutdown` or a signal.
pub async fn serve(cfg: Config, source: ModelSource, handle_signals: bool) -> anyhow::Result<ServerHandle> {
    let served = if cfg.server.served_model_name.is_empty() { source.default_name() } else { cfg.server.served_model_name.clone() };
    let addr = format!("{}:{}", cfg.server.host, cfg.server.port);
    let listener = tokio::net::TcpListener::bind(&addr).await.map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    let addr = listener.local_addr()?;
    let st = AppState::new(cfg, served)?;
    tracing::info!(%addr, model = %st.served_name, "listening");
    let load_failed = Arc::new(Notify::new());
    let (loader, failed) = (st.clone(), load_failed.clone());
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        if let Err(e) = loader.load(&source) {
            tracing::error!("{e:#}");
            failed.notify_one();
            return;
        }
        handle.block_on(loader.restore_demonstrations());
    });
    let client_timeout = st.cfg.server.client_timeout_seconds;
    let shutdown = Arc::new(Notify::new());
    let (app, signal, draining, served) = (router(st.clone()), shutdown.clone(), st.clone(), st.clone());
    let task = tokio::spawn(async move {
        let stop = async move {
            let reason = tokio::select! {
                _ = signal.notified() => "shutdown requested",
                _ = wait_for_signal(handle_signals) => "signal received",
                _ = load_failed.notified() => "model failed to load",
            };
            drain(&draining, reason).await;
        };
        serve_connections(listener, app, stop, Duration::from_secs(client_timeout)).await;
        if !served.is_loaded() {
            anyhow::bail!("the model failed to load");
        }
        Ok(())
    });
    Ok(ServerHandle { addr, state: st, shutdown, task })
}

/// Serves connections until `stop` completes, then lets each finish the exchange it is in and
/// waits for them all (as `axum::serve` with a graceful shutdown does), with one addition: a
/// client must send a request's headers within `header_timeout`, or its connection is closed
/// (a client trickling them holds a connection no longer than that; the timer also runs while a
/// kept-alive connection waits for its next request, so idle connections are closed too).
async fn serve_connections(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
    header_timeout: Duration,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tokio::sync::watch;
    // `stopping` turns true when `stop` completes; every connection holds a `closed` receiver,
    // so `done.closed()` resolves when the last one ends.
    let (stop_tx, stopping) = watch::channel(false);
    tokio::spawn(async move {
        stop.await;
        let _ = stop_tx.send(true);
    });
    let (done, closed) = watch::channel(());
    let mut signal = stopping.clone();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = async { drop(signal.wait_for(|s| *s).await) } => break,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                // Out of file descriptors and the like: let it pass rather than spin.
                tracing::warn!(error = %e, "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let (mut stopping, closed) = (stopping.clone(), closed.clone());
        tokio::spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(header_timeout);
            let conn = builder.serve_connection(TokioIo::new(tcp), service);
            tokio::pin!(conn);
            let mut shutting_down = false;
            loop {
                tokio::select! {
                    ended = conn.as_mut() => {
                        if let Err(e) = ended {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                        break;
                    }
                    _ = async { drop(stopping.wait_for(|s| *s).await) }, if !shutting_down => {
                        shutting_down = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
            drop(closed);
        });
    }
    drop(closed);
    drop(listener);
    done.closed().await;
}

/// New requests get 503 from now on; waits for in-flight ones (up to the grace period).
async fn drain(st: &AppState, reason: &str) {
    let grace = Duration::from_secs(st.cfg.server.shutdown_grace_seconds);
    tracing::info!(reason, inflight = st.inflight(), "shutting down: draining in-flight requests");
    let left = st.drain(grace).await;
    if left > 0 {
        tracing::warn!(inflight = left, "grace period over; stopping with requests in flight");
    }
}

async fn wait_for_signal(enabled: bool) {
    if !enabled {
        return std::future::pending().await;
    }
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
