//! The bench's floor for a cold pull: the least work a pull-through cache that verifies
//! every byte must do, with nothing else (no routing, no async runtime, no HTTP library, no
//! framing but `Content-Length`, no auth, no index). A bench tool, never linked.
//!
//!     floor-relay <listen host:port> <upstream host:port> <dir> [relay|seq|pipe|pipe3] [ca.pem]
//!
//! With `ca.pem` the upstream is HTTPS (rustls with ring, as Stevedore links it), trusted
//! through that CA, its name the upstream's IP address.
//!
//! One thread per client connection, one upstream connection each, requests relayed verbatim
//! (GET/HEAD without a body, the bench's client). A `200` to a `GET …/blobs/sha256:<hex>` is
//! filled: each chunk read from the upstream is sent to the client, hashed (SHA-256, the same
//! `sha2` Stevedore links) and written to `<dir>/<hex>.tmp`; the client's last byte is held
//! back until the digest matches, then the file is fsynced and renamed to `<dir>/<hex>` on a
//! thread of its own (after the client has its bytes and off the connection's path, as
//! Stevedore commits). `seq`: one thread reads, sends,
//! hashes, writes in turn; `pipe`: a second thread hashes and writes while the first reads
//! and sends (the shape of Stevedore's fill: a batch hashed and written on the blocking pool
//! while the next is received). Everything else is relayed as it is.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;

use sha2::{Digest, Sha256};

const CHUNK: usize = 1 << 20;
/// A chunk is passed on once it has this many bytes (or the body's end): a TLS record
/// (16 KiB) at a time would cost every stage a call per record.
const MIN_CHUNK: usize = 128 << 10;

