//! `POST /api/impact` against the demo shop's controller state (no agents) and the three flow
//! records the fixture holds in memory: frontend → backend:8080 admitted, debug → backend:8080
//! denied (both at the backend's ingress), frontend → 192.0.2.7:443 denied by `no-world`.

use super::tests::{VIEWER, bearer, request, serve, serve_with_auth, token_auth};
use std::time::Duration;

use crate::{impact::Impact, server::HttpConfig};

const YAML: (&str, &str) = ("Content-Type", "application/yaml");

/// `backend-api` admitting the frontend on 9090 instead of the `api` port (8080).
const CLOSE_8080: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: backend-api, namespace: shop}
spec:
  podSelector: {matchLabels: {app: backend}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: frontend}}}]
    ports: [{port: 9090}]
  egress:
  - to: [{podSelector: {matchLabels: {app: db}}}]
    ports: [{port: 5432, protocol: TCP}]
"#;

async fn post(addr: std::net::SocketAddr, path: &str, body: &str) -> (u16, String) {
    let (status, _, body) = request(addr, "POST", path, &[YAML], body).await;
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impact_lists_the_edges_a_proposal_changes() {
    let f = serve("127.0.0.1:9961", HttpConfig::default(), false).await;
    let (status, body) = post(f.addr, "/api/impact", CLOSE_8080).await;
    assert_eq!(status, 200, "{body}");
    let i: Impact = serde_json::from_str(&body).expect("an Impact");
    assert_eq!(i.proposal.changed, ["NetworkPolicy/shop/backend-api"]);
    assert!(!i.from_history);
    assert_eq!((i.records, i.edges, i.breaks), (3, 3, 1), "{i:#?}");
    let e = &i.changed[0];
    assert!(e.breaks, "{e:?}");
    assert_eq!(
        (e.src.as_str(), e.dst.as_str(), e.at.as_str(), e.port),
        ("10.203.0.10", "shop/backend", "shop/backend", 8080)
    );
    assert_eq!(e.before.rule, "NetworkPolicy shop/backend-api ingress[0]");

    // A deletion, named in the query, with an empty body: the world edge keeps its verdict
    // under another rule.
    let (status, body) = post(f.addr, "/api/impact?delete=ServicePolicy/shop/no-world", "").await;
    assert_eq!(status, 200, "{body}");
    let i: Impact = serde_json::from_str(&body).expect("an Impact");
    assert_eq!(i.proposal.deleted, ["ServicePolicy/shop/no-world"]);
    assert_eq!(i.breaks, 0);
    assert_eq!(i.changed.len(), 1, "{i:#?}");
    assert_eq!(i.changed[0].dst, "192.0.2.7");

    // The window: nothing recorded after now + 1 h.
    let later = (std::time::SystemTime::now() + std::time::Duration::from_secs(3600))
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_nanos();
    let (status, body) = post(f.addr, &format!("/api/impact?since={later}"), CLOSE_8080).await;
    assert_eq!(status, 200, "{body}");
    let i: Impact = serde_json::from_str(&body).expect("an Impact");
    assert_eq!((i.records, i.changed.len()), (0, 0));

    // The live state is untouched: the same question gives the same answer.
    let (_, again) = post(f.addr, "/api/impact", CLOSE_8080).await;
    let again: Impact = serde_json::from_str(&again).expect("an Impact");
    assert_eq!(again.breaks, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_proposal_is_a_400_that_says_what_is_wrong() {
    let f = serve("127.0.0.1:9961", HttpConfig::default(), false).await;
    for (path, body, status, says) in [
        ("/api/impact", "kind: [", 400, "not valid YAML"),
        (
            "/api/impact",
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x, namespace: shop}\nspec: {podSelector: {}, policyTypes: [Sideways]}\n",
            400,
            "document 1",
        ),
        ("/api/impact", "", 400, "empty"),
        (
            "/api/impact?delete=Pod/shop/db",
            "",
            400,
            "KIND/NAMESPACE/NAME",
        ),
        (
            "/api/impact?delete=NetworkPolicy/shop/nope",
            "",
            400,
            "no such policy",
        ),
        ("/api/impact?since=yesterday", CLOSE_8080, 400, "bad query"),
    ] {
        let (got, body) = post(f.addr, path, body).await;
        assert_eq!(got, status, "{path}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("an error body");
        let error = v["error"].as_str().expect("error text");
        assert!(error.contains(says), "{path}: {error}");
    }
    // Not YAML: refused before reading (a cross-site form cannot send application/yaml).
    for ct in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/json",
    ] {
        let (status, _, body) = request(
            f.addr,
            "POST",
            "/api/impact",
            &[("Content-Type", ct)],
            CLOSE_8080,
        )
        .await;
        assert_eq!(status, 415, "{ct}: {body}");
    }
    // Too large: refused. (One byte over the limit, so that the server has read all of it
    // when it answers: unread data would make it reset the connection, answer and all.)
    let big = "#".repeat(crate::impact::MAX_PROPOSAL_BYTES + 1);
    let stream = tokio::net::TcpStream::connect(f.addr)
        .await
        .expect("connect");
    let (mut rx, mut tx) = stream.into_split();
    let head = format!(
        "POST /api/impact HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Type: application/yaml\r\nContent-Length: {}\r\n\r\n",
        f.addr,
        big.len()
    );
    let writer = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let _ = tx.write_all(head.as_bytes()).await;
        let _ = tx.write_all(big.as_bytes()).await;
        tx
    });
    let mut answer = Vec::new();
    {
        use tokio::io::AsyncReadExt;
        let _ = tokio::time::timeout(Duration::from_secs(10), rx.read_to_end(&mut answer)).await;
    }
    let _ = writer.await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impact_needs_what_reading_needs() {
    let f = serve_with_auth("127.0.0.1:9961", HttpConfig::default(), false, token_auth).await;
    let (status, _) = post(f.addr, "/api/impact", CLOSE_8080).await;
    assert_eq!(status, 401);
    let v = bearer(VIEWER);
    let (status, _, body) = request(
        f.addr,
        "POST",
        "/api/impact",
        &[YAML, (v.0, &v.1)],
        CLOSE_8080,
    )
    .await;
    assert_eq!(status, 200, "a viewer may ask: {body}");
}
