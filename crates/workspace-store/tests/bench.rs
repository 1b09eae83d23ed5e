//! Figures for docs/performance.md ("Workspace persistence"). Not a test: run it with
//!
//! ```text
//! cargo test --release -p nestor-workspace-store --test bench -- --ignored --nocapture
//! ```
//!
//! It compares nestor's restore (pull) with a plain copy of the same data on the same server in
//! the same run: `aws s3 sync` (PyPI awscli, installed by `scripts/setup-s3.sh --awscli`) and a
//! naive sequential object_store download, and measures the periodic push when nothing changed.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{bucket, config, noise, write};
use futures::TryStreamExt;
use nestor_core::{ConversationId, UserId};
use nestor_workspace_store::{Area, WorkspaceStore};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

const MIB: usize = 1024 * 1024;
const RUNS: usize = 3;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn aws_cli() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("NESTOR_AWS_CLI") {
        return Some(p.into());
    }
    let out = Command::new("bash")
        .arg(common::repo_root().join("scripts/setup-s3.sh"))
        .arg("--awscli")
        .output()
        .ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().lines().last().unwrap_or("").into())
}

fn aws(cli: &Path, endpoint: &str, args: &[&str]) {
    let st = Command::new(cli)
        .args(["--endpoint-url", endpoint, "--only-show-errors"])
        .args(args)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .status()
        .unwrap();
    assert!(st.success(), "aws {args:?}");
}

/// Every file under `root` as (relative path, absolute path).
fn files(root: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.strip_prefix(root).unwrap().to_str().unwrap().to_owned(), p));
            }
        }
    }
    out
}

/// Sequential upload of a plain copy (objects at their paths).
async fn naive_upload(raw: &Arc<dyn ObjectStore>, root: &Path, prefix: &str) {
    for (rel, abs) in files(root) {
        let key = ObjectPath::parse(format!("{prefix}/{rel}")).unwrap();
        raw.put(&key, PutPayload::from(std::fs::read(abs).unwrap())).await.unwrap();
    }
}

/// Sequential download of a plain copy, streamed to files.
async fn naive_download(raw: &Arc<dyn ObjectStore>, prefix: &str, dst: &Path) {
    use futures::StreamExt;
    use tokio::io::AsyncWriteExt;
    let p = ObjectPath::parse(prefix).unwrap();
    let metas: Vec<_> = raw.list(Some(&p)).try_collect().await.unwrap();
    for m in metas {
        let rel = m.location.as_ref().strip_prefix(&format!("{prefix}/")).unwrap().to_owned();
        let out = dst.join(rel);
        tokio::fs::create_dir_all(out.parent().unwrap()).await.unwrap();
        let mut f = tokio::fs::File::create(&out).await.unwrap();
        let mut s = raw.get(&m.location).await.unwrap().into_stream();
        while let Some(c) = s.next().await {
            f.write_all(&c.unwrap()).await.unwrap();
        }
        f.flush().await.unwrap();
    }
}

struct Row {
    what: String,
    nestor_push: Duration,
    nestor_pull: Duration,
    aws_up: Option<Duration>,
    aws_down: Option<Duration>,
    naive_up: Duration,
    naive_down: Duration,
}

#[allow(clippy::too_many_arguments)] // a bench helper: every argument is one piece of the run
async fn scenario(
    name: &str,
    make: impl Fn(&Path),
    store: &WorkspaceStore,
    raw: &Arc<dyn ObjectStore>,
    endpoint: &str,
    bucket: &str,
    cli: Option<&Path>,
    tmp: &Path,
) -> Row {
    let src = tmp.join(format!("{name}-src"));
    std::fs::create_dir_all(&src).unwrap();
    make(&src);
    let c = store.conversation(&UserId::new("bench"), ConversationId::new_random()).unwrap();

    let t = Instant::now();
    c.push(Area::Workspace, &src).await.unwrap();
    let nestor_push = t.elapsed();
    let mut pulls = Vec::new();
    for i in 0..RUNS {
        let fresh = store.conversation(c.user(), c.conversation()).unwrap();
        let dst = tmp.join(format!("{name}-nestor-{i}/ws"));
        let t = Instant::now();
        fresh.pull(Area::Workspace, &dst).await.unwrap();
        pulls.push(t.elapsed());
    }

    let plain = format!("bench-plain/{name}-{:x}", rand_u64());
    let (aws_up, aws_down) = match cli {
        Some(cli) => {
            let url = format!("s3://{bucket}/{plain}-aws");
            let t = Instant::now();
            aws(cli, endpoint, &["s3", "sync", src.to_str().unwrap(), &url]);
            let up = t.elapsed();
            let mut downs = Vec::new();
            for i in 0..RUNS {
                let dst = tmp.join(format!("{name}-aws-{i}"));
                let t = Instant::now();
                aws(cli, endpoint, &["s3", "sync", &url, dst.to_str().unwrap()]);
                downs.push(t.elapsed());
                assert_eq!(files(&dst).len(), files(&src).len());
            }
            (Some(up), Some(median(downs)))
        }
        None => (None, None),
    };
    let t = Instant::now();
    naive_upload(raw, &src, &plain).await;
    let naive_up = t.elapsed();
    let mut downs = Vec::new();
    for i in 0..RUNS {
        let dst = tmp.join(format!("{name}-naive-{i}"));
        let t = Instant::now();
        naive_download(raw, &plain, &dst).await;
        downs.push(t.elapsed());
    }
    Row {
        what: name.into(),
        nestor_push,
        nestor_pull: median(pulls),
        aws_up,
        aws_down,
        naive_up,
        naive_down: median(downs),
    }
}

