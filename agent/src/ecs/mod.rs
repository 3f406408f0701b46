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
//! [`Phase`] is the state machine, with its transitions; [`resume`] decides what to do with a
//! deploy a crash interrupted, from the local record and the weights AWS shows.

pub mod aws;
pub mod driver;

use serde::{Deserialize, Serialize};

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
pub enum Phase {
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

/// Where a phase leads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Go on with this phase.
    Phase(Phase),
    /// The deploy is complete.
    Done,
    /// The rollback is complete: the old side is live again.
    RolledBack,
}

impl Phase {
    /// The phase's name in logs and events.
    pub fn name(self) -> String {
        match self {
            Phase::StableBlue => "stable_blue".into(),
            Phase::CreatingGreen => "creating_green".into(),
            Phase::Provisioning => "provisioning".into(),
            Phase::HealthCheck => "health_check".into(),
            Phase::TrafficShift(p) => format!("traffic_shift_{p}"),
            Phase::Monitoring(p) => format!("monitoring_{p}"),
            Phase::StableGreen => "stable_green".into(),
            Phase::DeletingBlue => "deleting_blue".into(),
            Phase::Complete => "complete".into(),
            Phase::RollingBack => "rolling_back".into(),
        }
    }

    /// The failpoint name of the phase (`ecs:` + a name without the percentage).
    pub fn failpoint(self) -> String {
        match self {
            Phase::TrafficShift(_) => "ecs:traffic_shift".into(),
            Phase::Monitoring(_) => "ecs:monitoring".into(),
            p => format!("ecs:{}", p.name()),
        }
    }

    /// Where this phase leads when it succeeds, with `steps` the traffic steps.
    pub fn on_success(self, steps: &[u8]) -> Next {
        let after = |p: u8| steps.iter().copied().find(|s| *s > p);
        match self {
            Phase::StableBlue => Next::Phase(Phase::CreatingGreen),
            Phase::CreatingGreen => Next::Phase(Phase::Provisioning),
            Phase::Provisioning => Next::Phase(Phase::HealthCheck),
            Phase::HealthCheck => Next::Phase(Phase::TrafficShift(after(0).unwrap_or(100))),
            Phase::TrafficShift(p) => Next::Phase(Phase::Monitoring(p)),
            Phase::Monitoring(p) => match after(p) {
                Some(n) => Next::Phase(Phase::TrafficShift(n)),
                None => Next::Phase(Phase::StableGreen),
            },
            Phase::StableGreen => Next::Phase(Phase::DeletingBlue),
            Phase::DeletingBlue => Next::Phase(Phase::Complete),
            Phase::Complete => Next::Done,
            Phase::RollingBack => Next::RolledBack,
        }
    }

    /// Where this phase leads when it fails.
    pub fn on_failure(self) -> Next {
        match self {
            // Nothing shifted yet, or traffic partly on the new side: back to the old one.
            Phase::StableBlue
            | Phase::CreatingGreen
            | Phase::Provisioning
            | Phase::HealthCheck
            | Phase::TrafficShift(_)
            | Phase::Monitoring(_) => Next::Phase(Phase::RollingBack),
            // All traffic is on the new side: cleaning up the old one is retried, never undone.
            Phase::StableGreen | Phase::DeletingBlue => Next::Phase(Phase::DeletingBlue),
            Phase::Complete => Next::Done,
            // A rollback is retried until it holds.
            Phase::RollingBack => Next::Phase(Phase::RollingBack),
        }
    }

    /// Checks that `to` may follow `self` under `steps`.
    pub fn step(self, to: Phase, steps: &[u8]) -> Result<Phase, String> {
        if self.on_success(steps) == Next::Phase(to) || self.on_failure() == Next::Phase(to) {
            Ok(to)
        } else {
            Err(format!("illegal ECS transition {self:?} → {to:?}"))
        }
    }

