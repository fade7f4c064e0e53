//! Things end-to-end tests build: archives, and a tiny HTTP service for `http/request` steps.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};

/// A tar.gz of `(path, contents)` regular files with `mode`. Paths are written raw (the tar
/// crate's own path setter refuses `..`, which hostile cases need); at most 100 bytes each.
pub fn tar_gz(entries: &[(&str, &[u8])], mode: u32) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut b = tar::Builder::new(gz);
    for (name, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        b.append(&h, *data).unwrap_or_else(|e| panic!("tar: {e}"));
    }
    let gz = b.into_inner().unwrap_or_else(|e| panic!("tar: {e}"));
    gz.finish().unwrap_or_else(|e| panic!("gzip: {e}"))
}

/// An HTTP/1.1 service on loopback answering every request with `status` and `body`, after
/// reading the whole request (closing with unread bytes would reset the connection).
pub fn tiny_http(status: u16, body: &'static str) -> SocketAddr {
    tiny_http_bytes(status, body.as_bytes().to_vec())
}

/// [`tiny_http`] answering any bytes.
pub fn tiny_http_bytes(status: u16, body: Vec<u8>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("bind: {e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { continue };
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && c.read(&mut b).unwrap_or(0) == 1 {
                head.push(b[0]);
            }
            let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
            let length: usize = text
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            let mut body_in = vec![0u8; length];
            let _ = c.read_exact(&mut body_in);
            let _ = write!(
                c,
                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = c.write_all(&body);
        }
    });
    addr
}
