//! A fault-injecting TCP proxy, for chaos tests: put it between nestor and a downstream
//! (nestor is configured with the proxy's address) and cut or stall the connections on
//! command.
//!
//! * [`ChaosProxy::reset_all`] / [`ChaosProxy::reset_some`]: connections are reset (`RST`
//!   to both peers, `SO_LINGER` 0), as a crashed middlebox or a flapping network does —
//!   in-flight requests fail, WebSockets drop without a close frame.
//! * [`ChaosProxy::stall`]: no byte moves in either direction until the stall ends (new
//!   connections are accepted but stall too), as a congested or partitioned path does.
//! * [`ChaosProxy::set_refusing`]: new connections are reset as soon as they are accepted
//!   (the downstream looks down, while the downstream itself is fine).
//!
//! Bytes are otherwise forwarded untouched, in both directions, half-closes included. The
//! proxy listens on loopback (or, with [`ChaosProxy::start_on`], another local address).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Counters of what the proxy did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChaosStats {
    /// Connections accepted.
    pub accepted: u64,
    /// Connections reset on command (open ones) or refused (new ones).
    pub resets: u64,
    /// Stalls started.
    pub stalls: u64,
    /// Connections open now.
    pub open: usize,
}

struct Conn {
    reset: Notify,
    fired: AtomicBool,
}

struct Inner {
    addr: SocketAddr,
    target: SocketAddr,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
    /// Forwarding is held until this instant (None: not stalled).
    stall_until: Mutex<Option<Instant>>,
    refusing: AtomicBool,
    accepted: AtomicU64,
    resets: AtomicU64,
    stalls: AtomicU64,
    stop: CancellationToken,
}

/// Handle to a running proxy; cheap to clone. Dropping the last handle does not stop it:
/// call [`ChaosProxy::stop`].
#[derive(Clone)]
pub struct ChaosProxy {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ChaosProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChaosProxy").field("addr", &self.inner.addr).field("target", &self.inner.target).finish()
    }
}

impl ChaosProxy {
    /// Listen on a free loopback port and forward every connection to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), target).await
    }

    /// Listen on `listen` (a local address, e.g. the Docker bridge's gateway so containers
    /// reach a loopback-only server on the host) and forward to `target`.
    pub async fn start_on(listen: SocketAddr, target: SocketAddr) -> std::io::Result<Self> {
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.set_reuseaddr(true)?;
        sock.bind(listen)?;
        let listener = sock.listen(2048)?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            addr,
            target,
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            stall_until: Mutex::new(None),
            refusing: AtomicBool::new(false),
            accepted: AtomicU64::new(0),
            resets: AtomicU64::new(0),
            stalls: AtomicU64::new(0),
            stop: CancellationToken::new(),
        });
        tokio::spawn(accept_loop(inner.clone(), listener));
        Ok(ChaosProxy { inner })
    }

    /// The address to give the client side (nestor).
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// `http://<addr>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    pub fn target(&self) -> SocketAddr {
        self.inner.target
    }

    /// Reset every open connection. Returns how many.
    pub fn reset_all(&self) -> usize {
        let conns: Vec<Arc<Conn>> = self.lock_conns().values().cloned().collect();
        conns.iter().filter(|c| self.fire(c)).count()
    }

    /// Reset `n` open connections chosen by `pick` (called with the number open, returns an
    /// index), e.g. a seeded random generator. Returns how many were reset.
    pub fn reset_some(&self, n: usize, mut pick: impl FnMut(usize) -> usize) -> usize {
        let mut conns: Vec<Arc<Conn>> = self.lock_conns().values().cloned().collect();
        let mut done = 0;
        while done < n && !conns.is_empty() {
            let i = pick(conns.len()) % conns.len();
            let c = conns.swap_remove(i);
            if self.fire(&c) {
                done += 1;
            }
        }
        done
    }

    /// Hold every byte, both ways, on every connection (open and new) for `d`.
    pub fn stall(&self, d: Duration) {
        *self.inner.stall_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + d);
        self.inner.stalls.fetch_add(1, Ordering::Relaxed);
    }

    /// End a stall now.
    pub fn unstall(&self) {
        *self.inner.stall_until.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Reset new connections as soon as they are accepted (open ones are left alone).
    pub fn set_refusing(&self, on: bool) {
        self.inner.refusing.store(on, Ordering::SeqCst);
    }

    pub fn stats(&self) -> ChaosStats {
        ChaosStats {
            accepted: self.inner.accepted.load(Ordering::Relaxed),
            resets: self.inner.resets.load(Ordering::Relaxed),
            stalls: self.inner.stalls.load(Ordering::Relaxed),
            open: self.lock_conns().len(),
        }
    }

    /// Stop listening and reset every connection.
    pub fn stop(&self) {
        self.inner.stop.cancel();
        self.reset_all();
    }

    fn lock_conns(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        self.inner.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fire(&self, c: &Conn) -> bool {
        if c.fired.swap(true, Ordering::SeqCst) {
            return false;
        }
        self.inner.resets.fetch_add(1, Ordering::Relaxed);
        c.reset.notify_one();
        true
    }
}

async fn accept_loop(inner: Arc<Inner>, listener: TcpListener) {
    loop {
        let (client, _) = tokio::select! {
            _ = inner.stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
            },
        };
        inner.accepted.fetch_add(1, Ordering::Relaxed);
        if inner.refusing.load(Ordering::SeqCst) {
            inner.resets.fetch_add(1, Ordering::Relaxed);
            let _ = client.set_zero_linger();
            drop(client);
            continue;
        }
        let inner = inner.clone();
        tokio::spawn(async move {
            let upstream = match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(inner.target)).await {
                Ok(Ok(u)) => u,
                _ => {
                    let _ = client.set_zero_linger();
                    return;
                }
            };
            let _ = client.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
            let conn = Arc::new(Conn { reset: Notify::new(), fired: AtomicBool::new(false) });
            inner.conns.lock().unwrap_or_else(|p| p.into_inner()).insert(id, conn.clone());
            run_conn(&inner, client, upstream, &conn).await;
            inner.conns.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        });
    }
}

