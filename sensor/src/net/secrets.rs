//! Secrets kept in files (tokens, HMAC keys) and bearer tokens in `Authorization` headers.

use std::path::Path;

use super::NetError;

/// Reads a secret (token, key) from a file: its contents without surrounding whitespace.
/// `what` names it in errors ("HEC token file"). A file other users can read is used, with a
/// warning: refusing it would stop an agent over a permission an operator can fix later.
pub fn read_secret(path: &Path, what: &str) -> Result<String, NetError> {
    use std::os::unix::fs::PermissionsExt;
    let text = std::fs::read_to_string(path)
        .map_err(|e| NetError::io(format!("cannot read the {what} {}", path.display()), e))?;
    let secret = text.trim().to_owned();
    if secret.is_empty() {
        return Err(NetError::Config(format!(
            "the {what} {} is empty",
            path.display()
        )));
    }
    let mode = std::fs::metadata(path).map_or(0, |m| m.permissions().mode());
    if mode & 0o077 != 0 {
        log::warn!(
            "the {what} {} is accessible to other users (mode {:o}); consider chmod 600",
            path.display(),
            mode & 0o777
        );
    }
    Ok(secret)
}

/// The `Authorization` header value carrying `token`.
pub fn bearer_header(token: &str) -> String {
    format!("Bearer {token}")
}

/// The token of an `Authorization: Bearer <token>` header value (scheme case-insensitive).
pub fn bearer(header: Option<&str>) -> Option<&str> {
    let v = header?.trim();
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens() {
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(Some("Bearer ")), None);
        assert_eq!(bearer(None), None);
        assert_eq!(bearer(Some(&bearer_header("t-1"))), Some("t-1"));
    }

    #[test]
    fn secret_files() {
        let dir = std::env::temp_dir().join(format!("sensor-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("t"), "tok\n\n").expect("write");
        std::fs::write(dir.join("e"), " \n").expect("write");
        assert_eq!(read_secret(&dir.join("t"), "token").expect("read"), "tok");
        let empty = read_secret(&dir.join("e"), "token").expect_err("empty");
        assert!(empty.to_string().contains("is empty"), "{empty}");
        assert!(read_secret(&dir.join("missing"), "token").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
