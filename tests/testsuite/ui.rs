//! The web dashboard in a real browser: Debian's Chromium, headless, driven by playwright-core
//! (`tests/ui/dashboard.mjs`), against a real coordinator and real agents. An approver approves
//! in the page and watches the fleet converge live; a viewer sees no buttons and a forged POST
//! gets 403; a hostile `last_error` shows as text and runs nothing; a wrong token is refused.
//! Screenshots are kept under `target/ui-screenshots/`.

use std::process::Command;
use std::time::Duration;

use drover_tests::coordinator::{Coordinator, token};
use drover_tests::host::{Fleet, Running};
use drover_tests::wait_for;

use crate::coordinator::{start_hosts, wait_all};

/// What a hostile host reports as its last error.
const EVIL: &str =
    "<img src=x onerror=\"window.__pwned=1;alert(1)\"><script>window.__pwned=2</script>";

#[test]
fn the_dashboard_in_a_real_browser() {
    let ui = drover_tests::workspace().join("tests/ui");
    assert!(
        ui.join("node_modules/playwright-core").is_dir(),
        "playwright-core is not installed: .ci/install-peers runs `npm ci --prefix tests/ui`"
    );
    assert!(
        std::path::Path::new("/usr/bin/chromium").exists(),
        "chromium is not installed: .ci/install-peers installs Debian's chromium"
    );
    let f = Fleet::new();
    let c = Coordinator::start(f.dir.path(), "");
    let policy = "approval: { required: true, approvers: [release-managers], timeout: 10m }\n";
    f.pin_env("prod", policy, &f.hello("1.0.0", &[]));
    let (hosts, _agents): (_, Vec<Running>) = start_hosts(&f, &c, &["p1", "p2"], "prod");
    wait_for(
        "the rollout to wait for approval",
        Duration::from_secs(60),
        || (c.state("prod", "1.0.0").as_deref() == Some("APPROVAL_REQUIRED")).then_some(()),
    );
    // A host of another environment reports markup as its last error.
    let hb = serde_json::json!({
        "environment": "qa", "labels": {}, "agent_version": "0.1.0",
        "services": [ { "service": "hello", "desired": "1.0.0", "actual": "0.9.0",
                        "healthy": false, "last_error": EVIL } ]
    });
    let (status, body) = c.http(
        "POST",
        "/v1/hosts/evil-01/heartbeat",
        Some(&token("fleet")),
        &hb.to_string(),
        true,
    );
    assert_eq!(status, 200, "{body}");
    let shots = drover_tests::bin_dir()
        .parent()
        .expect("target dir")
        .join("ui-screenshots");
    let out = Command::new("node")
        .arg(ui.join("dashboard.mjs"))
        .env("DROVER_URL", c.url())
        .env("TOKEN_APPROVER", token("alice"))
        .env("TOKEN_VIEWER", token("watcher"))
        .env("EVIL", EVIL)
        .env("SHOTS", &shots)
        .output()
        .expect("node runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    for check in [
        "ok - a wrong token gets no session cookie",
        "ok - the viewer's forged approve (with its own CSRF token) gets 403",
        "ok - no script of it ran",
        "ok - the fleet converged in the page without a reload",
    ] {
        assert!(text.contains(check), "{check} missing in:\n{text}");
    }
    wait_all(&hosts, "1.0.0", Duration::from_secs(30));
    // The browser's approval is alice's, in the audit; the viewer's forgery is a denial.
    let history = c.history();
    assert!(
        history
            .iter()
            .any(|e| e["action"] == "approve" && e["actor"] == "alice"),
        "{history:?}"
    );
    assert!(
        history
            .iter()
            .any(|e| e["action"] == "denied" && e["actor"] == "watcher"),
        "{history:?}"
    );
    assert!(shots.join("fleet-converged.png").exists());
}
