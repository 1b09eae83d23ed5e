//! Pull, push, deletions, incrementality, quotas, prefixes and purge against a real
//! S3-compatible server (moto_server; see tests/common/mod.rs).

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{bucket, chmod, config, noise, snapshot, unique_prefix, write, Node};
use futures::TryStreamExt;
use nestor_core::{ConversationId, UserId};
use nestor_workspace_store::{
    Area, ConversationStorage, QuotaKind, StoreError, TreeSpec, WorkspaceStorageConfig, WorkspaceStore,
};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

const BUCKET: &str = "nestor-ws-tests";

struct Env {
    cfg: WorkspaceStorageConfig,
    /// The same bucket, raw, to look at (or tamper with) what is stored.
    raw: Arc<dyn ObjectStore>,
    tmp: tempfile::TempDir,
}

impl Env {
    fn new(endpoint: &str, test: &str) -> Env {
        Self::with(endpoint, test, |_| {})
    }

    fn with(endpoint: &str, test: &str, change: impl FnOnce(&mut WorkspaceStorageConfig)) -> Env {
        let b = bucket(endpoint, BUCKET);
        let mut cfg = config(endpoint, &b, &unique_prefix(test));
        change(&mut cfg);
        let raw = cfg.build_object_store().unwrap();
        Env { cfg, raw, tmp: tempfile::tempdir().unwrap() }
    }

    /// A store as one nestor host sees it (its own cache root).
    fn host(&self, name: &str) -> WorkspaceStore {
        WorkspaceStore::connect(&self.cfg, self.tmp.path().join(format!("cache-{name}"))).unwrap()
    }

