//! `drover-agent plan`: what a pass would change on this host, nothing done.

use super::*;
use crate::vm::{VmNeed, decide};

impl Agent {
    /// What `plan` prints: what would change on this host, nothing done.
    pub async fn plan(&self) -> anyhow::Result<String> {
        let (snap, plan) = self.desired("").await?;
        let mut out = format!(
            "commit {} — host {} in environment {}\n",
            short(&snap.commit),
            self.config.host,
            self.config.environment
        );
        if let Some(ecs) = &self.ecs {
            for job in self.jobs(&plan) {
                if let Job::Ecs(svc) = job {
                    out.push_str(&format!("  {}: {}\n", svc.service, ecs.plan(&svc).await));
                }
            }
            if plan.ecs.is_empty() {
                out.push_str("  no ECS services in this environment\n");
            }
            return Ok(out);
        }
        for svc in &plan.services {
            let st = match self.store.load::<VmRecord>(&svc.service) {
                Ok(s) => s.unwrap_or_else(|| crate::vm::VmRecord::new(&svc.service)),
                Err(e) => {
                    out.push_str(&format!("  {}: {e}\n", svc.service));
                    continue;
                }
            };
            let layout = Layout::new(&svc.root);
            let line = match decide(svc, &st, layout.current().as_deref()) {
                VmNeed::Recover => format!(
                    "finish an interrupted deploy of {} (phase {})",
                    st.deployment
                        .as_ref()
                        .map(|d| d.target.version.as_str())
                        .unwrap_or("?"),
                    st.deployment
                        .as_ref()
                        .map(|d| d.phase.name())
                        .unwrap_or("?")
                ),
                VmNeed::EnsureRunning => format!("{} — up to date", svc.version),
                VmNeed::SkipFailed { reason } => format!(
                    "{} failed here before; not retried until the desired version changes ({reason})",
                    svc.version
                ),
                VmNeed::Deploy => {
                    deploy_steps(svc, st.current.as_ref().map(|c| c.version.as_str()))
                }
            };
            out.push_str(&format!("  {}: {line}\n", svc.service));
        }
        for j in &plan.jobs {
            let t = &j.service;
            let rec = self
                .once
                .record(&t.service)
                .unwrap_or_else(|| crate::job::JobRecord::new(&t.service));
            let line = match crate::job::decide(&rec, &t.version) {
                crate::job::JobNeed::Recover => {
                    "settle an interrupted run (a run cut off while its command ran fails; it is not run again by itself)".to_string()
                }
                crate::job::JobNeed::Done => format!("job {} — done", t.version),
                crate::job::JobNeed::SkipFailed { reason } => format!(
                    "job {} failed here; not run again until drover retry or a new version ({reason})",
                    t.version
                ),
                crate::job::JobNeed::Run => format!(
                    "job {}: ask the coordinator for its one lease; if granted, fetch {} (sha256 {}), stage releases/{}, run {:?} (timeout {}); else another host runs it",
                    t.version,
                    t.artifact_url,
                    t.sha256,
                    t.version,
                    t.run.command,
                    j.timeout
                ),
            };
            out.push_str(&format!("  {}: {line}\n", t.service));
        }
        for (name, why) in &plan.skipped {
            out.push_str(&format!("  {name}: not on this host ({why})\n"));
        }
        if plan.services.is_empty() && plan.jobs.is_empty() && plan.skipped.is_empty() {
            out.push_str("  no services for this host\n");
        }
        Ok(out)
    }
}

fn deploy_steps(svc: &ResolvedService, from: Option<&str>) -> String {
    let mut steps = vec![format!(
        "fetch {} (sha256 {})",
        svc.artifact_url,
        svc.sha256.short()
    )];
    steps.push(format!(
        "stage {}/releases/{}",
        svc.root.display(),
        svc.version
    ));
    if from.is_some() && svc.before_stop.is_some() {
        steps.push("before_stop hook".into());
    }
    steps.push("stop".into());
    steps.push("switch current".into());
    if svc.after_install.is_some() {
        steps.push("after_install hook".into());
    }
    steps.push("start".into());
    if let Some(h) = &svc.health {
        steps.push(format!("health {}", h.url));
    }
    if !svc.smoke.is_empty() {
        steps.push(format!("{} smoke test(s)", svc.smoke.len()));
    }
    format!(
        "{} → {}: {}",
        from.unwrap_or("(nothing)"),
        svc.version,
        steps.join(", ")
    )
}
