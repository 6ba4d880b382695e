//! `edgemesh-bench transport`: the candidate transports for direct node-to-node paths, measured
//! with one tool so only the transport differs: plain TCP (the kernel route, the peer), TCP with
//! TLS 1.3 (tokio-rustls), and QUIC (quinn), both with rustls on ring and an ECDSA P-256
//! certificate like the mesh's node certificates.
//!
//! `serve` answers on three ports (TCP `port`, TLS `port+1`, QUIC/UDP `port+2`, quinn's
//! default transport settings); `run` measures
//! each transport in turn, several rounds, and prints one table: upload throughput over one
//! stream and over four concurrent streams (TCP and TLS: four connections; QUIC: four streams
//! of one connection, which is how direct paths would carry tunnel streams), and request
//! latency (64-byte request and answer, one after the other on one stream; for QUIC also on a
//! new stream per request). CPU time of both processes is reported per gigabyte moved.
//!
//! On a stream the first byte picks the test: `U` upload (the server counts until the end of
//! the stream and answers the count, 8 bytes), `P` ping-pong (64-byte messages echoed), `C`
//! (the server answers its CPU time so far, in microseconds).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MSG: usize = 64;
const CHUNK: usize = 64 << 10;
const ALPN: &[u8] = b"edgemesh-bench";
/// Ping-pongs before the timed ones.
const WARMUP: usize = 200;

#[derive(clap::Args)]
pub struct TransportArgs {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(clap::Subcommand)]
enum Mode {
    /// Serve plain TCP (PORT), TCP+TLS (PORT+1) and QUIC (UDP PORT+2) until killed.
    Serve {
        #[arg(long)]
        listen: IpAddr,
        #[arg(long, default_value_t = 5301)]
        port: u16,
        /// Where to write the server's certificate (PEM), for the client to trust.
        #[arg(long)]
        cert_out: PathBuf,
    },
    /// Measure every transport against a server and print the table.
    Run {
        #[arg(long)]
        server: IpAddr,
        #[arg(long, default_value_t = 5301)]
        port: u16,
        /// The server's certificate (PEM).
        #[arg(long)]
        ca: PathBuf,
        /// Seconds per throughput measurement.
        #[arg(long, default_value_t = 5)]
        duration: u64,
        /// Timed requests per latency measurement.
        #[arg(long, default_value_t = 10_000)]
        requests: usize,
        /// Each measurement is made this many times, transports taking turns; the median is
        /// shown.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Upload throughput of the kernel route measured by iperf3 (one stream and four), shown
        /// as a reference row: "ONE,FOUR" in Gbit/s.
        #[arg(long)]
        iperf3: Option<String>,
    },
}

