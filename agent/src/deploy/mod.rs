//! Deploying one service on this host: the phase machine and the pure decisions around it.
//!
//! A deploy goes through [`Phase`]s: fetch → stage → lease → stop → switch → start → check →
//! verify.
//! The first three never touch the running version (the lease is the coordinator's permission
//! to go on); from `stop` on, any failure rolls back to the previous
//! release. The phase is recorded *before* it runs, so after a crash [`recover`] can tell
//! what may have happened and what to do. [`decide`] says what a service needs given the
//! desired state and the local state. The I/O lives in [`driver`].

pub mod driver;
mod record;

use serde::{Deserialize, Serialize};

use crate::spec::ResolvedService;

pub use record::{Deployment, FORMAT, Failure, Release, ServiceState};

/// Deploys that crashed this many times are given up.
pub const MAX_ATTEMPTS: u32 = 3;

/// A phase of a deploy (or of its rollback), as recorded in the state file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Downloading and verifying the artifact.
    Fetch,
    /// Extracting and preparing `releases/<dir>.tmp`, then renaming it into place.
    Stage,
    /// Getting a lease from the coordinator (if one is configured).
    Lease,
    /// `before_stop` hook, then stopping the running version.
    Stop,
    /// Pointing `current` at the new release.
    Switch,
    /// `after_install` hook, then starting the new version.
    Start,
    /// Health check and smoke tests.
    Check,
    /// Metric analysis against the baseline (when `verify` is set).
    Verify,
    /// Putting the previous release back.
    RollBack,
}

/// Where a phase leads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Run this phase next.
    Phase(Phase),
    /// The new version runs and passed its checks.
    Deployed,
    /// It failed before touching the host: the running version never stopped.
    Abandoned,
    /// It failed and the previous release runs again.
    RolledBack,
    /// The rollback failed too: an operator is needed.
    Broken,
}

impl Phase {
    /// Every phase, in order.
    pub const ALL: [Phase; 9] = [
        Phase::Fetch,
        Phase::Stage,
        Phase::Lease,
        Phase::Stop,
        Phase::Switch,
        Phase::Start,
        Phase::Check,
        Phase::Verify,
        Phase::RollBack,
    ];

    /// Where this phase leads when it succeeds.
    pub fn on_success(self) -> Next {
        match self {
            Phase::Fetch => Next::Phase(Phase::Stage),
            Phase::Stage => Next::Phase(Phase::Lease),
            Phase::Lease => Next::Phase(Phase::Stop),
            Phase::Stop => Next::Phase(Phase::Switch),
            Phase::Switch => Next::Phase(Phase::Start),
            Phase::Start => Next::Phase(Phase::Check),
            Phase::Check => Next::Phase(Phase::Verify),
            Phase::Verify => Next::Deployed,
            Phase::RollBack => Next::RolledBack,
        }
    }

    /// Where this phase leads when it fails.
    pub fn on_failure(self) -> Next {
        match self {
            Phase::Fetch | Phase::Stage | Phase::Lease => Next::Abandoned,
            Phase::Stop | Phase::Switch | Phase::Start | Phase::Check | Phase::Verify => {
                Next::Phase(Phase::RollBack)
            }
            Phase::RollBack => Next::Broken,
        }
    }

    /// Whether the running version may have been touched once this phase started.
    pub fn touches_host(self) -> bool {
        !matches!(self, Phase::Fetch | Phase::Stage | Phase::Lease)
    }

    /// The phase's name, as in logs and events.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Fetch => "fetch",
            Phase::Stage => "stage",
            Phase::Lease => "lease",
            Phase::Stop => "stop",
            Phase::Switch => "switch",
            Phase::Start => "start",
            Phase::Check => "check",
            Phase::Verify => "verify",
            Phase::RollBack => "rollback",
        }
    }

    /// Checks that `to` may follow `self`; the driver calls this on every transition.
    pub fn step(self, to: Phase) -> Result<Phase, IllegalTransition> {
        let ok = self.on_success() == Next::Phase(to) || self.on_failure() == Next::Phase(to);
        if ok {
            Ok(to)
        } else {
            Err(IllegalTransition { from: self, to })
        }
    }
}

