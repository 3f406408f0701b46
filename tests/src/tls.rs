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
        use std::os::unix::fs::PermissionsExt;
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
        let mut csr = vec!["req"];
        csr.extend(ec);
        csr.extend([
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ]);
        openssl(dir, &csr);
        std::fs::write(
            dir.join("ext.cnf"),
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .expect("ext");
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.pem",
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
            ],
        );
        let key = dir.join("server.key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        TestCa {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key,
            dir: dir.to_path_buf(),
        }
    }

    /// A client certificate for `cn` signed by the CA (extended key usage clientAuth), and
    /// its key (mode 600): `(cert, key)`.
    pub fn client(&self, cn: &str) -> (PathBuf, PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let (key, csr, pem, ext) = (
            format!("{cn}.key"),
            format!("{cn}.csr"),
            format!("{cn}.pem"),
            format!("{cn}.cnf"),
        );
        openssl(
            &self.dir,
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
                &format!("/CN={cn}"),
            ],
        );
        std::fs::write(
            self.dir.join(&ext),
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n",
        )
        .expect("ext");
        openssl(
            &self.dir,
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
        let key = self.dir.join(key);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        (self.dir.join(pem), key)
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
