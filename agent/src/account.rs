//! Users and groups on the host: `run.user` / `run.group` / `template_owner` looked up in the
//! system's account database (NSS), and what a service runs as.

use std::ffi::{CStr, CString};

use crate::spec::{Account, ResolvedService};

/// Why an account could not be used.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs, reason = "variant fields are named for what they hold")]
pub enum AccountError {
    /// No such user or group on this host.
    #[error(
        "{what} `{name}` does not exist on this host; create it (e.g. `useradd --system {name}`) or change the service"
    )]
    Unknown {
        /// "user" or "group".
        what: &'static str,
        name: String,
    },
    /// The lookup itself failed.
    #[error("looking up {what} `{name}`: {source}")]
    Lookup {
        /// "user" or "group".
        what: &'static str,
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// Who a service's processes run as, and who owns the files made for it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ids {
    /// User of the app, hooks and smoke commands (`None`: the agent's, root).
    pub uid: Option<u32>,
    /// Their group.
    pub gid: Option<u32>,
    /// Owner of rendered templates (`None`: the agent's).
    pub template_uid: Option<u32>,
    /// Group of rendered templates.
    pub template_gid: Option<u32>,
}

/// What a process started as another user keeps of the agent's environment: only these, so
/// that what the agent holds (the `{env.*}` values of every service, cloud credentials) stays
/// with root. The service's own `run.env` is set on top.
pub const PASSED_ENV: [&str; 4] = ["PATH", "LANG", "LC_ALL", "TZ"];

impl Ids {
    /// Whether processes would run as root.
    pub fn is_root(&self) -> bool {
        matches!(self.uid, None | Some(0))
    }

    /// The environment a child starts from when it runs as another user ([`PASSED_ENV`] of
    /// the agent's); `None` when it runs as root and inherits the agent's.
    pub fn base_env(&self) -> Option<Vec<(&'static str, String)>> {
        if self.is_root() {
            return None;
        }
        Some(
            PASSED_ENV
                .iter()
                .filter_map(|k| std::env::var(k).ok().map(|v| (*k, v)))
                .collect(),
        )
    }
}

/// The user and group a process-managed service runs as: its `run.user`/`run.group`, each
/// else the agent's `run_as` default (a service that names only a group still runs as the
/// default user, never as root by omission). Names, not looked up.
pub fn run_as<'a>(
    svc: &'a ResolvedService,
    default: Option<&'a (Option<Account>, Option<Account>)>,
) -> (Option<&'a Account>, Option<&'a Account>) {
    let (du, dg) = default
        .map(|(u, g)| (u.as_ref(), g.as_ref()))
        .unwrap_or((None, None));
    let user = svc.run.user.as_ref().or(du);
    let group = match (&svc.run.user, &svc.run.group) {
        (_, Some(g)) => Some(g),
        // A user of its own: that user's primary group.
        (Some(_), None) => None,
        (None, None) => dg,
    };
    (user, group)
}

/// Looks the service's accounts up. `process` says whether `run.user` applies (the process
/// manager); under systemd the unit's `User=` decides, and only template ownership is used.
pub fn resolve(
    svc: &ResolvedService,
    default: Option<&(Option<Account>, Option<Account>)>,
    process: bool,
) -> Result<Ids, AccountError> {
    let (user, group) = if process {
        run_as(svc, default)
    } else {
        (None, None)
    };
    let (uid, primary) = match user {
        Some(u) => {
            let (uid, gid) = user_ids(u)?;
            (Some(uid), Some(gid))
        }
        None => (None, None),
    };
    let gid = match group {
        Some(g) => Some(group_id(g)?),
        None => primary,
    };
    let template_uid = svc.template_owner.as_ref().map(user_ids).transpose()?;
    let template_gid = match &svc.template_group {
        Some(g) => Some(group_id(g)?),
        None => gid,
    };
    Ok(Ids {
        uid,
        gid,
        template_uid: template_uid.map(|(u, _)| u),
        template_gid,
    })
}

/// (uid, primary gid) of a user name or numeric id.
pub fn user_ids(a: &Account) -> Result<(u32, u32), AccountError> {
    lookup_user(a.as_str())
}

