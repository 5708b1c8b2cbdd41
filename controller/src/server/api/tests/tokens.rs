//! `--http-auth tokens`: who may read and act through the API.

use super::*;

/// Finding 4: with `--http-auth tokens` every `/api/*` route needs a valid token (401 with
/// `WWW-Authenticate: Bearer` otherwise), a viewer reads but cannot quarantine (403), and an
/// admin can, even on a listener that is not loopback; the page needs no token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_guard_every_api_route_and_writes_need_an_admin() {
    let f = serve_with_auth("0.0.0.0:9961", HttpConfig::default(), true, token_auth).await;
    let host = ("Host", "127.0.0.1:9961".to_string());
    for path in ["/api/map", "/api/flows/query", "/api/quarantines"] {
        let (status, _, body) = request(f.addr, "GET", path, &[], "").await;
        assert_eq!(status, 401, "{path} without a token: {body}");
        let wrong = bearer("not-a-token-at-all-0000");
        let (status, _, _) = request(f.addr, "GET", path, &[(wrong.0, &wrong.1)], "").await;
        assert_eq!(status, 401, "{path} with an unknown token");
        let v = bearer(VIEWER);
        let (status, _, body) = request(f.addr, "GET", path, &[(v.0, &v.1)], "").await;
        assert_eq!(status, 200, "{path} as a viewer: {body}");
    }
    // The 401 says how to authenticate.
    let mut s = tokio::net::TcpStream::connect(f.addr)
        .await
        .expect("connect");
    s.write_all(b"GET /api/map HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .expect("send");
    let mut head = String::new();
    s.read_to_string(&mut head).await.expect("read");
    assert!(
        head.to_ascii_lowercase()
            .contains("www-authenticate: bearer realm=\"bulkhead\""),
        "{head}"
    );
    // The page holds no data and loads without a token.
    let (status, ct, _) = request(f.addr, "GET", "/", &[], "").await;
    assert_eq!((status, ct.starts_with("text/html")), (200, true));
    // The map names who asked.
    let v = bearer(VIEWER);
    let (status, _, body) = request(f.addr, "GET", "/api/map", &[(v.0, &v.1)], "").await;
    let map: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!((status, map["user"].as_str()), (200, Some("vera")));
    assert!(
        map["workloads"].is_array() || map["nodes"].is_array(),
        "{body}"
    );
    assert_eq!(map["actions"]["enabled"], json!(true), "{body}");
    // A viewer cannot quarantine; an admin can, on this non-loopback listener.
    let body = r#"{"pod": "tools/debug", "reason": "test"}"#;
    let (status, _, answer) = request(
        f.addr,
        "POST",
        "/api/quarantine",
        &[JSON, ACTION, (v.0, &v.1), (host.0, &host.1)],
        body,
    )
    .await;
    assert_eq!(status, 403, "{answer}");
    assert!(answer.contains("admin token"), "{answer}");
    let a = bearer(ADMIN);
    let (status, _, answer) = request(
        f.addr,
        "POST",
        "/api/quarantine",
        &[JSON, ACTION, (a.0, &a.1), (host.0, &host.1)],
        body,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let answer: Value = serde_json::from_str(&answer).expect("JSON");
    let actor = answer["quarantine"]["actor"].as_str().unwrap_or_default();
    assert!(actor.starts_with("adam via web UI"), "{answer}");
    // A viewer cannot release either.
    let release = r#"{"pod": "tools/debug"}"#;
    let (status, _, _) = request(
        f.addr,
        "POST",
        "/api/quarantine/release",
        &[JSON, ACTION, (v.0, &v.1), (host.0, &host.1)],
        release,
    )
    .await;
    assert_eq!(status, 403);
    let (status, _, answer) = request(
        f.addr,
        "POST",
        "/api/quarantine/release",
        &[JSON, ACTION, (a.0, &a.1), (host.0, &host.1)],
        release,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
}

/// The tokens file is re-read when it changes (a revoked token stops working at once); a
/// malformed file keeps the last good tokens; short tokens and unknown roles are refused when
/// the file is first read.
#[tokio::test]
async fn the_tokens_file_is_reread_and_validated() {
    let f = serve_with_auth("127.0.0.1:9961", HttpConfig::default(), false, token_auth).await;
    let v = bearer(VIEWER);
    let get = |h: (&'static str, String)| async move {
        request(f.addr, "GET", "/api/quarantines", &[(h.0, &h.1)], "")
            .await
            .0
    };
    assert_ne!(get(v.clone()).await, 401);
    // Revoke the viewer (the new file's time must differ from the old one's).
    std::thread::sleep(Duration::from_millis(20));
    let path = f.dir.join("tokens");
    std::fs::write(&path, format!("admin adam {ADMIN}\n")).expect("write");
    let later = SystemTime::now() + Duration::from_secs(5);
    std::fs::File::options()
        .write(true)
        .open(&path)
        .and_then(|f| f.set_modified(later))
        .expect("touch");
    assert_eq!(get(v.clone()).await, 401, "a revoked token still works");
    // A broken file keeps the last good tokens.
    std::fs::write(&path, "admin adam short\n").expect("write");
    std::fs::File::options()
        .write(true)
        .open(&path)
        .and_then(|f| f.set_modified(later + Duration::from_secs(5)))
        .expect("touch");
    assert_ne!(
        get(bearer(ADMIN)).await,
        401,
        "a broken file dropped the good tokens"
    );
    for (text, want) in [
        ("admin adam short\n", "at least 16"),
        (
            "root adam 0123456789abcdef0123\n",
            "neither viewer nor admin",
        ),
        ("admin 0123456789abcdef0123\n", "ROLE NAME TOKEN"),
        ("# nothing\n", "lists no token"),
    ] {
        let bad = f.dir.join("bad-tokens");
        std::fs::write(&bad, text).expect("write");
        let e = auth::TokenFile::open(&bad).err().expect("refused");
        assert!(format!("{e:#}").contains(want), "{text:?}: {e:#}");
    }
}
