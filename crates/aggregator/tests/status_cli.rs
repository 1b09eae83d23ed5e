//! `nestor status`: the operator's view of a running nestor (conversations with their
//! downstream, state and age), as a table and as JSON; a wrong key is a one-line error.

mod support;

use std::process::Command;

use serde_json::Value;
use support::*;

fn status(url: &str, key: &str, json: bool) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nestor"));
    cmd.args(["status", "--url", url, "--key", key]).env_remove("SESSION_API_KEY");
    if json {
        cmd.arg("--json");
    }
    cmd.output().expect("nestor status runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_lists_conversations_with_downstream_state_and_age() {
    let a = fake(0).await;
    let n = nestor_existing(&[&a], "").await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let v: Value = n.post("/api/conversations").json(&create_body(None)).send().await.unwrap().json().await.unwrap();
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    let url = n.url.clone();
    let (table, json, wrong) = tokio::task::spawn_blocking(move || (status(&url, CLIENT_KEY, false), status(&url, CLIENT_KEY, true), status(&url, "wrong", false)))
        .await
        .unwrap();
    assert!(table.status.success(), "{}", String::from_utf8_lossy(&table.stderr));
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("provisioner existing"), "{text}");
    assert!(text.lines().nth(1).is_some_and(|h| h.starts_with("CONVERSATION")), "{text}");
    for id in &ids {
        let line = text.lines().find(|l| l.contains(id.as_str())).unwrap_or_else(|| panic!("{id} missing:\n{text}"));
        assert!(line.contains("existing-"), "its downstream: {line}");
    }
    let v: Value = serde_json::from_slice(&json.stdout).expect("--json prints JSON");
    assert_eq!(v["conversations"].as_array().map(Vec::len), Some(2), "{v}");
    assert!(!String::from_utf8_lossy(&json.stdout).contains(&a.config().session_api_key.clone().unwrap()), "no downstream key in the status");
    assert_eq!(wrong.status.code(), Some(1));
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(err.starts_with("nestor: ") && err.contains("401"), "{err}");
    n.stop().await;
}
