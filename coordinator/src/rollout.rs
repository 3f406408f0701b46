//! The rollout state machine (docs/protocol.md): the transition matrix as a pure function.

use crate::wire::RolloutState::{self, *};

/// A transition the matrix does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a rollout cannot go from {from} to {to}")]
pub struct IllegalTransition {
    /// From.
    pub from: RolloutState,
    /// To.
    pub to: RolloutState,
}

/// Whether a rollout may go from `from` to `to`.
pub fn allowed(from: RolloutState, to: RolloutState) -> bool {
    matches!(
        (from, to),
        (Pending, ApprovalRequired | Running | Aborted)
            | (ApprovalRequired, Approved | Failed | Aborted)
            | (Approved, Running)
            | (
                Running,
                ApprovalRequired | Paused | Verifying | Failed | Aborted
            )
            | (Paused, Running | Aborted)
            | (Verifying, Success | Paused | Failed | Aborted)
            | (Failed, RollingBack | Aborted)
            | (RollingBack, Aborted | Failed)
    )
}

/// Checks a transition: `Ok(to)` if allowed.
pub fn transition(from: RolloutState, to: RolloutState) -> Result<RolloutState, IllegalTransition> {
    if allowed(from, to) {
        Ok(to)
    } else {
        Err(IllegalTransition { from, to })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The matrix of docs/protocol.md, written out row by row.
    const MATRIX: &[(RolloutState, &[RolloutState])] = &[
        (Pending, &[ApprovalRequired, Running, Aborted]),
        (ApprovalRequired, &[Approved, Failed, Aborted]),
        (Approved, &[Running]),
        (
            Running,
            &[ApprovalRequired, Paused, Verifying, Failed, Aborted],
        ),
        (Paused, &[Running, Aborted]),
        (Verifying, &[Success, Paused, Failed, Aborted]),
        (Failed, &[RollingBack, Aborted]),
        (RollingBack, &[Aborted, Failed]),
        (Success, &[]),
        (Aborted, &[]),
    ];

    #[test]
    fn every_pair_follows_the_matrix() {
        let mut checked = 0;
        for from in RolloutState::ALL {
            let row = MATRIX.iter().find(|(f, _)| *f == from).expect("row").1;
            for to in RolloutState::ALL {
                let legal = row.contains(&to);
                assert_eq!(allowed(from, to), legal, "{from} → {to}");
                assert_eq!(transition(from, to).is_ok(), legal);
                checked += 1;
            }
        }
        assert_eq!(checked, 100);
    }

    #[test]
    fn terminal_states_have_no_way_out() {
        for s in [Success, Aborted] {
            assert!(s.is_terminal());
            assert!(RolloutState::ALL.iter().all(|t| !allowed(s, *t)));
        }
    }

    #[test]
    fn errors_name_both_states() {
        let e = transition(Success, Running).unwrap_err();
        assert_eq!(e.to_string(), "a rollout cannot go from SUCCESS to RUNNING");
    }
}
