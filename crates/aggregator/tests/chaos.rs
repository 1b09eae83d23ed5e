//! Chaos: live conversations through a real nestor process while everything around it
//! fails, and what clients must still see.
//!
//! **`fifty_conversations_through_downstream_restarts_resets_and_nestor_kills`**: 50
//! conversations on 5 fake agent-servers (`existing` provisioner), each reached through a
//! [`ChaosProxy`]. Every client creates its conversation (id chosen up front, so retries are
//! idempotent), keeps one WebSocket open through nestor (even conversations: the events
//! socket like the SDK; odd ones: the session socket with `after_seq`) and drives rounds of
//! "send a message, run, wait until finished" over REST. Meanwhile, at random: downstreams
//! are killed and restarted on the same port (their runs die and come back as `error`: the
//! client runs again, as the SDK does), connections between nestor and downstreams are
//! reset, stalled or refused, and nestor itself is killed with SIGKILL and started again on
//! the same port and state. At the end nestor is stopped with SIGTERM.
//!
//! **`process_provisioner_children_killed_and_nestor_killed_leave_no_orphans`**: the same
//! clients on the `process` provisioner (the fake binary as the agent-server, persisting its
//! conversations like the real one), with children killed with SIGKILL at random and nestor
//! killed and restarted; after every restart and after the final SIGTERM, the processes left
//! are checked.
//!
//! What "exactly once" means (checked against each downstream's log at the end):
//! * a client socket that stays connected through nestor (downstream restarts, resets and
//!   stalls are nestor's business) receives every persisted event once, in log order, with
//!   no gap: on the events socket each connection's events are consecutive log positions;
//!   on the session socket each connection has one `sync` and consecutive seqs;
//! * nestor is killed: its client sockets drop (no close frame) and clients reconnect by
//!   themselves, as the SDK does. The session socket resumes with `after_seq=<last seq>`:
//!   still exact, the seqs stay consecutive across connections. The events socket
//!   reconnects live-only and then reconciles over REST (`/events/search`), like the SDK's
//!   `replay_missed_events`: the client's list (socket + REST, by event id) must equal the
//!   log; the socket may repeat an event only if that client got it from the REST
//!   reconciliation (counted as overlap), never one it got from a socket;
//! * nestor closes a client socket only when it was killed, or with 1012 at the final
//!   SIGTERM; every round of every client completes.
//!
//! CI runs ~25 s of chaos per test. A longer run: `NESTOR_CHAOS_SECS=600` (and
//! `NESTOR_CHAOS_CONVS`, `NESTOR_TEST_SEED`), see docs/reliability.md.

mod real_nestor;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use nestor_test_support::{ChaosProxy, FakeAgentServer, FakeConfig};
use real_nestor::*;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// xorshift64*, seeded (printed; `NESTOR_TEST_SEED` replays).
struct Rng(u64);

impl Rng {
    fn new(default: u64) -> Self {
        let seed = env_num("NESTOR_TEST_SEED", default);
        eprintln!("seed {seed} (set NESTOR_TEST_SEED to replay)");
        Rng(seed.max(1))
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

// ------------------------------------------------------------------ the shared world

/// What clients need to know of nestor's life (its URL never changes: same port).
struct World {
    url: String,
    /// Bumped just before nestor is killed: a socket opened in an older epoch may drop.
    epoch: AtomicU64,
    /// Set when the final SIGTERM is about to be sent: sockets must then close with 1012.
    shutting_down: AtomicBool,
    /// Clients stop starting rounds.
    stop_rounds: AtomicBool,
    /// Readers stop reconnecting.
    stop_readers: AtomicBool,
    http: reqwest::Client,
}

impl World {
    fn new(url: String) -> Arc<Self> {
        Arc::new(World {
            url,
            epoch: AtomicU64::new(0),
            shutting_down: AtomicBool::new(false),
            stop_rounds: AtomicBool::new(false),
            stop_readers: AtomicBool::new(false),
            http: reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(15)).pool_max_idle_per_host(4).build().unwrap(),
        })
    }
}

// ------------------------------------------------------------------ one client

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// `/sockets/events/{id}` live, REST reconciliation after a reconnect (the SDK).
    Events,
    /// `/sockets/session/{id}?after_seq=…`.
    Session,
}

/// One client connection to nestor.
#[derive(Debug, Default)]
struct Conn {
    #[allow(dead_code)]
    epoch: u64,
    /// Persisted event ids, in wire order.
    frames: Vec<String>,
    syncs: u32,
    closed: Option<String>,
}

