//! HTTP/1.1 over a Unix socket. Each connection gets its own thread (up to a limit) with read
//! and write timeouts, so a slow or stuck client holds only its own connection; requests are
//! bounded in size; nothing a client sends can panic the server.

use super::{route, ApiError, ApiMessage, ApiRequest, ApiResponse};
use log::{debug, warn};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use thiserror::Error;

pub const MAX_HEADER_BYTES: usize = 16 << 10;
pub const MAX_BODY_BYTES: usize = 1 << 20;
const MAX_CONNECTIONS: usize = 32;
const IO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum HttpServerError {
    #[error("Failed to bind the API socket {0}")]
    Bind(String, #[source] io::Error),
    #[error("Failed to start the API thread")]
    Thread(#[source] io::Error),
}

struct Request {
    method: String,
    path: String,
    body: Vec<u8>,
    keep_alive: bool,
}

enum ReadError {
    /// The client closed the connection (between requests).
    Closed,
    Io(io::Error),
    Bad(ApiError),
}

fn read_line(r: &mut impl BufRead, budget: &mut usize) -> Result<String, ReadError> {
    let mut line = Vec::new();
    let n = r
        .by_ref()
        .take(*budget as u64 + 1)
        .read_until(b'\n', &mut line)
        .map_err(ReadError::Io)?;
    if n == 0 {
        return Err(ReadError::Closed);
    }
    if n > *budget {
        return Err(ReadError::Bad(ApiError::BadRequest(format!(
            "Request header exceeds {MAX_HEADER_BYTES} bytes"
        ))));
    }
    *budget -= n;
    if !line.ends_with(b"\n") {
        return Err(ReadError::Closed);
    }
    String::from_utf8(line)
        .map(|s| s.trim_end_matches(['\r', '\n']).to_string())
        .map_err(|_| ReadError::Bad(ApiError::BadRequest("Request header is not UTF-8".into())))
}

fn read_request<S: Read + Write>(r: &mut BufReader<S>) -> Result<Request, ReadError> {
    let mut budget = MAX_HEADER_BYTES;
    let bad = |m: &str| ReadError::Bad(ApiError::BadRequest(m.to_string()));
    let mut first = read_line(r, &mut budget)?;
    while first.is_empty() {
        first = read_line(r, &mut budget)?; // tolerate stray CRLF between requests
    }
    let mut parts = first.split(' ');
    let (Some(method), Some(path), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("Malformed request line"));
    };
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(bad("Unsupported HTTP version"));
    }
    let mut content_length = 0usize;
    let mut keep_alive = version == "HTTP/1.1";
    let mut expect_continue = false;
    loop {
        let line = read_line(r, &mut budget).map_err(|e| match e {
            ReadError::Closed => bad("Truncated request header"),
            e => e,
        })?;
        if line.is_empty() {
            break;
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| bad("Malformed header line"))?;
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => {
                content_length = value.parse().map_err(|_| bad("Invalid Content-Length"))?;
            }
            "transfer-encoding" => {
                return Err(bad(
                    "Transfer-Encoding is not supported; send Content-Length",
                ))
            }
            "connection" => keep_alive = !value.eq_ignore_ascii_case("close"),
            "expect" => expect_continue = value.eq_ignore_ascii_case("100-continue"),
            _ => {}
        }
    }
    if content_length > MAX_BODY_BYTES {
        return Err(ReadError::Bad(ApiError::TooLarge(MAX_BODY_BYTES)));
    }
    if expect_continue && content_length > 0 {
        r.get_mut()
            .write_all(b"HTTP/1.1 100 \r\n\r\n")
            .map_err(ReadError::Io)?;
    }
    let mut body = vec![0; content_length];
    r.read_exact(&mut body)
        .map_err(|_| bad("Truncated request body"))?;
    Ok(Request {
        method: method.to_string(),
        path: path.to_string(),
        body,
        keep_alive,
    })
}

/// A recorded connection: reads come from the bytes, writes (`100 Continue`) go nowhere.
struct Replay<'a>(io::Cursor<&'a [u8]>);