/// A transition the phase machine does not allow (a bug, never user input).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("illegal deploy transition {from:?} → {to:?}")]
pub struct IllegalTransition {
    /// From.
    pub from: Phase,
    /// To.
    pub to: Phase,
}

/// What to do with a deploy found in flight at start-up (the agent crashed during it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recovery {
    /// The host was not touched: drop the half-done work and deploy again.
    Redeploy,
    /// The previous release is still current: make sure it runs, then deploy again.
    RestoreThenRedeploy,
    /// The new release is current: start it (idempotent) and check it.
    ResumeStart,
    /// Finish the rollback.
    FinishRollBack,
    /// It crashed too often: give up on this version (roll back if it is current).
    GiveUp,
}

/// Decides how to recover a deploy recorded at `phase`, started `attempts` times, given
/// whether `current` on disk points at the new release.
pub fn recover(phase: Phase, attempts: u32, new_is_current: bool) -> Recovery {
    if phase == Phase::RollBack {
        return Recovery::FinishRollBack;
    }
    if attempts >= MAX_ATTEMPTS {
        return Recovery::GiveUp;
    }
    match phase {
        Phase::Fetch | Phase::Stage | Phase::Lease => Recovery::Redeploy,
        _ if new_is_current => Recovery::ResumeStart,
        _ => Recovery::RestoreThenRedeploy,
    }
}

/// What a service needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// A deploy was in flight when the agent stopped: recover it first.
    Recover,
    /// The desired version runs (or should): make sure it is running.
    EnsureRunning,
    /// The desired version failed here before; wait for a different desired version.
    SkipFailed {
        /// Why it failed.
        reason: String,
    },
    /// Deploy the desired version.
    Deploy,
}

