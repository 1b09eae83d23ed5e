//! A 50 MiB file in a conversation's workspace round-trips through nestor (periodic push while
//! the child runs, restore on a fresh host) with nestor's memory bounded by the store's
//! buffer budget. Alone in its binary so the process's peak RSS is nestor's (the fake
//! agent-server child is a process of its own).

#[path = "../../workspace-store/tests/common/mod.rs"]
mod common;
mod support;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::{bucket, noise, peak_rss, reset_peak_rss, rss, unique_prefix};
use serde_json::Value;
use support::*;

const MIB: u64 = 1024 * 1024;

fn digest(p: &std::path::Path) -> (u64, u64) {
    // A cheap streaming checksum (FNV-1a over 1 MiB reads) and the length.
    let mut f = std::fs::File::open(p).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let (mut h, mut len) = (0xcbf29ce484222325u64, 0u64);
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        len += n as u64;
        for b in &buf[..n] {
            h = (h ^ *b as u64).wrapping_mul(0x100000001b3);
        }
    }
    (h, len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50_mib_file_round_trips_through_nestor_with_bounded_memory() {
    let ep = s3_or_skip!();
    let b = bucket(&ep, "nestor-aggregator-large");
    let prefix = unique_prefix("agglarge");
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "bind = \"127.0.0.1:0\"\nsession_api_keys = [\"{CLIENT_KEY}\"]\nstate_dir = \"{}\"\nready_timeout_secs = 60.0\n\
         [workspace_storage]\nbucket = \"{b}\"\nprefix = \"{prefix}\"\nendpoint = \"{ep}\"\nregion = \"us-east-1\"\naccess_key_id = \"test\"\nsecret_access_key = \"test\"\n\
         push_interval_secs = 1\npart_size_bytes = 5242880\nparts_in_flight = 2\nbuffer_budget_bytes = 15728640\ndownload_chunk_bytes = 8388608\non_delete = \"purge\"\n\
         [provisioner]\nkind = \"process\"\n[provisioner.process]\nagent_server = \"{}\"\nstartup_timeout_secs = 20.0\nstop_timeout_secs = 3.0\n",
        dir.path().join("state").display(),
        fake_bin().display()
    );
    let n = start_with_toml(dir, &toml).await;
    let r = n.post("/api/conversations").json(&create_body(None)).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let hex = uuid::Uuid::parse_str(&id).unwrap().simple().to_string();
    let ws = n.dir.path().join("state/process").join(&hex).join("workspace");
    let storage = |n: &TestNestor| {
        let url = format!("{}/api/conversations/{id}/runtime", n.url);
        let c = n.client();
        async move {
            let v: Value = c.get(url).header("X-Session-API-Key", CLIENT_KEY).send().await.unwrap().json().await.unwrap();
            v["nestor"]["workspace_storage"].clone()
        }
    };
    // Warm up (connection pool, pusher) with a small file first.
    std::fs::write(ws.join("small.txt"), "x").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while storage(&n).await["workspace"]["stored_files"] != 1 {
        assert!(Instant::now() < deadline, "the small file was not pushed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let can_reset = reset_peak_rss();
    let base = rss();
    {
        // Written 1 MiB at a time under a temporary name, then renamed: the pusher never sees
        // it half-written (and the test itself never holds it in memory).
        let mut f = std::fs::File::create(ws.join(".big.tmp")).unwrap();
        for i in 0..50 {
            f.write_all(&noise(i, MIB as usize)).unwrap();
        }
        f.sync_all().unwrap();
        std::fs::rename(ws.join(".big.tmp"), ws.join("big.bin")).unwrap();
    }
    let want = digest(&ws.join("big.bin"));
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = storage(&n).await;
        if s["workspace"]["stored_bytes"].as_u64() == Some(50 * MIB + 1) && s["pending_bytes"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the 50 MiB file was not pushed: {s}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let push_peak = peak_rss().saturating_sub(base);

    // Stop, lose the local copy, resume: restored before the child starts.
    assert_eq!(n.delete(&format!("/api/conversations/{id}/runtime")).send().await.unwrap().status(), 204);
    std::fs::remove_dir_all(&ws).unwrap();
    reset_peak_rss();
    let base = rss();
    let started = Instant::now();
    let r = n.post(&format!("/api/conversations/{id}/runtime/reprovision")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let restore_time = started.elapsed();
    let pull_peak = peak_rss().saturating_sub(base);
    assert_eq!(digest(&ws.join("big.bin")), want);

    eprintln!(
        "50 MiB through nestor: peak RSS growth {:.1} MiB during the periodic push, {:.1} MiB during the restore (restore + child start {:.2} s){}",
        push_peak as f64 / MIB as f64,
        pull_peak as f64 / MIB as f64,
        restore_time.as_secs_f64(),
        if can_reset { "" } else { " (peak RSS not resettable here: figures are upper bounds)" }
    );
    if can_reset {
        // The store's buffer budget (15 MiB) plus the HTTP stack's copies; never the file.
        assert!(push_peak < 40 * MIB, "push grew nestor's RSS by {push_peak} bytes");
        assert!(pull_peak < 24 * MIB, "restore grew nestor's RSS by {pull_peak} bytes");
    }
    assert_eq!(n.delete(&format!("/api/conversations/{id}")).send().await.unwrap().status(), 200);
    n.stop().await;
}