/// Everything a client has seen.
#[derive(Default)]
struct Seen {
    conns: Vec<Conn>,
    /// Event ids the client has (socket or REST).
    have: HashSet<String>,
    /// Ids it first got from a REST reconciliation.
    from_rest: HashSet<String>,
    /// Socket deliveries of events the client already had from REST (allowed overlap).
    overlap: usize,
    last_seq: i64,
    /// User message text → its timestamp; execution status updates (timestamp, value).
    user_msgs: HashMap<String, String>,
    statuses: Vec<(String, String)>,
    problems: Vec<String>,
}

impl Seen {
    fn ingest(&mut self, ev: &Value, via_rest: bool) -> bool {
        let Some(id) = ev["id"].as_str() else { return false };
        if !self.have.insert(id.to_owned()) {
            return false;
        }
        if via_rest {
            self.from_rest.insert(id.to_owned());
        }
        let ts = ev["timestamp"].as_str().unwrap_or("").to_owned();
        match ev["kind"].as_str() {
            Some("MessageEvent") if ev["source"] == "user" => {
                if let Some(t) = ev["llm_message"]["content"][0]["text"].as_str() {
                    self.user_msgs.entry(t.to_owned()).or_insert(ts);
                }
            }
            Some("ConversationStateUpdateEvent") if ev["key"] == "execution_status" => {
                self.statuses.push((ts, ev["value"].as_str().unwrap_or("").to_owned()));
            }
            _ => {}
        }
        true
    }

    /// Has the round whose message is `text` finished (a `finished` status after it)?
    fn round_done(&self, text: &str) -> bool {
        let Some(t) = self.user_msgs.get(text) else { return false };
        self.statuses.iter().any(|(ts, v)| ts > t && v == "finished")
    }
}

fn is_persisted(v: &Value) -> bool {
    let kind = v["kind"].as_str().unwrap_or("");
    !(kind == "StreamingDeltaEvent" || kind == "LLMCompletionLogEvent" || (kind == "ConversationStateUpdateEvent" && v["key"] == "full_state"))
}

struct Client {
    id: Uuid,
    kind: Kind,
    world: Arc<World>,
    seen: Mutex<Seen>,
    rounds_done: AtomicU64,
    reruns: AtomicU64,
    http_retries: AtomicU64,
}

