//! `hello`: a tiny HTTP service for drover's quickstart and tests.
//!
//! `hello --port 8080` serves:
//! - `/` — a greeting (with the configured error rate and latency);
//! - `/health` — 200, or 500 in a broken build;
//! - `/version` — the version;
//! - `/metrics` — Prometheus metrics (requests by code, a latency histogram).
//!
//! Its behaviour comes from `release.env` in the working directory (the release), so a
//! "broken" build is the same binary with a different `release.env`:
//! `VERSION=1.2.0`, `FAIL_HEALTH=1`, `ERROR_RATE=0.05` (fraction of `/` answered 500),
//! `LATENCY_MS=20` (added to `/`), `EXIT_AT_START=1` (exit at once with status 3),
//! `HANG_HEALTH=1` (`/health` never answers), `FAIL_ON_HOSTS=h3,h4` (`/health` fails when
//! the environment variable `HELLO_HOST` is one of them: a version broken on some hosts only),
//! `FAIL_IF_EXISTS=/path` (`/health` fails while that file exists: an outage of something the
//! version depends on, fixed without a new version).
//! Environment variables of the same names override the file.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Upper bounds of the latency histogram, in seconds.
const BUCKETS: [f64; 8] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

struct Settings {
    version: String,
    fail_health: bool,
    hang_health: bool,
    fail_if_exists: Option<std::path::PathBuf>,
    error_rate: f64,
    latency: Duration,
}

#[derive(Default)]
struct Metrics {
    ok: AtomicU64,
    errors: AtomicU64,
    /// Cumulative counts per bucket, then +Inf.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    /// Sum of latencies in microseconds.
    sum_us: AtomicU64,
    /// Requests to `/` so far, to spread errors evenly.
    seen: AtomicU64,
}

fn settings() -> Settings {
    let mut vars: HashMap<String, String> = std::fs::read_to_string("release.env")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    for key in [
        "VERSION",
        "FAIL_HEALTH",
        "ERROR_RATE",
        "LATENCY_MS",
        "EXIT_AT_START",
        "FAIL_ON_HOSTS",
    ] {
        if let Ok(v) = std::env::var(key) {
            vars.insert(key.to_string(), v);
        }
    }
    if vars.get("EXIT_AT_START").is_some_and(|v| v == "1") {
        eprintln!("hello: EXIT_AT_START=1, exiting");
        std::process::exit(3);
    }
    Settings {
        version: vars.get("VERSION").cloned().unwrap_or_else(|| "dev".into()),
        fail_health: vars.get("FAIL_HEALTH").is_some_and(|v| v == "1")
            || vars.get("FAIL_ON_HOSTS").is_some_and(|hosts| {
                let me = std::env::var("HELLO_HOST").unwrap_or_default();
                hosts.split(',').any(|h| !me.is_empty() && h.trim() == me)
            }),
        hang_health: vars.get("HANG_HEALTH").is_some_and(|v| v == "1"),
        fail_if_exists: vars
            .get("FAIL_IF_EXISTS")
            .filter(|p| !p.is_empty())
            .map(std::path::PathBuf::from),
        error_rate: vars
            .get("ERROR_RATE")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0),
        latency: Duration::from_millis(
            vars.get("LATENCY_MS")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        ),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let port = args
        .iter()
        .position(|a| a == "--port")
        .and_then(|i| args.get(i + 1))
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap_or_else(|| {
            eprintln!("usage: hello --port PORT");
            std::process::exit(2);
        });
    let s = Arc::new(settings());
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap_or_else(|e| {
        eprintln!("hello: cannot listen on 127.0.0.1:{port}: {e}");
        std::process::exit(1);
    });
    eprintln!("hello {} listening on 127.0.0.1:{port}", s.version);
    let metrics = Arc::new(Metrics::default());
    for stream in listener.incoming().flatten() {
        let (s, m) = (s.clone(), metrics.clone());
        std::thread::spawn(move || {
            let _ = serve(stream, &s, &m);
        });
    }
}

