//! ECS mode: blue-green and canary deploys of ECS services behind an ALB, by weighted target
//! groups (docs/design.md §3).
//!
//! The services are `<service>-blue` and `<service>-green`, each attached to its target group.
//! The **live** side is read from the listener's weights; a deploy builds the other (idle)
//! side — a new task definition revision that differs only in the image, then the service —
//! waits for it to be healthy, shifts traffic step by step (10 → 50 → 100 %) with a bake and
//! an analysis at each step, then scales the old side down and deletes it. Any failure puts
//! 100 % back on the old side in one call and removes the new side. The sides swap roles for
//! the next deploy.
//!
//! [`EcsPhase`] is the state machine, with its transitions; [`recover`] decides what to do with a
//! deploy a crash interrupted, from the local record and the weights AWS shows.

pub mod aws;
mod deployer;
mod machine;
mod record;

use serde::{Deserialize, Serialize};

pub use deployer::EcsDeployer;
pub use machine::EcsError;
pub use record::{EcsFailure, EcsFlight, EcsRecord, EcsRelease};

use crate::engine::{End, Next};
use crate::spec::ResolvedEcs;

/// A side of the deployment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Colour {
    /// `<service>-blue`, on `target_groups.blue`.
    Blue,
    /// `<service>-green`, on `target_groups.green`.
    Green,
}

impl Colour {
    /// The other side.
    pub fn other(self) -> Colour {
        match self {
            Colour::Blue => Colour::Green,
            Colour::Green => Colour::Blue,
        }
    }

    /// `blue` or `green`.
    pub fn name(self) -> &'static str {
        match self {
            Colour::Blue => "blue",
            Colour::Green => "green",
        }
    }
}

/// The ECS deploy state machine. "Blue" is the live side, "green" the new one, whatever
/// their physical colours.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "percent")]
pub enum EcsPhase {
    /// Before a deploy: all traffic on the live side.
    StableBlue,
    /// Registering the new task definition revision (only the image changes).
    CreatingGreen,
    /// Creating or updating the new side's service.
    Provisioning,
    /// Waiting for its tasks to run and its targets to be healthy (green attached at 0 %).
    HealthCheck,
    /// Moving this percentage of traffic to the new side.
    TrafficShift(u8),
    /// Baking and analysing at this percentage.
    Monitoring(u8),
    /// All traffic on the new side.
    StableGreen,
    /// Draining, then scaling down and deleting the old side.
    DeletingBlue,
    /// Done: the new side is the live one.
    Complete,
    /// Putting all traffic back on the old side (one call) and removing the new one.
    RollingBack,
}

impl EcsPhase {
    /// The phase's name in logs and events.
    pub fn name(self) -> String {
        match self {
            EcsPhase::StableBlue => "stable_blue".into(),
            EcsPhase::CreatingGreen => "creating_green".into(),
            EcsPhase::Provisioning => "provisioning".into(),
            EcsPhase::HealthCheck => "health_check".into(),
            EcsPhase::TrafficShift(p) => format!("traffic_shift_{p}"),
            EcsPhase::Monitoring(p) => format!("monitoring_{p}"),
            EcsPhase::StableGreen => "stable_green".into(),
            EcsPhase::DeletingBlue => "deleting_blue".into(),
            EcsPhase::Complete => "complete".into(),
            EcsPhase::RollingBack => "rolling_back".into(),
        }
    }

    /// The failpoint name of the phase (`ecs:` + a name without the percentage).
    pub fn failpoint(self) -> String {
        match self {
            EcsPhase::TrafficShift(_) => "ecs:traffic_shift".into(),
            EcsPhase::Monitoring(_) => "ecs:monitoring".into(),
            p => format!("ecs:{}", p.name()),
        }
    }

