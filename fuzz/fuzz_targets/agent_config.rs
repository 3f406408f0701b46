//! The agent's configuration: a main file and a drop-in, merged, parsed strictly, validated.
//!
//! The input is the two texts separated by a NUL byte. Nothing may panic. Files the config
//! names (a token, a CA bundle) are read with a size cap and only if regular, so a hostile
//! path such as `/dev/zero` or a FIFO is an error, not a hang.
#![no_main]

use std::collections::BTreeMap;
use std::path::PathBuf;

use drover_agent::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut files = Vec::new();
    for (name, part) in [
        "/etc/drover/agent.yaml",
        "/etc/drover/agent.d/10-local.yaml",
    ]
    .iter()
    .zip(data.split(|b| *b == 0))
    {
        let Ok(text) = std::str::from_utf8(part) else {
            return;
        };
        files.push((PathBuf::from(name), text.to_string()));
    }
    let env = BTreeMap::from([("DROVER_TOKEN".to_string(), "t0ken".to_string())]);
    let _ = Config::from_texts(&files, env);
});
