//! HAProxy as the load balancer in front of several coordinators: one URL for the agents,
//! sent to whichever coordinator answers `/healthz` (standbys do not listen).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// A running haproxy, stopped when dropped.
pub struct Haproxy {
    /// The port it listens on.
    pub port: u16,
    _child: crate::Killed,
}

impl Haproxy {
    /// Balances `backends` (ports on 127.0.0.1), health-checking `GET /healthz` every
    /// 200 ms; its log goes to `dir/haproxy.log`.
    pub fn start(dir: &Path, backends: &[u16]) -> Haproxy {
        let port = crate::free_port();
        let mut conf = format!(
            "global\n  maxconn 512\n\
             defaults\n  mode http\n  timeout connect 1s\n  timeout client 60s\n  \
             timeout server 60s\n  retries 2\n  option redispatch\n\
             listen coordinators\n  bind 127.0.0.1:{port}\n  option httpchk GET /healthz\n  \
             http-check expect status 200\n  default-server inter 200ms fall 1 rise 1\n"
        );
        for (i, b) in backends.iter().enumerate() {
            conf.push_str(&format!("  server c{i} 127.0.0.1:{b} check\n"));
        }
        let path = dir.join(format!("haproxy-{port}.cfg"));
        std::fs::write(&path, conf).expect("haproxy config");
        let log = std::fs::File::create(dir.join("haproxy.log")).expect("haproxy log");
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("haproxy runs (apt install haproxy)");
        crate::wait_port(port, Duration::from_secs(10));
        Haproxy {
            port,
            _child: crate::Killed(child),
        }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}
