//! Settings and secrets live on nestor: a new conversation gets the user's defaults and
//! its secrets as lookups at nestor, authorised by a credential of that one conversation.

mod support;

use serde_json::{json, Value};
use support::*;

async fn put_secret(n: &TestNestor, name: &str, value: &str) -> reqwest::Response {
    n.client()
        .put(format!("{}/api/settings/secrets", n.url))
        .header("X-Session-API-Key", CLIENT_KEY)
        .json(&json!({"name": name, "value": value, "description": "d"}))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn secrets_reach_downstreams_only_as_lookups_at_nestor() {
    let a = fake(0).await;
    let n = nestor_existing(&[&a], "").await;
    assert_eq!(put_secret(&n, "GITHUB_TOKEN", "ghp-value-1234").await.status(), 200);

    // The client also passes a relative lookup, as the web frontend builds them.
    let mut body = create_body(None);
    body["secrets"] = json!({"MINE": {"kind": "LookupSecret", "url": "/api/settings/secrets/GITHUB_TOKEN", "headers": {"X-Session-API-Key": CLIENT_KEY}}});
    let r = n.post("/api/conversations").json(&body).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();

    let sent = a.create_bodies().pop().unwrap();
    let text = sent.to_string();
    assert!(!text.contains("ghp-value-1234"), "the value is never in the create body: {text}");
    assert!(!text.contains(CLIENT_KEY), "nor the client's key: {text}");
    let secrets = sent["secrets"].as_object().unwrap();
    for name in ["GITHUB_TOKEN", "MINE"] {
        let s = &secrets[name];
        assert_eq!(s["kind"], "LookupSecret", "{name}: {s}");
        let url = s["url"].as_str().unwrap();
        assert!(url.starts_with(&n.url.replace("127.0.0.1:0", "")) || url.contains("/nestor/secrets/"), "{url}");
        assert!(url.ends_with(&format!("/nestor/secrets/{id}/GITHUB_TOKEN")), "{url}");
    }
    let credential = secrets["GITHUB_TOKEN"]["headers"]["X-Session-API-Key"].as_str().unwrap().to_owned();

    // What the downstream does with the lookup: GET with the credential.
    let lookup = |key: String| {
        let c = n.client();
        let url = format!("{}/nestor/secrets/{id}/GITHUB_TOKEN", n.url);
        async move { c.get(url).header("X-Session-API-Key", key).send().await.unwrap() }
    };
    let r = lookup(credential.clone()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "ghp-value-1234");
    assert_eq!(lookup("wrong".into()).await.status(), 401);
    // The credential opens nothing else: not the conversation, not the settings.
    let r = n.client().get(format!("{}/api/conversations/{id}", n.url)).header("X-Session-API-Key", &credential).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = n.client().get(format!("{}/api/settings", n.url)).header("X-Session-API-Key", &credential).send().await.unwrap();
    assert_eq!(r.status(), 401);
    // The client's own key cannot use the lookup route.
    assert_eq!(lookup(CLIENT_KEY.into()).await.status(), 401);

    // Deleting the conversation revokes the credential.
    n.delete(&format!("/api/conversations/{id}")).send().await.unwrap();
    assert_eq!(lookup(credential).await.status(), 401);
    n.stop().await;
}

#[tokio::test]
async fn a_create_naming_no_agent_uses_the_stored_settings() {
    let a = fake(0).await;
    let n = nestor_existing(&[&a], "").await;
    let r = n
        .patch("/api/settings")
        .json(&json!({"agent_settings_diff": {"llm": {"model": "openai/stored-model", "base_url": "http://127.0.0.1:9/v1"}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let body = json!({"workspace": {"kind": "LocalWorkspace", "working_dir": "/tmp/w"}, "autotitle": false});
    let r = n.post("/api/conversations").json(&body).send().await.unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let sent = a.create_bodies().pop().unwrap();
    assert_eq!(sent["agent_settings"]["llm"]["model"], "openai/stored-model", "{sent}");
    n.stop().await;
}

#[tokio::test]
async fn secret_validation_matches_the_agent_server() {
    let a = fake(0).await;
    let n = nestor_existing(&[&a], "").await;
    for (name, value) in [("1BAD", "v"), ("has-dash", "v"), ("OK_NAME", ""), ("OK_NAME", "**********")] {
        let r = put_secret(&n, name, value).await;
        assert_eq!(r.status(), 422, "{name}={value:?}");
    }
    let r = n.get("/api/settings/secrets/NOPE").send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"detail": "Secret not found"}));
    // Settings are nestor's: the downstream never sees these requests.
    assert_eq!(a.request_count_for("/api/settings"), 0);
    n.stop().await;
}
