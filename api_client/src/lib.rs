//! A small HTTP/1.1 client over a Unix socket, for `ch-remote` and tests.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;
use thiserror::Error;

const MAX_RESPONSE_BYTES: usize = 16 << 20;

#[derive(Debug, Error)]
pub enum Error {
    #[error("Failed to connect to {0}")]
    Connect(String, #[source] io::Error),
    #[error("Failed to send the request")]
    Write(#[source] io::Error),
    #[error("Failed to read the response")]
    Read(#[source] io::Error),
    #[error("Malformed response: {0}")]
    Malformed(String),
    /// The server answered with an error status; its message is kept as sent.
    #[error("Server error {status}: {message}")]
    Server { status: u16, message: String },
}

/// A response: status and body.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// Sends one request and reads the response (any status).
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<Response, Error> {
    let mut s =
        UnixStream::connect(socket).map_err(|e| Error::Connect(socket.display().to_string(), e))?;
    // A migration's reply comes when the migration is over: receiving waits for the sender.
    if !path.ends_with("-migration") {
        let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
    }
    let body = body.unwrap_or("");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\nConnection: close\r\n"
    );
    if !body.is_empty() {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).map_err(Error::Write)?;
    read_response(&mut BufReader::new(s))
}

fn read_response(r: &mut impl BufRead) -> Result<Response, Error> {
    loop {
        let mut line = String::new();
        r.read_line(&mut line).map_err(Error::Read)?;
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Error::Malformed(format!("status line \"{}\"", line.trim())))?;
        let mut len = None;
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).map_err(Error::Read)? == 0 {
                return Err(Error::Malformed("truncated header".into()));
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = Some(
                        v.trim()
                            .parse::<usize>()
                            .map_err(|_| Error::Malformed("Content-Length".into()))?,
                    );
                }
            }
        }
        if status == 100 {
            continue;
        }
        let mut body = Vec::new();
        match len {
            Some(n) if n > MAX_RESPONSE_BYTES => {
                return Err(Error::Malformed("response too large".into()))
            }
            Some(n) => {
                body.resize(n, 0);
                r.read_exact(&mut body).map_err(Error::Read)?;
            }
            None => {
                r.take(MAX_RESPONSE_BYTES as u64)
                    .read_to_end(&mut body)
                    .map_err(Error::Read)?;
            }
        }
        let body =
            String::from_utf8(body).map_err(|_| Error::Malformed("body is not UTF-8".into()))?;
        return Ok(Response { status, body });
    }
}

/// Calls a Cloud Hypervisor API endpoint (`vm.info`, ...): the body on success, the server's
/// message as `Error::Server` otherwise.
pub fn simple_api_command(
    socket: &Path,
    method: &str,
    endpoint: &str,
    body: Option<&str>,
) -> Result<String, Error> {
    let r = request(socket, method, &format!("/api/v1/{endpoint}"), body)?;
    if (200..300).contains(&r.status) {
        Ok(r.body)
    } else {
        Err(Error::Server {
            status: r.status,
            message: r.body.trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_responses() {
        let raw = "HTTP/1.1 100 \r\n\r\nHTTP/1.1 200 \r\nContent-Length: 2\r\n\r\n{}";
        let r = read_response(&mut BufReader::new(raw.as_bytes())).unwrap();
        assert_eq!(
            r,
            Response {
                status: 200,
                body: "{}".into()
            }
        );
        let raw = "HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(
            read_response(&mut BufReader::new(raw.as_bytes()))
                .unwrap()
                .status,
            204
        );
        assert!(read_response(&mut BufReader::new("garbage\r\n".as_bytes())).is_err());
        assert!(read_response(&mut BufReader::new(
            "HTTP/1.1 200 OK\r\nContent-Le".as_bytes()
        ))
        .is_err());
    }
}
