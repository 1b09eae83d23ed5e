//! `FakeConfig::persist_dir`: a new fake process on the same directory has the same
//! conversations and logs (what the process provisioner's chaos tests rely on when they
//! kill a child and nestor starts it again).

use std::time::Duration;

use nestor_test_support::{FakeAgentServer, FakeConfig};
use serde_json::json;

fn cfg(dir: &std::path::Path) -> FakeConfig {
    FakeConfig { persist_dir: Some(dir.to_path_buf()), step_delay: Duration::from_millis(50), ..FakeConfig::with_key("k") }
}

#[tokio::test]
async fn a_new_server_on_the_same_directory_has_the_same_conversations() {
    let path = std::env::temp_dir().join(format!("nestor-fake-persist-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&path).unwrap();
    struct Rm(std::path::PathBuf);
    impl Drop for Rm {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let dir = Rm(path);
    let dir = &dir;
    let a = FakeAgentServer::start(cfg(dir.0.as_path())).await.unwrap();
    let info = a.create_conversation(None, json!({"workspace": {"working_dir": "/w"}, "tags": {"t": "1"}}));
    let id: uuid::Uuid = info["id"].as_str().unwrap().parse().unwrap();
    a.send_user_message(id, "hello", true);
    for _ in 0..100 {
        if a.execution_status(id).as_deref() == Some("finished") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(a.execution_status(id).as_deref(), Some("finished"));
    let other = a.create_conversation(None, json!({"workspace": {"working_dir": "/w"}}));
    let other: uuid::Uuid = other["id"].as_str().unwrap().parse().unwrap();
    a.send_user_message(other, "killed mid-run", true);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let log = a.events(id);
    a.stop().await;

    let b = FakeAgentServer::start(cfg(dir.0.as_path())).await.unwrap();
    assert_eq!(b.events(id), log, "same log, same ids and timestamps");
    assert_eq!(b.execution_status(id).as_deref(), Some("finished"));
    assert_eq!(b.conversation(id).unwrap()["tags"], json!({"t": "1"}));
    assert_eq!(b.execution_status(other).as_deref(), Some("error"), "a run cut by the kill is an error, like the real server");
    // Still persisting: a third start sees what the second appended.
    b.send_user_message(id, "again", false);
    let log = b.events(id);
    b.stop().await;
    let c = FakeAgentServer::start(cfg(dir.0.as_path())).await.unwrap();
    assert_eq!(c.events(id), log);
    c.stop().await;
}
