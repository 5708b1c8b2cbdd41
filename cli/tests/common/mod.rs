//! Shared by the end-to-end tests of the `bulkhead` binary.
#![allow(dead_code)]

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::Command,
    time::Duration,
};

/// The `bulkhead` binary under test: this build's, or the one `BULKHEAD_TEST_BIN` names (to run
/// a scenario against another release, e.g. to show a fix by the same test failing before it).
pub fn bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("BULKHEAD_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_bulkhead").into())
    })
}

/// The body of a plain HTTP/1.0 GET to 127.0.0.1:`port`, `None` when nobody answers.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(500),
    )
    .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).ok()?;
    response.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

/// Takes the lab in this state directory down when dropped, also when the test fails.
pub struct LabDown(pub PathBuf);

impl Drop for LabDown {
    fn drop(&mut self) {
        let _ = Command::new(bin())
            .args(["lab", "--state"])
            .arg(&self.0)
            .arg("down")
            .output();
    }
}
