//! Handing a source's secret (a Jebbit `shared_secret`, a JotUrl URL token) to where the
//! intake reads it, without showing it: a file only its owner can read, or, when asked, a
//! Kubernetes Secret manifest on standard output. The secret goes nowhere else.

use std::io::Write;
use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};

/// The environment variable the intake reads a source's secret from.
pub fn env_var(source: &str) -> String {
    format!(
        "{}__INTAKE__SOURCES__{}__SECRET",
        crate::config::ENV_PREFIX,
        source.to_ascii_uppercase()
    )
}

/// The file a secret goes to when the operator names none: in the working directory.
pub fn default_file(source: &str) -> PathBuf {
    PathBuf::from(format!("{source}.secret"))
}

/// Checks that `path` can be written, before a secret exists that would be lost if it
/// could not: opens an existing file for writing without changing it, or creates the
/// file and removes it again.
pub fn check_writable(path: &Path) -> std::io::Result<()> {
    if path.exists() {
        return std::fs::OpenOptions::new().write(true).open(path).map(drop);
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path)?;
    std::fs::remove_file(path)
}

/// Writes `secret` (no newline) to `path`, readable and writable by its owner only (0600),
/// also when the file already existed with wider permissions.
pub fn write_file(path: &Path, secret: &SecretString) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        options.mode(0o600);
        let file = options.open(path)?;
        // `mode` applies only to a file this call creates.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        write_all(file, secret)
    }
    #[cfg(not(unix))]
    {
        write_all(options.open(path)?, secret)
    }
}

fn write_all(mut file: std::fs::File, secret: &SecretString) -> std::io::Result<()> {
    file.write_all(secret.expose_secret().as_bytes())?;
    file.sync_all()
}

/// A Kubernetes Secret named `name` whose one key is the source's environment variable,
/// ready for `envFrom: [{secretRef: {name: …}}]` on the intake's Deployment.
pub fn k8s_manifest(name: &str, source: &str, secret: &SecretString) -> String {
    // JSON string quoting is valid YAML, and safe for any character in the secret.
    let quote = |s: &str| serde_json::Value::from(s).to_string();
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {}\n  labels:\n    app.kubernetes.io/name: segment-bridge\ntype: Opaque\nstringData:\n  {}: {}\n",
        quote(name),
        env_var(source),
        quote(secret.expose_secret())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_is_the_bare_secret_and_only_its_owner_may_read_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.secret");
        std::fs::write(&path, "old and longer content").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        write_file(&path, &SecretString::from("s3cr\"t")).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "s3cr\"t");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn the_manifest_holds_the_secret_under_the_intakes_variable() {
        let m = k8s_manifest("sb-jebbit-eu", "jebbit_eu", &SecretString::from("a\"b:c"));
        assert!(m.contains("kind: Secret"), "{m}");
        assert!(
            m.contains("  SEGMENT_BRIDGE__INTAKE__SOURCES__JEBBIT_EU__SECRET: \"a\\\"b:c\"\n"),
            "{m}"
        );
    }
}
