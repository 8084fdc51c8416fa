//! Normalization of searchable values before they are blind-indexed, so that
//! equal-meaning inputs produce equal index keys.

use unicode_normalization::UnicodeNormalization;
use unicode_normalization::char::is_combining_mark;

/// A family name, case- and accent-insensitive: NFKD, combining marks removed,
/// lowercased, and only letters and digits kept ("O'Brien-Núñez" -> "obriennunez").
pub fn family_name(s: &str) -> String {
    s.nfkd().filter(|c| !is_combining_mark(*c)).flat_map(char::to_lowercase).filter(|c| c.is_alphanumeric()).collect()
}

/// An identifier value or member id: uppercase, with spaces, dashes and dots removed.
pub fn identifier_value(s: &str) -> String {
    s.chars().filter(|c| !matches!(c, ' ' | '-' | '.' | '\t')).flat_map(char::to_uppercase).collect()
}

/// An identifier system: trimmed and lowercased.
pub fn identifier_system(s: &str) -> String {
    s.trim().to_lowercase()
}

/// The bytes indexed for an identifier: system, NUL, value.
pub fn identifier_key(system: &str, value: &str) -> Vec<u8> {
    let mut v = identifier_system(system).into_bytes();
    v.push(0);
    v.extend_from_slice(identifier_value(value).as_bytes());
    v
}

/// The bytes indexed for family name + birth date: name, NUL, date text.
pub fn name_birth_date_key(family: &str, birth_date: &str) -> Vec<u8> {
    let mut v = family_name(family).into_bytes();
    v.push(0);
    v.extend_from_slice(birth_date.as_bytes());
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn family_names_ignore_case_accents_and_punctuation() {
        assert_eq!(family_name("Núñez"), "nunez");
        assert_eq!(family_name("NUNEZ"), "nunez");
        assert_eq!(family_name("O'Brien-Smith"), "obriensmith");
        assert_eq!(family_name("Zoë"), family_name("zoe"));
    }

    #[test]
    fn identifier_values_ignore_case_spaces_and_dashes() {
        assert_eq!(identifier_value("123-45-6789"), "123456789");
        assert_eq!(identifier_value("abc 12"), "ABC12");
        assert_eq!(identifier_key("urn:X", "a-1"), identifier_key(" urn:x ", "A1"));
    }
}
