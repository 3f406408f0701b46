//! Shell completions and man pages for drover's binaries, generated from their clap
//! definitions so that they cannot drift from the flags the binary really takes.
//!
//! Every binary answers `<bin> generate <bash|zsh|fish|man> <dir>` before it parses its own
//! command line ([`intercept`]), so the word is neither in `--help` nor offered by the
//! completions themselves. `packaging/build.sh` runs it and the packages install the files.

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Command, ValueEnum};
use clap_complete::Shell;

/// What `generate` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Doc {
    /// A bash completion script, `<bin>.bash`.
    Bash,
    /// A zsh completion function, `_<bin>`.
    Zsh,
    /// A fish completion script, `<bin>.fish`.
    Fish,
    /// Section 1 man pages: `<bin>.1` and one `<bin>-<subcommand>.1` per subcommand.
    Man,
}

/// The word that asks a binary for a document.
pub const WORD: &str = "generate";

/// Writes `doc` for `cmd` into `dir` (which must exist) and returns the files written.
pub fn generate(doc: Doc, cmd: Command, dir: &Path) -> io::Result<Vec<PathBuf>> {
    let shell = match doc {
        Doc::Bash => Shell::Bash,
        Doc::Zsh => Shell::Zsh,
        Doc::Fish => Shell::Fish,
        Doc::Man => {
            let before = names(dir)?;
            clap_mangen::generate_to(cmd, dir)?;
            let mut made: Vec<PathBuf> = names(dir)?
                .into_iter()
                .filter(|p| !before.contains(p) && p.extension().is_some_and(|e| e == "1"))
                .collect();
            made.sort();
            return Ok(made);
        }
    };
    let mut cmd = cmd;
    let name = cmd.get_name().to_string();
    Ok(vec![clap_complete::generate_to(
        shell, &mut cmd, name, dir,
    )?])
}

fn names(dir: &Path) -> io::Result<Vec<PathBuf>> {
    std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect()
}

/// If the process was started as `<bin> generate <doc> <dir>`, writes the document for the
/// command `cmd` builds and returns the exit code; otherwise `None`, and the binary goes on
/// to parse its command line as usual.
pub fn intercept(cmd: impl FnOnce() -> Command) -> Option<ExitCode> {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if args.first().is_none_or(|a| a != WORD) {
        return None;
    }
    let cmd = cmd();
    let bin = cmd.get_name().to_string();
    let usage = format!("usage: {bin} {WORD} <bash|zsh|fish|man> <existing directory>");
    let (doc, dir) = match &args[1..] {
        [doc, dir] => (doc.to_string_lossy(), Path::new(dir)),
        _ => {
            eprintln!("{usage}");
            return Some(ExitCode::from(2));
        }
    };
    let Ok(doc) = Doc::from_str(&doc, false) else {
        eprintln!("{bin} {WORD}: unknown document '{doc}'\n{usage}");
        return Some(ExitCode::from(2));
    };
    match generate(doc, cmd, dir) {
        Ok(files) => {
            for f in files {
                println!("{}", f.display());
            }
            Some(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{bin} {WORD}: cannot write into {}: {e}", dir.display());
            Some(ExitCode::FAILURE)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Arg;

    fn sample() -> Command {
        Command::new("tool")
            .about("a sample tool")
            .subcommand(
                Command::new("run")
                    .about("runs")
                    .arg(Arg::new("fast").long("fast")),
            )
            .subcommand(Command::new("secret").hide(true))
    }

    #[test]
    fn every_document_is_written_under_its_conventional_name() {
        let dir = tempfile::tempdir().unwrap();
        let mut all = Vec::new();
        for doc in Doc::value_variants() {
            all.extend(generate(*doc, sample(), dir.path()).unwrap());
        }
        let mut names: Vec<String> = all
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["_tool", "tool-run.1", "tool.1", "tool.bash", "tool.fish"]
        );
        let bash = std::fs::read_to_string(dir.path().join("tool.bash")).unwrap();
        assert!(bash.contains("--fast"), "{bash}");
        let man = std::fs::read_to_string(dir.path().join("tool.1")).unwrap();
        assert!(
            man.contains("a sample tool") && !man.contains("secret"),
            "{man}"
        );
    }

    #[test]
    fn a_missing_directory_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("gone");
        assert!(generate(Doc::Bash, sample(), &gone).is_err());
        assert!(generate(Doc::Man, sample(), &gone).is_err());
    }
}
