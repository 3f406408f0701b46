//! The VM machine: deploying one service on this host — its phases, its record, the pure
//! decisions around them, and (in [`VmDeployer`]) the I/O.
//!
//! A deploy goes through [`VmPhase`]s: fetch → stage → lease → stop → switch → start → check
//! → verify. The first three never touch the running version (the lease is the coordinator's permission
//! to go on); from `stop` on, any failure rolls back to the previous
//! release. The phase is recorded *before* it runs, so after a crash [`recover`] can tell
//! what may have happened and what to do. [`decide`] says what a service needs given the
//! desired state and the local state. [`VmDeployer`] does the I/O: it is the VM
//! [`Machine`](crate::engine::Machine) the engine drives.

mod deployer;
mod machine;
mod record;

use serde::{Deserialize, Serialize};

use crate::engine::{End, Next};
use crate::spec::ResolvedService;

pub use deployer::{Peers, VmDeployer, rebuild};
pub use machine::VmError;
pub use record::{FORMAT, VmFailure, VmFlight, VmRecord, VmRelease};

/// Deploys that crashed this many times are given up.
pub const MAX_ATTEMPTS: u32 = 3;

/// A phase of a deploy (or of its rollback), as recorded in the state file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmPhase {
    /// Downloading and verifying the artifact.
    Fetch,
    /// Extracting and preparing `releases/<dir>.tmp`, then renaming it into place.
    Stage,
    /// Getting a lease from the coordinator (if one is configured).
    LeaseRecord,
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

impl VmPhase {
    /// Every phase, in order.
    pub const ALL: [VmPhase; 9] = [
        VmPhase::Fetch,
        VmPhase::Stage,
        VmPhase::LeaseRecord,
        VmPhase::Stop,
        VmPhase::Switch,
        VmPhase::Start,
        VmPhase::Check,
        VmPhase::Verify,
        VmPhase::RollBack,
    ];

    /// Where this phase leads when it succeeds.
    pub fn on_success(self) -> Next<VmPhase> {
        match self {
            VmPhase::Fetch => Next::Phase(VmPhase::Stage),
            VmPhase::Stage => Next::Phase(VmPhase::LeaseRecord),
            VmPhase::LeaseRecord => Next::Phase(VmPhase::Stop),
            VmPhase::Stop => Next::Phase(VmPhase::Switch),
            VmPhase::Switch => Next::Phase(VmPhase::Start),
            VmPhase::Start => Next::Phase(VmPhase::Check),
            VmPhase::Check => Next::Phase(VmPhase::Verify),
            VmPhase::Verify => Next::End(End::Deployed),
            VmPhase::RollBack => Next::End(End::RolledBack),
        }
    }

    /// Where this phase leads when it fails.
    pub fn on_failure(self) -> Next<VmPhase> {
        match self {
            VmPhase::Fetch | VmPhase::Stage | VmPhase::LeaseRecord => Next::End(End::Abandoned),
            VmPhase::Stop | VmPhase::Switch | VmPhase::Start | VmPhase::Check | VmPhase::Verify => {
                Next::Phase(VmPhase::RollBack)
            }
            VmPhase::RollBack => Next::End(End::Broken),
        }
    }

    /// Whether the running version may have been touched once this phase started.
    pub fn touches_host(self) -> bool {
        !matches!(self, VmPhase::Fetch | VmPhase::Stage | VmPhase::LeaseRecord)
    }

    /// The phase's name, as in logs and events.
    pub fn name(self) -> &'static str {
        match self {
            VmPhase::Fetch => "fetch",
            VmPhase::Stage => "stage",
            VmPhase::LeaseRecord => "lease",
            VmPhase::Stop => "stop",
            VmPhase::Switch => "switch",
            VmPhase::Start => "start",
            VmPhase::Check => "check",
            VmPhase::Verify => "verify",
            VmPhase::RollBack => "rollback",
        }
    }

    /// Checks that `to` may follow `self` (the transitions [`VmPhase::on_success`] and
    /// [`VmPhase::on_failure`] allow).
    pub fn step(self, to: VmPhase) -> Result<VmPhase, IllegalVmStep> {
        let ok = self.on_success() == Next::Phase(to) || self.on_failure() == Next::Phase(to);
        if ok {
            Ok(to)
        } else {
            Err(IllegalVmStep { from: self, to })
        }
    }
}

