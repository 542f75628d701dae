//! Test certificates: a CA and server certificates it signed, made with the `openssl`
//! CLI into a test's directory (for a TLS RabbitMQ node, a TLS fake Segment).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Runs `openssl args…` in `dir`; panics with its output when it fails.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("the openssl CLI runs");
    assert!(out.status.success(), "openssl {args:?}: {out:?}");
}

/// A test CA, valid for two days: `ca.pem` and `ca.key` in `dir`. Returns `ca.pem`.
pub fn test_ca(dir: &Path) -> PathBuf {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-subj",
            "/CN=segment-bridge test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    dir.join("ca.pem")
}

/// A server certificate for the names in `san` (e.g. `DNS:localhost,IP:127.0.0.1`),
/// signed by the CA [`test_ca`] made in `dir`: `<name>.pem` and `<name>.key`, returned in
/// that order.
pub fn server_certificate(dir: &Path, name: &str, san: &str) -> (PathBuf, PathBuf) {
    let (key, csr, ext, pem) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.ext"),
        format!("{name}.pem"),
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            "/CN=segment-bridge test server",
        ],
    );
    std::fs::write(
        dir.join(&ext),
        format!(
            "subjectAltName={san}\nbasicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
        ),
    )
    .unwrap();
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
            "-days",
            "2",
            "-out",
            &pem,
            "-extfile",
            &ext,
        ],
    );
    (dir.join(pem), dir.join(key))
}
