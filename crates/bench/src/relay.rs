//! The floor: a byte relay with no HTTP or WebSocket logic at all (tokio's
//! `copy_bidirectional` between the client's connection and one to the downstream).
//!
//! No proxy can add less than this on a machine: it pays the same extra loopback hops,
//! wake-ups and copies as any proxy and nothing else. Measured side by side with direct,
//! nestor and nginx, it says how much of a proxy's added latency is the machine's (the
//! relay's) and how much is the proxy's own work.

use std::net::SocketAddr;

/// Relay every connection accepted on `listen` to `target` until killed.
pub fn run(listen: SocketAddr, target: SocketAddr) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        loop {
            let (mut client, _) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            tokio::spawn(async move {
                let _ = client.set_nodelay(true);
                let Ok(mut upstream) = tokio::net::TcpStream::connect(target).await else { return };
                let _ = upstream.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    })
}
