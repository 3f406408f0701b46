//! The notification receiver (`tests/notify/receiver.py`): a local stand-in for Slack,
//! PagerDuty, Jira and webhook receivers, which checks each request against the service's
//! documented format and records it. A fake on purpose: no such service is reachable here.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

/// PagerDuty routing keys are 32 characters.
pub const PD_KEY: &str = "R0UTINGKEY0123456789abcdef012345";
/// The webhook channel's HMAC secret.
pub const HOOK_SECRET: &str = "hook-secret-of-the-tests";
/// The Slack app's signing secret.
pub const SLACK_SIGNING: &str = "8f742231b10e8888abcd99yyyzzz85a5";
/// Jira's account and API token.
pub const JIRA_EMAIL: &str = "ops@example.com";
/// Jira's API token.
pub const JIRA_TOKEN: &str = "jira-api-token";

/// A running receiver.
pub struct Receiver {
    /// Its port.
    pub port: u16,
    /// Its request log (JSON lines).
    pub log: PathBuf,
    child: Child,
}

impl Receiver {
    /// Starts it on `port`, logging under `dir`.
    pub fn start(dir: &Path, port: u16) -> Receiver {
        let log = dir.join(format!("receiver-{port}.jsonl"));
        let auth = format!(
            "Basic {}",
            base64(format!("{JIRA_EMAIL}:{JIRA_TOKEN}").as_bytes())
        );
        let child = Command::new("python3")
            .arg(crate::workspace().join("tests/notify/receiver.py"))
            .args(["--port", &port.to_string(), "--log"])
            .arg(&log)
            .args(["--hook-secret", HOOK_SECRET, "--jira-auth", &auth])
            .args(["--slack-token", "xoxb-test"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 runs the receiver");
        crate::wait_port(port, Duration::from_secs(20));
        Receiver { port, log, child }
    }

    /// Its base URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("receiver log line"))
            .collect()
    }

    /// The requests on paths starting with `prefix`.
    pub fn on(&self, prefix: &str) -> Vec<Value> {
        self.requests()
            .into_iter()
            .filter(|r| r["path"].as_str().unwrap_or("").starts_with(prefix))
            .collect()
    }

    /// The next requests under `prefix` get these (status, Retry-After) answers.
    pub fn script(&self, prefix: &str, answers: &[(u16, Option<&str>)]) {
        let body = serde_json::json!({ "prefix": prefix, "answers": answers });
        let (status, _) = crate::http_request(
            self.port,
            "POST",
            "/_script",
            &[],
            body.to_string().as_bytes(),
        )
        .expect("receiver answers");
        assert_eq!(status, 200);
    }

    /// Fails the test if any request broke its service's format.
    pub fn assert_well_formed(&self) {
        for r in self.requests() {
            let p = r["problems"].as_array().cloned().unwrap_or_default();
            assert!(p.is_empty(), "{} {}: {p:?}", r["path"], r["body"]);
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a secret file readable by its owner only.
pub fn secret_file(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).expect("secret file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

/// Standard base64 (for the receiver's expected Basic header).
pub fn base64(data: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Percent-encodes `s` for an `application/x-www-form-urlencoded` body.
pub fn form_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'*' => {
                (b as char).to_string()
            }
            b' ' => "+".to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The `notifications:` block of a coordinator using every channel of `r`, with its secret
/// files written under `dir`; `hook_give_up` is the webhook's give-up time.
pub fn channels(dir: &Path, r_url: &str, hook_give_up: &str) -> String {
    let f = |name: &str, text: &str| {
        let p = dir.join(name);
        secret_file(&p, text);
        p.display().to_string()
    };
    format!(
        "public_url: https://drover.test\nnotifications:\n\
         \x20 - {{ name: deploys-slack, type: slack, webhook_url_file: {}, signing_secret_file: {}, slack_users: {{ U0ALICE: alice, U0BOB: bob, U0WATCH: watcher }}, response_url_base: \"{r_url}/slack/response/\" }}\n\
         \x20 - {{ name: prod-pager, type: pagerduty, routing_key_file: {}, base_url: \"{r_url}/pd\" }}\n\
         \x20 - {{ name: ops-jira, type: jira, base_url: \"{r_url}/jira\", project: OPS, issue_type: Bug, email: {JIRA_EMAIL}, token_file: {} }}\n\
         \x20 - {{ name: audit-hook, type: webhook, url: \"{r_url}/hook/in\", secret_file: {}, give_up_after: {hook_give_up} }}\n",
        f("slack-url", &format!("{r_url}/slack/hook/T000/B000/XXXX")),
        f("slack-signing", SLACK_SIGNING),
        f("pd-key", PD_KEY),
        f("jira-token", JIRA_TOKEN),
        f("hook-secret", HOOK_SECRET),
    )
}