impl Read for Replay<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Replay<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads and routes the requests in `input` as a connection that sent those bytes would have
/// them read and routed, without dispatching any: everything of the API a client reaches
/// before the VMM acts (the fuzz target `http_api`). Stops where the connection would close.
pub fn route_requests(input: &[u8]) -> Vec<Result<ApiRequest, ApiError>> {
    let mut r = BufReader::new(Replay(io::Cursor::new(input)));
    let mut out = Vec::new();
    loop {
        match read_request(&mut r) {
            Ok(req) => {
                out.push(route(&req.method, &req.path, &req.body));
                if !req.keep_alive {
                    return out;
                }
            }
            Err(ReadError::Bad(e)) => {
                out.push(Err(e));
                return out;
            }
            Err(ReadError::Closed | ReadError::Io(_)) => return out,
        }
    }
}

fn write_response(
    w: &mut UnixStream,
    status: u16,
    body: Option<(&str, &str)>,
    keep_alive: bool,
) -> io::Result<()> {
    let (ctype, text) = body.unwrap_or(("", ""));
    // An empty reason phrase, as Cloud Hypervisor's server writes it: its ch-remote takes
    // everything from the code to the line's end as the code.
    let mut head = format!("HTTP/1.1 {status} \r\nServer: vio-hypervisor\r\n");
    head.push_str(if keep_alive {
        "Connection: keep-alive\r\n"
    } else {
        "Connection: close\r\n"
    });
    if !ctype.is_empty() {
        head.push_str(&format!("Content-Type: {ctype}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", text.len()));
    w.write_all(head.as_bytes())?;
    w.write_all(text.as_bytes())?;
    w.flush()
}

fn write_error(w: &mut UnixStream, e: &ApiError, keep_alive: bool) -> io::Result<()> {
    let mut line = e.to_string().replace(['\n', '\r'], " ");
    line.push('\n');
    write_response(w, e.status(), Some(("text/plain", &line)), keep_alive)
}

/// With this variable in its environment (tests only), the VMM serves `SECCOMP_PROBE_PATH`:
/// the connection's thread makes a call no VMM thread may make, to show the filters bite.
pub const SECCOMP_PROBE_ENV: &str = "VIO_TEST_SECCOMP_PROBE";
pub const SECCOMP_PROBE_PATH: &str = "/api/v1/vmm.seccomp-probe";

/// Opens (and closes) an IPv4 socket: what a compromised VMM would do to reach the network.
fn seccomp_probe() {
    // SAFETY: socket() takes no pointers; the descriptor, if any, is closed at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    if fd >= 0 {
        // SAFETY: a descriptor this function owns.
        unsafe { libc::close(fd) };
    }
    warn!(
        "seccomp probe: an IPv4 socket was {}",
        if fd >= 0 { "opened" } else { "refused" }
    );
}

/// Hands `request` to the VMM and waits for its reply; the returned sender tells the VMM the
/// reply has been written.
fn dispatch(api: &Mutex<Sender<ApiMessage>>, request: ApiRequest) -> (ApiResponse, Sender<()>) {
    let (tx, rx) = channel();
    let (written_tx, written) = channel();
    let sent = api.lock().unwrap().send(ApiMessage {
        request,
        reply: tx,
        written,
    });
    let res = match sent {
        Err(_) => Err(ApiError::Internal("The VMM is shutting down".into())),
        Ok(()) => rx
            .recv()
            .unwrap_or_else(|_| Err(ApiError::Internal("The VMM dropped the request".into()))),
    };
    (res, written_tx)
}