fn rand_u64() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture, in release"]
async fn workspace_persistence_figures() {
    let ep = s3_or_skip!();
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let b = bucket(&ep, "nestor-ws-bench");
    let cfg = config(&ep, &b, &common::unique_prefix("bench"));
    let tmp = tempfile::tempdir().unwrap();
    let store = WorkspaceStore::connect(&cfg, tmp.path().join("cache")).unwrap();
    let raw = cfg.build_object_store().unwrap();
    let cli = aws_cli();
    if cli.is_none() {
        eprintln!("aws CLI not available: only the naive baseline is measured");
    }

    let small = scenario(
        "1000-small-files",
        |d| {
            for i in 0..1000u64 {
                write(d, &format!("dir{:02}/file{i:04}.txt", i % 20), noise(i, 4096));
            }
        },
        &store,
        &raw,
        &ep,
        &b,
        cli.as_deref(),
        tmp.path(),
    )
    .await;
    let big = scenario(
        "one-100MiB-file",
        |d| {
            use std::io::Write;
            let mut f = std::fs::File::create(d.join("big.bin")).unwrap();
            for i in 0..100 {
                f.write_all(&noise(1000 + i, MIB)).unwrap();
            }
        },
        &store,
        &raw,
        &ep,
        &b,
        cli.as_deref(),
        tmp.path(),
    )
    .await;

    // The periodic push of an unchanged tree.
    let mut unchanged = Vec::new();
    for n in [1_000u64, 10_000] {
        let d = tmp.path().join(format!("unchanged-{n}"));
        for i in 0..n {
            write(&d, &format!("d{:03}/f{i}", i % 100), noise(i, 1024));
        }
        let c = store.conversation(&UserId::new("bench"), ConversationId::new_random()).unwrap();
        c.push(Area::Workspace, &d).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        c.push(Area::Workspace, &d).await.unwrap(); // re-reads the files written < 1 s before the first
        let before = store.io_stats();
        let mut times = Vec::new();
        for _ in 0..10 {
            let t = Instant::now();
            let r = c.push(Area::Workspace, &d).await.unwrap();
            times.push(t.elapsed());
            assert!(!r.committed && r.files_hashed == 0);
        }
        let io = store.io_stats().since(&before);
        unchanged.push((n, median(times), io.requests as f64 / 10.0, io.bytes_uploaded));
    }

    let tool = if cli.is_some() { "aws s3 sync (awscli 1.x)" } else { "aws CLI unavailable" };
    println!("\n| data | nestor push | nestor restore (pull) | {tool} up | {tool} down | naive sequential up | naive sequential down |");
    println!("|---|---|---|---|---|---|---|");
    for r in [&small, &big] {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.what,
            ms(r.nestor_push),
            ms(r.nestor_pull),
            r.aws_up.map(ms).unwrap_or("–".into()),
            r.aws_down.map(ms).unwrap_or("–".into()),
            ms(r.naive_up),
            ms(r.naive_down)
        );
    }
    println!("\n| unchanged tree | periodic push (median of 10) | requests per push | bytes uploaded |");
    println!("|---|---|---|---|");
    for (n, t, req, up) in unchanged {
        println!("| {n} files | {} | {req:.0} | {up} |", ms(t));
    }
    println!("\n(restore and download figures: median of {RUNS} runs into fresh directories)");
    println!(
        "load average before: {}, after: {}",
        load_before.trim(),
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
    );
}
