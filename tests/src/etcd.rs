//! A real etcd cluster for the tests: three members on loopback (TESTING.md, "A 3-member etcd
//! cluster"), each killable with SIGKILL and restartable on its data directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// One member.
struct Member {
    name: String,
    client: u16,
    peer: u16,
    dir: PathBuf,
    child: Option<Child>,
}

/// A cluster of three members, stopped when dropped.
pub struct Etcd {
    members: Vec<Member>,
    token: String,
    log: PathBuf,
    tls: Option<Tls>,
}

/// Client TLS of a cluster started by [`Etcd::start_tls`].
struct Tls {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    /// What etcdctl presents.
    client: (PathBuf, PathBuf),
}

impl Etcd {
    /// Starts three members under `dir/etcd` and waits until the cluster answers.
    pub fn start(dir: &Path) -> Etcd {
        Etcd::start_with(dir, None)
    }

    /// [`Etcd::start`], its clients served over TLS with `ca`'s server certificate, and
    /// only clients with a certificate `ca` signed let in (`--client-cert-auth`).
    pub fn start_tls(dir: &Path, ca: &crate::tls::TestCa) -> Etcd {
        Etcd::start_with(
            dir,
            Some(Tls {
                ca: ca.ca.clone(),
                cert: ca.cert.clone(),
                key: ca.key.clone(),
                client: ca.client("etcdctl"),
            }),
        )
    }

    fn start_with(dir: &Path, tls: Option<Tls>) -> Etcd {
        let base = dir.join("etcd");
        std::fs::create_dir_all(&base).expect("mkdir");
        let members: Vec<Member> = (1..=3)
            .map(|i| Member {
                name: format!("e{i}"),
                client: crate::free_port(),
                peer: crate::free_port(),
                dir: base.join(format!("e{i}")),
                child: None,
            })
            .collect();
        let mut e = Etcd {
            members,
            token: format!("drover-test-{}-{}", std::process::id(), crate::free_port()),
            log: base.join("etcd.log"),
            tls,
        };
        for i in 0..3 {
            e.spawn(i, "new");
        }
        e.wait_healthy();
        e
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&mut self, i: usize, state: &str) {
        let cluster = self.initial_cluster();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("etcd log");
        let scheme = self.scheme();
        let m = &mut self.members[i];
        let client = format!("{scheme}://127.0.0.1:{}", m.client);
        let peer = format!("http://127.0.0.1:{}", m.peer);
        let mut etcd = Command::new("etcd");
        if let Some(t) = &self.tls {
            etcd.arg("--cert-file")
                .arg(&t.cert)
                .arg("--key-file")
                .arg(&t.key)
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--client-cert-auth");
        }
        let child = etcd
            .args(["--name", &m.name, "--data-dir"])
            .arg(&m.dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &cluster])
            .args(["--initial-cluster-state", state])
            .args(["--initial-cluster-token", &self.token])
            // drover's batches are transactions of up to this many keys.
            .args(["--max-txn-ops", "1024"])
            .args(["--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd runs (apt install etcd-server)");
        m.child = Some(child);
    }

    /// Waits until every running member reports healthy.
    pub fn wait_healthy(&self) {
        let endpoints = self.running_endpoints();
        crate::wait_for("etcd to be healthy", Duration::from_secs(30), || {
            self.etcdctl()
                .args(["--endpoints", &endpoints, "endpoint", "health"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .ok()
                .filter(|s| s.success())
        });
    }

    /// `etcdctl`, with the client certificate when the cluster wants one.
    fn etcdctl(&self) -> Command {
        let mut c = Command::new("etcdctl");
        c.env("ETCDCTL_API", "3");
        if let Some(t) = &self.tls {
            c.arg("--cacert")
                .arg(&t.ca)
                .arg("--cert")
                .arg(&t.client.0)
                .arg("--key")
                .arg(&t.client.1);
        }
        c
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    fn running_endpoints(&self) -> String {
        self.members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| format!("{}://127.0.0.1:{}", self.scheme(), m.client))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The client URLs of every member.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("{}://127.0.0.1:{}", self.scheme(), m.client))
            .collect()
    }

    /// Kills member `i` with SIGKILL.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Restarts member `i` on its data directory.
    pub fn restart(&mut self, i: usize) {
        self.spawn(i, "existing");
        self.wait_healthy();
    }

    /// Runs `etcdctl` with `args` against the cluster; its stdout.
    pub fn ctl(&self, args: &[&str]) -> String {
        let out = self
            .etcdctl()
            .args(["--endpoints", &self.running_endpoints()])
            .args(args)
            .output()
            .expect("etcdctl runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