    fn dir(&self, name: &str) -> std::path::PathBuf {
        let d = self.tmp.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    async fn keys(&self, under: &str) -> BTreeSet<String> {
        let p = ObjectPath::parse(under).unwrap();
        self.raw.list(Some(&p)).map_ok(|m| m.location.to_string()).try_collect().await.unwrap()
    }
}

fn user(s: &str) -> UserId {
    UserId::new(s)
}

fn conv(store: &WorkspaceStore, u: &str) -> ConversationStorage {
    store.conversation(&user(u), ConversationId::new_random()).unwrap()
}

/// A tree with everything the store keeps (and a FIFO it skips).
fn sample_tree(root: &Path) {
    write(root, "README.md", "# hello\n");
    write(root, "src/main.rs", "fn main() {}\n");
    write(root, "src/deep/er/still/file.txt", noise(1, 10_000));
    write(root, "bin/run.sh", "#!/bin/sh\necho hi\n");
    chmod(root, "bin/run.sh", 0o755);
    write(root, "private.key", "k");
    chmod(root, "private.key", 0o600);
    write(root, "empty-file", "");
    write(root, "copy-a.bin", noise(7, 3000));
    write(root, "copy-b.bin", noise(7, 3000));
    write(root, "ünïcödé name with spaces.txt", "u");
    std::fs::create_dir_all(root.join("empty/dir")).unwrap();
    std::os::unix::fs::symlink("src/main.rs", root.join("link-inside")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", root.join("link-outside")).unwrap();
    std::os::unix::fs::symlink("../../..", root.join("src/up")).unwrap();
    let fifo = std::ffi::CString::new(root.join("a-fifo").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
}

fn without_special(mut s: std::collections::BTreeMap<String, Node>) -> std::collections::BTreeMap<String, Node> {
    s.retain(|_, n| *n != Node::Special);
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_then_pull_into_a_fresh_dir_reproduces_every_file() {
    let ep = s3_or_skip!();
    let env = Env::new(&ep, "roundtrip");
    let store = env.host("a");
    let c = conv(&store, "alice");
    let src = env.dir("src-ws");
    sample_tree(&src);

    let rep = c.push(Area::Workspace, &src).await.unwrap();
    assert!(rep.committed);
    assert_eq!(rep.generation, 1);
    assert_eq!(rep.skipped_special, 1, "the FIFO is skipped");
    // Two files with the same content share one blob.
    assert_eq!(rep.blobs_uploaded, 8, "9 files, 8 contents: {rep:?}");

    // A fresh host restores it into a directory that does not exist yet.
    let other = env.host("b");
    let c2 = other.conversation(c.user(), c.conversation()).unwrap();
    let dst = env.tmp.path().join("host-b/conv/workspace");
    let pulled = c2.pull(Area::Workspace, &dst).await.unwrap();
    assert!(pulled.found);
    assert_eq!(pulled.generation, 1);
    assert_eq!(pulled.bytes_downloaded, pulled.bytes - 3000, "duplicates are downloaded once");
    let want = without_special(snapshot(&src));
    let got = snapshot(&dst);
    assert_eq!(got, want, "content, paths, modes, mtimes and links all round-trip");
    assert!(matches!(&got["bin/run.sh"], Node::File { mode: 0o755, .. }));
    assert!(matches!(&got["private.key"], Node::File { mode: 0o600, .. }));
    assert_eq!(got["link-outside"], Node::Symlink("/etc/passwd".into()));
    assert!(matches!(got["empty/dir"], Node::Dir { .. }));
    // No temporary directories are left beside the target.
    let siblings: Vec<_> = std::fs::read_dir(dst.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(siblings, vec![std::ffi::OsString::from("workspace")]);

    // Pulling over an existing, different tree replaces it whole.
    let stale = env.dir("stale");
    write(&stale, "old-file", "old");
    write(&stale, "src/main.rs", "stale");
    c2.pull(Area::Workspace, &stale).await.unwrap();
    assert_eq!(snapshot(&stale), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletions_propagate_and_unreferenced_blobs_go() {
    let ep = s3_or_skip!();
    let env = Env::new(&ep, "deletions");
    let store = env.host("a");
    let c = conv(&store, "alice");
    let src = env.dir("ws");
    write(&src, "keep.txt", "keep");
    write(&src, "gone.txt", "gone");
    write(&src, "dir/inner.txt", "inner");
    c.push(Area::Workspace, &src).await.unwrap();
    let blobs_before = env.keys(&format!("{}/workspace/blobs", c.key_prefix())).await;
    assert_eq!(blobs_before.len(), 3);

    std::fs::remove_file(src.join("gone.txt")).unwrap();
    std::fs::remove_dir_all(src.join("dir")).unwrap();
    let rep = c.push(Area::Workspace, &src).await.unwrap();
    assert!(rep.committed);
    assert_eq!(rep.entries_removed, 3, "gone.txt, dir, dir/inner.txt");
    assert_eq!(rep.blobs_deleted, 2);
    assert_eq!(env.keys(&format!("{}/workspace/blobs", c.key_prefix())).await.len(), 1);

    let dst = env.tmp.path().join("restored");
    c.pull(Area::Workspace, &dst).await.unwrap();
    assert_eq!(snapshot(&dst).keys().cloned().collect::<Vec<_>>(), ["keep.txt"]);
    // And it stays deleted after another (unchanged) push.
    c.push(Area::Workspace, &src).await.unwrap();
    let dst2 = env.tmp.path().join("restored2");
    c.pull(Area::Workspace, &dst2).await.unwrap();
    assert_eq!(snapshot(&dst2).keys().cloned().collect::<Vec<_>>(), ["keep.txt"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_tree_uploads_nothing() {
    let ep = s3_or_skip!();
    let env = Env::new(&ep, "unchanged");
    let store = env.host("a");
    let c = conv(&store, "alice");
    let src = env.dir("ws");
    for i in 0..200 {
        write(&src, &format!("d{}/f{i}.txt", i % 10), noise(i, 500));
    }
    c.push(Area::Workspace, &src).await.unwrap();
    // Files written less than a second before a push are hashed again next time (their stat
    // cannot be trusted yet); wait that out so the last push reads nothing.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let before = store.io_stats();
    let rep = c.push(Area::Workspace, &src).await.unwrap();
    let io = store.io_stats().since(&before);
    assert!(!rep.committed);
    assert_eq!((io.bytes_uploaded, io.puts), (0, 0), "{io:?}");
    assert_eq!(io.requests, 1, "one HEAD of the manifest: {io:?}");

    let before = store.io_stats();
    let rep = c.push(Area::Workspace, &src).await.unwrap();
    let io = store.io_stats().since(&before);
    assert_eq!(rep.files_hashed, 0, "nothing read: {rep:?}");
    assert_eq!((io.requests, io.bytes_uploaded), (1, 0), "{io:?}");

    // A rename uploads no content, only the manifest.
    std::fs::rename(src.join("d1/f1.txt"), src.join("renamed.txt")).unwrap();
    let before = store.io_stats();
    let rep = c.push(Area::Workspace, &src).await.unwrap();
    let io = store.io_stats().since(&before);
    assert!(rep.committed);
    assert_eq!(rep.blobs_uploaded, 0);
    assert_eq!(io.puts, 1, "just the manifest: {io:?}");

    // A changed file uploads just that file.
    write(&src, "d2/f2.txt", "changed");
    let rep = c.push(Area::Workspace, &src).await.unwrap();
    assert_eq!((rep.blobs_uploaded, rep.bytes_uploaded), (1, 7));
    assert_eq!(c.status().workspace.pending_bytes, 0);
    assert_eq!(c.status().workspace.stored_files, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_conversation_pushes_nothing_after_its_pull() {
    let ep = s3_or_skip!();
    let env = Env::new(&ep, "resume");
    let a = env.host("a");
    let c = conv(&a, "alice");
    let src = env.dir("host-a-ws");
    sample_tree(&src);
    std::fs::remove_file(src.join("a-fifo")).unwrap();
    c.push(Area::Workspace, &src).await.unwrap();
    write(&src.join("../host-a-state"), "conversations/x/meta.json", "{}");
    c.push(Area::State, &src.join("../host-a-state")).await.unwrap();

    let b = env.host("b");
    let c2 = b.conversation(c.user(), c.conversation()).unwrap();
    let ws = env.tmp.path().join("host-b/ws");
    let st = env.tmp.path().join("host-b/state");
    c2.pull(Area::Workspace, &ws).await.unwrap();
    c2.pull(Area::State, &st).await.unwrap();
    assert_eq!(std::fs::read_to_string(st.join("conversations/x/meta.json")).unwrap(), "{}");
    let before = b.io_stats();
    let rep = c2.push(Area::Workspace, &ws).await.unwrap();
    assert_eq!((rep.committed, rep.files_hashed), (false, 0), "{rep:?}");
    assert_eq!(b.io_stats().since(&before).bytes_uploaded, 0);
    assert_eq!(c2.status().workspace.generation, 1);
    assert!(c2.status().workspace.last_pull_at.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_exceeded_is_a_clear_error_and_keeps_what_was_stored() {
    let ep = s3_or_skip!();
    let env = Env::with(&ep, "quota", |c| {
        c.quota.max_bytes = Some(100_000);
        c.quota.max_files = Some(50);
    });
    let store = env.host("a");
    let c = conv(&store, "alice");
    let src = env.dir("ws");
    write(&src, "a.bin", noise(1, 40_000));
    write(&src, "b.bin", noise(2, 40_000));
    c.push(Area::Workspace, &src).await.unwrap();
    let stored = snapshot(&src);

    // The state tree counts too: 40 kB more of it would go over.
    let state = env.dir("state");
    write(&state, "events.json", noise(3, 30_000));
    let before = store.io_stats();
    let err = c.push(Area::State, &state).await.unwrap_err();
    match &err {
        StoreError::QuotaExceeded { kind: QuotaKind::Bytes, limit: 100_000, would_be: 110_000 } => {}
        e => panic!("{e:?}"),
    }
    assert!(err.to_string().contains("nothing was uploaded"), "{err}");
    assert_eq!(store.io_stats().since(&before).bytes_uploaded, 0, "nothing of the offending push is uploaded");
    assert!(!err.is_retriable());

    write(&src, "c.bin", noise(4, 30_000));
    let err = c.push(Area::Workspace, &src).await.unwrap_err();
    assert!(matches!(err, StoreError::QuotaExceeded { kind: QuotaKind::Bytes, .. }), "{err:?}");
    let s = c.status();
    assert_eq!(s.workspace.consecutive_failures, 1);
    assert!(s.workspace.last_error.as_deref().unwrap().contains("quota"));
    assert_eq!(s.workspace.pending_bytes, 30_000);
    assert_eq!(s.workspace.generation, 1);

    // What was stored before is intact.
    let dst = env.tmp.path().join("check");
    c.pull(Area::Workspace, &dst).await.unwrap();
    assert_eq!(snapshot(&dst), stored);

    // Too many files.
    std::fs::remove_file(src.join("c.bin")).unwrap();
    for i in 0..60 {
        write(&src, &format!("many/{i}"), "");
    }
    let err = c.push(Area::Workspace, &src).await.unwrap_err();
    assert!(matches!(err, StoreError::QuotaExceeded { kind: QuotaKind::Files, limit: 50, would_be: 62 }), "{err:?}");

    // Cleaning up always goes through.
    std::fs::remove_dir_all(src.join("many")).unwrap();
    std::fs::remove_file(src.join("b.bin")).unwrap();
    assert!(c.push(Area::Workspace, &src).await.unwrap().committed);
    assert!(c.push(Area::State, &state).await.unwrap().committed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_quota_counts_every_conversation_of_the_user_and_keeps_what_was_stored() {
    let ep = s3_or_skip!();
    let env = Env::with(&ep, "userquota", |c| {
        c.user_quota.max_bytes = Some(100_000);
        c.user_quota.max_files = Some(20);
    });
    let store = env.host("a");
    let a1 = conv(&store, "alice");
    let a2 = conv(&store, "alice");
    let b1 = conv(&store, "bob");
    let d1 = env.dir("a1");
    write(&d1, "x.bin", noise(1, 60_000));
    a1.push(Area::Workspace, &d1).await.unwrap();
    // Bob has his own allowance.
    let db = env.dir("b1");
    write(&db, "x.bin", noise(2, 90_000));
    b1.push(Area::Workspace, &db).await.unwrap();

    // Alice's second conversation would take her to 120 kB: refused, nothing uploaded.
    let d2 = env.dir("a2");
    write(&d2, "y.bin", noise(3, 60_000));
    let before = store.io_stats();
    let err = a2.push(Area::Workspace, &d2).await.unwrap_err();
    match &err {
        StoreError::UserQuotaExceeded { user, kind: QuotaKind::Bytes, limit: 100_000, would_be: 120_000 } if user == "alice" => {}
        e => panic!("{e:?}"),
    }
    assert!(err.is_quota() && !err.is_retriable());
    assert_eq!(store.io_stats().since(&before).bytes_uploaded, 0);
    assert!(a2.status().workspace.over_quota && a2.status().over_quota());
    assert_eq!(store.user_usage(&user("alice")).await.unwrap().bytes, 60_000);

    // A fresh nestor (another host) learns the usage from the bucket.
    let other = env.host("b");
    assert_eq!(other.user_usage(&user("alice")).await.unwrap().bytes, 60_000);
    assert_eq!(other.user_usage(&user("bob")).await.unwrap().bytes, 90_000);
    let a2b = other.conversation(&user("alice"), a2.conversation()).unwrap();
    assert!(a2b.push(Area::Workspace, &d2).await.unwrap_err().is_quota());

    // Freeing space in one conversation lets the other through; the refused push stored nothing.
    std::fs::remove_file(d1.join("x.bin")).unwrap();
    write(&d1, "small.txt", "small");
    assert!(a1.push(Area::Workspace, &d1).await.unwrap().committed);
    let r = a2.push(Area::Workspace, &d2).await.unwrap();
    assert!(r.committed);
    assert!(!a2.status().over_quota());
    assert_eq!(store.user_usage(&user("alice")).await.unwrap().bytes, 60_005);

    // Purging a conversation gives its share back.
    a2.purge().await.unwrap();
    assert_eq!(store.user_usage(&user("alice")).await.unwrap().bytes, 5);

    // Files count too.
    for i in 0..25 {
        write(&d1, &format!("many/{i}"), "");
    }
    let err = a1.push(Area::Workspace, &d1).await.unwrap_err();
    assert!(matches!(err, StoreError::UserQuotaExceeded { kind: QuotaKind::Files, limit: 20, .. }), "{err:?}");
    a1.purge().await.unwrap();
    b1.purge().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_user_has_their_own_prefix() {
    let ep = s3_or_skip!();
    let env = Env::new(&ep, "users");
    let store = env.host("a");
    let id = ConversationId::new_random();
    let alice = store.conversation(&user("alice"), id).unwrap();
    let bob = store.conversation(&user("bob"), id).unwrap();
    let (wa, wb) = (env.dir("a"), env.dir("b"));
    write(&wa, "who", "alice");
    write(&wb, "who", "bob");
    alice.push(Area::Workspace, &wa).await.unwrap();
    bob.push(Area::Workspace, &wb).await.unwrap();

    let prefix = &env.cfg.prefix;
    assert_eq!(alice.key_prefix(), format!("{prefix}/alice/{}", id.hex()));
    let all = env.keys(prefix).await;
    assert!(all.iter().all(|k| k.starts_with(&format!("{prefix}/alice/")) || k.starts_with(&format!("{prefix}/bob/"))));
    assert_eq!(env.keys(&format!("{prefix}/alice")).await.len(), 2, "manifest + one blob");
    assert_eq!(env.keys(&format!("{prefix}/bob")).await.len(), 2);

    let d = env.tmp.path().join("x");
    bob.pull(Area::Workspace, &d).await.unwrap();
    assert_eq!(std::fs::read_to_string(d.join("who")).unwrap(), "bob");

    // A user id that could escape its prefix is refused.
    for bad in ["../alice", "bob/../alice", "", ".."] {
        assert!(matches!(store.conversation(&user(bad), id), Err(StoreError::InvalidId(_))), "{bad:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_manifest_cannot_write_outside_the_tree() {
    let ep = s3_or_skip!();
    let env = Env::new(&ep, "tamper");
    let store = env.host("a");
    let c = conv(&store, "alice");
    let src = env.dir("ws");
    write(&src, "f", "x");
    c.push(Area::Workspace, &src).await.unwrap();
    let mkey = ObjectPath::parse(format!("{}/workspace/manifest.json", c.key_prefix())).unwrap();
    let good: serde_json::Value =
        serde_json::from_slice(&env.raw.get(&mkey).await.unwrap().bytes().await.unwrap()).unwrap();
    let hash = good["entries"]["f"]["hash"].as_str().unwrap().to_owned();
    let file = serde_json::json!({"t": "file", "size": 1, "mtime_ns": 0, "mode": 420, "hash": hash});
    let evil_manifests = [
        serde_json::json!({"../escaped": file}),
        serde_json::json!({"d": {"t": "symlink", "target": "/tmp"}, "d/escaped": file}),
        serde_json::json!({"/abs": file}),
    ];
    let dst = env.dir("victim");
    write(&dst, "mine", "untouched");
    for entries in evil_manifests {
        let mut m = good.clone();
        m["entries"] = entries;
        env.raw.put(&mkey, PutPayload::from(serde_json::to_vec(&m).unwrap())).await.unwrap();
        let err = c.pull(Area::Workspace, &dst).await.unwrap_err();
        assert!(matches!(err, StoreError::CorruptManifest { .. }), "{err:?}");
        assert!(!err.is_retriable());
        assert_eq!(snapshot(&dst).len(), 1, "the local tree is untouched");
        assert!(!env.tmp.path().join("escaped").exists());
    }

    // A blob whose content does not match its name is refused too.
    env.raw.put(&mkey, PutPayload::from(serde_json::to_vec(&good).unwrap())).await.unwrap();
    let blob = ObjectPath::parse(format!("{}/workspace/blobs/{}/{hash}", c.key_prefix(), &hash[..2])).unwrap();
    env.raw.put(&blob, PutPayload::from_static(b"y")).await.unwrap();
    let err = c.pull(Area::Workspace, &dst).await.unwrap_err();
    assert!(matches!(err, StoreError::CorruptBlob { .. }), "{err:?}");
    assert_eq!(std::fs::read_to_string(dst.join("mine")).unwrap(), "untouched");
    let leftovers: Vec<_> = std::fs::read_dir(env.tmp.path())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.contains("nestor-pull"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pushes_of_one_conversation_are_serialised() {
    let ep = s3_or_skip!();
    let env = Env::new(&ep, "serial");
    let store = env.host("a");
    let c = conv(&store, "alice");
    let c_again = store.conversation(c.user(), c.conversation()).unwrap();
    let src = env.dir("ws");
    for i in 0..50 {
        write(&src, &format!("f{i}"), noise(i, 20_000));
    }
    let (r1, r2) = tokio::join!(c.push(Area::Workspace, &src), c_again.push(Area::Workspace, &src));
    let (r1, r2) = (r1.unwrap(), r2.unwrap());
    // One stored the tree, the other found it stored: never two interleaved generations.
    assert_eq!([r1.committed, r2.committed].iter().filter(|c| **c).count(), 1, "{r1:?} {r2:?}");
    assert_eq!(r1.generation.max(r2.generation), 1);
    assert_eq!(r1.blobs_uploaded + r2.blobs_uploaded, 50);
    assert_eq!(store.status(c.user(), c.conversation()).unwrap().workspace.generation, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_deletes_everything_of_one_conversation_only() {
    let ep = s3_or_skip!();
    let env = Env::new(&ep, "purge");
    let store = env.host("a");
    let c = conv(&store, "alice");
    let keep = conv(&store, "alice");
    let ws = env.dir("ws");
    sample_tree(&ws);
    let st = env.dir("state");
    write(&st, "events/1.json", "{}");
    c.push(Area::Workspace, &ws).await.unwrap();
    c.push(Area::State, &st).await.unwrap();
    keep.push(Area::Workspace, &st).await.unwrap();

    let rep = c.purge().await.unwrap();
    assert!(rep.objects_deleted >= 10, "{rep:?}");
    assert!(env.keys(c.key_prefix()).await.is_empty());
    assert_eq!(env.keys(keep.key_prefix()).await.len(), 2);
    let d = env.tmp.path().join("after-purge");
    let p = c.pull(Area::Workspace, &d).await.unwrap();
    assert!(!p.found);
    assert!(d.is_dir() && snapshot(&d).is_empty());
    // Pushing again after a purge stores everything again.
    let rep = c.push(Area::Workspace, &ws).await.unwrap();
    assert!(rep.committed && rep.blobs_uploaded == 8, "{rep:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pusher_pushes_periodically_and_on_finish() {
    let ep = s3_or_skip!();
    let env = Env::new(&ep, "pusher");
    let store = env.host("a");
    let c = conv(&store, "alice");
    let ws = env.dir("ws");
    let st = env.dir("state");
    write(&ws, "a", "1");
    let pusher = c.spawn_pusher(vec![TreeSpec::new(Area::Workspace, &ws), TreeSpec::new(Area::State, &st)], Duration::from_millis(300));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while c.status().workspace.generation < 1 {
        assert!(tokio::time::Instant::now() < deadline, "no periodic push: {:?}", c.status());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    write(&ws, "b", "2");
    let reps = pusher.push_now().await.unwrap();
    assert_eq!(reps.len(), 2);
    assert!(c.status().workspace.generation >= 2);
    write(&ws, "c", "3");
    let reps = pusher.finish(Duration::from_secs(30)).await.unwrap();
    assert_eq!(reps[0].area, Area::Workspace);
    let d = env.tmp.path().join("restored");
    c.pull(Area::Workspace, &d).await.unwrap();
    assert_eq!(snapshot(&d).len(), 3, "the final push stored c");

    // stop() does not push.
    let pusher = c.spawn_pusher(vec![TreeSpec::new(Area::Workspace, &ws)], Duration::from_secs(3600));
    write(&ws, "d", "4");
    let g = c.status().workspace.generation;
    pusher.stop().await;
    assert_eq!(c.status().workspace.generation, g);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_reports_a_missing_bucket_or_server() {
    let ep = s3_or_skip!();
    let env = Env::new(&ep, "probe");
    env.host("a").probe().await.unwrap();
    let mut missing = env.cfg.clone();
    missing.bucket = "no-such-bucket-here".into();
    let err = WorkspaceStore::connect(&missing, env.tmp.path().join("m")).unwrap().probe().await.unwrap_err();
    assert!(matches!(&err, StoreError::Config(m) if m.contains("does not exist")), "{err:?}");
    let mut cfg = env.cfg.clone();
    cfg.endpoint = Some(format!("http://127.0.0.1:{}", common::free_port()));
    cfg.request_timeout_secs = 5;
    let down = WorkspaceStore::connect(&cfg, env.tmp.path().join("c")).unwrap();
    let err = down.probe().await.unwrap_err();
    assert!(err.is_retriable(), "{err:?}");
}