fn serve(stream: UnixStream, api: Arc<Mutex<Sender<ApiMessage>>>) {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let Ok(mut w) = stream.try_clone() else {
        return;
    };
    let mut r = BufReader::new(stream);
    loop {
        let req = match read_request(&mut r) {
            Ok(req) => req,
            Err(ReadError::Closed) => return,
            Err(ReadError::Io(e)) => return debug!("API connection: {e}"),
            Err(ReadError::Bad(e)) => {
                let _ = write_error(&mut w, &e, false);
                return;
            }
        };
        if req.path == SECCOMP_PROBE_PATH && std::env::var_os(SECCOMP_PROBE_ENV).is_some() {
            seccomp_probe();
            let _ = write_response(&mut w, 204, None, false);
            return;
        }
        let routed = route(&req.method, &req.path, &req.body);
        if let Ok(ApiRequest::VmmShutdown) = routed {
            // The process exits once the VMM sees this: answer first.
            let _ = write_response(&mut w, 204, None, false);
            let _ = dispatch(&api, ApiRequest::VmmShutdown);
            return;
        }
        debug!("API: {} {} -> {routed:?}", req.method, req.path);
        let (reply, written) = match routed {
            Ok(r) => dispatch(&api, r),
            Err(e) => (Err(e), channel().0),
        };
        let res = match reply {
            Ok(Some(v)) => write_response(
                &mut w,
                200,
                Some(("application/json", &v.to_string())),
                req.keep_alive,
            ),
            Ok(None) => write_response(&mut w, 204, None, req.keep_alive),
            Err(e) => write_error(&mut w, &e, req.keep_alive),
        };
        let _ = w.flush();
        let _ = written.send(());
        if res.is_err() || !req.keep_alive {
            return;
        }
    }
}

/// Binds `path` (replacing a stale socket file) and serves it on a new thread.
pub fn start(path: &Path, api: Sender<ApiMessage>) -> Result<JoinHandle<()>, HttpServerError> {
    if path.exists() && UnixStream::connect(path).is_err() {
        let _ = std::fs::remove_file(path);
    }
    // The API can do anything to the VM: only its owner may connect. The socket is created
    // with that mode (a chmod after bind would leave a window in which anyone could connect
    // and be served later); the umask is the process's, so it is put back at once.
    // SAFETY: umask only swaps the process's file-creation mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(|e| HttpServerError::Bind(path.display().to_string(), e))?;
    let api = Arc::new(Mutex::new(api));
    let active = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("http-server".into())
        .spawn(move || {
            virtio_devices::seccomp::narrow("http-server");
            for stream in listener.incoming() {
                let mut stream = match stream {
                    Ok(s) => s,
                    Err(e) => {
                        warn!("API accept failed: {e}");
                        continue;
                    }
                };
                if active.load(Ordering::Acquire) >= MAX_CONNECTIONS {
                    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
                    let _ = write_response(
                        &mut stream,
                        503,
                        Some(("text/plain", "Too many connections\n")),
                        false,
                    );
                    continue;
                }
                active.fetch_add(1, Ordering::AcqRel);
                let (conn_api, conn_active) = (api.clone(), active.clone());
                let spawned =
                    std::thread::Builder::new()
                        .name("http-conn".into())
                        .spawn(move || {
                            virtio_devices::seccomp::narrow("http-conn");
                            serve(stream, conn_api);
                            conn_active.fetch_sub(1, Ordering::AcqRel);
                        });
                if spawned.is_err() {
                    active.fetch_sub(1, Ordering::AcqRel);
                    warn!("API: cannot start a connection thread");
                }
            }
        })
        .map_err(HttpServerError::Thread)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_connection_is_read_as_a_live_one() {
        let input = b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n\r\n\
            PUT /api/v1/vm.reclaim HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 12\r\n\r\n{\"bytes\":10}\
            PUT /api/v1/vm.pause HTTP/1.0\r\n\r\n\
            GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n";
        let got = route_requests(input);
        assert_eq!(got.len(), 3, "HTTP/1.0 closes the connection: {got:?}");
        assert!(matches!(got[0], Ok(ApiRequest::VmmPing)));
        assert!(
            matches!(got[1], Ok(ApiRequest::VmReclaim { .. })),
            "{got:?}"
        );
        assert!(matches!(got[2], Ok(ApiRequest::VmPause)));

        let got = route_requests(b"GET /api/v1/vmm.ping HTTP/1.1\r\ncontent-length: x\r\n\r\n");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].as_ref().unwrap_err().status(), 400);
        assert!(route_requests(b"GET /api/v1/vmm.ping HTTP/1.1\r\n").len() == 1);
        assert!(route_requests(b"").is_empty());
    }
}
