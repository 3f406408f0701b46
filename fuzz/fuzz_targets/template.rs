//! Template rendering: `{name}` and `{env.NAME}` in template files and spec strings.
//!
//! Nothing may panic, and the output stays linear in the input: each placeholder becomes
//! one of the (short) values below.
#![no_main]

use std::collections::BTreeMap;

use drover_desired::spec::{Template, Vars, env_names, render_str};
use drover_desired::yaml::Mark;
use libfuzzer_sys::fuzz_target;

/// The longest value below.
const LONGEST: usize = 16;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let names = BTreeMap::from([
        ("host".to_string(), "web-1".to_string()),
        ("environment".to_string(), "prod".to_string()),
        ("version".to_string(), "1.2.3".to_string()),
        ("rack".to_string(), "{host}{version}}".to_string()),
    ]);
    let env = BTreeMap::from([("SECRET".to_string(), "hunter2hunter2".to_string())]);
    for vars in [
        Vars {
            names: &names,
            env: None,
        },
        Vars {
            names: &names,
            env: Some(&env),
        },
    ] {
        if let Ok(out) = render_str(text, &vars) {
            assert!(
                out.len() <= text.len() * LONGEST + LONGEST,
                "output of {} bytes from {} bytes of template",
                out.len(),
                text.len()
            );
        }
    }
    let t = Template::new(text, Mark::file_start("services/hello.yaml"));
    let _ = t.names().count();
    let _ = env_names(text).count();
});
