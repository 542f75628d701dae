//! A JotUrl CTA's set-up: JotUrl signs nothing, so a source's secret is a random token in
//! its webhook URL (`<public URL>/webhooks/<source>/<token>`). This module makes the token
//! and the URL; handing the token over is [`super::secret_out`]'s.

use base64::Engine;
use secrecy::{ExposeSecret, SecretString};

/// Random bytes per token: 256 bits, beyond guessing.
pub const TOKEN_BYTES: usize = 32;

/// A fresh token: [`TOKEN_BYTES`] from the operating system's random source, URL-safe
/// base64 without padding (43 characters of `A-Z a-z 0-9 - _`).
pub fn new_token() -> Result<SecretString, getrandom::Error> {
    let mut bytes = [0u8; TOKEN_BYTES];
    getrandom::fill(&mut bytes)?;
    Ok(SecretString::from(
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes),
    ))
}

/// The URL to paste into JotUrl's "Set webhook" dialog. It holds the token.
pub fn webhook_url(public_url: &str, source: &str, token: &SecretString) -> SecretString {
    SecretString::from(format!(
        "{}/webhooks/{source}/{}",
        public_url.trim_end_matches('/'),
        token.expose_secret()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_43_url_safe_characters_and_never_repeat() {
        let tokens: Vec<String> = (0..100)
            .map(|_| new_token().unwrap().expose_secret().to_owned())
            .collect();
        for t in &tokens {
            assert_eq!(t.len(), 43, "{t}");
            assert!(
                t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                "{t}"
            );
        }
        let distinct: std::collections::BTreeSet<_> = tokens.iter().collect();
        assert_eq!(distinct.len(), tokens.len());
    }

    #[test]
    fn the_webhook_url_is_the_sources_route_with_the_token() {
        let url = webhook_url("https://in.example.com/", "cta", &SecretString::from("tok"));
        assert_eq!(
            url.expose_secret(),
            "https://in.example.com/webhooks/cta/tok"
        );
    }
}