/// Reads the body's next chunk into `buf`: at least `MIN_CHUNK` bytes (or all that is
/// `left`), at most `CHUNK`; counts them off `left`.
fn read_chunk(up: &mut impl Read, buf: &mut [u8], left: &mut u64) -> io::Result<usize> {
    let want = (CHUNK as u64).min(*left) as usize;
    let mut got = 0;
    while got < want.min(MIN_CHUNK) {
        let n = up.read(&mut buf[got..want])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    *left -= got as u64;
    Ok(got)
}

/// A buffer for the next chunk: one never used yet, else one a worker handed back.
fn free_buf(pool: &mut Vec<Vec<u8>>, spare: &mpsc::Receiver<Vec<u8>>) -> io::Result<Vec<u8>> {
    match pool.pop() {
        Some(b) => Ok(b),
        None => spare.recv().map_err(|_| io::Error::other("workers gone")),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Read, send, hash, write in turn on one thread.
    Seq,
    /// Read and send on one thread, hash and write on another.
    Pipe,
    /// Read on one thread, send on a second, hash and write on a third.
    Pipe3,
    /// Copy, nothing else: no hash, no file (the floor of any proxy, verifying or not).
    Relay,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: floor-relay <listen> <upstream> <dir> [seq|pipe]");
        std::process::exit(2);
    }
    let listener = TcpListener::bind(&args[1]).expect("bind");
    let upstream = args[2].clone();
    let dir = PathBuf::from(&args[3]);
    let mode = match args.get(4).map(String::as_str).unwrap_or("seq") {
        "seq" => Mode::Seq,
        "pipe" => Mode::Pipe,
        "pipe3" => Mode::Pipe3,
        "relay" => Mode::Relay,
        m => {
            eprintln!("unknown mode {m}");
            std::process::exit(2);
        }
    };
    let tls = args.get(5).map(|ca| tls_config(ca));
    println!("floor-relay listening on {}", listener.local_addr().unwrap());
    for conn in listener.incoming() {
        let Ok(client) = conn else { continue };
        let (upstream, dir, tls) = (upstream.clone(), dir.clone(), tls.clone());
        thread::spawn(move || {
            let done = TcpStream::connect(&upstream).and_then(|up| {
                up.set_nodelay(true)?;
                match tls {
                    None => serve(client, up, &dir, mode),
                    Some(cfg) => {
                        let host = upstream.rsplit_once(':').map_or(upstream.as_str(), |(h, _)| h).to_owned();
                        let name = rustls_pki_types::ServerName::try_from(host).map_err(io::Error::other)?;
                        let conn = rustls::ClientConnection::new(cfg, name).map_err(io::Error::other)?;
                        serve(client, rustls::StreamOwned::new(conn, up), &dir, mode)
                    }
                }
            });
            if let Err(e) = done {
                if e.kind() != io::ErrorKind::UnexpectedEof {
                    eprintln!("connection: {e}");
                }
            }
        });
    }
}

/// A request or response head: its lines, as received.
fn read_head(r: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let mut head = Vec::new();
    loop {
        let n = r.read_until(b'\n', &mut head)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if head.ends_with(b"\r\n\r\n") || head == b"\r\n" {
            return Ok(head);
        }
        if head.len() > 64 << 10 {
            return Err(io::Error::other("head too long"));
        }
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// The upstream's trust: the CA in `ca` (PEM), nothing else.
fn tls_config(ca: &str) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca).expect("CA file") {
        roots.add(cert.expect("CA certificate")).expect("CA certificate");
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    std::sync::Arc::new(cfg)
}

fn serve(client: TcpStream, up: impl Read + Write, dir: &Path, mode: Mode) -> io::Result<()> {
    client.set_nodelay(true)?;
    let mut c_in = BufReader::with_capacity(64 << 10, client.try_clone()?);
    let mut c_out = client;
    let mut u_in = BufReader::with_capacity(64 << 10, up);
    loop {
        let req = read_head(&mut c_in)?;
        // Writes bypass the read buffer (and leave it alone).
        u_in.get_mut().write_all(&req)?;
        u_in.get_mut().flush()?;
        let req = String::from_utf8_lossy(&req).into_owned();
        let mut words = req.split_whitespace();
        let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        let resp = read_head(&mut u_in)?;
        let text = String::from_utf8_lossy(&resp).into_owned();
        let status = text.split_whitespace().nth(1).unwrap_or("");
        let len: u64 = header(&text, "content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        c_out.write_all(&resp)?;
        if method == "HEAD" || status == "204" || status == "304" || len == 0 {
            continue;
        }
        let blob = path.rsplit_once("/blobs/sha256:").map(|(_, hex)| hex.to_owned());
        match blob {
            Some(hex) if method == "GET" && status == "200" && hex.len() == 64 && mode != Mode::Relay => {
                let tmp = dir.join(format!("{hex}.tmp"));
                let file = std::fs::File::create(&tmp)?;
                let file = match mode {
                    Mode::Pipe => fill_pipelined(&mut u_in, &mut c_out, file, len, &hex)?,
                    Mode::Pipe3 => fill_three(&mut u_in, c_out.try_clone()?, file, len, &hex)?,
                    _ => fill_sequential(&mut u_in, &mut c_out, file, len, &hex)?,
                };
                // Durable and visible after the client has its bytes, off its path: the
                // connection's next request does not wait for the disk.
                let dest = dir.join(&hex);
                thread::spawn(move || {
                    if let Err(e) = file.sync_all().and_then(|()| std::fs::rename(&tmp, &dest)) {
                        eprintln!("commit {}: {e}", dest.display());
                    }
                });
            }
            _ => relay(&mut u_in, &mut c_out, len)?,
        }
    }
}

/// `len` bytes from `up` to `client` through one 1 MiB buffer.
fn relay(up: &mut impl Read, client: &mut impl Write, len: u64) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let n = read_chunk(up, &mut buf, &mut left)?;
        client.write_all(&buf[..n])?;
    }
    Ok(())
}

fn check(hasher: Sha256, hex: &str) -> io::Result<()> {
    let got: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if got != hex {
        return Err(io::Error::other(format!("digest mismatch: {got}")));
    }
    Ok(())
}

/// Read, send, hash, write, in turn on one thread; the last byte after the digest matched.
fn fill_sequential(
    up: &mut impl Read,
    client: &mut impl Write,
    mut file: std::fs::File,
    len: u64,
    hex: &str,
) -> io::Result<std::fs::File> {
    let mut buf = vec![0u8; CHUNK];
    let mut hasher = Sha256::new();
    let mut left = len;
    let mut last = 0u8;
    while left > 0 {
        let n = read_chunk(up, &mut buf, &mut left)?;
        let held = usize::from(left == 0);
        client.write_all(&buf[..n - held])?;
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n])?;
        last = buf[n - 1];
    }
    check(hasher, hex)?;
    client.write_all(&[last])?;
    Ok(file)
}

