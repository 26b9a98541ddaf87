//! The app features this build implements, for fail-closed config.
//!
//! An app may list features it requires (`App.required_features`). An
//! edge serves it only if it implements every one of them: an edge that
//! meets a name it does not know (the app was configured for a newer build)
//! answers that app with `FeatureUnsupported` (503), instead of serving it
//! without, say, the sign-in the app relies on.
//!
//! Names are compared exactly (they are lower-case by convention). A name
//! is never reused for a different meaning.

/// Every feature name this build implements.
///
/// - `websocket`: WebSocket upgrades (HTTP/1.1 `Upgrade`) are carried to
///   the app's backend.
/// - `oidc`: the edge signs users in (`preauth = oidc`,
///   [`crate::api::SIGN_IN_FEATURE`]) before a request reaches the app.
/// - `maintenance`: the edge answers an app in maintenance mode with 503
///   `Maintenance` ([`crate::api::MAINTENANCE_FEATURE`]).
/// - `oidc-app-client`: the edge signs an app's users in through the app's
///   own OpenID client ([`crate::api::APP_CLIENT_FEATURE`]).
pub const KNOWN: &[&str] = &["websocket", "oidc", "maintenance", "oidc-app-client"];

/// Whether this build implements the feature `name`.
pub fn is_known(name: &str) -> bool {
    KNOWN.contains(&name)
}

/// The first of `required` this build does not implement, if any: the app
/// must then not be served.
pub fn first_unknown<S: AsRef<str>>(required: &[S]) -> Option<&str> {
    required
        .iter()
        .map(AsRef::as_ref)
        .find(|name| !is_known(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_unknown_feature_is_named() {
        let cases: [(&[&str], Option<&str>); 7] = [
            (&[], None),
            (&["websocket"], None),
            (&["websocket", "websocket"], None),
            (&["mtls"], Some("mtls")),
            (&["websocket", "oidc", "mtls"], Some("mtls")),
            // Exact names: a spelling this build does not use is unknown.
            (&["WebSocket"], Some("WebSocket")),
            (&[""], Some("")),
        ];
        for (required, want) in cases {
            assert_eq!(first_unknown(required), want, "{required:?}");
        }
        // Owned names, as `App.required_features` holds them.
        let owned = vec!["websocket".to_owned(), "mtls".to_owned()];
        assert_eq!(first_unknown(&owned), Some("mtls"));
    }

    /// Names are lower-case tokens, listed once.
    #[test]
    fn known_names_are_distinct_tokens() {
        for (i, name) in KNOWN.iter().enumerate() {
            assert!(
                !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
                "{name:?}"
            );
            assert!(!KNOWN[..i].contains(name), "{name:?} listed twice");
        }
    }
}
