//! Serving: bind, accept, and shut down gracefully.
//!
//! SIGTERM or SIGINT stops accepting, lets in-flight requests finish (bounded by
//! `DRAIN_TIMEOUT`), closes every proxied WebSocket with 1012 "service restart" (clients
//! retry, against the next nestor), then asks the provisioner to stop what it started (per
//! its policy: `on_shutdown`). WebSocket pairs are not connections axum's graceful
//! shutdown knows about once upgraded, so nestor tracks them itself (`AppState::sockets`);
//! without that they would be cut with no close frame (1006) when the process exits.

use std::time::Duration;

use tokio::net::TcpListener;

use crate::app::AppState;

/// Longest wait for in-flight requests after a shutdown signal.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// Least time given to open WebSockets to close after the drain.
const SOCKET_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Serve on `listener` until `state.shutdown` is cancelled; then drain and shut down.
pub async fn serve(state: AppState, listener: TcpListener) -> anyhow::Result<()> {
    serve_with_internal(state, listener, None).await
}

/// [`serve`], plus the downstream-only listener (`internal_bind`) when given.
pub async fn serve_with_internal(state: AppState, listener: TcpListener, internal: Option<TcpListener>) -> anyhow::Result<()> {
    if let Some(l) = internal {
        let app = crate::routes::internal_only(state.clone());
        let token = state.shutdown.clone();
        tokio::spawn(async move {
            let _ = axum::serve(l, app).with_graceful_shutdown(async move { token.cancelled().await }).await;
        });
    }
    let app = crate::routes::router(state.clone());
    let drained = tokio::spawn(accept_loop(state.clone(), listener, app));
    state.shutdown.cancelled().await;
    let started = std::time::Instant::now();
    // Sockets see the same token: each pair closes its client with 1012 at once.
    state.sockets.close();
    let open = state.sockets.len();
    match tokio::time::timeout(DRAIN_TIMEOUT, drained).await {
        Ok(Ok(())) => tracing::info!("in-flight requests drained"),
        Ok(Err(e)) => tracing::warn!("server task failed: {e}"),
        Err(_) => tracing::warn!("requests still in flight after {DRAIN_TIMEOUT:?}; closing them"),
    }
    // A pair closes within a few seconds (close frame, then bounded flush and close).
    let left = DRAIN_TIMEOUT.saturating_sub(started.elapsed()).max(SOCKET_CLOSE_TIMEOUT);
    if tokio::time::timeout(left, state.sockets.wait()).await.is_err() {
        tracing::warn!(left = state.sockets.len(), "WebSockets still open after {left:?}; dropping them");
    } else {
        // `open` may undercount: pairs see the same token and may be gone before it is read.
        tracing::info!(sockets = open, "WebSockets closed (1012)");
    }
    state.provisioner.shutdown().await;
    // Catalog infos queued for disk (routes were written before their creates answered).
    state.catalog.flush(std::time::Duration::from_secs(10)).await;
    if let Some(p) = &state.persistence {
        // After the downstreams stopped (if they do): the trees are final.
        p.shutdown().await;
    }
    tracing::info!("nestor stopped");
    Ok(())
}

/// Accept client connections until shutdown, then wait for the open ones to finish their
/// in-flight requests. Each connection starts on the fast path (crate::fastpath), on an I/O
/// thread when there are any (crate::io_threads, `[http] io_threads`), and goes to the
/// router (`app`) on this runtime from its first request the fast path does not take; the
/// router's connections are shut down gracefully like `axum::serve` does.
async fn accept_loop(state: AppState, listener: TcpListener, app: axum::Router) {
    let connections = tokio_util::task::TaskTracker::new();
    let io = match state.cfg.http.io_thread_count() {
        0 => None,
        n => match crate::io_threads::IoThreads::start(n, state.cfg.http.busy_poll(), &state.shutdown) {
            Ok(io) => Some(io),
            Err(e) => {
                tracing::warn!("cannot start {n} I/O threads ({e}); serving connections on the main runtime");
                None
            }
        },
    };
    // The fast path's downstream connections when connections are served here.
    let pool = std::sync::Arc::new(crate::fastpath::Pool::default());
    let main = tokio::runtime::Handle::current();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = state.shutdown.cancelled() => break,
        };
        match accepted {
            Ok((tcp, _)) => {
                // No Nagle delay: answers and WebSocket frames are small and latency-bound.
                let _ = tcp.set_nodelay(true);
                let (state, router) = (state.clone(), app.clone());
                match &io {
                    Some(io) => {
                        let token = connections.token();
                        let main = Some((main.clone(), connections.clone()));
                        io.serve(tcp, move |tcp, local| async move {
                            let _tracked = token;
                            let serving = crate::fastpath::Serving { router, pool: local.pool, stop: local.stop, busy: Some(local.busy), main };
                            crate::fastpath::serve_connection(state, serving, tcp).await;
                        });
                    }
                    None => {
                        let stop = state.shutdown.clone();
                        let serving = crate::fastpath::Serving { router, pool: pool.clone(), stop, busy: None, main: None };
                        connections.spawn(crate::fastpath::serve_connection(state, serving, tcp));
                    }
                }
            }
            // Per-connection failures (the peer gave up before accept): keep accepting.
            Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionRefused) => {}
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                tracing::error!("accept failed: {e}; retrying in 1 s");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = state.shutdown.cancelled() => break,
                }
            }
        }
    }
    drop(listener);
    connections.close();
    // Every connection sees the shutdown token: the fast path's between requests, the
    // router's through hyper's graceful shutdown (in-flight requests finish, then close).
    connections.wait().await;
    // Every connection is done: the I/O threads have nothing left to serve.
    drop(io);
}

/// Cancel `state.shutdown` on SIGTERM or SIGINT.
pub fn on_signals(state: &AppState) {
    let token = state.shutdown.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        token.cancel();
    });
}
