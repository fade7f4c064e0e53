//! A tiny blocking W3C WebDriver client for the browser tests: it starts `chromedriver` on a
//! free loopback port (killed on drop), opens a headless Chromium session with a fresh profile,
//! and speaks WebDriver's JSON over plain HTTP/1.1 on loopback, one connection per command.
//!
//! Only what the tests use: navigate, find by CSS selector, click, type, read text and page
//! source, run a script, read a cookie and whether an alert is open.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::ChildGuard;

/// The W3C key of an element reference.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";
/// How long one WebDriver command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the Debian packages put the browser and the driver.
const CHROMIUM: &[&str] = &["/usr/bin/chromium", "/usr/bin/chromium-browser"];
const CHROMEDRIVER: &[&str] = &["/usr/bin/chromedriver"];

fn first_existing(paths: &[&str]) -> Option<PathBuf> {
    paths.iter().map(PathBuf::from).find(|p| p.is_file())
}

/// A running chromedriver.
pub struct Driver {
    addr: SocketAddr,
    chromium: PathBuf,
    _child: ChildGuard,
}

impl Driver {
    /// Starts chromedriver (logging to `log`); `Err` says why the browser cannot run here.
    pub fn start(log: &Path) -> Result<Driver, String> {
        let chromium = first_existing(CHROMIUM)
            .ok_or("chromium is not installed (apt-get install chromium chromium-driver)")?;
        let driver = first_existing(CHROMEDRIVER)
            .ok_or("chromedriver is not installed (apt-get install chromium-driver)")?;
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port: {e}"))?
            .port();
        let log_file = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let mut cmd = Command::new(&driver);
        cmd.arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        let child = ChildGuard::spawn("chromedriver", &mut cmd);
        let d = Driver {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            chromium,
            _child: child,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match d.call("GET", "/status", None) {
                Ok(v) if v["ready"] == true => return Ok(d),
                _ if Instant::now() > deadline => {
                    return Err(format!(
                        "chromedriver did not become ready; see {}",
                        log.display()
                    ))
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// A new headless browser session with a fresh profile in `profile`. Certificate errors
    /// are ignored in this test browser only: trusting the server's private CA would need the
    /// profile's NSS database.
    pub fn session(&self, profile: &Path) -> Result<Session<'_>, String> {
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "acceptInsecureCerts": true,
            "goog:chromeOptions": {
                "binary": self.chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-background-networking", "--no-first-run",
                    "--ignore-certificate-errors", "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        }}});
        let v = self.call("POST", "/session", Some(&caps))?;
        let id = v["sessionId"]
            .as_str()
            .ok_or_else(|| format!("no session id in {v}"))?
            .to_owned();
        Ok(Session { driver: self, id })
    }

    /// One command: the answer's `value`, or the WebDriver error.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
        let body = body.map(Value::to_string).unwrap_or_default();
        let mut tcp = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))
            .map_err(|e| format!("connect chromedriver: {e}"))?;
        tcp.set_read_timeout(Some(COMMAND_TIMEOUT)).ok();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        tcp.write_all(request.as_bytes())
            .map_err(|e| format!("send to chromedriver: {e}"))?;
        let body = read_response(&mut tcp).map_err(|e| format!("read from chromedriver: {e}"))?;
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        let value = v.get("value").cloned().unwrap_or(Value::Null);
        if let Some(error) = value.get("error").and_then(Value::as_str) {
            let message = value["message"].as_str().unwrap_or_default();
            return Err(format!("{error}: {message}"));
        }
        Ok(value)
    }
}

/// Reads one HTTP/1.1 response and answers its body. chromedriver keeps the connection open
/// despite `Connection: close`, so the body is read by its `Content-Length` (or chunks).
fn read_response(tcp: &mut TcpStream) -> std::io::Result<String> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = tcp.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::Error::other(
                "connection closed before the head ended",
            ));
        }
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
    let length = head.lines().find_map(|l| {
        l.strip_prefix("content-length:")
            .and_then(|v| v.trim().parse::<usize>().ok())
    });
    let chunked = head.contains("transfer-encoding: chunked");
    loop {
        let body = &raw[head_end..];
        let complete = match length {
            Some(n) => body.len() >= n,
            None if chunked => body.windows(5).any(|w| w == b"0\r\n\r\n"),
            None => false,
        };
        if complete {
            break;
        }
        let n = tcp.read(&mut buf)?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
    }
    let body = String::from_utf8_lossy(&raw[head_end..]).into_owned();
    Ok(if chunked { dechunk(&body) } else { body })
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

/// A browser session; deleted (browser closed) on drop.
pub struct Session<'a> {
    driver: &'a Driver,
    id: String,
}

/// An element of the current page.
#[derive(Debug, Clone)]
pub struct Element(String);

