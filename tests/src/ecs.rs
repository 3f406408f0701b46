//! ECS mode against moto_server: the server, its setup (VPC, ALB, target groups, listener,
//! cluster, task definition, blue service), a scheduler stand-in (moto starts no tasks), and a
//! proxy in front of moto that records every AWS call and can throttle some.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::TestDir;
use crate::git::Repo;
use crate::host::Out;

/// Tasks per ECS service in the tests (moto reports this many running).
pub const TASKS: u32 = 2;

/// A moto server.
pub struct Moto {
    /// Its port.
    pub port: u16,
    _child: crate::Killed,
}

impl Moto {
    /// Starts moto_server on a free port.
    pub fn start(dir: &Path) -> Moto {
        let port = crate::free_port();
        let log = std::fs::File::create(dir.join(format!("moto-{port}.log"))).expect("log");
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            // moto starts no tasks; this makes its services report this many running.
            .env("MOTO_ECS_SERVICE_RUNNING", TASKS.to_string())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("moto_server starts (pip install 'moto[server]')");
        crate::wait_for("moto", Duration::from_secs(30), || {
            crate::http_get(port, "/moto-api/").filter(|(s, _)| *s == 200)
        });
        Moto {
            port,
            _child: crate::Killed(child),
        }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// One recorded AWS call.
#[derive(Clone, Debug)]
pub struct Call {
    /// `ModifyListener`, `UpdateService`, … (ELBv2 `Action=` or the ECS target's operation).
    pub action: String,
    /// The request body.
    pub body: String,
    /// When it came.
    pub at: std::time::Instant,
}

impl Call {
    /// For a ModifyListener/ModifyRule call: (target group ARN, weight) pairs, in order.
    pub fn weights(&self) -> Vec<(String, u32)> {
        let mut arns = HashMap::new();
        let mut weights = HashMap::new();
        for kv in self.body.split('&') {
            let Some((k, v)) = kv.split_once('=') else {
                continue;
            };
            let v = urldecode(v);
            if let Some(idx) = k
                .strip_suffix(".TargetGroupArn")
                .and_then(|k| k.rsplit('.').next())
            {
                if k.contains("ForwardConfig.TargetGroups.member") {
                    arns.insert(idx.parse::<u32>().unwrap_or(0), v);
                }
            } else if let Some(idx) = k.strip_suffix(".Weight").and_then(|k| k.rsplit('.').next()) {
                weights.insert(idx.parse::<u32>().unwrap_or(0), v.parse().unwrap_or(0));
            }
        }
        let mut idx: Vec<u32> = arns.keys().copied().collect();
        idx.sort();
        idx.into_iter()
            .map(|i| (arns[&i].clone(), weights.get(&i).copied().unwrap_or(1)))
            .collect()
    }
}

fn urldecode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap_or(b'?'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A recording, throttling HTTP proxy in front of moto (a fake on purpose: AWS throttling
/// cannot be produced on demand otherwise).
pub struct Proxy {
    /// Its port.
    pub port: u16,
    calls: Arc<Mutex<Vec<Call>>>,
    throttle: Arc<Mutex<HashMap<String, u32>>>,
}

impl Proxy {
    /// Forwards to 127.0.0.1:`upstream`.
    pub fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let calls: Arc<Mutex<Vec<Call>>> = Arc::default();
        let throttle: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let (c, t) = (calls.clone(), throttle.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (c, t) = (c.clone(), t.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, upstream, &c, &t);
                });
            }
        });
        Proxy {
            port,
            calls,
            throttle,
        }
    }

    /// Its URL (the agents' AWS_ENDPOINT_URL).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Throttles the next `n` calls of `action` (`u32::MAX`: always).
    pub fn throttle(&self, action: &str, n: u32) {
        self.throttle.lock().unwrap().insert(action.into(), n);
    }

    /// The calls so far.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    /// The calls of one action.
    pub fn calls_of(&self, action: &str) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.action == action)
            .collect()
    }

    /// Forgets the calls so far.
    pub fn clear(&self) {
        self.calls.lock().unwrap().clear();
    }
}