pub async fn run(args: TransportArgs) -> anyhow::Result<()> {
    match args.mode {
        Mode::Serve {
            listen,
            port,
            cert_out,
        } => serve(listen, port, cert_out).await,
        Mode::Run {
            server,
            port,
            ca,
            duration,
            requests,
            rounds,
            iperf3,
        } => {
            anyhow::ensure!(
                (1..=300).contains(&duration),
                "--duration: 1 to 300 seconds"
            );
            anyhow::ensure!(
                (100..=1_000_000).contains(&requests),
                "--requests: 100 to 1000000"
            );
            anyhow::ensure!((1..=20).contains(&rounds), "--rounds: 1 to 20");
            let iperf3 = iperf3
                .map(|s| {
                    let mut it = s.split(',').map(|v| v.trim().parse::<f64>());
                    match (it.next(), it.next()) {
                        (Some(Ok(a)), Some(Ok(b))) => Ok((a, b)),
                        _ => Err(anyhow::anyhow!("--iperf3: expected ONE,FOUR in Gbit/s")),
                    }
                })
                .transpose()?;
            let ca = CertificateDer::from_pem_file(&ca)
                .with_context(|| format!("--ca {}", ca.display()))?;
            measure(
                Target {
                    server,
                    port,
                    ca,
                    duration: Duration::from_secs(duration),
                    requests,
                },
                rounds,
                iperf3,
            )
            .await
        }
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// CPU time of this process (user + system), in microseconds.
fn cpu_micros() -> u64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    us(usage.ru_utime) + us(usage.ru_stime)
}

// ---------------------------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------------------------

async fn serve(listen: IpAddr, port: u16, cert_out: PathBuf) -> anyhow::Result<()> {
    let key = rcgen::KeyPair::generate()?;
    let cert =
        rcgen::CertificateParams::new(vec!["bench-server".to_string()])?.self_signed(&key)?;
    std::fs::write(&cert_out, cert.pem()).with_context(|| cert_out.display().to_string())?;
    let chain = vec![cert.der().clone()];
    let private = || PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));

    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain.clone(), private())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut quic_tls = tls.clone();
    quic_tls.max_early_data_size = u32::MAX;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

    let tcp = TcpListener::bind((listen, port)).await?;
    let tls_listener = TcpListener::bind((listen, port + 1)).await?;
    let quic_config = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(quic_tls)?,
    ));
    let quic = quinn::Endpoint::server(quic_config, SocketAddr::new(listen, port + 2))?;
    eprintln!(
        "transport: serving TCP {port}, TLS {}, QUIC {}",
        port + 1,
        port + 2
    );

    let plain = tokio::spawn(async move {
        while let Ok((s, _)) = tcp.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(serve_stream(s));
        }
    });
    let tls_task = tokio::spawn(async move {
        while let Ok((s, _)) = tls_listener.accept().await {
            let _ = s.set_nodelay(true);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(s) = acceptor.accept(s).await {
                    let _ = serve_stream(s).await;
                }
            });
        }
    });
    while let Some(incoming) = quic.accept().await {
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            while let Ok((send, recv)) = conn.accept_bi().await {
                tokio::spawn(serve_stream(tokio::io::join(recv, send)));
            }
        });
    }
    plain.abort();
    tls_task.abort();
    Ok(())
}

async fn serve_stream<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> std::io::Result<()> {
    let mut op = [0u8; 1];
    s.read_exact(&mut op).await?;
    match op[0] {
        b'U' => {
            let mut buf = vec![0u8; 256 << 10];
            let mut total = 0u64;
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            s.write_all(&total.to_be_bytes()).await?;
        }
        b'P' => {
            let mut buf = [0u8; MSG];
            loop {
                match s.read_exact(&mut buf).await {
                    Ok(_) => s.write_all(&buf).await?,
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                    Err(e) => return Err(e),
                }
            }
        }
        b'C' => s.write_all(&cpu_micros().to_be_bytes()).await?,
        _ => {}
    }
    s.shutdown().await
}

// ---------------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------------

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}
type Boxed = Pin<Box<dyn Stream>>;

struct Target {
    server: IpAddr,
    port: u16,
    ca: CertificateDer<'static>,
    duration: Duration,
    requests: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Tcp,
    Tls,
    Quic,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Tcp => "plain TCP (kernel route, same tool)",
            Kind::Tls => "TCP + TLS 1.3 (tokio-rustls)",
            Kind::Quic => "QUIC (quinn)",
        }
    }
}

/// Opens streams of one transport: TCP and TLS one connection per stream, QUIC one stream of a
/// single connection.
struct Dialer {
    kind: Kind,
    addr: SocketAddr,
    tls: tokio_rustls::TlsConnector,
    quic: Option<(quinn::Endpoint, quinn::Connection)>,
}