/// Read and send on this thread; hash and write on another (buffers handed over and back).
/// The last byte after the other thread's digest matched.
fn fill_pipelined(
    up: &mut impl Read,
    client: &mut impl Write,
    file: std::fs::File,
    len: u64,
    hex: &str,
) -> io::Result<std::fs::File> {
    let (to_hash, hashing) = mpsc::sync_channel::<(Vec<u8>, usize)>(2);
    let (give_back, spare) = mpsc::channel::<Vec<u8>>();
    let hex_owned = hex.to_owned();
    let worker = thread::spawn(move || -> io::Result<(std::fs::File, u8)> {
        let mut file = file;
        let mut hasher = Sha256::new();
        let mut last = 0u8;
        for (buf, n) in hashing {
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n])?;
            last = buf[n - 1];
            let _ = give_back.send(buf);
        }
        check(hasher, &hex_owned)?;
        Ok((file, last))
    });
    let mut left = len;
    let mut pool: Vec<Vec<u8>> = (0..3).map(|_| vec![0u8; CHUNK]).collect();
    while left > 0 {
        let mut buf = free_buf(&mut pool, &spare)?;
        let n = read_chunk(up, &mut buf, &mut left)?;
        let held = usize::from(left == 0);
        client.write_all(&buf[..n - held])?;
        if to_hash.send((buf, n)).is_err() {
            break;
        }
    }
    drop(to_hash);
    let (file, last) = worker.join().map_err(|_| io::Error::other("hasher panicked"))??;
    client.write_all(&[last])?;
    Ok(file)
}

/// Read on this thread; send on a second and hash and write on a third, each chunk shared
/// (the last of the two to finish with a buffer hands it back). The last byte after the
/// digest matched.
fn fill_three(
    up: &mut impl Read,
    mut client: TcpStream,
    file: std::fs::File,
    len: u64,
    hex: &str,
) -> io::Result<std::fs::File> {
    use std::sync::Arc;
    type Chunk = (Arc<Vec<u8>>, usize, bool);
    let (to_hash, hashing) = mpsc::sync_channel::<Chunk>(2);
    let (to_send, sending) = mpsc::sync_channel::<Chunk>(2);
    let (give_back, spare) = mpsc::channel::<Vec<u8>>();
    let back = give_back.clone();
    let hex_owned = hex.to_owned();
    let hasher = thread::spawn(move || -> io::Result<std::fs::File> {
        let mut file = file;
        let mut hasher = Sha256::new();
        for (buf, n, _) in hashing {
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n])?;
            if let Ok(v) = Arc::try_unwrap(buf) {
                let _ = give_back.send(v);
            }
        }
        check(hasher, &hex_owned)?;
        Ok(file)
    });
    let sender = thread::spawn(move || -> io::Result<(TcpStream, u8)> {
        let mut last = 0u8;
        for (buf, n, is_last) in sending {
            // The last chunk is sent short of its last byte, which waits for the digest.
            let end = n - usize::from(is_last);
            client.write_all(&buf[..end])?;
            last = buf[n - 1];
            if let Ok(v) = Arc::try_unwrap(buf) {
                let _ = back.send(v);
            }
        }
        Ok((client, last))
    });
    let mut left = len;
    let mut pool: Vec<Vec<u8>> = (0..4).map(|_| vec![0u8; CHUNK]).collect();
    while left > 0 {
        let mut buf = free_buf(&mut pool, &spare)?;
        let n = read_chunk(up, &mut buf, &mut left)?;
        let buf = Arc::new(buf);
        if to_send.send((buf.clone(), n, left == 0)).is_err() || to_hash.send((buf, n, left == 0)).is_err() {
            break;
        }
    }
    drop((to_send, to_hash));
    let file = hasher.join().map_err(|_| io::Error::other("hasher panicked"))??;
    let (mut client, last) = sender.join().map_err(|_| io::Error::other("sender panicked"))??;
    client.write_all(&[last])?;
    Ok(file)
}
