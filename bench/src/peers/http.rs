//! A small HTTP/1.1 client over a unix socket, enough for the peers' APIs:
//! one request per connection (`Connection: close`), a JSON body or none,
//! the status line and the body of the answer (by `Content-Length`, else
//! to the end of the stream). Hand-written: the peers' APIs need ~100
//! lines of it, and the HTTP crates that speak over a unix socket bring an
//! async runtime with them.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// An answer: status code and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code, e.g. 204.
    pub status: u16,
    /// The body (empty when there is none).
    pub body: String,
}

impl Response {
    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// The bytes of a request: `method path`, with `body` as JSON if any.
pub fn format_request(method: &str, path: &str, body: Option<&str>) -> String {
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAccept: application/json\r\n");
    match body {
        Some(b) => {
            req.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}", b.len()));
        }
        None => req.push_str("Content-Length: 0\r\n\r\n"),
    }
    req
}

/// Parses a whole answer: `Ok(None)` while `buf` holds less than the head
/// and the `Content-Length` it announces; an error for a malformed one.
pub fn parse_response(buf: &[u8]) -> anyhow::Result<Option<Response>> {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_end]).context("an HTTP head that is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (version, code) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    if !version.starts_with("HTTP/1.") {
        bail!("not an HTTP/1 status line: {status_line:?}");
    }
    let status: u16 = code.parse().with_context(|| format!("no status code in {status_line:?}"))?;
    let mut length = None;
    for line in lines {
        let (name, value) = line.split_once(':').with_context(|| format!("a header line without ':': {line:?}"))?;
        if name.trim().eq_ignore_ascii_case("content-length") {
            length = Some(value.trim().parse::<usize>().with_context(|| format!("bad Content-Length {value:?}"))?);
        }
    }
    let body = &buf[head_end + 4..];
    let body = match length {
        Some(n) if body.len() < n => return Ok(None),
        Some(n) => &body[..n],
        // No length (and no body for 204): what came, read to the end.
        None => body,
    };
    Ok(Some(Response { status, body: String::from_utf8_lossy(body).into_owned() }))
}

/// Sends one request to the API socket `sock` and reads its answer, within
/// `limit`.
pub fn request(sock: &Path, method: &str, path: &str, body: Option<&str>, limit: Duration) -> anyhow::Result<Response> {
    let mut stream = UnixStream::connect(sock).with_context(|| format!("connecting to {}", sock.display()))?;
    stream.set_read_timeout(Some(limit))?;
    stream.set_write_timeout(Some(limit))?;
    stream
        .write_all(format_request(method, path, body).as_bytes())
        .with_context(|| format!("sending {method} {path}"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(r) = parse_response(&buf)? {
            return Ok(r);
        }
        let n = stream.read(&mut chunk).with_context(|| format!("reading the answer to {method} {path}"))?;
        if n == 0 {
            // Closed: an answer without Content-Length ends here.
            return parse_response(&buf)?.with_context(|| {
                format!("{method} {path}: the connection closed mid-answer: {:?}", String::from_utf8_lossy(&buf))
            });
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Connects to `sock` until it accepts (a peer creates its socket before
/// it listens), for at most `limit`.
pub fn wait_for_socket(sock: &Path, limit: Duration) -> anyhow::Result<()> {
    let t0 = Instant::now();
    loop {
        match UnixStream::connect(sock) {
            Ok(_) => return Ok(()),
            Err(e) if t0.elapsed() >= limit => {
                return Err(e).with_context(|| format!("{} did not accept within {limit:?}", sock.display()))
            }
            Err(_) => std::thread::sleep(Duration::from_micros(200)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_carries_its_body_and_length() {
        assert_eq!(
            format_request("PUT", "/actions", Some(r#"{"a":1}"#)),
            "PUT /actions HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAccept: application/json\r\n\
             Content-Type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":1}"
        );
        assert!(format_request("GET", "/", None).ends_with("Content-Length: 0\r\n\r\n"));
    }

    #[test]
    fn answers_parse_once_whole() {
        let full = b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\ncontent-length: 13\r\n\r\n{\"fault\":\"x\"}";
        for cut in [0, 10, full.len() - 14, full.len() - 1] {
            assert_eq!(parse_response(&full[..cut]).unwrap(), None, "cut at {cut}");
        }
        let r = parse_response(full).unwrap().unwrap();
        assert_eq!(r, Response { status: 400, body: "{\"fault\":\"x\"}".into() });
        assert!(!r.is_success());
        let r = parse_response(b"HTTP/1.1 204 No Content\r\nServer: Firecracker API\r\n\r\n").unwrap().unwrap();
        assert_eq!(r, Response { status: 204, body: String::new() });
        assert!(r.is_success());
    }

    #[test]
    fn malformed_answers_are_errors() {
        assert!(parse_response(b"SSH-2.0 hello\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 abc OK\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n").is_err());
    }
}
