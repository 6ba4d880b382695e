use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::io::Protocol;

fn request(node: Option<&str>) -> OpenRequest {
    OpenRequest {
        stream: 0,
        namespace: "default".into(),
        service: "hello".into(),
        endpoint: SocketAddr::from(([10, 244, 2, 10], 8080)),
        node: node.map(str::to_string),
        protocol: Protocol::Opaque,
        source: String::new(),
        window: 0,
    }
}

/// Carries what `from` writes into `to`, like a websocket would; open requests that arrive at
/// `to` come out of the returned receiver.
fn pump(mut from: mpsc::UnboundedReceiver<Outgoing>, to: Mux) -> mpsc::UnboundedReceiver<Incoming> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(out) = from.recv().await {
            let (message, _budget) = out.into_parts();
            match message {
                WsMessage::Binary(raw) => to.on_binary(raw).expect("frame"),
                WsMessage::Text(text) => {
                    let msg = Message::from_json(text.as_str()).expect("json");
                    if let Some(incoming) = to.on_message(&msg).expect("stream message") {
                        let _ = tx.send(incoming);
                    }
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        to.close("link lost");
    });
    rx
}

fn cfg(window: u32) -> MuxConfig {
    MuxConfig {
        window,
        max_streams: 8,
        open_timeout: Duration::from_secs(2),
        link_budget: 64 * 1024,
    }
}

/// An edge and a cloud multiplexer joined by an in-memory link.
fn link(
    window: u32,
) -> (
    Mux,
    Mux,
    mpsc::UnboundedReceiver<Incoming>,
    mpsc::UnboundedReceiver<Incoming>,
) {
    let (edge, edge_out) = Mux::new(cfg(window), Side::Edge);
    let (cloud, cloud_out) = Mux::new(cfg(window), Side::Cloud);
    let at_cloud = pump(edge_out, cloud.clone());
    let at_edge = pump(cloud_out, edge.clone());
    (edge, cloud, at_edge, at_cloud)
}

#[tokio::test]
async fn data_flows_both_ways_with_half_close() {
    let (edge, cloud, _at_edge, mut at_cloud) = link(64 * 1024);
    let server = tokio::spawn(async move {
        let incoming = at_cloud.recv().await.expect("open");
        assert_eq!(incoming.request.service, "hello");
        assert_eq!(incoming.request.stream % 2, 0, "edge ids are even");
        let mut s = cloud.accept(incoming).expect("accept");
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.expect("read");
        // Half-closed by the client: this side can still answer.
        s.write_all(&got).await.expect("echo");
        s.shutdown().await.expect("fin");
        got.len()
    });
    let mut s = edge.open(request(None)).await.expect("open");
    let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = tokio::io::split(&mut s);
    let writer = async {
        w.write_all(&payload).await.expect("write");
        w.shutdown().await.expect("shutdown");
    };
    let mut back = Vec::new();
    let reader = r.read_to_end(&mut back);
    let (_, n) = tokio::join!(writer, reader);
    n.expect("read back");
    assert_eq!(back, payload);
    assert_eq!(server.await.expect("server"), payload.len());
    drop(s);
    tokio::task::yield_now().await;
    assert_eq!(edge.open_streams(), 0);
}

