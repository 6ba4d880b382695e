//! Small real servers for end-to-end tests and benchmarks, one thread per connection:
//!
//! - `edgemesh-testserver http ADDR NAME`: HTTP/1.1, answers every request with `NAME\n`
//!   (keep-alive unless the client asks to close);
//! - `edgemesh-testserver banner ADDR TEXT`: writes `TEXT\n` as soon as a client connects
//!   (a server-speaks-first protocol), then echoes;
//! - `edgemesh-testserver echo ADDR`: echoes until the client half-closes, then closes its
//!   side too;
//! - `edgemesh-testserver stall ADDR`: accepts and then neither reads nor writes, holding the
//!   connection open (a stuck application: whatever is sent piles up in front of it);
//! - `web`, `grpc`, `https`: real HTTP/1.1 + HTTP/2, gRPC and HTTPS servers, see
//!   `edgemesh_e2e::servers`.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::ExitCode;
use std::thread;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mode, addr) = match (args.first(), args.get(1)) {
        (Some(m), Some(a)) => (m.as_str(), a.as_str()),
        _ => {
            eprintln!(
                "usage: edgemesh-testserver http|banner|echo|stall|udp-echo ADDR [NAME|TEXT]"
            );
            return ExitCode::from(2);
        }
    };
    if let Some(code) = edgemesh_e2e::servers::run(mode, addr, &args[2..]) {
        return code;
    }
    if mode == "udp-echo" {
        return udp_echo(addr, args.get(2).map_or("", String::as_str));
    }
    let text = args.get(2).cloned().unwrap_or_default();
    let listener = match TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot listen on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!("{mode} server listening on {addr}");
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        let text = text.clone();
        let mode = mode.to_string();
        thread::spawn(move || {
            let _ = match mode.as_str() {
                "http" => serve_http(stream, &text),
                "banner" => stream
                    .try_clone()
                    .and_then(|mut w| w.write_all(format!("{text}\n").as_bytes()))
                    .and_then(|_| echo(stream)),
                "stall" => stall(stream),
                _ => echo(stream),
            };
        });
    }
    ExitCode::SUCCESS
}

fn stall(stream: TcpStream) -> io::Result<()> {
    // Held, never touched, until the process ends.
    let _held = stream;
    loop {
        thread::park();
    }
}

fn echo(mut stream: TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return stream.shutdown(Shutdown::Write);
        }
        stream.write_all(&buf[..n])?;
    }
}

fn serve_http(stream: TcpStream, name: &str) -> io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let mut close = request_line.trim_end().ends_with("HTTP/1.0");
        let mut body_len = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let lower = line.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("connection:") {
                close = v.trim() == "close";
            }
            if let Some(v) = lower.strip_prefix("content-length:") {
                body_len = v.trim().parse().unwrap_or(0);
            }
        }
        io::copy(&mut (&mut reader).take(body_len as u64), &mut io::sink())?;
        let body = format!("{name}\n");
        let connection = if close { "close" } else { "keep-alive" };
        // One write: `write!` on a socket is a system call per piece, and with Nagle's
        // algorithm the pieces after the first wait for the client's (delayed) ACK, 40 ms on a
        // reused connection.
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n{body}",
            body.len()
        );
        writer.write_all(response.as_bytes())?;
        if close {
            return writer.shutdown(Shutdown::Write);
        }
    }
}

/// Sends every datagram back to where it came from, as it came (any size up to 65,535);
/// `who` is answered with `name`, so that tests can tell endpoints apart.
fn udp_echo(addr: &str, name: &str) -> ExitCode {
    let socket = match std::net::UdpSocket::bind(addr) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot bind udp {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!("udp-echo server on {addr}");
    let mut buf = vec![0u8; 65_536];
    loop {
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => {
                let answer = if &buf[..n] == b"who" {
                    name.as_bytes()
                } else {
                    &buf[..n]
                };
                let _ = socket.send_to(answer, from);
            }
            Err(e) => eprintln!("udp-echo: {e}"),
        }
    }
}
