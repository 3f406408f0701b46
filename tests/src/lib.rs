//! Support for drover's integration tests: the binaries under test, real peers (Git over
//! file/HTTP/git://, an HTTP artifact server), artifacts, and agent "hosts" with their own
//! state dir and app port.
//!
//! Everything a test starts is stopped when its handle drops; app processes started by
//! agents (which outlive the agents by design) are found by their `DROVER_INSTANCE` marker
//! under the test's directory and killed with it.

pub mod artifact;
pub mod coordinator;
pub mod ecs;
pub mod etcd;
pub mod faulty;
pub mod git;
pub mod haproxy;
pub mod host;
pub mod lighttpd;
pub mod nspawn;
pub mod prometheus;
pub mod receiver;
pub mod tls;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf()
}

/// The directory of the binaries under test (built once per test run).
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args([
                "build",
                "--quiet",
                "--bins",
                "-p",
                "drover-agent",
                "-p",
                "drover-example-hello",
                "-p",
                "drover-coordinator",
                "--manifest-path",
            ])
            .arg(workspace().join("Cargo.toml"))
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building the binaries under test failed");
        // This test binary is target/<profile>/deps/testsuite-<hash>.
        let exe = std::env::current_exe().expect("current exe");
        exe.parent()
            .and_then(Path::parent)
            .expect("target/<profile>")
            .to_path_buf()
    })
}

/// Path of a binary under test.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(p.is_file(), "{} not built", p.display());
    p
}

/// Builds `bin` of `package` with the release profile and returns its path, next to the
/// running benchmark's own binary (`target/release/`). For benchmarks.
pub fn release_bin(package: &str, bin: &str) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let ok = Command::new(cargo)
        .args(["build", "--release", "--quiet", "-p", package, "--bin", bin])
        .current_dir(workspace())
        .status()
        .expect("cargo")
        .success();
    assert!(ok, "building {bin} failed");
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/release")
        .join(bin)
}

/// A free TCP port on 127.0.0.1, never the same twice in this test process: tests run in
/// parallel, and two hosts handed the same released port would answer each other's health
/// checks. It is taken below the kernel's ephemeral range (`ip_local_port_range`): a port from
/// that range, once released, can become the source port of any outgoing connection on the
/// machine, and an app restarted on it (a rollback) would then fail to bind it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let (low, high) = port_range();
    let span = high - low;
    // Start at a place of its own, so that two test processes rarely walk the same ports.
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id().wrapping_mul(7919)
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos()))
            % span,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..span {
        let port = (low + NEXT.fetch_add(1, Ordering::Relaxed) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {low}..{high}");
}

/// The ports `free_port` hands out: from 10000 up to the ephemeral range, or above it when it
/// starts too low.
fn port_range() -> (u32, u32) {
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|n| n.parse::<u32>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999));
    if ephemeral.0 >= 12_000 {
        (10_000, ephemeral.0)
    } else if ephemeral.1 < 60_000 {
        (ephemeral.1 + 1, 65_535)
    } else {
        // No room outside it: any port, as the kernel would.
        (10_000, 65_535)
    }
}

/// A child process killed (and reaped) when dropped: a peer that lives as long as a test.
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `f` every 50 ms until it returns `Some`, or panics with `what` after `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > limit {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until something accepts connections on `port`.
pub fn wait_port(port: u16, limit: Duration) {
    wait_for(&format!("port {port}"), limit, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
}

/// A GET on 127.0.0.1, returning (status, body); `None` if nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    http_request(port, "GET", path, &[], b"")
}

/// An HTTP/1.1 request on 127.0.0.1 with extra header lines; (status, body) or `None`.
pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[String],
    body: &[u8],
) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    if !body.is_empty() {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).ok()?;
    // A server refusing a large body may close early: that is still an answer.
    let _ = s.write_all(body);
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let buf = String::from_utf8_lossy(&buf).into_owned();
    let status = buf.split_whitespace().nth(1)?.parse().ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Some((status, body))
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

/// Pids of live processes whose environment contains `DROVER_INSTANCE=<prefix>…`.
pub fn instance_pids(prefix: &Path) -> Vec<i32> {
    let needle = format!("DROVER_INSTANCE={}", prefix.display());
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
                .unwrap_or(true);
            !zombie
                && std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
                    env.split(|b| *b == 0)
                        .any(|kv| kv.starts_with(needle.as_bytes()))
                })
        })
        .collect()
}

/// Kills every app process started under `prefix` (and its process group).
pub fn kill_instances(prefix: &Path) {
    for pid in instance_pids(prefix) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

/// A per-test directory that also kills the app processes started under it when dropped.
pub struct TestDir {
    dir: tempfile::TempDir,
}

impl TestDir {
    /// A new directory under /tmp.
    pub fn new() -> TestDir {
        TestDir {
            dir: tempfile::Builder::new()
                .prefix("drover-test.")
                .tempdir()
                .expect("tempdir"),
        }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Default for TestDir {
    fn default() -> Self {
        TestDir::new()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        kill_instances(self.dir.path());
        if std::env::var_os("DROVER_TEST_KEEP").is_some() {
            let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"));
            eprintln!("kept test directory {}", dir.keep().display());
        }
    }
}

/// A tmpfs mounted for a test (needs root), unmounted when dropped, after the app processes
/// started under it are killed.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. `64m`) at `at`; `None` where mounting is not allowed.
    pub fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).expect("mkdir");
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        kill_instances(&self.0);
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}
