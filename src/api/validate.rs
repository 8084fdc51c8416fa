//! Field-level validation helpers used while converting requests to domain types.
//!
//! Descriptions are fixed strings: they never echo what the client sent,
//! because what the client sent may be PHI.

use crate::app::Parsed;
use crate::error::{Description, FieldViolation};

/// Largest request accepted for processing (bytes of the encoded message).
/// Larger ones are rejected as INVALID_ARGUMENT (and audited); tonic's own
/// hard limit (1 MiB) stops anything larger still before decoding.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Collects violations while a request is parsed.
#[derive(Default)]
pub struct Checker {
    violations: Vec<FieldViolation>,
}

impl Checker {
    /// Records a violation.
    pub fn bad(&mut self, field: impl Into<String>, description: impl Into<Description>) {
        self.violations.push(FieldViolation { field: field.into(), description: description.into() });
    }

    /// A free-text string: trimmed, at most `max` characters, no control characters.
    pub fn text(&mut self, field: &str, s: &str, max: usize, required: bool) -> String {
        let t = s.trim();
        if required && t.is_empty() {
            self.bad(field, "is required");
        } else if t.chars().count() > max {
            self.bad(field, Description::TooLong(max));
        } else if t.chars().any(char::is_control) {
            self.bad(field, "must not contain control characters");
        }
        t.to_string()
    }

    /// A repeated field's length.
    pub fn count(&mut self, field: &str, len: usize, min: usize, max: usize) -> bool {
        if len < min {
            self.bad(field, if min == 1 { "at least one is required" } else { "too few entries" });
            false
        } else if len > max {
            self.bad(field, Description::TooMany(max));
            false
        } else {
            true
        }
    }

    /// Repeated strings, each checked as text.
    pub fn texts(&mut self, field: &str, items: &[String], max_items: usize, max_len: usize) -> Vec<String> {
        if !self.count(field, items.len(), 0, max_items) {
            return Vec::new();
        }
        items.iter().enumerate().map(|(i, s)| self.text(&format!("{field}[{i}]"), s, max_len, true)).collect()
    }

    /// Ends parsing: the value if nothing was wrong.
    pub fn finish<T>(self, value: impl FnOnce() -> T) -> Parsed<T> {
        if self.violations.is_empty() { Ok(value()) } else { Err(self.violations) }
    }

    /// Ends parsing with a value built along the way (`None` only if something was recorded).
    pub fn into_result<T>(mut self, value: Option<T>) -> Parsed<T> {
        match value {
            Some(v) if self.violations.is_empty() => Ok(v),
            _ => {
                if self.violations.is_empty() {
                    self.bad("request", "is invalid");
                }
                Err(self.violations)
            }
        }
    }

    /// True when no violation has been recorded.
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }
}

/// Phone syntax: optional leading +, digits with spaces, dots, dashes and
/// parentheses, 7 to 15 digits, optional extension ("x123" or "ext 123").
pub fn is_phone(s: &str) -> bool {
    let lower = s.to_ascii_lowercase();
    let (main, ext) = match lower.find("ext").or_else(|| lower.find('x')) {
        Some(i) => {
            let ext = lower[i..].trim_start_matches("ext").trim_start_matches('x').trim_start_matches('.').trim();
            (&lower[..i], Some(ext))
        }
        None => (lower.as_str(), None),
    };
    if let Some(ext) = ext
        && (ext.is_empty() || ext.len() > 6 || !ext.bytes().all(|c| c.is_ascii_digit()))
    {
        return false;
    }
    let main = main.trim();
    let body = main.strip_prefix('+').unwrap_or(main);
    if !body.chars().all(|c| c.is_ascii_digit() || matches!(c, ' ' | '-' | '.' | '(' | ')')) {
        return false;
    }
    let digits = body.chars().filter(char::is_ascii_digit).count();
    (7..=15).contains(&digits)
}

/// E-mail syntax: one @, a local part of 1-64 printable characters, and a
/// domain of dot-separated labels of letters, digits and hyphens.
pub fn is_email(s: &str) -> bool {
    let Some((local, domain)) = s.split_once('@') else { return false };
    if local.is_empty() || local.len() > 64 || s.len() > 254 || domain.contains('@') {
        return false;
    }
    if !local
        .chars()
        .all(|c| c.is_ascii_graphic() && !matches!(c, '(' | ')' | ',' | ':' | ';' | '<' | '>' | '[' | ']' | '\\' | '"'))
    {
        return false;
    }
    let labels: Vec<&str> = domain.split('.').collect();
    labels.len() >= 2
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// BCP 47-ish language tag: 2-8 letters, then hyphenated 1-8 alphanumeric subtags.
pub fn is_language_tag(s: &str) -> bool {
    let mut parts = s.split('-');
    let first_ok =
        parts.next().is_some_and(|p| (2..=8).contains(&p.len()) && p.chars().all(|c| c.is_ascii_alphabetic()));
    first_ok
        && parts.all(|p| (1..=8).contains(&p.len()) && p.chars().all(|c| c.is_ascii_alphanumeric()))
        && s.len() <= 35
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phones_accept_common_formats_and_reject_junk() {
        for ok in ["+1 (555) 010-0199", "555.010.0199", "5550100199 x12", "+44 20 7946 0958", "555-0101 ext 7"] {
            assert!(is_phone(ok), "{ok}");
        }
        for bad in ["", "12345", "call me", "+1 555 010 0199 x", "++15550100199", "1234567890123456"] {
            assert!(!is_phone(bad), "{bad}");
        }
    }

    #[test]
    fn emails_need_a_local_part_and_a_dotted_domain() {
        assert!(is_email("a.b+c@example.org"));
        for bad in ["", "a@", "@b.c", "a@b", "a b@c.d", "a@@b.c", "a@-b.c", "a@b..c"] {
            assert!(!is_email(bad), "{bad}");
        }
    }

    #[test]
    fn language_tags_follow_bcp47_shape() {
        assert!(is_language_tag("en"));
        assert!(is_language_tag("es-MX"));
        assert!(is_language_tag("zh-Hant-TW"));
        assert!(!is_language_tag("e"));
        assert!(!is_language_tag("en_US"));
    }

    #[test]
    fn text_checks_report_each_field() {
        let mut c = Checker::default();
        c.text("a", "  ", 10, true);
        c.text("b", &"x".repeat(11), 10, false);
        c.text("c", "ok\u{7}", 10, false);
        c.text("d", "fine", 10, true);
        let v = c.finish(|| ()).unwrap_err();
        let fields: Vec<_> = v.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["a", "b", "c"]);
    }

    #[test]
    fn length_and_count_descriptions_state_the_real_limit() {
        let mut c = Checker::default();
        c.text("note", &"x".repeat(1001), 1000, true);
        c.text("family", &"x".repeat(101), 100, true);
        c.count("names", 11, 0, 10);
        let v = c.finish(|| ()).unwrap_err();
        let said: Vec<String> = v.iter().map(|v| v.description.to_string()).collect();
        assert_eq!(
            said,
            [
                "is too long (at most 1000 characters)",
                "is too long (at most 100 characters)",
                "too many entries (at most 10)"
            ]
        );
    }
}
