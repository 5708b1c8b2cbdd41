//! The HTTP/1 server under the agent's and the controller's HTTP endpoints, with the limits
//! `axum::serve` does not set: a client must send its request headers within
//! [`Limits::header_read_timeout`] (a half-sent request, or an idle keep-alive connection, is
//! closed), and at most [`Limits::max_connections`] connections are open at once (more are
//! closed on accept and counted). Issue 21, finding 9.

use std::{sync::Arc, time::Duration};

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore};

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            max_connections: 256,
        }
    }
}

/// Serves `app` on `listener` until the listener fails; `refused` counts connections closed
/// because the cap was reached.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: Limits,
    refused: prometheus::IntCounter,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            // Out of file descriptors and the like: wait instead of spinning.
            Err(e) if is_transient(&e) => {
                tracing::warn!(error = %e, "accept failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            refused.inc();
            tracing::debug!(%peer, "connection limit reached; closing");
            drop(stream);
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout);
            if let Err(e) = http.serve_connection(TokioIo::new(stream), service).await {
                tracing::debug!(%peer, error = %e, "http connection ended");
            }
        });
    }
}

fn is_transient(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::Interrupted
    ) || e.raw_os_error().is_some_and(|c| {
        c == nix::errno::Errno::EMFILE as i32 || c == nix::errno::Errno::ENFILE as i32
    })
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        net::TcpStream,
        time::Instant,
    };

    use super::*;

    async fn start(limits: Limits) -> (std::net::SocketAddr, prometheus::IntCounter) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = axum::Router::new().route("/healthz", axum::routing::get(|| async { "ok" }));
        let refused = prometheus::IntCounter::new("refused", "refused").expect("counter");
        tokio::spawn(serve(listener, app, limits, refused.clone()));
        (addr, refused)
    }

    fn get(addr: std::net::SocketAddr) -> std::io::Result<String> {
        let mut s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    }

    /// Whether the server closed `s` (end of stream or reset) within `within`.
    fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
        s.set_read_timeout(Some(within)).expect("timeout");
        let mut buf = [0u8; 256];
        match s.read(&mut buf) {
            Ok(0) => true,
            Ok(_) => closed_within(s, within),
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_half_sent_request_is_closed_after_the_header_timeout() {
        let (addr, _) = start(Limits {
            header_read_timeout: Duration::from_millis(300),
            max_connections: 8,
        })
        .await;
        let closed = tokio::task::spawn_blocking(move || {
            let mut s = TcpStream::connect(addr).expect("connect");
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                .expect("half a request");
            let t = Instant::now();
            (closed_within(&mut s, Duration::from_secs(5)), t.elapsed())
        })
        .await
        .expect("join");
        assert!(closed.0, "the half-sent request must be closed");
        assert!(closed.1 < Duration::from_secs(5), "{:?}", closed.1);
        let ok = tokio::task::spawn_blocking(move || get(addr))
            .await
            .expect("join")
            .expect("a whole request is served");
        assert!(ok.ends_with("ok"), "{ok}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_over_the_cap_are_closed_and_counted() {
        let (addr, refused) = start(Limits {
            header_read_timeout: Duration::from_secs(30),
            max_connections: 4,
        })
        .await;
        let refused_now = refused.clone();
        let (held, over_closed) = tokio::task::spawn_blocking(move || {
            let held: Vec<TcpStream> = (0..4)
                .map(|_| TcpStream::connect(addr).expect("connect"))
                .collect();
            // Let the server accept the four first.
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut over = TcpStream::connect(addr).expect("connect");
            while refused_now.get() == 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            (held, closed_within(&mut over, Duration::from_secs(5)))
        })
        .await
        .expect("join");
        assert!(over_closed, "the fifth connection is closed");
        assert_eq!(refused.get(), 1);
        drop(held);
        // Once they are gone, requests are served again.
        let ok = tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match get(addr) {
                    Ok(r) if r.ends_with("ok") => return r,
                    _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                    other => panic!("not served after the held connections left: {other:?}"),
                }
            }
        })
        .await
        .expect("join");
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    }
}