    /// Where this phase leads when it succeeds, with `steps` the traffic steps.
    pub fn on_success(self, steps: &[u8]) -> Next<EcsPhase> {
        let after = |p: u8| steps.iter().copied().find(|s| *s > p);
        match self {
            EcsPhase::StableBlue => Next::Phase(EcsPhase::CreatingGreen),
            EcsPhase::CreatingGreen => Next::Phase(EcsPhase::Provisioning),
            EcsPhase::Provisioning => Next::Phase(EcsPhase::HealthCheck),
            EcsPhase::HealthCheck => Next::Phase(EcsPhase::TrafficShift(after(0).unwrap_or(100))),
            EcsPhase::TrafficShift(p) => Next::Phase(EcsPhase::Monitoring(p)),
            EcsPhase::Monitoring(p) => match after(p) {
                Some(n) => Next::Phase(EcsPhase::TrafficShift(n)),
                None => Next::Phase(EcsPhase::StableGreen),
            },
            EcsPhase::StableGreen => Next::Phase(EcsPhase::DeletingBlue),
            EcsPhase::DeletingBlue => Next::Phase(EcsPhase::Complete),
            EcsPhase::Complete => Next::End(End::Deployed),
            EcsPhase::RollingBack => Next::End(End::RolledBack),
        }
    }

    /// Where this phase leads when it fails.
    pub fn on_failure(self) -> Next<EcsPhase> {
        match self {
            // No lease (wait, refused): nothing was touched.
            EcsPhase::StableBlue => Next::End(End::Abandoned),
            // Nothing shifted yet, or traffic partly on the new side: back to the old one.
            EcsPhase::CreatingGreen
            | EcsPhase::Provisioning
            | EcsPhase::HealthCheck
            | EcsPhase::TrafficShift(_)
            | EcsPhase::Monitoring(_) => Next::Phase(EcsPhase::RollingBack),
            // All traffic is on the new side: cleaning up the old one is retried, never undone.
            EcsPhase::StableGreen | EcsPhase::DeletingBlue => Next::Phase(EcsPhase::DeletingBlue),
            EcsPhase::Complete => Next::End(End::Deployed),
            // A rollback is retried until it holds.
            EcsPhase::RollingBack => Next::Phase(EcsPhase::RollingBack),
        }
    }

    /// Checks that `to` may follow `self` under `steps`.
    pub fn step(self, to: EcsPhase, steps: &[u8]) -> Result<EcsPhase, String> {
        if self.on_success(steps) == Next::Phase(to) || self.on_failure() == Next::Phase(to) {
            Ok(to)
        } else {
            Err(format!("illegal ECS transition {self:?} → {to:?}"))
        }
    }
}

/// `<service>-blue` or `<service>-green`.
pub fn service_name(service: &str, c: Colour) -> String {
    format!("{service}-{}", c.name())
}

/// The target group of side `c`.
pub fn tg(e: &ResolvedEcs, c: Colour) -> &str {
    match c {
        Colour::Blue => &e.tg_blue,
        Colour::Green => &e.tg_green,
    }
}

/// A target group as CloudWatch names it (dimension `TargetGroup`): its ARN's resource,
/// `targetgroup/NAME/ID`. Pure.
pub fn tg_dimension(arn: &str) -> &str {
    arn.rsplit_once(':').map_or(arn, |(_, r)| r)
}

/// A listener's load balancer as CloudWatch names it (dimension `LoadBalancer`):
/// `app/NAME/ID` from `…:listener/app/NAME/ID/LISTENER`. Pure.
pub fn lb_dimension(listener_arn: &str) -> Option<&str> {
    let r = tg_dimension(listener_arn).strip_prefix("listener/")?;
    let (lb, _listener) = r.rsplit_once('/')?;
    Some(lb)
}

/// Listener weights with `live` at `100 - p` and the other side at `p`.
pub fn split(live: Colour, p: u8) -> Weights {
    let (l, n) = (u32::from(100 - p), u32::from(p));
    match live {
        Colour::Blue => Weights { blue: l, green: n },
        Colour::Green => Weights { blue: n, green: l },
    }
}

/// What the listener shows: the weight on each physical side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Weights {
    /// Weight on `target_groups.blue` (0 if absent).
    pub blue: u32,
    /// Weight on `target_groups.green` (0 if absent).
    pub green: u32,
}

impl Weights {
    /// The weight on `c`.
    pub fn of(self, c: Colour) -> u32 {
        match c {
            Colour::Blue => self.blue,
            Colour::Green => self.green,
        }
    }

    /// The side carrying all traffic, if one does.
    pub fn all_on(self) -> Option<Colour> {
        match (self.blue, self.green) {
            (b, 0) if b > 0 => Some(Colour::Blue),
            (0, g) if g > 0 => Some(Colour::Green),
            _ => None,
        }
    }

