//! `tether-test-proxy LISTEN [USER:PASSWORD]`: a small HTTP CONNECT proxy for the egress tests.
//! Each tunnel it opens is printed as `tunnel HOST:PORT` on standard output (refusals as
//! `refused STATUS`), so a test can see what went through it. With USER:PASSWORD it answers
//! 407 to a request without those basic credentials. Not for anything but tests.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(listen) = args.next() else {
        eprintln!("usage: tether-test-proxy LISTEN [USER:PASSWORD]");
        std::process::exit(2);
    };
    let expected = args.next().map(|c| format!("Basic {}", STANDARD.encode(c)));
    let listener = match TcpListener::bind(&listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("tether-test-proxy: {listen}: {e}");
            std::process::exit(1);
        }
    };
    println!("listening {listen}");
    for client in listener.incoming().flatten() {
        let expected = expected.clone();
        std::thread::spawn(move || serve(client, expected.as_deref()));
    }
}

fn serve(client: TcpStream, expected: Option<&str>) {
    let _ = client.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok(reader_side) = client.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(reader_side);
    let mut request = String::new();
    if reader.read_line(&mut request).is_err() {
        return;
    }
    let mut authorization = None;
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if line == "\r\n" => break,
            Ok(_) => {
                if let Some((k, v)) = line.split_once(':') {
                    if k.eq_ignore_ascii_case("proxy-authorization") {
                        authorization = Some(v.trim().to_owned());
                    }
                }
            }
        }
    }
    let mut client = client;
    let mut answer = |status: &str| {
        println!("refused {status}");
        let _ = write!(client, "HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
    };
    let mut parts = request.split_whitespace();
    let (Some("CONNECT"), Some(target)) = (parts.next(), parts.next()) else {
        return answer("405 Method Not Allowed");
    };
    if expected.is_some() && authorization.as_deref() != expected {
        return answer("407 Proxy Authentication Required");
    }
    let Ok(upstream) = TcpStream::connect(target) else {
        return answer("502 Bad Gateway");
    };
    println!("tunnel {target}");
    let _ = client.set_read_timeout(None);
    if client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .is_err()
    {
        return;
    }
    let (Ok(mut up_read), Ok(mut client_write)) = (upstream.try_clone(), client.try_clone()) else {
        return;
    };
    // Whatever the reader buffered past the head (nothing, for a well-behaved client) first.
    let buffered = reader.buffer().to_vec();
    let mut up_write = upstream;
    if up_write.write_all(&buffered).is_err() {
        return;
    }
    let down = std::thread::spawn(move || {
        let _ = std::io::copy(&mut up_read, &mut client_write);
        let _ = client_write.shutdown(Shutdown::Write);
    });
    let mut client_read = reader.into_inner();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match client_read.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if up_write.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = up_write.shutdown(Shutdown::Write);
    let _ = down.join();
}