#[tokio::test]
async fn a_stalled_reader_stops_only_its_own_stream() {
    let window = 16 * 1024;
    let (edge, cloud, _at_edge, mut at_cloud) = link(window);
    let accepted = tokio::spawn(async move {
        let mut streams = Vec::new();
        for _ in 0..2 {
            let incoming = at_cloud.recv().await.expect("open");
            streams.push(cloud.accept(incoming).expect("accept"));
        }
        streams
    });
    let mut stalled = edge.open(request(None)).await.expect("open");
    let mut busy = edge.open(request(None)).await.expect("open");
    let mut streams = accepted.await.expect("accept");
    let mut busy_far = streams.pop().expect("busy");
    let _stalled_far = streams.pop().expect("stalled");
    // The stalled stream's writer gets exactly one window through, then waits.
    let chunk = vec![7u8; 4096];
    let mut written = 0;
    while tokio::time::timeout(Duration::from_millis(50), stalled.write_all(&chunk))
        .await
        .is_ok()
    {
        written += chunk.len();
        assert!(
            written <= window as usize,
            "wrote {written} past the window"
        );
    }
    assert_eq!(written, window as usize);
    // Meanwhile the other stream moves far more than a window.
    let send = tokio::spawn(async move {
        for _ in 0..64 {
            busy.write_all(&[1u8; 8192]).await.expect("busy write");
        }
        busy.shutdown().await.expect("fin");
        busy
    });
    let mut got = Vec::new();
    busy_far.read_to_end(&mut got).await.expect("busy read");
    assert_eq!(got.len(), 64 * 8192);
    send.await.expect("sender");
}

#[tokio::test]
async fn refusals_and_lost_links_reach_the_opener() {
    let (edge, cloud, _at_edge, mut at_cloud) = link(64 * 1024);
    let c = cloud.clone();
    tokio::spawn(async move {
        let incoming = at_cloud.recv().await.expect("open");
        c.refuse(incoming, RefusalKind::Forbidden, "no such endpoint");
        let incoming = at_cloud.recv().await.expect("open");
        let s = c.accept(incoming).expect("accept");
        // Hold it until the link is cut.
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(s);
    });
    match edge.open(request(None)).await {
        Err(OpenError::Refused {
            kind: RefusalKind::Forbidden,
            message,
        }) => {
            assert_eq!(message, "no such endpoint")
        }
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
    let mut s = edge.open(request(None)).await.expect("open");
    edge.close("hub connection lost");
    let mut buf = [0u8; 8];
    let err = s.read(&mut buf).await.expect_err("reset");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    assert!(err.to_string().contains("hub connection lost"), "{err}");
    assert!(matches!(
        edge.open(request(None)).await,
        Err(OpenError::LinkDown)
    ));
}

#[tokio::test]
async fn the_cloud_relays_between_two_nodes() {
    let (a, cloud_a, _at_a, mut at_cloud_a) = link(32 * 1024);
    let (b, cloud_b, mut at_b, _at_cloud_b) = link(32 * 1024);
    // The cloud relays every open from A to B.
    tokio::spawn(async move {
        while let Some(incoming) = at_cloud_a.recv().await {
            let mut forward = incoming.request.clone();
            forward.source = "node-a".into();
            let (ca, cb) = (cloud_a.clone(), cloud_b.clone());
            tokio::spawn(async move {
                let _ = ca.relay(incoming, &cb, forward).await;
            });
        }
    });
    // Node B echoes, upper-cased, and checks who it is talking to.
    tokio::spawn(async move {
        while let Some(incoming) = at_b.recv().await {
            assert_eq!(incoming.request.source, "node-a");
            assert_eq!(incoming.request.stream % 2, 1, "cloud ids are odd");
            let mut s = b.accept(incoming).expect("accept");
            tokio::spawn(async move {
                // Server speaks first: the relay must carry data sent right after the answer.
                s.write_all(b"hello from b\n").await.expect("greet");
                let mut got = Vec::new();
                s.read_to_end(&mut got).await.expect("read");
                s.write_all(&got.to_ascii_uppercase()).await.expect("echo");
                s.shutdown().await.expect("fin");
            });
        }
    });
    let mut tasks = Vec::new();
    for i in 0..6u8 {
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = a.open(request(Some("node-b"))).await.expect("open");
            let body: Vec<u8> = std::iter::repeat_n(b'a' + i, 200_000).collect();
            let (mut r, mut w) = tokio::io::split(&mut s);
            let writer = async {
                w.write_all(&body).await.expect("write");
                w.shutdown().await.expect("fin");
            };
            let mut back = Vec::new();
            let (_, res) = tokio::join!(writer, r.read_to_end(&mut back));
            res.expect("read");
            let mut want = b"hello from b\n".to_vec();
            want.extend(body.to_ascii_uppercase());
            assert!(back == want, "stream {i}: {} bytes back", back.len());
        }));
    }
    for t in tasks {
        t.await.expect("stream");
    }
}