    /// The percentage on `c`, rounded.
    pub fn percent(self, c: Colour) -> u8 {
        let total = self.blue + self.green;
        (self.of(c) * 100 + total / 2)
            .checked_div(total)
            .map_or(0, |p| p as u8)
    }
}

/// What to do at start-up for one service, from the local record (phase and live side of a
/// deploy in flight) and the weights AWS shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EcsRecovery {
    /// Nothing in flight and traffic on one side: deploy normally from there.
    Idle {
        /// The live side.
        live: Colour,
    },
    /// Go on from this phase.
    At(EcsPhase),
    /// Traffic is split and no record says why: put it all back on the majority side.
    Restore {
        /// The side that gets all traffic.
        to: Colour,
    },
}

/// Decides how to recover a deploy a crash interrupted. Pure.
pub fn recover(record: Option<(EcsPhase, Colour)>, w: Weights) -> EcsRecovery {
    match record {
        None => match w.all_on() {
            Some(live) => EcsRecovery::Idle { live },
            // Split (or nothing): never leave it like that; the larger side wins (blue on a tie).
            None => EcsRecovery::Restore {
                to: if w.green > w.blue {
                    Colour::Green
                } else {
                    Colour::Blue
                },
            },
        },
        Some((phase, live)) => {
            let new = live.other();
            match phase {
                EcsPhase::RollingBack => EcsRecovery::At(EcsPhase::RollingBack),
                EcsPhase::StableGreen | EcsPhase::DeletingBlue | EcsPhase::Complete => {
                    EcsRecovery::At(EcsPhase::DeletingBlue)
                }
                // Before any traffic moved, the new side is rebuilt idempotently.
                EcsPhase::StableBlue | EcsPhase::CreatingGreen => {
                    EcsRecovery::At(EcsPhase::CreatingGreen)
                }
                EcsPhase::Provisioning | EcsPhase::HealthCheck => {
                    EcsRecovery::At(EcsPhase::Provisioning)
                }
                // Traffic may be split: watch it again at the weight AWS shows.
                EcsPhase::TrafficShift(_) | EcsPhase::Monitoring(_) => match w.percent(new) {
                    0 => EcsRecovery::At(EcsPhase::HealthCheck),
                    100 => EcsRecovery::At(EcsPhase::StableGreen),
                    p => EcsRecovery::At(EcsPhase::Monitoring(p)),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STEPS: &[u8] = &[10, 50, 100];

    #[test]
    fn cloudwatch_names_target_groups_and_load_balancers_from_their_arns() {
        assert_eq!(
            tg_dimension(
                "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/web-blue/0123456789abcdef"
            ),
            "targetgroup/web-blue/0123456789abcdef"
        );
        assert_eq!(
            lb_dimension(
                "arn:aws:elasticloadbalancing:us-east-1:123456789012:listener/app/web/0123456789abcdef/fedcba9876543210"
            ),
            Some("app/web/0123456789abcdef")
        );
        assert_eq!(lb_dimension("not-an-arn"), None);
        assert_eq!(
            lb_dimension("arn:aws:elasticloadbalancing:us-east-1:1:targetgroup/x/y"),
            None
        );
    }

    #[test]
    fn a_deploy_goes_through_every_step() {
        let mut p = EcsPhase::StableBlue;
        let mut seen = vec![p];
        while let Next::Phase(n) = p.on_success(STEPS) {
            p = p.step(n, STEPS).unwrap();
            seen.push(p);
        }
        assert_eq!(
            seen,
            [
                EcsPhase::StableBlue,
                EcsPhase::CreatingGreen,
                EcsPhase::Provisioning,
                EcsPhase::HealthCheck,
                EcsPhase::TrafficShift(10),
                EcsPhase::Monitoring(10),
                EcsPhase::TrafficShift(50),
                EcsPhase::Monitoring(50),
                EcsPhase::TrafficShift(100),
                EcsPhase::Monitoring(100),
                EcsPhase::StableGreen,
                EcsPhase::DeletingBlue,
                EcsPhase::Complete,
            ]
        );
        assert_eq!(
            EcsPhase::Complete.on_success(STEPS),
            Next::End(End::Deployed)
        );
        assert_eq!(
            EcsPhase::RollingBack.on_success(STEPS),
            Next::End(End::RolledBack)
        );
        // Canary steps.
        let canary = [10, 25, 50, 100];
        assert_eq!(
            EcsPhase::Monitoring(10).on_success(&canary),
            Next::Phase(EcsPhase::TrafficShift(25))
        );
    }

    #[test]
    fn failures_roll_back_until_traffic_is_all_on_the_new_side() {
        for p in [
            EcsPhase::CreatingGreen,
            EcsPhase::Provisioning,
            EcsPhase::HealthCheck,
            EcsPhase::TrafficShift(10),
            EcsPhase::Monitoring(50),
        ] {
            assert_eq!(p.on_failure(), Next::Phase(EcsPhase::RollingBack), "{p:?}");
        }
        // No lease: nothing was touched.
        assert_eq!(EcsPhase::StableBlue.on_failure(), Next::End(End::Abandoned));
        assert_eq!(
            EcsPhase::StableGreen.on_failure(),
            Next::Phase(EcsPhase::DeletingBlue)
        );
        assert_eq!(
            EcsPhase::DeletingBlue.on_failure(),
            Next::Phase(EcsPhase::DeletingBlue)
        );
        assert_eq!(
            EcsPhase::RollingBack.on_failure(),
            Next::Phase(EcsPhase::RollingBack)
        );
    }

    #[test]
    fn illegal_transitions_are_refused() {
        assert!(
            EcsPhase::HealthCheck
                .step(EcsPhase::TrafficShift(50), STEPS)
                .is_err()
        );
        assert!(
            EcsPhase::TrafficShift(10)
                .step(EcsPhase::Monitoring(50), STEPS)
                .is_err()
        );
        assert!(
            EcsPhase::Monitoring(100)
                .step(EcsPhase::StableGreen, STEPS)
                .is_ok()
        );
        assert!(
            EcsPhase::StableGreen
                .step(EcsPhase::RollingBack, STEPS)
                .is_err()
        );
        assert!(
            EcsPhase::Complete
                .step(EcsPhase::RollingBack, STEPS)
                .is_err()
        );
        assert!(
            EcsPhase::StableBlue
                .step(EcsPhase::Complete, STEPS)
                .is_err()
        );
    }

    #[test]
    fn weights() {
        let w = Weights {
            blue: 90,
            green: 10,
        };
        assert_eq!(w.all_on(), None);
        assert_eq!(w.percent(Colour::Green), 10);
        assert_eq!(Weights { blue: 0, green: 1 }.all_on(), Some(Colour::Green));
        assert_eq!(Weights { blue: 0, green: 0 }.all_on(), None);
    }

    #[test]
    fn resuming_after_a_crash() {
        let all_blue = Weights {
            blue: 100,
            green: 0,
        };
        let split = Weights {
            blue: 50,
            green: 50,
        };
        let all_green = Weights {
            blue: 0,
            green: 100,
        };
        assert_eq!(
            recover(None, all_green),
            EcsRecovery::Idle {
                live: Colour::Green
            }
        );
        assert_eq!(
            recover(None, split),
            EcsRecovery::Restore { to: Colour::Blue }
        );
        assert_eq!(
            recover(
                None,
                Weights {
                    blue: 10,
                    green: 90
                }
            ),
            EcsRecovery::Restore { to: Colour::Green }
        );
        let live_blue = |p| Some((p, Colour::Blue));
        assert_eq!(
            recover(live_blue(EcsPhase::CreatingGreen), all_blue),
            EcsRecovery::At(EcsPhase::CreatingGreen)
        );
        assert_eq!(
            recover(live_blue(EcsPhase::HealthCheck), all_blue),
            EcsRecovery::At(EcsPhase::Provisioning)
        );
        assert_eq!(
            recover(live_blue(EcsPhase::TrafficShift(50)), split),
            EcsRecovery::At(EcsPhase::Monitoring(50))
        );
        assert_eq!(
            recover(live_blue(EcsPhase::TrafficShift(10)), all_blue),
            EcsRecovery::At(EcsPhase::HealthCheck)
        );
        assert_eq!(
            recover(live_blue(EcsPhase::Monitoring(100)), all_green),
            EcsRecovery::At(EcsPhase::StableGreen)
        );
        assert_eq!(
            recover(live_blue(EcsPhase::DeletingBlue), all_green),
            EcsRecovery::At(EcsPhase::DeletingBlue)
        );
        assert_eq!(
            recover(live_blue(EcsPhase::RollingBack), split),
            EcsRecovery::At(EcsPhase::RollingBack)
        );
    }
}
