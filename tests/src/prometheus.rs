//! A real Prometheus (Debian's `prometheus`) scraping the hello apps every second, and a
//! traffic generator for them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The share of the hello app's requests answered 500, by version (`{version}`), over 4 s.
pub const ERROR_RATE: &str = r#"sum(rate(hello_http_requests_total{code="500",version="{version}"}[4s])) / sum(rate(hello_http_requests_total{version="{version}"}[4s]))"#;

/// A running Prometheus.
pub struct Prometheus {
    /// Its port.
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Prometheus {
    /// Starts Prometheus scraping `127.0.0.1:<port>/metrics` for each of `targets`.
    pub fn start(work: &Path, targets: &[u16]) -> Prometheus {
        let list = targets
            .iter()
            .map(|p| format!("'127.0.0.1:{p}'"))
            .collect::<Vec<_>>()
            .join(", ");
        Prometheus::start_with(
            work,
            &format!("  - job_name: hello\n    static_configs:\n      - targets: [{list}]\n"),
        )
    }

    /// Starts Prometheus with these `scrape_configs` entries (YAML, indented by two), every
    /// second.
    pub fn start_with(work: &Path, scrape_configs: &str) -> Prometheus {
        let port = crate::free_port();
        let dir = work.join(format!("prometheus-{port}"));
        std::fs::create_dir_all(dir.join("data")).expect("mkdir");
        std::fs::write(
            dir.join("prometheus.yml"),
            format!(
                "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\nscrape_configs:\n{scrape_configs}"
            ),
        )
        .expect("config");
        let mut p = Prometheus {
            port,
            dir,
            child: None,
        };
        p.restart();
        p
    }

    /// Starts it again (same port and data).
    pub fn restart(&mut self) {
        let log = std::fs::File::create(self.dir.join("prometheus.log")).expect("log");
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                self.dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                self.dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{}", self.port))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus starts (apt-get install prometheus)");
        self.child = Some(child);
        crate::wait_for("prometheus", Duration::from_secs(30), || {
            crate::http_get(self.port, "/-/ready").filter(|(s, _)| *s == 200)
        });
    }

    /// Stops it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Waits until an instant query for `query` returns a value (Prometheus's first samples
    /// come some seconds after start: poll, never sleep a fixed time).
    pub fn wait_for_data(&self, query: &str) {
        let path = format!("/api/v1/query?query={}", urlencode(query));
        crate::wait_for(
            &format!("prometheus data for {query}"),
            Duration::from_secs(60),
            || {
                let (s, body) = crate::http_get(self.port, &path)?;
                (s == 200 && body.contains("\"value\"") && !body.contains("\"NaN\"")).then_some(())
            },
        );
    }

    /// The samples of an instant query: each series' labels and value.
    pub fn query(&self, query: &str) -> Vec<(serde_json::Value, f64)> {
        let path = format!("/api/v1/query?query={}", urlencode(query));
        let Some((200, body)) = crate::http_get(self.port, &path) else {
            return Vec::new();
        };
        let v: serde_json::Value = serde_json::from_str(&body).expect("prometheus answers JSON");
        v["data"]["result"]
            .as_array()
            .map(|r| {
                r.iter()
                    .map(|s| {
                        let value = s["value"][1].as_str().unwrap_or("NaN");
                        (s["metric"].clone(), value.parse().unwrap_or(f64::NAN))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until `query` has one sample equal to `value`; returns its labels.
    pub fn wait_for_value(&self, query: &str, value: f64) -> serde_json::Value {
        crate::wait_for(
            &format!("prometheus: {query} == {value}"),
            Duration::from_secs(60),
            || {
                let r = self.query(query);
                (r.len() == 1 && r[0].1 == value).then(|| r[0].0.clone())
            },
        )
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Requests to `/` of some apps, about `per_second` each, until dropped.
pub struct Traffic {
    stop: Arc<AtomicBool>,
}

impl Traffic {
    /// Starts sending.
    pub fn start(ports: &[u16], per_second: u32) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        for &port in ports {
            let stop = stop.clone();
            let pause = Duration::from_millis(1000 / u64::from(per_second.max(1)));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let _ = crate::http_get(port, "/");
                    std::thread::sleep(pause);
                }
            });
        }
        Traffic { stop }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
