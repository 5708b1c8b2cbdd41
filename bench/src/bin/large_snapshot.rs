//! Issue 21, finding 3: a node's rule set larger than gRPC's default 4 MiB message limit, over a
//! real gRPC socket. Antrea's one-namespace scenario (100k pods on 1,000 nodes, one policy
//! selecting every pod and admitting ingress from every pod, so every node's rule set lists every
//! pod's address): one agent (the real follower) connects as one node; prints the snapshot's
//! size, the parts it travelled in, and the time from connecting to the ack. Also the size and
//! the encode/decode time of that snapshot and of one delta, as JSON (what travelled before
//! issue 16) and as protobuf (what travels now).
//!
//! `cargo run --release -p bulkhead-bench --bin large_snapshot [-- --pods 100000 --nodes 1000]`

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;
use bulkhead_bench::{labels, node_name, one_namespace, pod, pod_ip};
use bulkhead_controller::{
    Change, EngineConfig, Object, PolicyEngine,
    distribution::{DistributionService, FlowStore, Hub},
    ruleset::{NodeDelta, RuleSet},
};
use bulkhead_proto::{
    follower::{Follower, run_session},
    parts,
    prost::Message,
    v1::{self as pb, ControllerMessage, controller_message},
};
use clap::Parser;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 100_000)]
    pods: usize,
    #[arg(long, default_value_t = 1_000)]
    nodes: usize,
    /// Connections measured (each a fresh agent).
    #[arg(long, default_value_t = 5)]
    samples: usize,
}

