//! Record identifiers: UUID v7 newtypes that parse from their canonical text.

use std::fmt;

use uuid::Uuid;

macro_rules! id_type {
    ($name:ident, $doc:literal) => {
        #[doc = $doc]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(Uuid);

        impl $name {
            /// A new time-ordered (v7) id.
            pub fn new_v7() -> Self {
                $name(Uuid::now_v7())
            }

            /// Parses the hyphenated form; rejects the nil UUID.
            pub fn parse(s: &str) -> Option<Self> {
                if s.len() != 36 {
                    return None;
                }
                Uuid::try_parse(s).ok().filter(|u| !u.is_nil()).map($name)
            }

            /// From the 16 storage bytes.
            pub fn from_bytes(b: [u8; 16]) -> Self {
                $name(Uuid::from_bytes(b))
            }

            /// The 16 bytes used in storage keys and associated data.
            pub fn bytes(&self) -> [u8; 16] {
                *self.0.as_bytes()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.hyphenated().fmt(f)
            }
        }
    };
}

id_type!(PatientId, "A patient's id.");
id_type!(CoverageId, "A coverage's id.");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_only_canonical_non_nil_uuids() {
        let id = PatientId::new_v7();
        assert_eq!(PatientId::parse(&id.to_string()), Some(id));
        assert_eq!(PatientId::parse("00000000-0000-0000-0000-000000000000"), None);
        assert_eq!(PatientId::parse("not-a-uuid"), None);
        assert_eq!(PatientId::parse(&id.to_string().replace('-', "")), None);
    }
}
