//! Approve from Slack: `POST /v1/integrations/slack/actions` receives Slack's interaction
//! payloads (a click on an approval message's button). Slack signs each request:
//! `X-Slack-Signature: v0=<hex HMAC-SHA256 of "v0:" + X-Slack-Request-Timestamp + ":" + body>`
//! with the app's signing secret; a timestamp more than 5 minutes from now is refused (a
//! replay). [`verify`] and [`parse`] are pure; the handler in `http.rs` maps the Slack user
//! to a drover identity and applies the API's RBAC.

use serde::Deserialize;

/// The widest gap between Slack's timestamp and now.
pub const MAX_SKEW_S: u64 = 300;

/// Why a Slack request is refused (401; nothing happens).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// A header is missing.
    #[error("unsigned: Slack requests carry X-Slack-Request-Timestamp and X-Slack-Signature")]
    Unsigned,
    /// The timestamp is not a number, or too far from now.
    #[error(
        "stale: X-Slack-Request-Timestamp is more than {MAX_SKEW_S}s from the coordinator's clock (a replay, or a clock off)"
    )]
    Stale,
    /// No signing secret verifies it.
    #[error("the X-Slack-Signature does not match the body and any configured signing secret")]
    Mismatch,
}

/// Checks Slack's signature of `body` against `secret`, at `now_s` (Unix seconds). Pure.
pub fn verify(
    secret: &[u8],
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now_s: u64,
) -> Result<(), Refused> {
    let (Some(ts), Some(sig)) = (timestamp, signature) else {
        return Err(Refused::Unsigned);
    };
    let t: u64 = ts.trim().parse().map_err(|_| Refused::Stale)?;
    if t.abs_diff(now_s) > MAX_SKEW_S {
        return Err(Refused::Stale);
    }
    let Some(hex_sig) = sig.trim().strip_prefix("v0=") else {
        return Err(Refused::Mismatch);
    };
    let mut base = format!("v0:{}:", ts.trim()).into_bytes();
    base.extend_from_slice(body);
    if crate::webhook::hmac_matches(secret, &base, hex_sig) {
        Ok(())
    } else {
        Err(Refused::Mismatch)
    }
}

/// A click, as drover reads it from the payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Click {
    /// The Slack user id.
    pub user: String,
    /// Approve (true) or reject.
    pub approve: bool,
    /// Environment.
    pub environment: String,
    /// Service.
    pub service: String,
    /// Version.
    pub version: String,
    /// Where the message is updated.
    pub response_url: Option<String>,
}

#[derive(Deserialize)]
struct Payload {
    #[serde(rename = "type")]
    kind: String,
    user: User,
    #[serde(default)]
    actions: Vec<ActionIn>,
    response_url: Option<String>,
}

#[derive(Deserialize)]
struct User {
    id: String,
}

#[derive(Deserialize)]
struct ActionIn {
    action_id: String,
    #[serde(default)]
    value: String,
}

/// Reads a verified request body (`application/x-www-form-urlencoded`, `payload=<JSON>`):
/// one `block_actions` click on drover's Approve or Reject button. Pure.
pub fn parse(body: &[u8]) -> Result<Click, String> {
    let json = url::form_urlencoded::parse(body)
        .find(|(k, _)| k == "payload")
        .map(|(_, v)| v.into_owned())
        .ok_or("the body has no `payload` field (Slack sends payload=<JSON>)")?;
    let p: Payload =
        serde_json::from_str(&json).map_err(|e| format!("the payload is not Slack's JSON: {e}"))?;
    if p.kind != "block_actions" {
        return Err(format!(
            "a `{}` interaction; drover only handles block_actions (its buttons)",
            crate::auth::cap(&p.kind, 40)
        ));
    }
    let [a] = p.actions.as_slice() else {
        return Err(format!(
            "{} actions in one click; drover's buttons send one",
            p.actions.len()
        ));
    };
    let approve = match a.action_id.as_str() {
        "drover_approve" => true,
        "drover_reject" => false,
        other => {
            return Err(format!(
                "action `{}` is not drover's (drover_approve, drover_reject)",
                crate::auth::cap(other, 40)
            ));
        }
    };
    let mut parts = a.value.split('/');
    let (Some(env), Some(service), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("the button's value is not environment/service/version".into());
    };
    for (what, v) in [
        ("environment", env),
        ("service", service),
        ("version", version),
    ] {
        if !crate::core::valid_name(v, 128) {
            return Err(format!("the button's {what} is not a valid name"));
        }
    }
    if !crate::core::valid_name(&p.user.id, 64) {
        return Err("the Slack user id is not an id".into());
    }
    Ok(Click {
        user: p.user.id,
        approve,
        environment: env.into(),
        service: service.into(),
        version: version.into(),
        response_url: p.response_url,
    })
}

/// The message that replaces the approval request once a click is handled.
pub fn answer(text: &str) -> serde_json::Value {
    serde_json::json!({
        "replace_original": true,
        "text": super::payload::slack_escape(text),
    })
}

/// An answer only the clicking user sees (the approval request stays).
pub fn ephemeral(text: &str) -> serde_json::Value {
    serde_json::json!({
        "response_type": "ephemeral",
        "replace_original": false,
        "text": super::payload::slack_escape(text),
    })
}
