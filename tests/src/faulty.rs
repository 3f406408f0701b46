//! A scripted HTTP server for the failures no real artifact server produces on demand:
//! errors then success, bodies cut short, responses that never come. It is a fake on
//! purpose, and only used for those cases; plain downloads use lighttpd.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What to answer on a path.
#[derive(Clone, Debug)]
pub enum Script {
    /// 200 with this body.
    Body(Vec<u8>),
    /// This status, empty body.
    Status(u16),
    /// `n` times this status, then the body.
    FailThen(usize, u16, Vec<u8>),
    /// Announce the full length, send only the first `cut` bytes, close.
    Truncate(Vec<u8>, usize),
    /// Accept, read the request, never answer.
    Hang,
}

/// A running scripted server.
pub struct Faulty {
    /// Its port.
    pub port: u16,
    scripts: Arc<Mutex<HashMap<String, Script>>>,
    hits: Arc<Mutex<HashMap<String, usize>>>,
    stop: Arc<AtomicBool>,
}

impl Faulty {
    /// Starts the server with no scripts (everything 404).
    pub fn start() -> Faulty {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let scripts: Arc<Mutex<HashMap<String, Script>>> = Arc::default();
        let hits: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (s, h, st) = (scripts.clone(), hits.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(mut conn) = conn else { continue };
                let (s, h) = (s.clone(), h.clone());
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
                    let mut line = String::new();
                    if reader.read_line(&mut line).is_err() {
                        return;
                    }
                    loop {
                        let mut hdr = String::new();
                        if reader.read_line(&mut hdr).unwrap_or(0) == 0 || hdr == "\r\n" {
                            break;
                        }
                    }
                    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                    let n = {
                        let mut h = h.lock().unwrap();
                        let c = h.entry(path.clone()).or_default();
                        *c += 1;
                        *c
                    };
                    let script = s.lock().unwrap().get(&path).cloned();
                    let head = |status: u16, len: usize| {
                        format!(
                            "HTTP/1.1 {status} X\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
                        )
                    };
                    let _ = match script {
                        None => conn.write_all(head(404, 0).as_bytes()),
                        Some(Script::Status(c)) => conn.write_all(head(c, 0).as_bytes()),
                        Some(Script::Body(b)) => conn
                            .write_all(head(200, b.len()).as_bytes())
                            .and_then(|()| conn.write_all(&b)),
                        Some(Script::FailThen(k, c, _)) if n <= k => {
                            conn.write_all(head(c, 0).as_bytes())
                        }
                        Some(Script::FailThen(_, _, b)) => conn
                            .write_all(head(200, b.len()).as_bytes())
                            .and_then(|()| conn.write_all(&b)),
                        Some(Script::Truncate(b, cut)) => conn
                            .write_all(head(200, b.len()).as_bytes())
                            .and_then(|()| conn.write_all(&b[..cut])),
                        Some(Script::Hang) => {
                            std::thread::sleep(Duration::from_secs(3600));
                            Ok(())
                        }
                    };
                });
            }
        });
        Faulty {
            port,
            scripts,
            hits,
            stop,
        }
    }

    /// Scripts `path`.
    pub fn set(&self, path: &str, script: Script) {
        self.scripts
            .lock()
            .unwrap()
            .insert(path.to_string(), script);
    }

    /// How many requests `path` got.
    pub fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    /// The base URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Faulty {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
    }
}