fn serve(stream: TcpStream, s: &Settings, m: &Metrics) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        let mut request = String::new();
        if reader.read_line(&mut request)? == 0 {
            return Ok(());
        }
        let mut keep_alive = true;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 || header == "\r\n" || header == "\n" {
                break;
            }
            if header.to_ascii_lowercase().starts_with("connection: close") {
                keep_alive = false;
            }
        }
        let path = request.split_whitespace().nth(1).unwrap_or("/");
        let (status, body) = route(path, s, m);
        let reason = if status == 200 { "OK" } else { "Error" };
        write!(
            out,
            "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n{body}",
            body.len(),
            if keep_alive {
                ""
            } else {
                "Connection: close\r\n"
            }
        )?;
        out.flush()?;
        if !keep_alive {
            return Ok(());
        }
    }
}

fn route(path: &str, s: &Settings, m: &Metrics) -> (u16, String) {
    match path {
        "/health" if s.hang_health => {
            std::thread::sleep(Duration::from_secs(3600));
            (500, String::new())
        }
        "/health" if s.fail_health => (500, "unhealthy (broken build)\n".into()),
        "/health" if s.fail_if_exists.as_ref().is_some_and(|p| p.exists()) => {
            (500, "unhealthy (a dependency is down)\n".into())
        }
        "/health" => (200, "ok\n".into()),
        "/version" => (200, format!("{}\n", s.version)),
        "/metrics" => (200, metrics_text(s, m)),
        _ => {
            let start = Instant::now();
            std::thread::sleep(s.latency);
            let n = m.seen.fetch_add(1, Ordering::Relaxed) + 1;
            // Deterministic spread: request n fails when floor(n*rate) moves.
            let fail =
                ((n as f64) * s.error_rate).floor() > (((n - 1) as f64) * s.error_rate).floor();
            let took = start.elapsed();
            let secs = took.as_secs_f64();
            for (i, b) in BUCKETS.iter().enumerate() {
                if secs <= *b {
                    m.buckets[i].fetch_add(1, Ordering::Relaxed);
                }
            }
            m.buckets[BUCKETS.len()].fetch_add(1, Ordering::Relaxed);
            m.sum_us
                .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
            if fail {
                m.errors.fetch_add(1, Ordering::Relaxed);
                (500, "injected error\n".into())
            } else {
                m.ok.fetch_add(1, Ordering::Relaxed);
                (200, format!("hello from {}\n", s.version))
            }
        }
    }
}

fn metrics_text(s: &Settings, m: &Metrics) -> String {
    let mut t = String::new();
    t.push_str("# HELP hello_http_requests_total Requests to / by status code.\n");
    t.push_str("# TYPE hello_http_requests_total counter\n");
    t.push_str(&format!(
        "hello_http_requests_total{{code=\"200\",version=\"{}\"}} {}\n",
        s.version,
        m.ok.load(Ordering::Relaxed)
    ));
    t.push_str(&format!(
        "hello_http_requests_total{{code=\"500\",version=\"{}\"}} {}\n",
        s.version,
        m.errors.load(Ordering::Relaxed)
    ));
    t.push_str("# HELP hello_http_request_duration_seconds Latency of /.\n");
    t.push_str("# TYPE hello_http_request_duration_seconds histogram\n");
    for (i, b) in BUCKETS.iter().enumerate() {
        t.push_str(&format!(
            "hello_http_request_duration_seconds_bucket{{le=\"{b}\",version=\"{}\"}} {}\n",
            s.version,
            m.buckets[i].load(Ordering::Relaxed)
        ));
    }
    let count = m.buckets[BUCKETS.len()].load(Ordering::Relaxed);
    t.push_str(&format!(
        "hello_http_request_duration_seconds_bucket{{le=\"+Inf\",version=\"{}\"}} {count}\n",
        s.version
    ));
    t.push_str(&format!(
        "hello_http_request_duration_seconds_sum{{version=\"{}\"}} {}\n",
        s.version,
        m.sum_us.load(Ordering::Relaxed) as f64 / 1e6
    ));
    t.push_str(&format!(
        "hello_http_request_duration_seconds_count{{version=\"{}\"}} {count}\n",
        s.version
    ));
    t.push_str(&format!(
        "hello_version_info{{version=\"{}\"}} 1\n",
        s.version
    ));
    t
}