#[tokio::test]
async fn a_relayed_stream_is_reset_when_the_target_link_drops() {
    let (a, cloud_a, _at_a, mut at_cloud_a) = link(32 * 1024);
    let (b, cloud_b, mut at_b, _at_cloud_b) = link(32 * 1024);
    let cb = cloud_b.clone();
    tokio::spawn(async move {
        let incoming = at_cloud_a.recv().await.expect("open");
        let forward = incoming.request.clone();
        let _ = cloud_a.relay(incoming, &cb, forward).await;
    });
    let held = tokio::spawn(async move {
        let incoming = at_b.recv().await.expect("open");
        b.accept(incoming).expect("accept")
    });
    let mut s = a.open(request(Some("node-b"))).await.expect("open");
    let _far = held.await.expect("accepted");
    cloud_b.close("node-b went offline");
    let mut buf = [0u8; 4];
    let err = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
        .await
        .expect("prompt")
        .expect_err("reset");
    assert!(err.to_string().contains("node-b went offline"), "{err}");
}

#[tokio::test]
async fn bad_frames_reset_the_stream_or_fail_the_link() {
    let (edge, cloud, _at_edge, mut at_cloud) = link(1024);
    let c = cloud.clone();
    let far = tokio::spawn(async move {
        let incoming = at_cloud.recv().await.expect("open");
        c.accept(incoming).expect("accept")
    });
    let mut s = edge.open(request(None)).await.expect("open");
    let _far = far.await.expect("far");
    let id = s.id();
    // More than the window at once: the peer broke flow control.
    edge.on_binary(Frame::encode_data(id, &[0u8; 600]))
        .expect("ok");
    edge.on_binary(Frame::encode_data(id, &[0u8; 600]))
        .expect("ok");
    let mut buf = vec![0u8; 2048];
    let mut total = 0;
    let err = loop {
        match s.read(&mut buf).await {
            Ok(0) => panic!("clean end"),
            Ok(n) => total += n,
            Err(e) => break e,
        }
    };
    assert!(total <= 600);
    assert!(err.to_string().contains("window"), "{err}");
    // A header that cannot be read is the link's problem.
    assert!(edge
        .on_binary(Bytes::from_static(b"\x09\0\0\0\x02"))
        .is_err());
    assert!(edge.on_binary(Bytes::from_static(b"\0")).is_err());
    // Unknown streams and bad frames of a known id are absorbed.
    assert!(edge.on_binary(Frame::Fin(4242).encode()).is_ok());
    assert!(edge
        .on_binary(Bytes::from_static(b"\x01\0\0\0\x02\0"))
        .is_ok());
}

#[tokio::test]
async fn opens_with_a_foreign_id_or_over_the_cap_are_refused() {
    let (edge, cloud, _at_edge, mut at_cloud) = link(1024);
    // More opens than the cap (8): the ninth is refused as busy.
    let c = cloud.clone();
    let acceptor = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some(incoming) = at_cloud.recv().await {
            if let Ok(s) = c.accept(incoming) {
                held.push(s);
            }
        }
        held
    });
    let mut streams = Vec::new();
    for _ in 0..8 {
        streams.push(edge.open(request(None)).await.expect("open"));
    }
    assert!(matches!(
        edge.open(request(None)).await,
        Err(OpenError::TooManyStreams(8))
    ));
    // A forged open that reuses an id the cloud allocates is refused at the cloud.
    let forged = Incoming {
        request: OpenRequest {
            stream: 3,
            ..request(None)
        },
        msg_id: "x".into(),
    };
    let refusal = cloud.accept(forged).err().expect("refused");
    assert_eq!(refusal.kind, RefusalKind::Invalid);
    drop(streams);
    drop(acceptor);
}
