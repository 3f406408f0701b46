//! Hostile input on the agent (issue 11, in part): a commit built to exhaust the agent's
//! memory or stack is refused with where and why, in bounded memory, and the running version
//! stays.

use std::os::unix::process::CommandExt;

use drover_tests::host::Fleet;

/// Nine levels of nine aliases: 9^10 values once expanded (the report's 407-byte bomb).
fn bomb() -> String {
    let mut text = String::from("environment: test\nx0: &a0 [x, x, x, x, x, x, x, x, x]\n");
    for i in 1..10 {
        let p = i - 1;
        text.push_str(&format!(
            "x{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
        ));
    }
    text
}

#[test]
fn a_yaml_bomb_commit_is_refused_in_bounded_memory_and_the_running_version_stays() {
    let f = Fleet::new();
    let h = f.host("h1");
    f.pin(&f.hello("1.0.0", &[]));
    assert_eq!(h.once().code, 0);
    let pids = h.app_pids();
    for (what, text) in [
        ("alias bomb", bomb()),
        (
            "deep nesting",
            format!("environment: test\nx:\n{}x\n", "- ".repeat(100_000)),
        ),
    ] {
        f.repo.write("environments/test.yaml", &text);
        f.repo.commit(what);
        // At most 1 GiB of address space (the unbounded parser needed over 6 GB).
        let mut cmd = h.cmd(&["once"]);
        // SAFETY: setrlimit only, between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                let lim = libc::rlimit {
                    rlim_cur: 1 << 30,
                    rlim_max: 1 << 30,
                };
                if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = cmd.output().unwrap();
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.code().is_some(),
            "{what}: killed by a signal: {all}"
        );
        assert_ne!(out.status.code(), Some(0), "{what}: {all}");
        assert!(all.contains("environments/test.yaml:"), "{what}: {all}");
        assert!(
            all.contains("alias bomb") || all.contains("levels deep"),
            "{what}: {all}"
        );
        assert_eq!(h.version().as_deref(), Some("1.0.0"), "{what}");
        assert_eq!(
            h.app_pids(),
            pids,
            "{what}: the running app was not touched"
        );
        // validate says the same.
        let v = std::process::Command::new(drover_tests::bin("drover-agent"))
            .arg("validate")
            .arg(&f.repo.dir)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&v.stdout).to_string();
        assert_eq!(v.status.code(), Some(1), "{text}");
        assert!(text.contains("environments/test.yaml:"), "{text}");
    }
}
