//! The fake's deferred-init (dormant) mode, as the real 1.58.2 server behaves (checked by
//! hand against `agent-server` started with `OH_DEFERRED_INIT=true`).

use nestor_test_support::{FakeAgentServer, FakeConfig};
use serde_json::{json, Value};

async fn dormant() -> FakeAgentServer {
    FakeAgentServer::start(FakeConfig {
        session_api_key: Some("boot-key".into()),
        deferred_init: true,
        secret_key: Some("init-key".into()),
        ..FakeConfig::default()
    })
    .await
    .unwrap()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

#[tokio::test]
async fn dormant_until_init_then_only_the_delivered_key_works() {
    let srv = dormant().await;
    let c = client();
    let url = srv.url();
    // Health answers; the API does not, whatever the key.
    assert_eq!(c.get(format!("{url}/alive")).send().await.unwrap().status(), 200);
    assert_eq!(c.get(format!("{url}/ready")).send().await.unwrap().status(), 200);
    let r = c.get(format!("{url}/api/conversations/search")).header("X-Session-API-Key", "boot-key").send().await.unwrap();
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert!(v["exception"].as_str().unwrap().contains("deferred-init state 'dormant'"), "{v}");
    let v: Value = c.get(format!("{url}/api/init")).send().await.unwrap().json().await.unwrap();
    assert_eq!(v, json!({"state": "dormant", "error": null}));
    // A socket upgrade is refused before the handshake.
    let ws = tokio_tungstenite::connect_async(format!(
        "{}/sockets/events/{}?session_api_key=boot-key",
        srv.ws_url(),
        uuid::Uuid::new_v4()
    ))
    .await;
    match ws {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 403),
        other => panic!("expected a 403 refusal, got {:?}", other.map(|_| ())),
    }

    // Init needs the init key.
    let body = json!({"session_api_keys": ["conv-key"], "secret_key": "conv-secret", "webhooks": [{"base_url": "http://x/nestor/webhooks"}]});
    let r = c.post(format!("{url}/api/init")).header("X-Init-API-Key", "boot-key").json(&body).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = c.post(format!("{url}/api/init")).header("X-Init-API-Key", "init-key").json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"state": "ready", "error": null}));
    assert!(!srv.is_dormant());
    assert_eq!(srv.init_request().unwrap()["webhooks"][0]["base_url"], "http://x/nestor/webhooks");

    // The delivered key replaced the boot key.
    let search = |k: &'static str| c.get(format!("{url}/api/conversations/search")).header("X-Session-API-Key", k).send();
    assert_eq!(search("conv-key").await.unwrap().status(), 200);
    assert_eq!(search("boot-key").await.unwrap().status(), 401);
    // Once only; and the init key is now the delivered secret key.
    let r = c.post(format!("{url}/api/init")).header("X-Init-API-Key", "init-key").json(&body).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = c.post(format!("{url}/api/init")).header("X-Init-API-Key", "conv-secret").json(&body).send().await.unwrap();
    assert_eq!(r.status(), 400);
    srv.stop().await;
}

#[tokio::test]
async fn init_is_404_on_a_normal_server_and_rejects_empty_keys() {
    let srv = FakeAgentServer::start(FakeConfig::with_key("k")).await.unwrap();
    let r = client().get(format!("{}/api/init", srv.url())).send().await.unwrap();
    assert_eq!(r.status(), 404);
    srv.stop().await;

    let srv = dormant().await;
    let r = client()
        .post(format!("{}/api/init", srv.url()))
        .header("X-Init-API-Key", "init-key")
        .json(&json!({"session_api_keys": [""]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    assert!(srv.is_dormant(), "a refused init leaves it dormant");
    srv.stop().await;
}
