//! A test certificate authority made with the real `openssl` command: a CA, and a server
//! certificate it signs for 127.0.0.1 and localhost.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The files of a test CA and one server certificate.
pub struct TestCa {
    /// The CA certificate (what clients trust).
    pub ca: PathBuf,
    /// The server's certificate, PEM.
    pub cert: PathBuf,
    /// The server's private key, PEM, mode 600.
    pub key: PathBuf,
    /// Where the files are (the CA's key too, to sign client certificates).
    dir: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TestCa {
    /// Makes the CA and the server certificate under `dir`.
    pub fn new(dir: &Path) -> TestCa {
        std::fs::create_dir_all(dir).expect("mkdir");
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509"];
        ca.extend(ec);
        ca.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-subj",
            "/CN=drover test CA",
            "-days",
            "2",
        ]);
        openssl(dir, &ca);
        let (cert, key) = issue(
            dir,
            "server",
            "/CN=127.0.0.1",
            "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
        );
        TestCa {
            ca: dir.join("ca.pem"),
            cert,
            key,
            dir: dir.to_path_buf(),
        }
    }

    /// A client certificate for `cn` signed by the CA (extended key usage clientAuth), and
    /// its key (mode 600): `(cert, key)`.
    pub fn client(&self, cn: &str) -> (PathBuf, PathBuf) {
        issue(
            &self.dir,
            cn,
            &format!("/CN={cn}"),
            "extendedKeyUsage=clientAuth\n",
        )
    }

    /// The coordinator config lines for it.
    pub fn config(&self) -> String {
        format!(
            "tls: {{ cert: {}, key: {} }}\n",
            self.cert.display(),
            self.key.display()
        )
    }
}

/// A new EC key `dir/NAME.key` (mode 600) and its certificate `dir/NAME.pem` for `subject`,
/// signed by the CA in `dir` with `usage` (extension lines) besides the basic constraints:
/// `(cert, key)`.
fn issue(dir: &Path, name: &str, subject: &str, usage: &str) -> (PathBuf, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let (key, csr, pem, ext) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.pem"),
        format!("{name}.cnf"),
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            subject,
        ],
    );
    std::fs::write(
        dir.join(&ext),
        format!("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n{usage}"),
    )
    .expect("ext");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            &ext,
        ],
    );
    let key = dir.join(key);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    (dir.join(pem), key)
}