fn serve(
    client: TcpStream,
    upstream: u16,
    calls: &Mutex<Vec<Call>>,
    throttle: &Mutex<HashMap<String, u32>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut out = client;
    loop {
        let mut head = Vec::new();
        let mut line = String::new();
        let mut length = 0usize;
        let mut target = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let lower = line.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
            if lower.starts_with("x-amz-target:") {
                target = line.split(':').nth(1).unwrap_or("").trim().to_string();
            }
            if lower.starts_with("connection:") {
                continue;
            }
            if line == "\r\n" {
                head.extend_from_slice(b"Connection: close\r\n\r\n");
                break;
            }
            head.extend_from_slice(line.as_bytes());
        }
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body)?;
        let text = String::from_utf8_lossy(&body).into_owned();
        let action = if target.is_empty() {
            text.split('&')
                .find_map(|kv| kv.strip_prefix("Action="))
                .unwrap_or("")
                .to_string()
        } else {
            target.rsplit('.').next().unwrap_or("").to_string()
        };
        calls.lock().unwrap().push(Call {
            action: action.clone(),
            body: text,
            at: std::time::Instant::now(),
        });
        let throttled = {
            let mut t = throttle.lock().unwrap();
            match t.get_mut(&action) {
                Some(n) if *n > 0 => {
                    if *n != u32::MAX {
                        *n -= 1;
                    }
                    true
                }
                _ => false,
            }
        };
        if throttled {
            let (ctype, body) = if target.is_empty() {
                ("text/xml", "<ErrorResponse><Error><Type>Sender</Type><Code>Throttling</Code><Message>Rate exceeded</Message></Error><RequestId>t</RequestId></ErrorResponse>".to_string())
            } else {
                (
                    "application/x-amz-json-1.1",
                    r#"{"__type":"ThrottlingException","message":"Rate exceeded"}"#.to_string(),
                )
            };
            write!(
                out,
                "HTTP/1.1 400 Bad Request\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: keep-alive\r\n\r\n{body}",
                body.len()
            )?;
            out.flush()?;
            continue;
        }
        let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
        up.write_all(&head)?;
        up.write_all(&body)?;
        let mut resp = Vec::new();
        up.read_to_end(&mut resp)?;
        // Keep the client's connection open: rewrite moto's "Connection: close".
        let resp = String::from_utf8_lossy(&resp).replacen(
            "Connection: close",
            "Connection: keep-alive",
            1,
        );
        out.write_all(resp.as_bytes())?;
        out.flush()?;
    }
}

/// A test ECS setup: moto, the proxy, the scheduler, the repo, an agent config.
pub struct Ecs {
    /// Test directory.
    pub dir: TestDir,
    /// moto.
    pub moto: Moto,
    /// The proxy the agent talks to.
    pub proxy: Proxy,
    /// The desired-state repo.
    pub repo: Repo,
    /// ARNs from the setup (`cluster`, `listener`, `blue`, `green`, `subnets`, `sg`,
    /// `other_listener`, `other_tg`).
    pub arns: Value,
    scheduler: Child,
    /// The agent config.
    pub config: PathBuf,
}

/// The ECS service name in the tests.
pub const SERVICE: &str = "web";

impl Ecs {
    /// Sets everything up with the blue service on 1.0.0 and the repo pinning 1.0.0.
    pub fn new(ecs_extra: &str) -> Ecs {
        let dir = TestDir::new();
        let moto = Moto::start(dir.path());
        let out = Command::new("python3")
            .arg(crate::workspace().join("tests/ecs/setup.py"))
            .args([&moto.url(), SERVICE, &image("1.0.0"), &TASKS.to_string()])
            .output()
            .expect("python3 runs");
        assert!(
            out.status.success(),
            "setup.py: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let arns: Value = serde_json::from_slice(&out.stdout).expect("setup json");
        let scheduler = Command::new("python3")
            .arg(crate::workspace().join("tests/ecs/scheduler.py"))
            .args([&moto.url(), arns["cluster"].as_str().unwrap()])
            .arg(dir.path().join("broken-images"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("scheduler.log")).expect("log"))
            .spawn()
            .expect("scheduler starts");
        let proxy = Proxy::start(moto.port);
        let repo = Repo::init(&dir.path().join("fleet"));
        let config = dir.path().join("agent.yaml");
        std::fs::write(
            &config,
            format!(
                "host: ecs-agent\nenvironment: prod\nrepo: {{ url: \"{}\", poll_interval: 1s }}\nstate_dir: {}\nmode: ecs\necs: {{ cluster: {}, region: us-east-1, poll_interval: 200ms }}\n",
                repo.dir.display(),
                dir.path().join("state").display(),
                arns["cluster"].as_str().unwrap()
            ),
        )
        .expect("config");
        let e = Ecs {
            dir,
            moto,
            proxy,
            repo,
            arns,
            scheduler,
            config,
        };
        e.write_service(ecs_extra);
        e.pin("1.0.0");
        e
    }

    /// Writes services/web.yaml with the setup's ARNs; `extra` lines go into `ecs:`.
    pub fn write_service(&self, extra: &str) {
        self.write_service_with(extra, "");
    }

    /// Like [`Ecs::write_service`], with top-level `tail` (e.g. a `verify:` block) after `ecs:`.
    pub fn write_service_with(&self, extra: &str, tail: &str) {
        let a = &self.arns;
        let mut ecs = format!(
            "  cluster: {}\n  task_family: {SERVICE}\n  container: {SERVICE}\n  image: \"repo/{SERVICE}:{{version}}\"\n  desired_count: {TASKS}\n  listener_arn: \"{}\"\n  target_groups: {{ blue: \"{}\", green: \"{}\" }}\n  step_wait: 0s\n  drain: 0s\n  health_timeout: 30s\n  container_port: 8080\n  network: {{ subnets: {}, security_groups: [\"{}\"] }}\n",
            a["cluster"].as_str().unwrap(),
            a["listener"].as_str().unwrap(),
            a["blue"].as_str().unwrap(),
            a["green"].as_str().unwrap(),
            a["subnets"],
            a["sg"].as_str().unwrap()
        );
        // `extra` lines replace the keys they set.
        for line in extra.lines() {
            if let Some((key, _)) = line.trim().split_once(':') {
                ecs = ecs
                    .lines()
                    .filter(|l| !l.trim_start().starts_with(&format!("{key}:")))
                    .map(|l| format!("{l}\n"))
                    .collect();
            }
            ecs.push_str(line);
            ecs.push('\n');
        }
        self.repo.write(
            &format!("services/{SERVICE}.yaml"),
            &format!("service: {SERVICE}\nkind: ecs\necs:\n{ecs}{tail}"),
        );
        self.repo.commit("service definition");
    }

    /// Pins the service to `version` in environment prod.
    pub fn pin(&self, version: &str) {
        self.repo.write(
            "environments/prod.yaml",
            &format!("environment: prod\nservices:\n  {SERVICE}: {{ version: {version} }}\n"),
        );
        self.repo.commit(&format!("{SERVICE} {version}"));
    }

    /// Makes `version`'s image never healthy (the scheduler withholds its targets).
    pub fn break_version(&self, version: &str) {
        let path = self.dir.path().join("broken-images");
        let mut text = std::fs::read_to_string(&path).unwrap_or_default();
        text.push_str(&format!("{}\n", image(version)));
        std::fs::write(path, text).expect("write");
    }

    /// The command `drover-agent ARGS` against the proxy.
    pub fn agent_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(crate::bin("drover-agent"));
        cmd.arg("--config")
            .arg(&self.config)
            .args(args)
            .env("AWS_ENDPOINT_URL", self.proxy.url())
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env_remove("JOURNAL_STREAM");
        cmd
    }

