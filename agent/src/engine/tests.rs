//! The engine's loop, run against a scripted machine. The machine is a test double for a
//! deploy target (its phases do no I/O, they answer from a script); the store, the event log
//! and the loop are the real ones. The real machines are tested end to end in tests/.

use std::collections::HashMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::*;
use crate::state::record;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
enum Step {
    Prepare,
    Apply,
    Undo,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Run {
    service: String,
    version: String,
    phase: Step,
    error: Option<String>,
}

impl Flight for Run {
    type Phase = Step;

    fn service(&self) -> &str {
        &self.service
    }

    fn version(&self) -> &str {
        &self.version
    }

    fn set_phase(&mut self, phase: Step) {
        self.phase = phase;
    }

    fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    fn set_error(&mut self, error: String) {
        self.error = Some(error);
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Book {
    format: u32,
    service: String,
    updated_at: String,
    run: Option<Run>,
    lease: Option<LeaseRecord>,
    /// How the deploy ended, as settled.
    ended: Option<String>,
}

record!(Book, "test", 1);

impl Ledger for Book {
    type Flight = Run;

    fn flight(&mut self) -> &mut Option<Run> {
        &mut self.run
    }

    fn lease(&mut self) -> &mut Option<LeaseRecord> {
        &mut self.lease
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Oops(String);

impl Transient for Oops {
    fn is_transient(&self) -> bool {
        false
    }
}

/// Fails the phases its script names; records what ran and what the store held meanwhile.
struct Scripted {
    engine: Engine,
    fails: HashMap<Step, &'static str>,
    ran: Mutex<Vec<(Step, Option<Step>)>>,
}

impl Machine for Scripted {
    type Phase = Step;
    type Flight = Run;
    type Record = Book;
    type Error = Oops;
    const BACKOFF: Duration = Duration::from_millis(1);

    fn engine(&self) -> &Engine {
        &self.engine
    }

    fn name(phase: Step) -> String {
        format!("{phase:?}").to_lowercase()
    }

    fn failpoint(phase: Step) -> String {
        format!("engine-test:{}", Self::name(phase))
    }

    fn on_success(&self, _flight: &Run, phase: Step) -> Next<Step> {
        match phase {
            Step::Prepare => Next::Phase(Step::Apply),
            Step::Apply => Next::End(End::Deployed),
            Step::Undo => Next::End(End::RolledBack),
        }
    }

    fn on_failure(phase: Step) -> Next<Step> {
        match phase {
            Step::Prepare => Next::End(End::Abandoned),
            Step::Apply | Step::Undo => Next::Phase(Step::Undo),
        }
    }

    fn takes_lease(_phase: Step) -> bool {
        false
    }

    fn rolls_back(phase: Step) -> bool {
        phase == Step::Undo
    }

    fn exhausted(_phase: Step) -> End {
        End::Broken
    }

    async fn run_phase(
        &self,
        _rec: &mut Book,
        flight: &mut Run,
        phase: Step,
    ) -> Result<(), StepError<Oops>> {
        // What the store holds while the phase runs: it must already name this phase.
        let stored = self
            .engine
            .store
            .load::<Book>(&flight.service)
            .unwrap()
            .and_then(|b| b.run)
            .map(|r| r.phase);
        self.ran.lock().unwrap().push((phase, stored));
        match self.fails.get(&phase) {
            Some(why) => Err(StepError::Machine(Oops(why.to_string()))),
            None => Ok(()),
        }
    }

    fn settle(
        &self,
        rec: &mut Book,
        flight: &Run,
        end: End,
        _cause: Option<&StepError<Oops>>,
    ) -> Reconciled {
        rec.ended = Some(format!("{end:?}"));
        let (version, error) = (
            flight.version.clone(),
            flight.error.clone().unwrap_or_default(),
        );
        match end {
            End::Deployed => Reconciled::Deployed {
                version,
                from: None,
                note: None,
            },
            End::Abandoned => Reconciled::Abandoned {
                version,
                error,
                retry: false,
            },
            End::RolledBack => Reconciled::RolledBack {
                version,
                to: None,
                error,
            },
            End::Broken => Reconciled::Broken { version, error },
        }
    }

    async fn after(&self, _rec: &Book, _flight: &Run, _outcome: &Reconciled) {}
}

async fn run(
    fails: &[(Step, &'static str)],
) -> (Reconciled, Book, Vec<(Step, Option<Step>)>, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path()).unwrap();
    let m = Scripted {
        engine: Engine {
            store: store.clone(),
            host: "h1".into(),
            gate: None,
            notify: Notifier::default(),
            metrics: Default::default(),
            progress: Default::default(),
        },
        fails: fails.iter().copied().collect(),
        ran: Mutex::default(),
    };
    let mut book = Book {
        format: 1,
        service: "svc".into(),
        updated_at: String::new(),
        run: None,
        lease: None,
        ended: None,
    };
    let flight = Run {
        service: "svc".into(),
        version: "2".into(),
        phase: Step::Prepare,
        error: None,
    };
    let mut watch = m.engine.progress.subscribe();
    let outcome = drive(&m, &mut book, flight, Step::Prepare, None, None)
        .await
        .unwrap();
    let stored: Book = store.load("svc").unwrap().unwrap();
    assert_eq!(stored.ended, book.ended, "what ended is saved");
    let events = store.events().into_iter().map(|e| e.phase).collect();
    // Every phase run is timed, and the ending counted once under its outcome.
    let counters = m.engine.metrics.snapshot();
    let ran = m.ran.into_inner().unwrap();
    let timed: u64 = counters.phases.values().map(|h| h.count).sum();
    assert_eq!(timed as usize, ran.len(), "{counters:?}");
    assert_eq!(counters.deploys.values().sum::<u64>(), 1, "{counters:?}");
    assert_eq!(counters.deploys.keys().next().unwrap().0, "svc");
    // Progress: each phase run starts and ends, in order; then the deploy ends, once.
    let mut updates = Vec::new();
    while let Ok(u) = watch.try_recv() {
        updates.push(u);
    }
    let Some(crate::progress::Update::Ended { outcome: name, .. }) = updates.pop() else {
        panic!("{updates:?}")
    };
    assert_eq!(name, crate::progress::outcome_name(&outcome));
    assert_eq!(updates.len(), 2 * ran.len(), "{updates:?}");
    for (pair, (step, _)) in updates.chunks(2).zip(&ran) {
        let phase = Scripted::name(*step);
        assert!(
            matches!(&pair[0], crate::progress::Update::PhaseStarted { phase: p, .. } if *p == phase)
                && matches!(&pair[1], crate::progress::Update::PhaseEnded { phase: p, .. } if *p == phase),
            "{pair:?}"
        );
    }
    (outcome, stored, ran, events)
}

#[tokio::test]
async fn each_phase_is_recorded_before_it_runs_and_the_end_clears_the_flight() {
    let (outcome, book, ran, events) = run(&[]).await;
    assert!(
        matches!(outcome, Reconciled::Deployed { .. }),
        "{outcome:?}"
    );
    assert_eq!(
        ran,
        [
            (Step::Prepare, Some(Step::Prepare)),
            (Step::Apply, Some(Step::Apply))
        ]
    );
    assert!(book.run.is_none());
    assert_eq!(book.ended.as_deref(), Some("Deployed"));
    assert_eq!(events, ["prepare", "apply", "deployed"]);
}

#[tokio::test]
async fn a_failure_before_touching_anything_abandons() {
    let (outcome, book, ran, events) = run(&[(Step::Prepare, "no artifact")]).await;
    assert_eq!(
        outcome,
        Reconciled::Abandoned {
            version: "2".into(),
            error: "prepare: no artifact".into(),
            retry: false
        }
    );
    assert_eq!(ran.len(), 1);
    assert_eq!(book.ended.as_deref(), Some("Abandoned"));
    assert_eq!(events, ["prepare", "abandoned"]);
}

#[tokio::test]
async fn a_failure_after_rolls_back_with_its_first_error() {
    let (outcome, _, ran, events) = run(&[(Step::Apply, "unhealthy")]).await;
    assert_eq!(
        outcome,
        Reconciled::RolledBack {
            version: "2".into(),
            to: None,
            error: "apply: unhealthy".into()
        }
    );
    assert_eq!(ran.last(), Some(&(Step::Undo, Some(Step::Undo))));
    assert_eq!(events, ["prepare", "apply", "undo", "rolled_back"]);
}

#[tokio::test]
async fn a_phase_failing_into_itself_is_retried_a_bounded_number_of_times() {
    let (outcome, book, ran, _) =
        run(&[(Step::Apply, "unhealthy"), (Step::Undo, "api down")]).await;
    let undos = ran.iter().filter(|(p, _)| *p == Step::Undo).count();
    assert_eq!(undos as u32, Scripted::TRIES);
    let Reconciled::Broken { error, .. } = outcome else {
        panic!("{outcome:?}")
    };
    assert!(
        error.starts_with("apply: unhealthy; rollback failed: undo: api down"),
        "{error}"
    );
    assert_eq!(book.ended.as_deref(), Some("Broken"));
}
