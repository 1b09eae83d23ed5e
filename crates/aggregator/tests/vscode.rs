//! VS Code through nestor's one origin, against a stand-in VS Code server (HTTP pages and a
//! WebSocket, token checked like openvscode-server: `tkn` query or `vscode-tkn` cookie).

mod support;

use axum::extract::ws::{Message, WebSocketUpgrade};
use axum::extract::Query;
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::routing::get;
use futures::{SinkExt, StreamExt};
use nestor_test_support::fake_server::{FakeAgentServer, FakeConfig};
use serde_json::Value;
use std::collections::HashMap;
use support::*;

const VS_TOKEN: &str = "downstream-key-vscode-abcdefgh";

fn authorized(q: &HashMap<String, String>, h: &HeaderMap) -> bool {
    q.get("tkn").map(String::as_str) == Some(VS_TOKEN)
        || h.get("cookie").and_then(|c| c.to_str().ok()).is_some_and(|c| c.contains(&format!("vscode-tkn={VS_TOKEN}")))
}

/// The stand-in: `/` (needs the token), `/static/app.js`, `/ws` (echo, needs the token).
async fn stand_in() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let app = axum::Router::new()
        .route(
            "/",
            get(|Query(q): Query<HashMap<String, String>>, h: HeaderMap| async move {
                if !authorized(&q, &h) {
                    return (axum::http::StatusCode::FORBIDDEN, "forbidden").into_response();
                }
                let folder = q.get("folder").cloned().unwrap_or_default();
                ([("set-cookie", format!("vscode-tkn={VS_TOKEN}; Path=/"))], format!("<html>workbench folder={folder}</html>")).into_response()
            }),
        )
        .route("/static/app.js", get(|| async { "console.log('vscode')" }))
        // An upgrade refused with an answer that names the server itself.
        .route(
            "/ws-refused",
            get(move || async move {
                let own = format!("http://127.0.0.1:{port}/login");
                (axum::http::StatusCode::FORBIDDEN, [("x-login", own.clone())], format!("log in at {own}")).into_response()
            }),
        )
        .route(
            "/ws",
            get(|Query(q): Query<HashMap<String, String>>, h: HeaderMap, ws: WebSocketUpgrade| async move {
                if !authorized(&q, &h) {
                    return (axum::http::StatusCode::FORBIDDEN, "forbidden").into_response();
                }
                ws.on_upgrade(|mut s| async move {
                    while let Some(Ok(m)) = s.next().await {
                        if let Message::Text(t) = m {
                            if s.send(Message::Text(format!("echo:{t}").into())).await.is_err() {
                                break;
                            }
                        }
                    }
                })
            }),
        );
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    port
}

#[tokio::test]
async fn vscode_is_served_through_nestor_with_its_own_token() {
    let vs_port = stand_in().await;
    let cfg = FakeConfig {
        vscode_url: Some(format!("http://localhost:{vs_port}/?tkn={VS_TOKEN}&folder=/workspace/project")),
        ..FakeConfig::with_key("downstream-key-0-abcdefgh")
    };
    let a = FakeAgentServer::start(cfg).await.unwrap();
    let conv = a.create_conversation(None, create_body(None))["id"].as_str().unwrap().to_owned();
    let n = nestor_existing(&[&a], "").await;

    // The URL answered is nestor's, with a nestor token: no downstream port, no downstream key.
    let v: Value = n.get(&format!("/api/conversations/{conv}/vscode/url")).send().await.unwrap().json().await.unwrap();
    let url = v["url"].as_str().unwrap().to_owned();
    assert!(url.starts_with(&format!("{}/nestor/vscode/{conv}/?tkn=", n.url)), "{url}");
    assert!(url.contains("folder=%2Fworkspace%2Fproject"), "{url}");
    assert!(!url.contains(VS_TOKEN) && !url.contains(&vs_port.to_string()), "{url}");
    // The host-global route, addressed by header, gives the same kind of URL.
    let v: Value = n.get("/api/vscode/url").header("X-OpenHands-ServerConversation-ID", &conv).send().await.unwrap().json().await.unwrap();
    assert!(v["url"].as_str().unwrap().contains("/nestor/vscode/"));

    // A browser: first load with the token in the URL, then assets with the cookie only.
    let browser = reqwest::Client::builder().no_proxy().cookie_store(true).build().unwrap();
    let r = browser.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let set_cookies: Vec<String> = r.headers().get_all("set-cookie").iter().map(|v| v.to_str().unwrap().to_owned()).collect();
    assert!(set_cookies.iter().all(|c| !c.contains(VS_TOKEN)), "VS Code's real token never reaches the browser: {set_cookies:?}");
    assert!(r.text().await.unwrap().contains("workbench folder=/workspace/project"));
    let r = browser.get(format!("{}/nestor/vscode/{conv}/static/app.js", n.url)).send().await.unwrap();
    assert_eq!(r.status(), 200, "the cookie authenticates later requests");
    // Without token or cookie: refused.
    let r = n.client().get(format!("{}/nestor/vscode/{conv}/static/app.js", n.url)).send().await.unwrap();
    assert_eq!(r.status(), 401);

    // The WebSocket through nestor, authenticated by the nestor token.
    let token = url.split("tkn=").nth(1).unwrap().split('&').next().unwrap().to_owned();
    let ws_url = format!("{}/nestor/vscode/{conv}/ws?tkn={token}", n.url.replace("http://", "ws://"));
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url).await.expect("VS Code socket through nestor");
    ws.send(tokio_tungstenite::tungstenite::Message::Text("hello".into())).await.unwrap();
    let m = tokio::time::timeout(std::time::Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(m.to_text().unwrap(), "echo:hello");
    // A refused upgrade: its answer passes the leak guard like any other (VS Code's own
    // address never reaches the browser).
    let refused = format!("{}/nestor/vscode/{conv}/ws-refused?tkn={token}", n.url.replace("http://", "ws://"));
    match tokio_tungstenite::connect_async(refused).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 403);
            let body = String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).into_owned();
            let login = resp.headers().get("x-login").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
            assert!(body.contains("log in at http://") && !body.contains(&vs_port.to_string()), "{body}");
            assert!(!login.contains(&vs_port.to_string()), "{login}");
        }
        other => panic!("expected the refusal, got {other:?}"),
    }

    // The VS Code token opens nothing else.
    let r = n.client().get(format!("{}/api/conversations/{conv}", n.url)).header("X-Session-API-Key", &token).send().await.unwrap();
    assert_eq!(r.status(), 401);
    n.stop().await;
}