    /// Whether traffic may be (partly) on the new side in this phase.
    pub fn traffic_moved(self) -> bool {
        matches!(
            self,
            Phase::TrafficShift(_)
                | Phase::Monitoring(_)
                | Phase::StableGreen
                | Phase::DeletingBlue
        )
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
pub enum Resume {
    /// Nothing in flight and traffic on one side: deploy normally from there.
    Idle {
        /// The live side.
        live: Colour,
    },
    /// Go on from this phase.
    At(Phase),
    /// Traffic is split and no record says why: put it all back on the majority side.
    Restore {
        /// The side that gets all traffic.
        to: Colour,
    },
}

/// Decides how to resume. Pure.
pub fn resume(record: Option<(Phase, Colour)>, w: Weights) -> Resume {
    match record {
        None => match w.all_on() {
            Some(live) => Resume::Idle { live },
            // Split (or nothing): never leave it like that; the larger side wins (blue on a tie).
            None => Resume::Restore {
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
                Phase::RollingBack => Resume::At(Phase::RollingBack),
                Phase::StableGreen | Phase::DeletingBlue | Phase::Complete => {
                    Resume::At(Phase::DeletingBlue)
                }
                // Before any traffic moved, the new side is rebuilt idempotently.
                Phase::StableBlue | Phase::CreatingGreen => Resume::At(Phase::CreatingGreen),
                Phase::Provisioning | Phase::HealthCheck => Resume::At(Phase::Provisioning),
                // Traffic may be split: watch it again at the weight AWS shows.
                Phase::TrafficShift(_) | Phase::Monitoring(_) => match w.percent(new) {
                    0 => Resume::At(Phase::HealthCheck),
                    100 => Resume::At(Phase::StableGreen),
                    p => Resume::At(Phase::Monitoring(p)),
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
    fn a_deploy_goes_through_every_step() {
        let mut p = Phase::StableBlue;
        let mut seen = vec![p];
        while let Next::Phase(n) = p.on_success(STEPS) {
            p = p.step(n, STEPS).unwrap();
            seen.push(p);
        }
        assert_eq!(
            seen,
            [
                Phase::StableBlue,
                Phase::CreatingGreen,
                Phase::Provisioning,
                Phase::HealthCheck,
                Phase::TrafficShift(10),
                Phase::Monitoring(10),
                Phase::TrafficShift(50),
                Phase::Monitoring(50),
                Phase::TrafficShift(100),
                Phase::Monitoring(100),
                Phase::StableGreen,
                Phase::DeletingBlue,
                Phase::Complete,
            ]
        );
        assert_eq!(Phase::Complete.on_success(STEPS), Next::Done);
        assert_eq!(Phase::RollingBack.on_success(STEPS), Next::RolledBack);
        // Canary steps.
        let canary = [10, 25, 50, 100];
        assert_eq!(
            Phase::Monitoring(10).on_success(&canary),
            Next::Phase(Phase::TrafficShift(25))
        );
    }

    #[test]
    fn failures_roll_back_until_traffic_is_all_on_the_new_side() {
        for p in [
            Phase::CreatingGreen,
            Phase::Provisioning,
            Phase::HealthCheck,
            Phase::TrafficShift(10),
            Phase::Monitoring(50),
        ] {
            assert_eq!(p.on_failure(), Next::Phase(Phase::RollingBack), "{p:?}");
        }
        assert_eq!(
            Phase::StableGreen.on_failure(),
            Next::Phase(Phase::DeletingBlue)
        );
        assert_eq!(
            Phase::DeletingBlue.on_failure(),
            Next::Phase(Phase::DeletingBlue)
        );
        assert_eq!(
            Phase::RollingBack.on_failure(),
            Next::Phase(Phase::RollingBack)
        );
    }

    #[test]
    fn illegal_transitions_are_refused() {
        assert!(
            Phase::HealthCheck
                .step(Phase::TrafficShift(50), STEPS)
                .is_err()
        );
        assert!(
            Phase::TrafficShift(10)
                .step(Phase::Monitoring(50), STEPS)
                .is_err()
        );
        assert!(
            Phase::Monitoring(100)
                .step(Phase::StableGreen, STEPS)
                .is_ok()
        );
        assert!(Phase::StableGreen.step(Phase::RollingBack, STEPS).is_err());
        assert!(Phase::Complete.step(Phase::RollingBack, STEPS).is_err());
        assert!(Phase::StableBlue.step(Phase::Complete, STEPS).is_err());
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
            resume(None, all_green),
            Resume::Idle {
                live: Colour::Green
            }
        );
        assert_eq!(resume(None, split), Resume::Restore { to: Colour::Blue });
        assert_eq!(
            resume(
                None,
                Weights {
                    blue: 10,
                    green: 90
                }
            ),
            Resume::Restore { to: Colour::Green }
        );
        let live_blue = |p| Some((p, Colour::Blue));
        assert_eq!(
            resume(live_blue(Phase::CreatingGreen), all_blue),
            Resume::At(Phase::CreatingGreen)
        );
        assert_eq!(
            resume(live_blue(Phase::HealthCheck), all_blue),
            Resume::At(Phase::Provisioning)
        );
        assert_eq!(
            resume(live_blue(Phase::TrafficShift(50)), split),
            Resume::At(Phase::Monitoring(50))
        );
        assert_eq!(
            resume(live_blue(Phase::TrafficShift(10)), all_blue),
            Resume::At(Phase::HealthCheck)
        );
        assert_eq!(
            resume(live_blue(Phase::Monitoring(100)), all_green),
            Resume::At(Phase::StableGreen)
        );
        assert_eq!(
            resume(live_blue(Phase::DeletingBlue), all_green),
            Resume::At(Phase::DeletingBlue)
        );
        assert_eq!(
            resume(live_blue(Phase::RollingBack), split),
            Resume::At(Phase::RollingBack)
        );
    }
}