/// A transition the phase machine does not allow (a bug, never user input).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("illegal deploy transition {from:?} → {to:?}")]
pub struct IllegalVmStep {
    /// From.
    pub from: VmPhase,
    /// To.
    pub to: VmPhase,
}

/// What to do with a deploy found in flight at start-up (the agent crashed during it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmRecovery {
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
pub fn recover(phase: VmPhase, attempts: u32, new_is_current: bool) -> VmRecovery {
    if phase == VmPhase::RollBack {
        return VmRecovery::FinishRollBack;
    }
    if attempts >= MAX_ATTEMPTS {
        return VmRecovery::GiveUp;
    }
    match phase {
        VmPhase::Fetch | VmPhase::Stage | VmPhase::LeaseRecord => VmRecovery::Redeploy,
        _ if new_is_current => VmRecovery::ResumeStart,
        _ => VmRecovery::RestoreThenRedeploy,
    }
}

/// What a service needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmNeed {
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
pub fn decide(desired: &ResolvedService, state: &VmRecord, on_disk: Option<&str>) -> VmNeed {
    if state.deployment.is_some() {
        return VmNeed::Recover;
    }
    if let Some(f) = &state.failed
        && f.version == desired.version
        && f.sha256 == desired.sha256
    {
        return VmNeed::SkipFailed {
            reason: f.reason.clone(),
        };
    }
    match &state.current {
        Some(c)
            if c.version == desired.version
                && c.sha256 == desired.sha256
                && on_disk == Some(c.dir.as_str()) =>
        {
            VmNeed::EnsureRunning
        }
        _ => VmNeed::Deploy,
    }
}

/// What the VM machine's tests deploy.
#[cfg(test)]
pub(crate) mod fixtures {
    use crate::spec::ResolvedService;