/// The gid of a group name or numeric id.
pub fn group_id(a: &Account) -> Result<u32, AccountError> {
    if let Ok(n) = a.as_str().parse::<u32>() {
        return Ok(n);
    }
    let name = cstring(a.as_str());
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: the out-pointers point at live locals and `buf` outlives the call; the
        // result's strings point into `buf`, which is not read after it is resized.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut out: *mut libc::group = std::ptr::null_mut();
        let rc = unsafe {
            libc::getgrnam_r(
                name.as_ptr(),
                &mut grp,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut out,
            )
        };
        match rc {
            0 if out.is_null() => {
                return Err(AccountError::Unknown {
                    what: "group",
                    name: a.to_string(),
                });
            }
            0 => return Ok(grp.gr_gid),
            libc::ERANGE if buf.len() < 1 << 20 => buf.resize(buf.len() * 2, 0),
            e => {
                return Err(AccountError::Lookup {
                    what: "group",
                    name: a.to_string(),
                    source: std::io::Error::from_raw_os_error(e),
                });
            }
        }
    }
}

fn cstring(s: &str) -> CString {
    // Account names are validated: no NUL.
    CString::new(s).expect("account names hold no NUL")
}

fn lookup_user(s: &str) -> Result<(u32, u32), AccountError> {
    let numeric = s.parse::<u32>().ok();
    let name = cstring(s);
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: as in `group_id`.
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let mut out: *mut libc::passwd = std::ptr::null_mut();
        let rc = unsafe {
            match numeric {
                Some(uid) => {
                    libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr().cast(), buf.len(), &mut out)
                }
                None => libc::getpwnam_r(
                    name.as_ptr(),
                    &mut pw,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    &mut out,
                ),
            }
        };
        match rc {
            0 if out.is_null() => {
                return Err(AccountError::Unknown {
                    what: "user",
                    name: s.to_string(),
                });
            }
            0 => return Ok((pw.pw_uid, pw.pw_gid)),
            libc::ERANGE if buf.len() < 1 << 20 => buf.resize(buf.len() * 2, 0),
            e => {
                return Err(AccountError::Lookup {
                    what: "user",
                    name: s.to_string(),
                    source: std::io::Error::from_raw_os_error(e),
                });
            }
        }
    }
}

/// The name of user `uid`, for messages.
pub fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0u8; 4096];
    // SAFETY: as in `group_id`; the name is copied out before `buf` is dropped.
    unsafe {
        let mut pw: libc::passwd = std::mem::zeroed();
        let mut out: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr().cast(), buf.len(), &mut out);
        if rc != 0 || out.is_null() || pw.pw_name.is_null() {
            return None;
        }
        Some(CStr::from_ptr(pw.pw_name).to_string_lossy().into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(user: Option<&str>, group: Option<&str>) -> ResolvedService {
        serde_json::from_value(serde_json::json!({
            "service": "hello", "environment": "prod", "version": "1",
            "sha256": "a".repeat(64), "artifact_url": "http://x/a.tgz", "root": "/srv/hello",
            "keep_releases": 5, "shared": [], "templates": [],
            "run": {"unit": null, "command": ["bin/hello"], "env": {}, "stop_timeout": "10s",
                    "user": user, "group": group},
            "before_stop": null, "after_install": null, "health": null, "smoke": [], "vars": {}
        }))
        .unwrap()
    }

    /// Found in review: a service naming only `run.group` ran as root.
    #[test]
    fn a_service_naming_only_a_group_runs_as_the_default_user() {
        let acct = |n: &str| Account::parse(n).unwrap();
        let default = (Some(acct("app")), Some(acct("app")));
        let names = |s: &ResolvedService| {
            let (u, g) = run_as(s, Some(&default));
            (u.map(|a| a.to_string()), g.map(|a| a.to_string()))
        };
        let s = |n: &str| Some(n.to_string());
        assert_eq!(names(&svc(None, None)), (s("app"), s("app")));
        assert_eq!(names(&svc(None, Some("web"))), (s("app"), s("web")));
        assert_eq!(names(&svc(Some("web"), None)), (s("web"), None));
        assert_eq!(names(&svc(Some("web"), Some("ops"))), (s("web"), s("ops")));
        assert_eq!(run_as(&svc(None, Some("web")), None).0, None);
    }

    #[test]
    fn root_and_unknown() {
        let root = Account::parse("root").unwrap();
        assert_eq!(user_ids(&root).unwrap(), (0, 0));
        assert_eq!(user_ids(&Account::parse("0").unwrap()).unwrap().0, 0);
        assert_eq!(group_id(&Account::parse("root").unwrap()).unwrap(), 0);
        assert_eq!(group_id(&Account::parse("4242").unwrap()).unwrap(), 4242);
        let e = user_ids(&Account::parse("no-such-user-x").unwrap()).unwrap_err();
        assert!(e.to_string().contains("does not exist on this host"), "{e}");
        assert!(group_id(&Account::parse("no-such-group-x").unwrap()).is_err());
        assert_eq!(user_name(0).as_deref(), Some("root"));
    }
}