/// Runs `f` and how long it took.
fn timed<T, E>(f: impl FnOnce() -> Result<T, E>) -> Result<(T, Duration), E> {
    let t = Instant::now();
    let out = f()?;
    Ok((out, t.elapsed()))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let started = Instant::now();
    let engine = PolicyEngine::new(
        EngineConfig::default(),
        one_namespace(a.pods, 1, a.nodes, 7),
    )
    .context("compile")?;
    let hub = Arc::new(Hub::new(engine));
    println!(
        "{} pods on {} nodes, one namespace-wide policy: compiled in {:.2} s",
        a.pods,
        a.nodes,
        started.elapsed().as_secs_f64()
    );
    let node = node_name(0);
    let want = hub.ruleset(&node).context("the node has no rule set")?;
    // The snapshot in both encodings: JSON (what travelled before) and protobuf (what travels).
    let (json, json_encode) = timed(|| serde_json::to_vec(&want))?;
    let (_, json_decode) = timed(|| serde_json::from_slice::<RuleSet>(&json))?;
    let (proto, proto_encode) =
        timed(|| Ok::<_, anyhow::Error>(pb::RuleSet::from(&want).encode_to_vec()))?;
    let (decoded, proto_decode) = timed(|| {
        let m = pb::RuleSet::decode(proto.as_slice())?;
        Ok::<_, anyhow::Error>(RuleSet::try_from(&m)?)
    })?;
    anyhow::ensure!(
        decoded == want,
        "the protobuf snapshot does not decode to the rule set"
    );
    // The message as the controller sends it, and the parts it travels in.
    let message = ControllerMessage {
        msg: Some(controller_message::Msg::Snapshot(pb::Snapshot {
            version: Some(pb::Version {
                epoch: hub.epoch(),
                version: want.version,
            }),
            ruleset: Some((&want).into()),
        })),
    };
    let encoded = message.encoded_len();
    let pieces = parts::split(message, parts::PART_BYTES).count();
    println!(
        "{node}: {} endpoints, {} ipcache entries; snapshot {encoded} bytes encoded ({:.2} MiB), sent as {pieces} part(s) of at most {} KiB",
        want.endpoints.len(),
        want.ipcache.len(),
        encoded as f64 / (1 << 20) as f64,
        parts::PART_BYTES / 1024
    );
    println!(
        "snapshot  JSON {:>10} bytes, encode {:>7.1} ms, decode {:>7.1} ms | protobuf {:>10} bytes, encode {:>7.1} ms, decode {:>7.1} ms | protobuf/JSON bytes {:.2}, encode {:.2}, decode {:.2}",
        json.len(),
        ms(json_encode),
        ms(json_decode),
        proto.len(),
        ms(proto_encode),
        ms(proto_decode),
        proto.len() as f64 / json.len() as f64,
        proto_encode.as_secs_f64() / json_encode.as_secs_f64(),
        proto_decode.as_secs_f64() / json_decode.as_secs_f64(),
    );
    // A delta: one more pod on this node (its endpoint, and its address on every node).
    let new_pod = Object::Pod(pod(
        "scale",
        "pod-new",
        labels(&[("app", "scale")]),
        node.clone(),
        pod_ip(a.pods + 1),
    ));
    let deltas = hub.apply(vec![Change::from(new_pod)], false)?;
    let delta = deltas
        .iter()
        .find(|d| d.node == node)
        .context("no delta for the node")?;
    let (djson, dj_encode) = timed(|| serde_json::to_vec(delta))?;
    let (_, dj_decode) = timed(|| serde_json::from_slice::<NodeDelta>(&djson))?;
    let (dproto, dp_encode) =
        timed(|| Ok::<_, anyhow::Error>(pb::NodeDelta::from(delta).encode_to_vec()))?;
    let (ddecoded, dp_decode) = timed(|| {
        let m = pb::NodeDelta::decode(dproto.as_slice())?;
        Ok::<_, anyhow::Error>(NodeDelta::try_from(&m)?)
    })?;
    anyhow::ensure!(
        &ddecoded == delta,
        "the protobuf delta does not decode to the delta"
    );
    println!(
        "delta     JSON {:>10} bytes, encode {:>7.3} ms, decode {:>7.3} ms | protobuf {:>10} bytes, encode {:>7.3} ms, decode {:>7.3} ms ({} deltas, one per node)",
        djson.len(),
        ms(dj_encode),
        ms(dj_decode),
        dproto.len(),
        ms(dp_encode),
        ms(dp_decode),
        deltas.len(),
    );
    let want = hub.ruleset(&node).context("the node has no rule set")?;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let service = DistributionService::new(hub.clone(), Arc::new(Mutex::new(FlowStore::new(16))));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service.into_server())
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?;
    let mut times = Vec::new();
    for sample in 0..a.samples {
        let channel = endpoint.connect().await?;
        let mut follower = Follower::new(&node);
        let t0 = Instant::now();
        let got: Arc<Mutex<Option<(u64, Duration)>>> = Arc::default();
        let g = got.clone();
        let session = tokio::spawn(async move {
            run_session(
                channel,
                &mut follower,
                move |rs| {
                    let g = g.clone();
                    async move {
                        if let Ok(mut g) = g.lock() {
                            *g = Some((rs.version, t0.elapsed()));
                        }
                        Ok(Default::default())
                    }
                },
                || {},
            )
            .await
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let acked = hub
                .node_states()
                .into_iter()
                .any(|n| n.node == node && n.realized == want.version);
            let decoded = got.lock().ok().and_then(|g| *g);
            // The node's realized version outlives a stream: only the first sample's ack is new.
            if (acked || sample > 0)
                && let Some((v, at)) = decoded
            {
                anyhow::ensure!(v == want.version, "realized version {v}");
                times.push((at, t0.elapsed()));
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the snapshot was not realized within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        session.abort();
        // The next sample's ack must be its own: wait until this stream has left.
        while hub
            .node_states()
            .iter()
            .any(|n| n.node == node && n.connected)
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    for (i, (decoded, acked)) in times.iter().enumerate() {
        print!(
            "sample {i}: connect → rule set received and decoded {:.1} ms",
            decoded.as_secs_f64() * 1e3
        );
        if i == 0 {
            print!(
                ", → ack recorded by the controller {:.1} ms",
                acked.as_secs_f64() * 1e3
            );
        }
        println!();
    }
    Ok(())
}