    /// A minimal process-managed service `hello` at `version`.
    pub fn service(version: &str) -> ResolvedService {
        serde_json::from_value(serde_json::json!({
            "service": "hello", "environment": "prod", "version": version,
            "sha256": "a".repeat(64), "artifact_url": "http://x/a.tgz", "root": "/srv/hello",
            "keep_releases": 5, "shared": [], "templates": [],
            "run": {"unit": null, "command": ["bin/hello"], "env": {}, "stop_timeout": "10s"},
            "before_stop": null, "after_install": null, "health": null, "smoke": [], "vars": {}
        }))
        .unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use super::{VmFailure, VmFlight, VmRelease};
    use crate::spec::Digest;

    #[test]
    fn phases_succeed_in_order() {
        let mut p = VmPhase::Fetch;
        let mut order = vec![p];
        while let Next::Phase(n) = p.on_success() {
            p = p.step(n).unwrap();
            order.push(p);
        }
        assert_eq!(
            order,
            [
                VmPhase::Fetch,
                VmPhase::Stage,
                VmPhase::LeaseRecord,
                VmPhase::Stop,
                VmPhase::Switch,
                VmPhase::Start,
                VmPhase::Check,
                VmPhase::Verify
            ]
        );
        assert_eq!(VmPhase::Verify.on_success(), Next::End(End::Deployed));
        assert_eq!(VmPhase::RollBack.on_success(), Next::End(End::RolledBack));
    }

    #[test]
    fn failures_before_stop_abandon_and_after_roll_back() {
        for p in VmPhase::ALL {
            let expect = match p {
                VmPhase::Fetch | VmPhase::Stage | VmPhase::LeaseRecord => Next::End(End::Abandoned),
                VmPhase::RollBack => Next::End(End::Broken),
                _ => Next::Phase(VmPhase::RollBack),
            };
            assert_eq!(p.on_failure(), expect, "{p:?}");
            assert_eq!(
                p.touches_host(),
                !matches!(p, VmPhase::Fetch | VmPhase::Stage | VmPhase::LeaseRecord)
            );
        }
    }

    #[test]
    fn every_transition_pair_is_checked() {
        let legal = [
            (VmPhase::Fetch, VmPhase::Stage),
            (VmPhase::Stage, VmPhase::LeaseRecord),
            (VmPhase::LeaseRecord, VmPhase::Stop),
            (VmPhase::Stop, VmPhase::Switch),
            (VmPhase::Switch, VmPhase::Start),
            (VmPhase::Start, VmPhase::Check),
            (VmPhase::Check, VmPhase::Verify),
            (VmPhase::Verify, VmPhase::RollBack),
            (VmPhase::Stop, VmPhase::RollBack),
            (VmPhase::Switch, VmPhase::RollBack),
            (VmPhase::Start, VmPhase::RollBack),
            (VmPhase::Check, VmPhase::RollBack),
        ];
        for from in VmPhase::ALL {
            for to in VmPhase::ALL {
                let ok = legal.contains(&(from, to));
                assert_eq!(from.step(to).is_ok(), ok, "{from:?} → {to:?}");
            }
        }
    }

    #[test]
    fn recovery_by_phase() {
        use VmRecovery::*;
        for (phase, new_current, expect) in [
            (VmPhase::Fetch, false, Redeploy),
            (VmPhase::Stage, false, Redeploy),
            (VmPhase::LeaseRecord, false, Redeploy),
            (VmPhase::Stop, false, RestoreThenRedeploy),
            (VmPhase::Switch, false, RestoreThenRedeploy),
            (VmPhase::Switch, true, ResumeStart),
            (VmPhase::Start, true, ResumeStart),
            (VmPhase::Check, true, ResumeStart),
            (VmPhase::Verify, true, ResumeStart),
            (VmPhase::RollBack, true, FinishRollBack),
            (VmPhase::RollBack, false, FinishRollBack),
        ] {
            assert_eq!(recover(phase, 1, new_current), expect, "{phase:?}");
        }
        assert_eq!(recover(VmPhase::Check, MAX_ATTEMPTS, true), GiveUp);
        assert_eq!(recover(VmPhase::Stage, MAX_ATTEMPTS, false), GiveUp);
        assert_eq!(
            recover(VmPhase::RollBack, MAX_ATTEMPTS, false),
            FinishRollBack
        );
    }

    fn svc(version: &str) -> ResolvedService {
        fixtures::service(version)
    }

    fn release(version: &str) -> VmRelease {
        VmRelease {
            version: version.into(),
            sha256: Digest::parse(&"a".repeat(64)).unwrap(),
            dir: version.into(),
            spec: None,
        }
    }

    #[test]
    fn decisions() {
        let mut st = VmRecord::new("hello");
        assert_eq!(decide(&svc("1"), &st, None), VmNeed::Deploy);
        st.current = Some(release("1"));
        assert_eq!(decide(&svc("1"), &st, Some("1")), VmNeed::EnsureRunning);
        // The state says 1 but `current` on disk says otherwise: deploy again.
        assert_eq!(decide(&svc("1"), &st, Some("0")), VmNeed::Deploy);
        assert_eq!(decide(&svc("2"), &st, Some("1")), VmNeed::Deploy);
        st.failed = Some(VmFailure {
            version: "2".into(),
            sha256: Digest::parse(&"a".repeat(64)).unwrap(),
            reason: "health".into(),
            at: "t".into(),
        });
        assert!(matches!(
            decide(&svc("2"), &st, Some("1")),
            VmNeed::SkipFailed { .. }
        ));
        // A different desired version is tried.
        assert_eq!(decide(&svc("3"), &st, Some("1")), VmNeed::Deploy);
        // Same version, re-pinned to another artifact: tried again.
        let mut repinned = svc("2");
        repinned.sha256 = Digest::parse(&"b".repeat(64)).unwrap();
        assert_eq!(decide(&repinned, &st, Some("1")), VmNeed::Deploy);
        st.deployment = Some(VmFlight {
            phase: VmPhase::Stop,
            target: svc("3"),
            dir: "3".into(),
            from: Some(release("1")),
            attempts: 1,
            error: None,
            touched_at_ms: None,
            started_at: "t".into(),
            note: None,
        });
        assert_eq!(decide(&svc("3"), &st, Some("1")), VmNeed::Recover);
    }
}