/// Decides what `desired` needs given the local `state` and the release `current` points at
/// on disk (its directory name).
pub fn decide(desired: &ResolvedService, state: &ServiceState, on_disk: Option<&str>) -> Action {
    if state.deployment.is_some() {
        return Action::Recover;
    }
    if let Some(f) = &state.failed
        && f.version == desired.version
        && f.sha256 == desired.sha256
    {
        return Action::SkipFailed {
            reason: f.reason.clone(),
        };
    }
    match &state.current {
        Some(c)
            if c.version == desired.version
                && c.sha256 == desired.sha256
                && on_disk == Some(c.dir.as_str()) =>
        {
            Action::EnsureRunning
        }
        _ => Action::Deploy,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use super::{Deployment, Failure, Release};
    use crate::spec::Digest;

    #[test]
    fn phases_succeed_in_order() {
        let mut p = Phase::Fetch;
        let mut order = vec![p];
        while let Next::Phase(n) = p.on_success() {
            p = p.step(n).unwrap();
            order.push(p);
        }
        assert_eq!(
            order,
            [
                Phase::Fetch,
                Phase::Stage,
                Phase::Lease,
                Phase::Stop,
                Phase::Switch,
                Phase::Start,
                Phase::Check,
                Phase::Verify
            ]
        );
        assert_eq!(Phase::Verify.on_success(), Next::Deployed);
        assert_eq!(Phase::RollBack.on_success(), Next::RolledBack);
    }

    #[test]
    fn failures_before_stop_abandon_and_after_roll_back() {
        for p in Phase::ALL {
            let expect = match p {
                Phase::Fetch | Phase::Stage | Phase::Lease => Next::Abandoned,
                Phase::RollBack => Next::Broken,
                _ => Next::Phase(Phase::RollBack),
            };
            assert_eq!(p.on_failure(), expect, "{p:?}");
            assert_eq!(
                p.touches_host(),
                !matches!(p, Phase::Fetch | Phase::Stage | Phase::Lease)
            );
        }
    }

    #[test]
    fn every_transition_pair_is_checked() {
        let legal = [
            (Phase::Fetch, Phase::Stage),
            (Phase::Stage, Phase::Lease),
            (Phase::Lease, Phase::Stop),
            (Phase::Stop, Phase::Switch),
            (Phase::Switch, Phase::Start),
            (Phase::Start, Phase::Check),
            (Phase::Check, Phase::Verify),
            (Phase::Verify, Phase::RollBack),
            (Phase::Stop, Phase::RollBack),
            (Phase::Switch, Phase::RollBack),
            (Phase::Start, Phase::RollBack),
            (Phase::Check, Phase::RollBack),
        ];
        for from in Phase::ALL {
            for to in Phase::ALL {
                let ok = legal.contains(&(from, to));
                assert_eq!(from.step(to).is_ok(), ok, "{from:?} → {to:?}");
            }
        }
    }

    #[test]
    fn recovery_by_phase() {
        use Recovery::*;
        for (phase, new_current, expect) in [
            (Phase::Fetch, false, Redeploy),
            (Phase::Stage, false, Redeploy),
            (Phase::Lease, false, Redeploy),
            (Phase::Stop, false, RestoreThenRedeploy),
            (Phase::Switch, false, RestoreThenRedeploy),
            (Phase::Switch, true, ResumeStart),
            (Phase::Start, true, ResumeStart),
            (Phase::Check, true, ResumeStart),
            (Phase::Verify, true, ResumeStart),
            (Phase::RollBack, true, FinishRollBack),
            (Phase::RollBack, false, FinishRollBack),
        ] {
            assert_eq!(recover(phase, 1, new_current), expect, "{phase:?}");
        }
        assert_eq!(recover(Phase::Check, MAX_ATTEMPTS, true), GiveUp);
        assert_eq!(recover(Phase::Stage, MAX_ATTEMPTS, false), GiveUp);
        assert_eq!(
            recover(Phase::RollBack, MAX_ATTEMPTS, false),
            FinishRollBack
        );
    }

    fn svc(version: &str) -> ResolvedService {
        serde_json::from_value(serde_json::json!({
            "service": "hello", "environment": "prod", "version": version,
            "sha256": "a".repeat(64), "artifact_url": "http://x/a.tgz", "root": "/srv/hello",
            "keep_releases": 5, "shared": [], "templates": [],
            "run": {"unit": null, "command": ["bin/hello"], "env": {}, "stop_timeout": "10s"},
            "before_stop": null, "after_install": null, "health": null, "smoke": [], "vars": {}
        }))
        .unwrap()
    }

    fn release(version: &str) -> Release {
        Release {
            version: version.into(),
            sha256: Digest::parse(&"a".repeat(64)).unwrap(),
            dir: version.into(),
            spec: None,
        }
    }

    #[test]
    fn decisions() {
        let mut st = ServiceState::new("hello");
        assert_eq!(decide(&svc("1"), &st, None), Action::Deploy);
        st.current = Some(release("1"));
        assert_eq!(decide(&svc("1"), &st, Some("1")), Action::EnsureRunning);
        // The state says 1 but `current` on disk says otherwise: deploy again.
        assert_eq!(decide(&svc("1"), &st, Some("0")), Action::Deploy);
        assert_eq!(decide(&svc("2"), &st, Some("1")), Action::Deploy);
        st.failed = Some(Failure {
            version: "2".into(),
            sha256: Digest::parse(&"a".repeat(64)).unwrap(),
            reason: "health".into(),
            at: "t".into(),
        });
        assert!(matches!(
            decide(&svc("2"), &st, Some("1")),
            Action::SkipFailed { .. }
        ));
        // A different desired version is tried.
        assert_eq!(decide(&svc("3"), &st, Some("1")), Action::Deploy);
        // Same version, re-pinned to another artifact: tried again.
        let mut repinned = svc("2");
        repinned.sha256 = Digest::parse(&"b".repeat(64)).unwrap();
        assert_eq!(decide(&repinned, &st, Some("1")), Action::Deploy);
        st.deployment = Some(Deployment {
            phase: Phase::Stop,
            target: svc("3"),
            dir: "3".into(),
            from: Some(release("1")),
            attempts: 1,
            error: None,
            touched_at_ms: None,
            started_at: "t".into(),
        });
        assert_eq!(decide(&svc("3"), &st, Some("1")), Action::Recover);
    }
}
