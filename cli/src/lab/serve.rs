//! The built-in server of a lab pod: on each declared port it answers with the pod's name
//! (TCP: on connect, then echoes what it receives until the peer closes; UDP: to every
//! datagram), so a probe knows whom it reached and a held connection can be watched. The lab's
//! external hosts run it too, bound to each host's own addresses (they share one namespace).

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, UdpSocket},
    process::ExitCode,
    thread,
};

use anyhow::{Context, bail};
use clap::Args;

#[derive(Args)]
pub struct ServeArgs {
    /// The pod's network namespace.
    #[arg(long)]
    netns: String,
    /// `namespace/pod`, the answer.
    #[arg(long)]
    name: String,
    /// `PORT/PROTOCOL` (TCP, UDP or SCTP), repeated.
    #[arg(long = "port")]
    ports: Vec<String>,
    /// Listen on this address only (repeated); every address of the namespace when none.
    #[arg(long = "address")]
    addresses: Vec<IpAddr>,
}

/// Where to listen on `port`: the given addresses, else dual-stack `[::]` (which accepts IPv4
/// too unless the kernel says otherwise) and `0.0.0.0` as the fallback.
fn binds(addresses: &[IpAddr], port: u16) -> Vec<Vec<SocketAddr>> {
    if addresses.is_empty() {
        vec![vec![
            SocketAddr::from(([0u16; 8], port)),
            SocketAddr::from(([0u8; 4], port)),
        ]]
    } else {
        addresses
            .iter()
            .map(|a| vec![SocketAddr::new(*a, port)])
            .collect()
    }
}

pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    // Single-threaded here: every thread started below lives in the pod's namespace.
    bulkhead_agent::netns::enter(&bulkhead_agent::netns::netns_path(&args.netns), &args.netns)?;
    let mut handles = Vec::new();
    for spec in &args.ports {
        let (port, proto) = spec.split_once('/').unwrap_or((spec.as_str(), "TCP"));
        let port: u16 = port
            .parse()
            .with_context(|| format!("invalid port {spec:?}"))?;
        let answer = format!("{}\n", args.name);
        match proto.to_uppercase().as_str() {
            "TCP" => {
                for bind in binds(&args.addresses, port) {
                    let answer = answer.clone();
                    let listener = TcpListener::bind(&bind[..])
                        .with_context(|| format!("listen on TCP {port}"))?;
                    handles.push(thread::spawn(move || {
                        for mut conn in listener.incoming().flatten() {
                            let answer = answer.clone();
                            thread::spawn(move || {
                                if conn.write_all(answer.as_bytes()).is_err() {
                                    return;
                                }
                                let mut buf = [0u8; 4096];
                                while let Ok(n) = conn.read(&mut buf) {
                                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                            });
                        }
                    }));
                }
            }
            "UDP" => {
                for bind in binds(&args.addresses, port) {
                    let answer = answer.clone();
                    let sock = UdpSocket::bind(&bind[..])
                        .with_context(|| format!("listen on UDP {port}"))?;
                    handles.push(thread::spawn(move || {
                        let mut buf = [0u8; 1500];
                        while let Ok((_, from)) = sock.recv_from(&mut buf) {
                            let _ = sock.send_to(answer.as_bytes(), from);
                        }
                    }));
                }
            }
            "SCTP" => {
                eprintln!(
                    "{}: SCTP port {port} is not served: the lab's built-in server speaks TCP and UDP",
                    args.name
                );
            }
            other => bail!("unknown protocol {other:?} in {spec:?}"),
        }
    }
    eprintln!(
        "{}: serving {} in {}",
        args.name,
        args.ports.join(", "),
        args.netns
    );
    for h in handles {
        let _ = h.join();
    }
    Ok(ExitCode::SUCCESS)
}