impl Dialer {
    async fn new(kind: Kind, t: &Target) -> anyhow::Result<Dialer> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(t.ca.clone())?;
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![ALPN.to_vec()];
        let port = t.port
            + match kind {
                Kind::Tcp => 0,
                Kind::Tls => 1,
                Kind::Quic => 2,
            };
        let addr = SocketAddr::new(t.server, port);
        let quic = if kind == Kind::Quic {
            let bind = SocketAddr::new(
                if t.server.is_ipv4() {
                    IpAddr::from([0, 0, 0, 0])
                } else {
                    IpAddr::from([0u16; 8])
                },
                0,
            );
            let mut endpoint = quinn::Endpoint::client(bind)?;
            endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(
                quinn::crypto::rustls::QuicClientConfig::try_from(config.clone())?,
            )));
            let conn = endpoint.connect(addr, "bench-server")?.await?;
            Some((endpoint, conn))
        } else {
            None
        };
        Ok(Dialer {
            kind,
            addr,
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            quic,
        })
    }

    async fn open(&self) -> anyhow::Result<Boxed> {
        Ok(match (&self.kind, &self.quic) {
            (_, Some((_, conn))) => {
                let (send, recv) = conn.open_bi().await?;
                Box::pin(tokio::io::join(recv, send))
            }
            (Kind::Tls, _) => {
                let tcp = TcpStream::connect(self.addr).await?;
                tcp.set_nodelay(true)?;
                let name = ServerName::try_from("bench-server")?;
                Box::pin(self.tls.connect(name, tcp).await?)
            }
            _ => {
                let tcp = TcpStream::connect(self.addr).await?;
                tcp.set_nodelay(true)?;
                Box::pin(tcp)
            }
        })
    }

    async fn close(self) {
        if let Some((endpoint, conn)) = self.quic {
            conn.close(0u32.into(), b"done");
            endpoint.wait_idle().await;
        }
    }
}

/// Uploads over `streams` streams for `duration`; bytes per second, as the server counted them.
async fn upload(d: &Dialer, streams: usize, duration: Duration) -> anyhow::Result<f64> {
    let mut opened = Vec::new();
    for _ in 0..streams {
        let mut s = d.open().await?;
        s.write_all(b"U").await?;
        opened.push(s);
    }
    let start = Instant::now();
    let tasks: Vec<_> = opened
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let chunk = vec![0x5au8; CHUNK];
                while start.elapsed() < duration {
                    s.write_all(&chunk).await?;
                }
                s.shutdown().await?;
                let mut total = [0u8; 8];
                s.read_exact(&mut total).await?;
                Ok::<u64, anyhow::Error>(u64::from_be_bytes(total))
            })
        })
        .collect();
    let mut bytes = 0u64;
    for t in tasks {
        bytes += t.await??;
    }
    Ok(bytes as f64 / start.elapsed().as_secs_f64())
}

/// Round trips of 64-byte messages: on one stream, or on a new stream each (QUIC).
async fn latency(d: &Dialer, requests: usize, new_stream: bool) -> anyhow::Result<Vec<Duration>> {
    let msg = [0x42u8; MSG];
    let mut buf = [0u8; MSG];
    let mut times = Vec::with_capacity(requests);
    let mut shared = if new_stream {
        None
    } else {
        let mut s = d.open().await?;
        s.write_all(b"P").await?;
        Some(s)
    };
    for i in 0..WARMUP + requests {
        let start = Instant::now();
        match shared.as_mut() {
            Some(s) => {
                s.write_all(&msg).await?;
                s.read_exact(&mut buf).await?;
            }
            None => {
                let mut s = d.open().await?;
                let mut first = Vec::with_capacity(MSG + 1);
                first.push(b'P');
                first.extend_from_slice(&msg);
                s.write_all(&first).await?;
                s.read_exact(&mut buf).await?;
                s.shutdown().await?;
            }
        }
        if i >= WARMUP {
            times.push(start.elapsed());
        }
    }
    if let Some(mut s) = shared {
        s.shutdown().await?;
    }
    times.sort();
    Ok(times)
}

/// The server's CPU time so far (over plain TCP: the question must not cost the transport
/// being measured).
async fn server_cpu(t: &Target) -> anyhow::Result<u64> {
    let mut s = TcpStream::connect((t.server, t.port)).await?;
    s.write_all(b"C").await?;
    let mut v = [0u8; 8];
    s.read_exact(&mut v).await?;
    Ok(u64::from_be_bytes(v))
}

#[derive(Default)]
struct Cell {
    samples: Vec<f64>,
}

impl Cell {
    fn median(&self) -> Option<f64> {
        let mut v = self.samples.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        (!v.is_empty()).then(|| v[v.len() / 2])
    }
}