impl Session<'_> {
    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        self.driver.call(
            method,
            &format!("/session/{}{path}", self.id),
            body.as_ref(),
        )
    }

    pub fn goto(&self, url: &str) -> Result<(), String> {
        self.cmd("POST", "/url", Some(json!({ "url": url })))
            .map(drop)
    }

    pub fn url(&self) -> Result<String, String> {
        Ok(self
            .cmd("GET", "/url", None)?
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    pub fn find(&self, css: &str) -> Result<Element, String> {
        let v = self.cmd(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        )?;
        v[ELEMENT_KEY]
            .as_str()
            .map(|id| Element(id.to_owned()))
            .ok_or_else(|| format!("{css}: no element in {v}"))
    }

    /// Waits up to `timeout` for `css` to match, then answers it.
    pub fn wait_for(&self, css: &str, timeout: Duration) -> Result<Element, String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.find(css) {
                Ok(e) => return Ok(e),
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("waiting for {css}: {e}"))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Waits up to `timeout` until the page's address satisfies `ok`: a navigation a click
    /// started has happened (a later `goto` would otherwise race it).
    pub fn wait_url(&self, timeout: Duration, ok: impl Fn(&str) -> bool) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let url = self.url()?;
            if ok(&url) {
                return Ok(url);
            }
            if Instant::now() > deadline {
                return Err(format!("address still {url:?} after {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits up to `timeout` until the text of `css` satisfies `ok`; answers the text.
    pub fn wait_text(
        &self,
        css: &str,
        timeout: Duration,
        ok: impl Fn(&str) -> bool,
    ) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        loop {
            if let Ok(text) = self.find(css).and_then(|e| self.text(&e)) {
                if ok(&text) {
                    return Ok(text);
                }
                last = text;
            }
            if Instant::now() > deadline {
                return Err(format!("{css}: text still {last:?} after {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn click(&self, e: &Element) -> Result<(), String> {
        self.cmd("POST", &format!("/element/{}/click", e.0), Some(json!({})))
            .map(drop)
    }

    pub fn clear(&self, e: &Element) -> Result<(), String> {
        self.cmd("POST", &format!("/element/{}/clear", e.0), Some(json!({})))
            .map(drop)
    }

    pub fn type_text(&self, e: &Element, text: &str) -> Result<(), String> {
        self.cmd(
            "POST",
            &format!("/element/{}/value", e.0),
            Some(json!({ "text": text })),
        )
        .map(drop)
    }

    /// The rendered text of `e`.
    pub fn text(&self, e: &Element) -> Result<String, String> {
        Ok(self
            .cmd("GET", &format!("/element/{}/text", e.0), None)?
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    /// The page's current DOM, serialized.
    pub fn source(&self) -> Result<String, String> {
        Ok(self
            .cmd("GET", "/source", None)?
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    /// Runs `script` (a function body) with `args`; answers its return value.
    pub fn execute(&self, script: &str, args: Value) -> Result<Value, String> {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
    }

    /// Sets the value of a form field directly (typing long text key by key is slow).
    pub fn set_value(&self, e: &Element, value: &str) -> Result<(), String> {
        self.execute(
            "arguments[0].value = arguments[1];",
            json!([{ ELEMENT_KEY: e.0 }, value]),
        )
        .map(drop)
    }

    /// The text of the open alert/confirm/prompt dialog, if one is open.
    pub fn alert_text(&self) -> Option<String> {
        self.cmd("GET", "/alert/text", None)
            .ok()
            .map(|v| v.as_str().unwrap_or_default().to_owned())
    }

    /// A PNG of the viewport.
    pub fn screenshot(&self) -> Result<Vec<u8>, String> {
        use base64::Engine as _;
        let v = self.cmd("GET", "/screenshot", None)?;
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or_default())
            .map_err(|e| e.to_string())
    }

    /// The value of cookie `name` (HttpOnly ones included: the driver sees them).
    pub fn cookie(&self, name: &str) -> Result<String, String> {
        let v = self.cmd("GET", &format!("/cookie/{name}"), None)?;
        v["value"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("cookie {name}: {v}"))
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        let _ = self
            .driver
            .call("DELETE", &format!("/session/{}", self.id), None);
    }
}

/// Starts the driver, or explains why not: under `CI=true` that is a failure (the machine
/// must have the browser: `make test` installs it), elsewhere the caller skips.
pub fn driver_or_skip(log: &Path) -> Option<Driver> {
    match Driver::start(log) {
        Ok(d) => Some(d),
        Err(why) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("the browser tests need headless Chromium under CI: {why}")
        }
        Err(why) => {
            eprintln!("SKIPPED: browser test not run: {why}");
            None
        }
    }
}