    /// `drover-agent ARGS` against the proxy, with `env`.
    pub fn agent(&self, args: &[&str], env: &[(&str, &str)]) -> Out {
        self.agent_cmd(args)
            .envs(env.iter().copied())
            .output()
            .expect("agent runs")
            .into()
    }

    /// What moto holds (inspect.py), optionally setting the weights first.
    pub fn inspect(&self, set: Option<(u32, u32)>) -> Value {
        let mut cmd = Command::new("python3");
        cmd.arg(crate::workspace().join("tests/ecs/moto_inspect.py"))
            .args([
                &self.moto.url(),
                self.arns["cluster"].as_str().unwrap(),
                SERVICE,
                self.arns["listener"].as_str().unwrap(),
            ]);
        if let Some((b, g)) = set {
            cmd.args([
                "set-weights",
                self.arns["blue"].as_str().unwrap(),
                &b.to_string(),
                self.arns["green"].as_str().unwrap(),
                &g.to_string(),
            ]);
        }
        let out = cmd.output().expect("inspect runs");
        assert!(
            out.status.success(),
            "moto_inspect.py: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("json")
    }

    /// (blue, green) weights from moto.
    pub fn weights(&self) -> (u64, u64) {
        let v = self.inspect(None);
        let w = |k: &str| {
            v["weights"][self.arns[k].as_str().unwrap()]
                .as_u64()
                .unwrap_or(0)
        };
        (w("blue"), w("green"))
    }

    /// The weight pairs of every ModifyListener call, as (blue, green).
    pub fn weight_calls(&self) -> Vec<(u32, u32)> {
        self.timed_weight_calls()
            .into_iter()
            .map(|(w, _)| w)
            .collect()
    }

    /// [`Ecs::weight_calls`] with when each came.
    pub fn timed_weight_calls(&self) -> Vec<((u32, u32), std::time::Instant)> {
        let (b, g) = (
            self.arns["blue"].as_str().unwrap(),
            self.arns["green"].as_str().unwrap(),
        );
        self.proxy
            .calls_of("ModifyListener")
            .iter()
            .map(|c| {
                let w = c.weights();
                let of = |arn: &str| w.iter().filter(|(a, _)| a == arn).map(|(_, x)| *x).sum();
                ((of(b), of(g)), c.at)
            })
            .collect()
    }
}

impl Drop for Ecs {
    fn drop(&mut self) {
        let _ = self.scheduler.kill();
        let _ = self.scheduler.wait();
    }
}

/// The image of `version`.
pub fn image(version: &str) -> String {
    format!("repo/{SERVICE}:{version}")
}