impl Client {
    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap()
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.world.url)
    }

    /// One request, retried while nestor or the downstream is away (connection errors,
    /// 502/503/504, and 404 for a moment after a nestor restart), bounded.
    async fn request(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> Result<(u16, Value), String> {
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut delay = Duration::from_millis(50);
        loop {
            let mut rb = self.world.http.request(method.clone(), self.url(path)).header("X-Session-API-Key", CLIENT_KEY);
            if let Some(b) = body {
                rb = rb.json(b);
            }
            let out = match rb.send().await {
                Ok(r) => {
                    let st = r.status().as_u16();
                    let v = r.json::<Value>().await.unwrap_or(Value::Null);
                    if matches!(st, 502..=504) {
                        Err(format!("HTTP {st} {v}"))
                    } else {
                        Ok((st, v))
                    }
                }
                Err(e) => Err(e.to_string()),
            };
            match out {
                Ok(x) => return Ok(x),
                // POSTs that may have happened are not retried here: the caller decides.
                Err(e) if method == reqwest::Method::POST && !path.ends_with("/run") && path != "/api/conversations" => return Err(e),
                Err(e) if Instant::now() > deadline => return Err(format!("{method} {path}: {e} (gave up after 90 s)")),
                Err(_) => {
                    self.http_retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_millis(1000));
                }
            }
        }
    }

    /// Every persisted event of the conversation, over REST (paged), in log order.
    async fn all_events(&self) -> Result<Vec<Value>, String> {
        let mut out = Vec::new();
        let mut page: Option<String> = None;
        for _ in 0..1000 {
            let mut path = format!("/api/conversations/{}/events/search?limit=100", self.id);
            if let Some(p) = &page {
                path.push_str(&format!("&page_id={p}"));
            }
            let (st, v) = self.request(reqwest::Method::GET, &path, None).await?;
            if st != 200 {
                return Err(format!("events/search: HTTP {st} {v}"));
            }
            out.extend(v["items"].as_array().cloned().unwrap_or_default());
            match v["next_page_id"].as_str() {
                Some(p) => page = Some(p.to_owned()),
                None => return Ok(out),
            }
        }
        Err("events/search: too many pages".into())
    }

    async fn create(&self) -> Result<(), String> {
        let body = json!({
            "conversation_id": self.id.to_string(),
            "agent": {"kind": "Agent", "llm": {"usage_id": "agent", "model": "openai/fake", "api_key": "x"}, "tools": [{"name": "terminal"}]},
            "workspace": {"kind": "LocalWorkspace", "working_dir": "/tmp/w"},
        });
        let (st, v) = self.request(reqwest::Method::POST, "/api/conversations", Some(&body)).await?;
        if st == 200 || st == 201 {
            Ok(())
        } else {
            Err(format!("create: HTTP {st} {v}"))
        }
    }

    fn socket_path(&self, reconnect: bool) -> String {
        match self.kind {
            Kind::Events => format!("/sockets/events/{}", self.id),
            Kind::Session => {
                let after = if reconnect { self.seen().last_seq } else { -1 };
                format!("/sockets/session/{}?after_seq={after}", self.id)
            }
        }
    }

    async fn connect(&self, reconnect: bool) -> Option<Ws> {
        let mut delay = Duration::from_millis(50);
        let deadline = Instant::now() + Duration::from_secs(90);
        while !self.world.stop_readers.load(Ordering::SeqCst) && Instant::now() < deadline {
            let url = format!("{}{}", self.world.url.replacen("http://", "ws://", 1), self.socket_path(reconnect));
            let mut req = url.into_client_request().unwrap();
            req.headers_mut().insert("X-Session-API-Key", CLIENT_KEY.parse().unwrap());
            if let Ok(Ok((ws, _))) = tokio::time::timeout(Duration::from_secs(10), tokio_tungstenite::connect_async(req)).await {
                return Some(ws);
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(500));
        }
        None
    }

    /// The socket side: connect, read, reconnect when nestor was killed; until told to stop.
    async fn read_loop(self: Arc<Self>, first_frame: tokio::sync::oneshot::Sender<()>) {
        let mut first_frame = Some(first_frame);
        let mut reconnect = false;
        loop {
            let epoch = self.world.epoch.load(Ordering::SeqCst);
            let Some(mut ws) = self.connect(reconnect).await else {
                if !self.world.stop_readers.load(Ordering::SeqCst) {
                    self.seen().problems.push("could not connect its socket for 90 s".into());
                }
                return;
            };
            self.seen().conns.push(Conn { epoch, ..Default::default() });
            let mut got_first = false;
            let closed = loop {
                let m = tokio::select! {
                    m = ws.next() => m,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {
                        if self.world.stop_readers.load(Ordering::SeqCst) && !self.world.shutting_down.load(Ordering::SeqCst) {
                            return;
                        }
                        continue;
                    }
                };
                match m {
                    Some(Ok(Message::Text(t))) => {
                        let v: Value = match serde_json::from_str(&t) {
                            Ok(v) => v,
                            Err(_) => {
                                self.seen().problems.push(format!("non-JSON frame {t}"));
                                continue;
                            }
                        };
                        if !got_first {
                            got_first = true;
                            if let Some(tx) = first_frame.take() {
                                let _ = tx.send(());
                            }
                            if reconnect && self.kind == Kind::Events {
                                // The SDK's replay_missed_events: REST reconciliation once the
                                // new subscription is up.
                                match self.all_events().await {
                                    Ok(evs) => {
                                        let mut s = self.seen();
                                        for e in &evs {
                                            s.ingest(e, true);
                                        }
                                    }
                                    Err(e) => self.seen().problems.push(format!("reconciliation failed: {e}")),
                                }
                            }
                        }
                        self.on_frame(&v);
                    }
                    Some(Ok(Message::Close(f))) => break f.map(|f| format!("close {} {}", u16::from(f.code), f.reason)).unwrap_or_else(|| "close".into()),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => break format!("error: {e}"),
                    None => break "ended".into(),
                }
            };
            let killed_since = self.world.epoch.load(Ordering::SeqCst) != epoch;
            let final_close = self.world.shutting_down.load(Ordering::SeqCst);
            {
                let mut s = self.seen();
                if let Some(c) = s.conns.last_mut() {
                    c.closed = Some(closed.clone());
                }
                if final_close {
                    if !closed.starts_with("close 1012") {
                        s.problems.push(format!("at SIGTERM the socket ended with {closed:?}, not 1012"));
                    }
                    return;
                }
                if !killed_since {
                    s.problems.push(format!("socket closed while nestor was up: {closed}"));
                }
            }
            if self.world.stop_readers.load(Ordering::SeqCst) {
                return;
            }
            reconnect = true;
        }
    }

    fn on_frame(&self, v: &Value) {
        let mut s = self.seen();
        let conn_no = s.conns.len();
        match self.kind {
            Kind::Events => {
                if !is_persisted(v) {
                    return;
                }
                let id = v["id"].as_str().unwrap_or("").to_owned();
                s.conns.last_mut().unwrap().frames.push(id.clone());
                if s.have.contains(&id) {
                    if s.from_rest.contains(&id) {
                        s.overlap += 1;
                    } else {
                        s.problems.push(format!("connection {conn_no}: event {id} delivered twice by sockets"));
                    }
                } else {
                    s.ingest(v, false);
                }
            }
            Kind::Session => match v["type"].as_str() {
                Some("sync") => {
                    let c = s.conns.last_mut().unwrap();
                    c.syncs += 1;
                    if c.syncs > 1 {
                        s.problems.push(format!("connection {conn_no}: a second sync"));
                    }
                }
                Some("durable") => {
                    let seq = v["seq"].as_i64().unwrap_or(-2);
                    let want = s.last_seq + 1;
                    if seq != want {
                        s.problems.push(format!("connection {conn_no}: seq {seq}, want {want}"));
                    }
                    s.last_seq = s.last_seq.max(seq);
                    let ev = &v["event"];
                    s.conns.last_mut().unwrap().frames.push(ev["id"].as_str().unwrap_or("").to_owned());
                    if !s.ingest(ev, false) {
                        s.problems.push(format!("connection {conn_no}: event {} twice", ev["id"]));
                    }
                }
                _ => {}
            },
        }
    }

    /// The REST side: rounds of message + run until told to stop (at least `min_rounds`).
    async fn drive(self: Arc<Self>, min_rounds: u64, pause_ms: u64) {
        let mut round = 0u64;
        while round < min_rounds || !self.world.stop_rounds.load(Ordering::SeqCst) {
            let text = format!("chaos round {round} of {}", self.id);
            if let Err(e) = self.one_round(&text).await {
                self.seen().problems.push(format!("round {round}: {e}"));
                return;
            }
            self.rounds_done.fetch_add(1, Ordering::Relaxed);
            round += 1;
            tokio::time::sleep(Duration::from_millis(pause_ms / 2 + self.id.as_u128() as u64 % pause_ms.max(1))).await;
        }
    }

    async fn one_round(&self, text: &str) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(120);
        let msg = json!({"role": "user", "content": [{"type": "text", "text": text}], "run": true});
        let path = format!("/api/conversations/{}/events", self.id);
        // Send it once: after an ambiguous failure, look for it before sending again.
        loop {
            match self.request(reqwest::Method::POST, &path, Some(&msg)).await {
                Ok((200, _)) => break,
                Ok((st, v)) => return Err(format!("sending the message: HTTP {st} {v}")),
                Err(_) => {
                    self.http_retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    if self.seen().user_msgs.contains_key(text) {
                        break;
                    }
                    let evs = self.all_events().await?;
                    if evs.iter().any(|e| e["llm_message"]["content"][0]["text"].as_str() == Some(text)) {
                        break;
                    }
                }
            }
            if Instant::now() > deadline {
                return Err("the message could not be sent in 120 s".into());
            }
        }
        let mut last_check = Instant::now();
        loop {
            if self.seen().round_done(text) {
                return Ok(());
            }
            if Instant::now() > deadline {
                let s = self.seen();
                return Err(format!("not finished after 120 s (message seen: {}, statuses: {:?})", s.user_msgs.contains_key(text), s.statuses.iter().rev().take(3).collect::<Vec<_>>()));
            }
            if last_check.elapsed() > Duration::from_millis(1500) {
                last_check = Instant::now();
                // A run killed by a downstream restart comes back as `error`: run again.
                let (st, v) = self.request(reqwest::Method::GET, &format!("/api/conversations/{}", self.id), None).await?;
                let status = v["execution_status"].as_str().unwrap_or("");
                if st == 200 && matches!(status, "error" | "idle" | "paused" | "stuck") {
                    self.reruns.fetch_add(1, Ordering::Relaxed);
                    let _ = self.request(reqwest::Method::POST, &format!("/api/conversations/{}/run", self.id), None).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Compare with the downstream's log.
    fn verify(&self, log: &[Value]) -> Vec<String> {
        let s = self.seen();
        let mut out: Vec<String> = s.problems.clone();
        let pos: HashMap<&str, usize> = log.iter().enumerate().filter_map(|(i, e)| e["id"].as_str().map(|id| (id, i))).collect();
        let log_ids: HashSet<&str> = pos.keys().copied().collect();
        let have: HashSet<&str> = s.have.iter().map(String::as_str).collect();
        let missing = log_ids.difference(&have).count();
        let extra: Vec<&&str> = have.difference(&log_ids).collect();
        if missing > 0 {
            out.push(format!("{missing} of {} events never reached the client", log.len()));
        }
        if !extra.is_empty() {
            out.push(format!("{} events not in the log: {:?}", extra.len(), extra.iter().take(3).collect::<Vec<_>>()));
        }
        for (n, c) in s.conns.iter().enumerate() {
            let mut prev: Option<usize> = None;
            for id in &c.frames {
                let Some(&p) = pos.get(id.as_str()) else { continue };
                if let Some(q) = prev {
                    if p != q + 1 {
                        out.push(format!("connection {}: log position {p} after {q} (a gap or a repeat on one connection)", n + 1));
                        break;
                    }
                }
                prev = Some(p);
            }
            if self.kind == Kind::Session && c.syncs != 1 && !c.frames.is_empty() {
                out.push(format!("connection {}: {} syncs", n + 1, c.syncs));
            }
        }
        if self.kind == Kind::Session && s.last_seq + 1 != log.len() as i64 {
            out.push(format!("last seq {} but the log has {} events", s.last_seq, log.len()));
        }
        out
    }
}

/// Start every client: create, subscribe (first frame), then drive. Returns their tasks.
async fn start_clients(world: &Arc<World>, n: usize, min_rounds: u64, pause_ms: u64) -> (Vec<Arc<Client>>, Vec<tokio::task::JoinHandle<()>>, Vec<tokio::task::JoinHandle<()>>) {
    let mut clients = Vec::new();
    let mut readers = Vec::new();
    let mut drivers = Vec::new();
    for i in 0..n {
        let c = Arc::new(Client {
            id: Uuid::new_v4(),
            kind: if i % 2 == 0 { Kind::Events } else { Kind::Session },
            world: world.clone(),
            seen: Mutex::new(Seen { last_seq: -1, ..Default::default() }),
            rounds_done: AtomicU64::new(0),
            reruns: AtomicU64::new(0),
            http_retries: AtomicU64::new(0),
        });
        clients.push(c.clone());
    }
    // Creates and subscriptions in parallel waves of 10.
    for chunk in clients.chunks(10) {
        let mut waits = Vec::new();
        for c in chunk {
            let c = c.clone();
            let (tx, rx) = tokio::sync::oneshot::channel();
            let created = c.create().await;
            if let Err(e) = created {
                c.seen().problems.push(e);
            }
            readers.push(tokio::spawn(c.clone().read_loop(tx)));
            waits.push((c, rx));
        }
        for (c, rx) in waits {
            if tokio::time::timeout(Duration::from_secs(30), rx).await.is_err() {
                c.seen().problems.push("no first frame within 30 s".into());
            }
            drivers.push(tokio::spawn(c.clone().drive(min_rounds, pause_ms)));
        }
    }
    (clients, readers, drivers)
}

/// Wait (bounded) for every driver, then until each client has every event of its log.
async fn finish_clients(world: &Arc<World>, clients: &[Arc<Client>], drivers: Vec<tokio::task::JoinHandle<()>>, log_of: impl Fn(Uuid) -> Vec<Value>) {
    world.stop_rounds.store(true, Ordering::SeqCst);
    for d in drivers {
        if tokio::time::timeout(Duration::from_secs(150), d).await.is_err() {
            panic!("a client did not finish its rounds within 150 s");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for c in clients {
        loop {
            let log = log_of(c.id);
            let ok = {
                let s = c.seen();
                log.iter().all(|e| e["id"].as_str().is_some_and(|id| s.have.contains(id)))
            };
            if ok || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The problems, grouped by kind (ids and numbers blanked), most frequent first, then the
/// first 20 as they are.
fn describe(problems: &[String]) -> String {
    let mut kinds: HashMap<String, usize> = HashMap::new();
    for p in problems {
        let k: String = p
            .split_whitespace()
            .map(|w| if w.chars().any(|c| c.is_ascii_digit()) { "#" } else { w })
            .collect::<Vec<_>>()
            .join(" ");
        *kinds.entry(k).or_default() += 1;
    }
    let mut kinds: Vec<_> = kinds.into_iter().collect();
    kinds.sort_by_key(|k| std::cmp::Reverse(k.1));
    let mut out = format!("{} problems, by kind:\n", problems.len());
    for (k, n) in kinds.iter().take(15) {
        out.push_str(&format!("  {n} × {k}\n"));
    }
    out.push_str("first ones:\n");
    for p in problems.iter().take(20) {
        out.push_str(&format!("  {p}\n"));
    }
    out
}

fn report(clients: &[Arc<Client>], log_of: impl Fn(Uuid) -> Vec<Value>) -> (Vec<String>, String) {
    let mut problems = Vec::new();
    let (mut events, mut conns, mut overlap, mut rounds, mut reruns, mut retries) = (0usize, 0usize, 0usize, 0u64, 0u64, 0u64);
    for (i, c) in clients.iter().enumerate() {
        let log = log_of(c.id);
        events += log.len();
        for p in c.verify(&log) {
            problems.push(format!("client {i} ({:?}, {}): {p}", c.kind, c.id));
        }
        let s = c.seen();
        conns += s.conns.len();
        overlap += s.overlap;
        rounds += c.rounds_done.load(Ordering::Relaxed);
        reruns += c.reruns.load(Ordering::Relaxed);
        retries += c.http_retries.load(Ordering::Relaxed);
    }
    let summary = format!(
        "{} clients: {rounds} rounds completed ({reruns} re-runs after a killed run), {events} events checked, {conns} client socket connections, {overlap} REST/socket overlaps (after nestor kills), {retries} HTTP retries",
        clients.len()
    );
    (problems, summary)
}

// ------------------------------------------------------------------ test 1: existing

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_conversations_through_downstream_restarts_resets_and_nestor_kills() {
    const FAKES: usize = 5;
    let convs = env_num("NESTOR_CHAOS_CONVS", 50) as usize;
    let chaos_secs = env_num("NESTOR_CHAOS_SECS", 25);
    let mut rng = Rng::new(0xc4a0_5eed);
    let t0 = Instant::now();

    let mut fakes = Vec::new();
    let mut proxies = Vec::new();
    for i in 0..FAKES {
        let f = FakeAgentServer::start(FakeConfig {
            run_steps: 2,
            step_delay: Duration::from_millis(20),
            max_subscribers_per_conversation: 10_000,
            ..FakeConfig::with_key(format!("downstream-key-chaos-{i}"))
        })
        .await
        .unwrap();
        proxies.push(ChaosProxy::start(f.addr()).await.unwrap());
        fakes.push(f);
    }
    let dir = tempfile::tempdir().unwrap();
    let mut toml = format!(
        "session_api_keys = [\"{CLIENT_KEY}\"]\nstate_dir = \"{}\"\nready_timeout_secs = 20.0\nupstream_timeout_secs = 10.0\n[websocket]\nresume_deadline_secs = 60.0\n[provisioner]\nkind = \"existing\"\n[provisioner.existing]\nhealth_interval_secs = 0.5\n",
        dir.path().join("state").display()
    );
    for (i, p) in proxies.iter().enumerate() {
        toml.push_str(&format!("[[provisioner.existing.servers]]\nurl = \"{}\"\napi_key = \"downstream-key-chaos-{i}\"\n", p.url()));
    }
    let mut nestor = NestorProc::start(dir.path(), &toml).await;
    let world = World::new(nestor.url());
    let (clients, readers, drivers) = start_clients(&world, convs, 3, 400).await;
    let subscribed = t0.elapsed();

    // Chaos.
    let fakes_c = fakes.clone();
    let log_of = move |id: Uuid| -> Vec<Value> {
        fakes_c.iter().find(|f| f.conversation(id).is_some()).map(|f| f.events(id)).unwrap_or_default()
    };
    let (mut restarts, mut resets, mut stalls, mut refusals, mut kills) = (0u32, 0usize, 0u32, 0u32, 0u32);
    let chaos_start = Instant::now();
    let chaos_for = Duration::from_secs(chaos_secs);
    let mut next_kill = chaos_start + chaos_for / 3;
    while chaos_start.elapsed() < chaos_for {
        tokio::time::sleep(Duration::from_millis(150 + rng.below(400))).await;
        if Instant::now() >= next_kill {
            world.epoch.fetch_add(1, Ordering::SeqCst);
            nestor.kill9();
            tokio::time::sleep(Duration::from_millis(rng.below(500))).await;
            nestor.spawn().await;
            kills += 1;
            next_kill = Instant::now() + Duration::from_secs(6 + rng.below(chaos_secs / 3 + 1));
            continue;
        }
        let p = &proxies[rng.below(FAKES as u64) as usize];
        match rng.below(10) {
            0..=2 => {
                fakes[rng.below(FAKES as u64) as usize].restart().await;
                restarts += 1;
            }
            3..=6 => {
                let n = 1 + rng.below(6) as usize;
                resets += if rng.below(4) == 0 { p.reset_all() } else { p.reset_some(n, |len| rng.below(len as u64) as usize) };
            }
            7..=8 => {
                p.stall(Duration::from_millis(200 + rng.below(1300)));
                stalls += 1;
            }
            _ => {
                p.set_refusing(true);
                tokio::time::sleep(Duration::from_millis(300 + rng.below(700))).await;
                p.set_refusing(false);
                refusals += 1;
            }
        }
    }
    for p in &proxies {
        p.unstall();
        p.set_refusing(false);
    }
    let chaos_took = chaos_start.elapsed();
    finish_clients(&world, &clients, drivers, &log_of).await;

    // Graceful stop: every client socket must get 1012.
    world.shutting_down.store(true, Ordering::SeqCst);
    world.stop_readers.store(true, Ordering::SeqCst);
    let term = nestor.sigterm(Duration::from_secs(30)).await;
    for r in readers {
        let _ = tokio::time::timeout(Duration::from_secs(10), r).await;
    }
    let (mut problems, summary) = report(&clients, &log_of);
    // Each conversation lives on exactly one downstream.
    for c in &clients {
        let holders = fakes.iter().filter(|f| f.conversation(c.id).is_some()).count();
        if holders != 1 {
            problems.push(format!("conversation {} is on {holders} downstreams", c.id));
        }
    }
    match term {
        Some((st, took)) if st.success() => eprintln!("SIGTERM: nestor exited in {took:?}"),
        other => problems.push(format!("nestor did not exit cleanly on SIGTERM: {other:?}")),
    }
    let pstats: Vec<_> = proxies.iter().map(|p| p.stats()).collect();
    eprintln!(
        "chaos {chaos_took:?} (subscribed at {subscribed:?}): {kills} nestor kills, {restarts} downstream restarts, {resets} connection resets, {stalls} stalls, {refusals} refusal windows; proxy connections accepted {}; {summary}; total {:?}",
        pstats.iter().map(|s| s.accepted).sum::<u64>(),
        t0.elapsed()
    );
    if !problems.is_empty() {
        eprintln!("nestor log tail:\n{}", nestor.log_tail(60));
    }
    assert!(problems.is_empty(), "{}", describe(&problems));
    assert!(kills >= 1 && restarts >= 1 && resets >= 1, "not enough chaos happened");
    for p in &proxies {
        p.stop();
    }
}

// ------------------------------------------------------------------ test 2: process

/// `(conversation dir, manifest pid)` of every conversation directory.
fn manifests(root: &Path) -> Vec<(PathBuf, Option<i32>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let p = e.path();
        let Ok(text) = std::fs::read_to_string(p.join("nestor-process.json")) else { continue };
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        out.push((p, v["pid"].as_i64().map(|x| x as i32)));
    }
    out
}

/// Processes under `root` that no manifest accounts for (a child per conversation
/// directory, the one its manifest names). Retried for a moment: a child being restarted
/// is spawned before its manifest names it.
async fn orphans(root: &Path) -> Vec<String> {
    let mut last = Vec::new();
    for _ in 0..30 {
        last.clear();
        let ms = manifests(root);
        for pid in pids_under(root) {
            let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap_or_default();
            match ms.iter().find(|(d, _)| cwd.starts_with(d)) {
                Some((_, Some(m))) if *m == pid => {}
                Some((d, m)) => last.push(format!("pid {pid} in {} (manifest names {m:?})", d.display())),
                None => last.push(format!("pid {pid} in {} (no manifest)", cwd.display())),
            }
        }
        if last.is_empty() {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_provisioner_children_killed_and_nestor_killed_leave_no_orphans() {
    let convs = env_num("NESTOR_CHAOS_PROCESS_CONVS", 12) as usize;
    let chaos_secs = env_num("NESTOR_CHAOS_SECS", 25);
    let mut rng = Rng::new(0x0f_a11);
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("state").join("process");
    // The fake binary persists conversations in OH_CONVERSATIONS_PATH, like the real one.
    let toml = format!(
        "session_api_keys = [\"{CLIENT_KEY}\"]\nstate_dir = \"{}\"\nready_timeout_secs = 30.0\nupstream_timeout_secs = 10.0\n[websocket]\nresume_deadline_secs = 60.0\n[provisioner]\nkind = \"process\"\n[provisioner.process]\nagent_server = \"{}\"\nstartup_timeout_secs = 20.0\nstop_timeout_secs = 2.0\non_shutdown = \"stop\"\n",
        dir.path().join("state").display(),
        fake_bin().display()
    );
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            kill_all_under(&self.0);
        }
    }
    let _cleanup = Cleanup(dir.path().to_path_buf());
    let mut nestor = NestorProc::start(dir.path(), &toml).await;
    let world = World::new(nestor.url());
    let (clients, readers, drivers) = start_clients(&world, convs, 3, 400).await;
    let subscribed = t0.elapsed();
    let mut problems = Vec::new();
    let (mut child_kills, mut kills) = (0u32, 0u32);
    let chaos_start = Instant::now();
    let chaos_for = Duration::from_secs(chaos_secs);
    let mut next_kill = chaos_start + chaos_for / 3;
    while chaos_start.elapsed() < chaos_for {
        tokio::time::sleep(Duration::from_millis(400 + rng.below(800))).await;
        if Instant::now() >= next_kill {
            world.epoch.fetch_add(1, Ordering::SeqCst);
            let before = pids_under(&root);
            nestor.kill9();
            tokio::time::sleep(Duration::from_millis(rng.below(300))).await;
            nestor.spawn().await;
            kills += 1;
            for o in orphans(&root).await {
                problems.push(format!("after nestor restart {kills}: {o}"));
            }
            let after = pids_under(&root);
            let readopted = before.iter().filter(|p| after.contains(p)).count();
            eprintln!("nestor restart {kills}: {} children before, {} after, {readopted} re-adopted", before.len(), after.len());
            next_kill = Instant::now() + Duration::from_secs(6 + rng.below(chaos_secs / 3 + 1));
            continue;
        }
        // SIGKILL a random child (its whole group, like the OOM killer or a crash).
        let ms = manifests(&root);
        if ms.is_empty() {
            continue;
        }
        let (_, pid) = &ms[rng.below(ms.len() as u64) as usize];
        if let Some(pid) = pid {
            // SAFETY: a child process of this test's nestor, named by its manifest.
            unsafe {
                libc::kill(-*pid, libc::SIGKILL);
                libc::kill(*pid, libc::SIGKILL);
            }
            child_kills += 1;
        }
    }
    let chaos_took = chaos_start.elapsed();
    let log_of = |id: Uuid| -> Vec<Value> {
        // The child persists its log as one JSON line per event.
        let path = root.join(id.simple().to_string()).join("state").join("conversations").join(id.simple().to_string()).join("events.jsonl");
        let alt = root.join(id.simple().to_string()).join("conversations").join(id.simple().to_string()).join("events.jsonl");
        let text = std::fs::read_to_string(&path).or_else(|_| std::fs::read_to_string(&alt)).unwrap_or_default();
        text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    };
    finish_clients(&world, &clients, drivers, &log_of).await;
    for o in orphans(&root).await {
        problems.push(format!("before the final SIGTERM: {o}"));
    }
    world.shutting_down.store(true, Ordering::SeqCst);
    world.stop_readers.store(true, Ordering::SeqCst);
    let children = pids_under(&root).len();
    let term = nestor.sigterm(Duration::from_secs(30)).await;
    for r in readers {
        let _ = tokio::time::timeout(Duration::from_secs(10), r).await;
    }
    match term {
        Some((st, took)) if st.success() => eprintln!("SIGTERM: nestor exited in {took:?}, stopping {children} children"),
        other => problems.push(format!("nestor did not exit cleanly on SIGTERM: {other:?}")),
    }
    let left = pids_under(dir.path());
    if !left.is_empty() {
        problems.push(format!("processes left after nestor's graceful shutdown: {left:?}"));
    }
    let (p2, summary) = report(&clients, log_of);
    problems.extend(p2);
    eprintln!("chaos {chaos_took:?} (subscribed at {subscribed:?}): {kills} nestor kills, {child_kills} children killed; {summary}; total {:?}", t0.elapsed());
    if !problems.is_empty() {
        eprintln!("nestor log tail:\n{}", nestor.log_tail(60));
    }
    assert!(problems.is_empty(), "{}", describe(&problems));
    assert!(kills >= 1 && child_kills >= 1, "not enough chaos happened");
}
