//! lighttpd: static files (artifacts) and Git smart HTTP (`git http-backend`) under `/git/`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running lighttpd.
pub struct Lighttpd {
    /// Its port.
    pub port: u16,
    /// The directory served as static files.
    pub docroot: PathBuf,
    conf: PathBuf,
    child: Option<Child>,
}

impl Lighttpd {
    /// Serves `docroot` statically and, if given, the bare repos under `repos` at `/git/`.
    pub fn start(work: &Path, docroot: &Path, repos: Option<&Path>) -> Lighttpd {
        let port = crate::free_port();
        std::fs::create_dir_all(docroot).expect("docroot");
        let mut conf = format!(
            r#"server.modules = ("mod_alias", "mod_cgi", "mod_setenv")
server.bind = "127.0.0.1"
server.port = {port}
server.document-root = "{doc}"
server.errorlog = "{work}/lighttpd-{port}.log"
mimetype.assign = ( "" => "application/octet-stream" )
"#,
            doc = docroot.display(),
            work = work.display(),
        );
        if let Some(repos) = repos {
            conf.push_str(&format!(
                r#"$HTTP["url"] =~ "^/git/" {{
  alias.url = ( "/git/" => "/usr/lib/git-core/git-http-backend/" )
  cgi.assign = ( "" => "" )
  setenv.set-environment = ( "GIT_PROJECT_ROOT" => "{r}", "GIT_HTTP_EXPORT_ALL" => "1", "REMOTE_USER" => "test", "GIT_CONFIG_GLOBAL" => "/dev/null" )
}}
"#,
                r = repos.display()
            ));
        }
        let path = work.join(format!("lighttpd-{port}.conf"));
        std::fs::write(&path, conf).expect("write conf");
        let mut l = Lighttpd {
            port,
            docroot: docroot.to_path_buf(),
            conf: path,
            child: None,
        };
        l.restart();
        l
    }

    /// The base URL of the static files.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stops the server.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        let child = Command::new("lighttpd")
            .arg("-D")
            .arg("-f")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("lighttpd starts (apt-get install lighttpd)");
        self.child = Some(child);
        crate::wait_port(self.port, Duration::from_secs(10));
    }
}

impl Drop for Lighttpd {
    fn drop(&mut self) {
        self.stop();
    }
}