async fn run_conn(inner: &Inner, client: TcpStream, upstream: TcpStream, conn: &Conn) {
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = upstream.into_split();
    let reset = tokio::select! {
        _ = async { tokio::join!(pump(inner, &mut cr, &mut uw), pump(inner, &mut ur, &mut cw)) } => false,
        _ = conn.reset.notified() => true,
        _ = inner.stop.cancelled() => true,
    };
    if reset {
        let _ = cr.as_ref().set_zero_linger();
        let _ = ur.as_ref().set_zero_linger();
    }
}

/// Copy one direction until EOF (then half-close the other side) or an error.
async fn pump(inner: &Inner, from: &mut OwnedReadHalf, to: &mut OwnedWriteHalf) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        // Held while stalled (checked again after each wait: the stall may be extended).
        loop {
            let until = *inner.stall_until.lock().unwrap_or_else(|p| p.into_inner());
            match until {
                Some(t) if t > Instant::now() => tokio::time::sleep_until(t.min(Instant::now() + Duration::from_millis(50))).await,
                _ => break,
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn forwards_resets_stalls_and_refuses() {
        let target = echo_server().await;
        let p = ChaosProxy::start(target).await.unwrap();
        let mut s = TcpStream::connect(p.addr()).await.unwrap();
        s.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");

        // Stall: nothing comes back until it ends.
        p.stall(Duration::from_millis(300));
        let t = std::time::Instant::now();
        s.write_all(b"again").await.unwrap();
        s.read_exact(&mut buf).await.unwrap();
        assert!(t.elapsed() >= Duration::from_millis(250), "{:?}", t.elapsed());

        // Reset: the client sees ECONNRESET (or EOF), not a hang.
        assert_eq!(p.reset_all(), 1);
        let r = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await.unwrap();
        assert!(matches!(r, Err(_) | Ok(0)), "{r:?}");

        p.set_refusing(true);
        let mut s2 = TcpStream::connect(p.addr()).await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(2), s2.read(&mut buf)).await.unwrap();
        assert!(matches!(r, Err(_) | Ok(0)), "{r:?}");
        p.set_refusing(false);
        let st = p.stats();
        assert_eq!((st.accepted, st.resets, st.stalls), (2, 2, 1));
        p.stop();
    }
}