#[derive(Default)]
struct Row {
    one: Cell,
    four: Cell,
    p50: Cell,
    p99: Cell,
    new_p50: Cell,
    new_p99: Cell,
    client_cpu: Cell,
    server_cpu: Cell,
}

fn pct(times: &[Duration], p: f64) -> f64 {
    let i = ((times.len() as f64 * p).ceil() as usize).clamp(1, times.len()) - 1;
    times[i].as_secs_f64() * 1e6
}

async fn measure(t: Target, rounds: usize, iperf3: Option<(f64, f64)>) -> anyhow::Result<()> {
    let kinds = [Kind::Tcp, Kind::Tls, Kind::Quic];
    let mut rows: Vec<Row> = kinds.iter().map(|_| Row::default()).collect();
    for round in 1..=rounds {
        for (i, kind) in kinds.iter().enumerate() {
            eprintln!("transport: round {round}/{rounds}: {}", kind.label());
            let d = Dialer::new(*kind, &t).await?;
            let (c0, s0) = (cpu_micros(), server_cpu(&t).await?);
            let one = upload(&d, 1, t.duration).await?;
            let four = upload(&d, 4, t.duration).await?;
            let (c1, s1) = (cpu_micros(), server_cpu(&t).await?);
            // Gigabytes moved by the two uploads (approximately: rate × duration).
            let gb = (one + four) * t.duration.as_secs_f64() / 1e9;
            let row = &mut rows[i];
            row.one.samples.push(one * 8.0 / 1e9);
            row.four.samples.push(four * 8.0 / 1e9);
            row.client_cpu.samples.push((c1 - c0) as f64 / 1e6 / gb);
            row.server_cpu.samples.push((s1 - s0) as f64 / 1e6 / gb);
            let times = latency(&d, t.requests, false).await?;
            row.p50.samples.push(pct(&times, 0.50));
            row.p99.samples.push(pct(&times, 0.99));
            if *kind == Kind::Quic {
                let times = latency(&d, t.requests, true).await?;
                row.new_p50.samples.push(pct(&times, 0.50));
                row.new_p99.samples.push(pct(&times, 0.99));
            }
            d.close().await;
        }
    }
    print_table(&kinds, &rows, &t, rounds, iperf3);
    Ok(())
}

fn print_table(
    kinds: &[Kind],
    rows: &[Row],
    t: &Target,
    rounds: usize,
    iperf3: Option<(f64, f64)>,
) {
    let f = |c: &Cell, digits: usize| {
        c.median()
            .map(|v| format!("{v:.digits$}"))
            .unwrap_or_else(|| "-".into())
    };
    let base = rows[0].one.median().unwrap_or(0.0);
    let of_base = |c: &Cell| {
        c.median()
            .filter(|_| base > 0.0)
            .map(|v| format!("{:.0}%", v / base * 100.0))
            .unwrap_or_else(|| "-".into())
    };
    println!(
        "\nmedian of {rounds} rounds; {} s per throughput run; {} timed requests per latency run (64 B each way)\n",
        t.duration.as_secs(),
        t.requests
    );
    println!("| transport | 1 stream Gbit/s | of kernel route | 4 streams Gbit/s | request p50 µs | request p99 µs | client CPU s/GB | server CPU s/GB |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    if let Some((one, four)) = iperf3 {
        println!("| kernel route (iperf3) | {one:.2} | - | {four:.2} | - | - | - | - |");
    }
    for (kind, row) in kinds.iter().zip(rows) {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            kind.label(),
            f(&row.one, 2),
            of_base(&row.one),
            f(&row.four, 2),
            f(&row.p50, 0),
            f(&row.p99, 0),
            f(&row.client_cpu, 2),
            f(&row.server_cpu, 2),
        );
        if !row.new_p50.samples.is_empty() {
            println!(
                "| {} (a new stream per request) | - | - | - | {} | {} | - | - |",
                kind.label(),
                f(&row.new_p50, 0),
                f(&row.new_p99, 0),
            );
        }
    }
}
