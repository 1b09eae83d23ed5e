//! A 50 MiB file round-trips with bounded memory. Alone in its binary so the process's peak
//! RSS is this test's.

mod common;

use std::io::{Read, Write};

use common::{bucket, config, noise, peak_rss, reset_peak_rss, rss};
use nestor_core::{ConversationId, UserId};
use nestor_workspace_store::{Area, WorkspaceStore};

const MIB: u64 = 1024 * 1024;

fn hash_file(p: &std::path::Path) -> String {
    let mut f = std::fs::File::open(p).unwrap();
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().to_hex().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50_mib_file_round_trips_with_bounded_memory() {
    let ep = s3_or_skip!();
    let b = bucket(&ep, "nestor-ws-large");
    let mut cfg = config(&ep, &b, &common::unique_prefix("large"));
    cfg.part_size_bytes = 5 * MIB;
    cfg.parts_in_flight = 2;
    cfg.buffer_budget_bytes = 15 * MIB;
    cfg.download_chunk_bytes = 8 * MIB;
    let tmp = tempfile::tempdir().unwrap();
    let store = WorkspaceStore::connect(&cfg, tmp.path().join("cache")).unwrap();
    let c = store.conversation(&UserId::new("alice"), ConversationId::new_random()).unwrap();
    let ws = tmp.path().join("ws");
    std::fs::create_dir_all(&ws).unwrap();
    {
        // Written 1 MiB at a time: the test itself never holds the file in memory.
        let mut f = std::fs::File::create(ws.join("big.bin")).unwrap();
        for i in 0..50 {
            f.write_all(&noise(i, MIB as usize)).unwrap();
        }
    }
    let want = hash_file(&ws.join("big.bin"));

    // Warm up the client (TLS-free here, but connection pool, runtime) on a small push.
    std::fs::write(ws.join("small.txt"), "x").unwrap();
    let warm = tmp.path().join("warm");
    std::fs::create_dir_all(&warm).unwrap();
    std::fs::write(warm.join("w"), "w").unwrap();
    store.conversation(&UserId::new("warm"), ConversationId::new_random()).unwrap().push(Area::Workspace, &warm).await.unwrap();

    let can_reset = reset_peak_rss();
    let base = rss();
    let before = store.io_stats();
    let rep = c.push(Area::Workspace, &ws).await.unwrap();
    let push_peak = peak_rss().saturating_sub(base);
    let io = store.io_stats().since(&before);
    assert_eq!(rep.bytes_uploaded, 50 * MIB + 1);
    // create + 10 parts + complete, the small file, the manifest.
    assert_eq!(io.puts, 14, "{io:?}");
    assert!(io.peak_buffered_bytes <= 15 * MIB, "buffered {} bytes", io.peak_buffered_bytes);

    reset_peak_rss();
    let base = rss();
    let dst = tmp.path().join("restored");
    let pulled = c.pull(Area::Workspace, &dst).await.unwrap();
    let pull_peak = peak_rss().saturating_sub(base);
    assert_eq!(pulled.bytes_downloaded, 50 * MIB + 1);
    assert_eq!(hash_file(&dst.join("big.bin")), want);

    eprintln!(
        "50 MiB round trip: upload buffers peaked at {:.1} MiB; peak RSS growth {:.1} MiB during push, {:.1} MiB during pull{}",
        io.peak_buffered_bytes as f64 / MIB as f64,
        push_peak as f64 / MIB as f64,
        pull_peak as f64 / MIB as f64,
        if can_reset { "" } else { " (peak RSS not resettable here: figures are upper bounds)" }
    );
    if can_reset {
        // part_size × (parts_in_flight + 1) = 15 MiB of content, plus the HTTP stack's copies.
        assert!(push_peak < 32 * MIB, "push grew RSS by {push_peak} bytes");
        assert!(pull_peak < 16 * MIB, "pull grew RSS by {pull_peak} bytes");
    }
}
