//! A patient's demographics, aligned with FHIR R4 Patient / US Core.

use serde::{Deserialize, Serialize};

use super::{FhirDate, Micros, PatientId};

macro_rules! code_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident => $code:literal / $tag:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[allow(missing_docs)]
        pub enum $name { $(#[serde(rename = $code)] $variant),+ }

        impl $name {
            /// The FHIR code.
            pub fn code(self) -> &'static str {
                match self { $($name::$variant => $code),+ }
            }

            /// The byte that stands for it in a record's binary plaintext
            /// (`domain::plaintext`; never 0, which means absent there).
            /// Fixed forever: a new variant takes a new byte.
            pub fn tag(self) -> u8 {
                match self { $($name::$variant => $tag),+ }
            }

            /// The variant a plaintext byte stands for, if any.
            pub fn from_tag(tag: u8) -> Option<Self> {
                match tag { $($tag => Some($name::$variant),)+ _ => None }
            }
        }
    };
}
pub(crate) use code_enum;

code_enum!(
    /// HL7 v2 table 0203 identifier type.
    IdentifierType { Mr => "MR" / 1, Ss => "SS" / 2, Dl => "DL" / 3, Mb => "MB" / 4, Ppn => "PPN" / 5, Pi => "PI" / 6, Other => "other" / 7 }
);
code_enum!(
    /// FHIR name-use.
    NameUse { Usual => "usual" / 1, Official => "official" / 2, Temp => "temp" / 3, Nickname => "nickname" / 4,
              Anonymous => "anonymous" / 5, Old => "old" / 6, Maiden => "maiden" / 7 }
);
code_enum!(
    /// FHIR administrative-gender.
    Gender { Male => "male" / 1, Female => "female" / 2, Other => "other" / 3, Unknown => "unknown" / 4 }
);
code_enum!(
    /// FHIR contact-point-system.
    ContactPointSystem { Phone => "phone" / 1, Fax => "fax" / 2, Email => "email" / 3, Pager => "pager" / 4, Url => "url" / 5,
                         Sms => "sms" / 6, Other => "other" / 7 }
);
code_enum!(
    /// FHIR contact-point-use.
    ContactPointUse { Home => "home" / 1, Work => "work" / 2, Temp => "temp" / 3, Old => "old" / 4, Mobile => "mobile" / 5 }
);
code_enum!(
    /// FHIR address-use.
    AddressUse { Home => "home" / 1, Work => "work" / 2, Temp => "temp" / 3, Old => "old" / 4, Billing => "billing" / 5 }
);
code_enum!(
    /// HL7 v2 table 0131 contact role (subset).
    ContactRelationship { Emergency => "C" / 1, NextOfKin => "N" / 2, Guarantor => "GT" / 3, Employer => "E" / 4, Other => "O" / 5 }
);

/// A business identifier (MRN, SSN, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identifier {
    /// Namespace URI or OID.
    pub system: String,
    /// The value.
    pub value: String,
    /// Kind of identifier, if given.
    pub r#type: Option<IdentifierType>,
}

/// A person's name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HumanName {
    /// How the name is used.
    pub name_use: Option<NameUse>,
    /// Family (last) name.
    pub family: String,
    /// Given names.
    pub given: Vec<String>,
    /// Prefixes (Dr., Ms.).
    pub prefix: Vec<String>,
    /// Suffixes (Jr., III).
    pub suffix: Vec<String>,
}

/// Phone, e-mail, ...
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContactPoint {
    /// Kind of contact point.
    pub system: ContactPointSystem,
    /// The number or address.
    pub value: String,
    /// How it is used.
    pub contact_use: Option<ContactPointUse>,
}

/// A postal address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Address {
    /// How it is used.
    pub address_use: Option<AddressUse>,
    /// Street lines.
    pub lines: Vec<String>,
    /// City.
    pub city: String,
    /// State or subdivision.
    pub state: String,
    /// Postal code.
    pub postal_code: String,
    /// Country.
    pub country: String,
}

/// Next of kin, emergency contact or guarantor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatientContact {
    /// Role of the contact.
    pub relationship: ContactRelationship,
    /// Their name.
    pub name: HumanName,
    /// How to reach them.
    pub telecom: Vec<ContactPoint>,
}

/// The client-supplied content of a patient record (everything but metadata).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatientData {
    /// Business identifiers.
    pub identifiers: Vec<Identifier>,
    /// Names (at least one).
    pub names: Vec<HumanName>,
    /// Administrative gender, if given.
    pub gender: Option<Gender>,
    /// Birth date, if known.
    pub birth_date: Option<FhirDate>,
    /// Phones, e-mails, ...
    pub telecom: Vec<ContactPoint>,
    /// Addresses.
    pub addresses: Vec<Address>,
    /// BCP 47 tag.
    pub preferred_language: Option<String>,
    /// Contacts.
    pub contacts: Vec<PatientContact>,
}

/// A stored patient version: metadata plus data. This whole struct is the
/// plaintext that gets sealed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Patient {
    /// Id.
    pub id: PatientIdText,
    /// Version, 1 on create.
    pub version: u64,
    /// When created.
    pub create_time: Micros,
    /// When this version was written.
    pub update_time: Micros,
    /// When deleted (soft delete), if deleted.
    pub delete_time: Option<Micros>,
    /// The content.
    pub data: PatientData,
}

impl Patient {
    /// Active means not deleted.
    pub fn active(&self) -> bool {
        self.delete_time.is_none()
    }
}

/// A patient id in a sealed record, as text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PatientIdText(pub String);

impl From<PatientId> for PatientIdText {
    fn from(id: PatientId) -> Self {
        PatientIdText(id.to_string())
    }
}
