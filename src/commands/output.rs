//! How the CLI shows what it got: JSON in the proto3 JSON mapping (with
//! every field present, timestamps in UTC with `Z`, hashes in hex like
//! everywhere else in the CLI), and errors a person can act on.

use base64::Engine;
use serde_json::Value;
use tonic_types::StatusExt;

/// Fields holding a SHA-256 hash (bytes, base64 in proto3 JSON), shown in hex.
const HASH_FIELDS: &[&str] = &["hash", "previousHash"];

/// Fields holding a `google.protobuf.Timestamp`.
const TIME_FIELDS: &[&str] = &[
    "time",
    "createTime",
    "updateTime",
    "deleteTime",
    "grantTime",
    "expireTime",
    "reviewTime",
    "startTime",
    "finishTime",
    "eraseTime",
];

/// `v` as pretty JSON, as the module docs say.
pub fn json<T: serde::Serialize>(v: &T) -> anyhow::Result<String> {
    let mut value = serde_json::to_value(v)?;
    normalize(&mut value);
    Ok(serde_json::to_string_pretty(&value)?)
}

fn normalize(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for (k, field) in map.iter_mut() {
                match field {
                    Value::String(s) if HASH_FIELDS.contains(&k.as_str()) => {
                        if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(s.as_bytes()) {
                            *s = hex::encode(bytes);
                        }
                    }
                    Value::String(s) if TIME_FIELDS.contains(&k.as_str()) => {
                        if let Some(utc) = zulu(s) {
                            *s = utc;
                        }
                    }
                    other => normalize(other),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(normalize),
        _ => {}
    }
}

/// An RFC 3339 time in UTC with the `Z` designator proto3 JSON requires.
fn zulu(s: &str) -> Option<String> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    t.to_offset(time::UtcOffset::UTC).format(&time::format_description::well_known::Rfc3339).ok()
}

/// A status as an error to print: code, message, and each bad field with why.
pub fn status(s: tonic::Status) -> anyhow::Error {
    let mut text = format!("{:?}: {}", s.code(), s.message());
    if let Some(bad) = s.get_details_bad_request() {
        for v in bad.field_violations {
            text += &format!("\n  {}: {}", v.field, v.description);
        }
    }
    if let Some(hint) = hint(&s) {
        text += &format!("\nhint: {hint}");
    }
    anyhow::anyhow!(text)
}

/// What to do about a call that failed before carevault answered it.
fn hint(s: &tonic::Status) -> Option<&'static str> {
    match s.code() {
        // A server that requires a client certificate checks it after a
        // TLS 1.3 handshake has completed on the client's side, so a client
        // without one may already be sending its request when the server's
        // alert closes the connection: that surfaces as an h2 error.
        tonic::Code::Cancelled | tonic::Code::Unknown | tonic::Code::Unavailable | tonic::Code::Internal
            if ["transport", "canceled", "h2 protocol error"].iter().any(|m| s.message().contains(m)) =>
        {
            Some(
                "the connection failed before the server answered. If the server uses TLS, use an https:// URL with --tls-ca; if it requires client certificates, add --tls-client-cert and --tls-client-key",
            )
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_become_hex_and_times_end_in_z_but_other_strings_stay() {
        let mut v = serde_json::json!({
            "events": [{"hash": "AAEC", "time": "2026-12-01T09:25:20.683872+00:00", "actor": "AAEC"}],
            "patient": {"createTime": "2026-01-01T01:00:00+01:00", "names": [{"family": "2026-12-01T09:25:20+00:00"}]}
        });
        normalize(&mut v);
        assert_eq!(v["events"][0]["hash"], "000102");
        assert_eq!(v["events"][0]["time"], "2026-12-01T09:25:20.683872Z");
        assert_eq!(v["events"][0]["actor"], "AAEC");
        assert_eq!(v["patient"]["createTime"], "2026-01-01T00:00:00Z");
        assert_eq!(v["patient"]["names"][0]["family"], "2026-12-01T09:25:20+00:00");
    }
}
