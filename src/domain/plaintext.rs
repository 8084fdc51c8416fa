//! The bytes a record version is sealed as: its plaintext encoding.
//!
//! Two formats, told apart by the first byte (README, "Record plaintext"):
//! - **format 2** (`0x02`), written now: a compact binary encoding, decoded
//!   without building any intermediate value;
//! - **format 1** (`{`), the JSON of the serde derives on [`Patient`] and
//!   [`Coverage`], written before format 2 existed and still read.
//!
//! Nothing here touches a key: `app` seals what [`Plaintext::to_plaintext`]
//! returns and decodes what it opened with [`Plaintext::from_plaintext`].
//! The encoded bytes are PHI, so they live in a [`Zeroizing`] buffer that
//! also wipes every smaller buffer it outgrows.

use zeroize::Zeroizing;

use super::coverage::{Payor, Period, Subscriber};
use super::patient::PatientIdText;
use super::{
    Address, CalendarDate, ContactPoint, Coverage, CoverageData, FhirDate, HumanName, Identifier, Patient,
    PatientContact, PatientData,
};

/// The first byte of a format-2 plaintext.
pub const FORMAT_2: u8 = 0x02;

/// The first byte of every format-1 (JSON object) plaintext.
const FORMAT_1_JSON: u8 = b'{';

/// Why a plaintext did not encode or decode. No variant carries any of the
/// bytes: they are PHI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PlaintextError {
    /// The first byte names no known format.
    #[error("unknown record plaintext format")]
    UnknownFormat,
    /// The bytes end inside a field, are followed by more, or hold a value
    /// no record can have (an unknown code, an impossible date, bad UTF-8).
    #[error("malformed record plaintext")]
    Malformed,
    /// A value no record made here has: an id that is not a UUID, or a
    /// year outside 1-9999.
    #[error("record value outside the plaintext format")]
    Unencodable,
}

/// A record that is sealed as a plaintext encoding.
pub trait Plaintext: Sized {
    /// The format-2 encoding of this record.
    fn to_plaintext(&self) -> Result<Zeroizing<Vec<u8>>, PlaintextError>;

    /// Decodes either format.
    fn from_plaintext(bytes: &[u8]) -> Result<Self, PlaintextError>;
}

impl Plaintext for Patient {
    fn to_plaintext(&self) -> Result<Zeroizing<Vec<u8>>, PlaintextError> {
        let mut w = Writer::new();
        w.u8(FORMAT_2);
        w.uuid(&self.id.0)?;
        w.u64(self.version);
        w.i64(self.create_time);
        w.i64(self.update_time);
        w.opt_i64(self.delete_time);
        let d = &self.data;
        w.list(&d.identifiers, |w, i| {
            w.str(&i.system);
            w.str(&i.value);
            w.code(i.r#type.map(|t| t.tag()));
        });
        w.list(&d.names, Writer::name);
        w.code(d.gender.map(|t| t.tag()));
        w.fhir_date(d.birth_date)?;
        w.list(&d.telecom, Writer::contact_point);
        w.list(&d.addresses, |w, a| {
            w.code(a.address_use.map(|t| t.tag()));
            w.list(&a.lines, |w, l| w.str(l));
            w.str(&a.city);
            w.str(&a.state);
            w.str(&a.postal_code);
            w.str(&a.country);
        });
        w.opt_str(d.preferred_language.as_deref());
        w.list(&d.contacts, |w, c| {
            w.u8(c.relationship.tag());
            w.name(&c.name);
            w.list(&c.telecom, Writer::contact_point);
        });
        Ok(w.finish())
    }

    fn from_plaintext(bytes: &[u8]) -> Result<Self, PlaintextError> {
        decode(bytes, |r| {
            Ok(Patient {
                id: PatientIdText(r.uuid()?),
                version: r.u64()?,
                create_time: r.i64()?,
                update_time: r.i64()?,
                delete_time: r.opt_i64()?,
                data: PatientData {
                    identifiers: r.list(|r| {
                        Ok(Identifier {
                            system: r.str()?,
                            value: r.str()?,
                            r#type: r.opt_code(super::IdentifierType::from_tag)?,
                        })
                    })?,
                    names: r.list(Reader::name)?,
                    gender: r.opt_code(super::Gender::from_tag)?,
                    birth_date: r.fhir_date()?,
                    telecom: r.list(Reader::contact_point)?,
                    addresses: r.list(|r| {
                        Ok(Address {
                            address_use: r.opt_code(super::AddressUse::from_tag)?,
                            lines: r.list(Reader::str)?,
                            city: r.str()?,
                            state: r.str()?,
                            postal_code: r.str()?,
                            country: r.str()?,
                        })
                    })?,
                    preferred_language: r.opt_str()?,
                    contacts: r.list(|r| {
                        Ok(PatientContact {
                            relationship: r.code(super::ContactRelationship::from_tag)?,
                            name: r.name()?,
                            telecom: r.list(Reader::contact_point)?,
                        })
                    })?,
                },
            })
        })
    }
}

impl Plaintext for Coverage {
    fn to_plaintext(&self) -> Result<Zeroizing<Vec<u8>>, PlaintextError> {
        let mut w = Writer::new();
        w.u8(FORMAT_2);
        w.uuid(&self.id)?;
        w.uuid(&self.patient_id.0)?;
        w.u64(self.version);
        w.i64(self.create_time);
        w.i64(self.update_time);
        w.opt_i64(self.delete_time);
        let d = &self.data;
        w.u8(d.status.tag());
        w.u8(d.coverage_type.tag());
        w.str(&d.payor.name);
        w.str(&d.payor.payer_id);
        w.str(&d.subscriber_id);
        match &d.subscriber {
            None => w.u8(0),
            Some(s) => {
                w.u8(1);
                w.name(&s.name);
                w.fhir_date(s.birth_date)?;
            }
        }
        w.u8(d.relationship.tag());
        w.str(&d.group_number);
        w.str(&d.plan_name);
        w.fhir_date(d.period.start.map(FhirDate::Date))?;
        w.fhir_date(d.period.end.map(FhirDate::Date))?;
        w.u8(d.order);
        Ok(w.finish())
    }

    fn from_plaintext(bytes: &[u8]) -> Result<Self, PlaintextError> {
        decode(bytes, |r| {
            Ok(Coverage {
                id: r.uuid()?,
                patient_id: PatientIdText(r.uuid()?),
                version: r.u64()?,
                create_time: r.i64()?,
                update_time: r.i64()?,
                delete_time: r.opt_i64()?,
                data: CoverageData {
                    status: r.code(super::CoverageStatus::from_tag)?,
                    coverage_type: r.code(super::CoverageType::from_tag)?,
                    payor: Payor { name: r.str()?, payer_id: r.str()? },
                    subscriber_id: r.str()?,
                    subscriber: match r.u8()? {
                        0 => None,
                        1 => Some(Subscriber { name: r.name()?, birth_date: r.fhir_date()? }),
                        _ => return Err(PlaintextError::Malformed),
                    },
                    relationship: r.code(super::SubscriberRelationship::from_tag)?,
                    group_number: r.str()?,
                    plan_name: r.str()?,
                    period: Period { start: r.calendar_date()?, end: r.calendar_date()? },
                    order: r.u8()?,
                },
            })
        })
    }
}

/// Decodes format 1 with serde, or format 2 with `body`, which must read
/// every byte.
fn decode<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    body: impl FnOnce(&mut Reader<'_>) -> Result<T, PlaintextError>,
) -> Result<T, PlaintextError> {
    match bytes.split_first() {
        Some((&FORMAT_2, rest)) => {
            let mut r = Reader(rest);
            let value = body(&mut r)?;
            r.end()?;
            Ok(value)
        }
        Some((&FORMAT_1_JSON, _)) => serde_json::from_slice(bytes).map_err(|_| PlaintextError::Malformed),
        _ => Err(PlaintextError::UnknownFormat),
    }
}

/// The date precisions of a `date` field (0 = absent).
const DATE_YEAR: u8 = 1;
const DATE_YEAR_MONTH: u8 = 2;
const DATE_FULL: u8 = 3;

/// Appends to a zeroizing buffer; a buffer it outgrows is wiped, not just freed.
struct Writer(Zeroizing<Vec<u8>>);

impl Writer {
    fn new() -> Writer {
        Writer(Zeroizing::new(Vec::with_capacity(512)))
    }

    fn bytes(&mut self, b: &[u8]) {
        let needed = self.0.len().saturating_add(b.len());
        if needed > self.0.capacity() {
            let mut bigger = Zeroizing::new(Vec::with_capacity(needed.max(self.0.capacity().saturating_mul(2))));
            bigger.extend_from_slice(&self.0);
            // The old buffer is zeroized as it drops here.
            self.0 = bigger;
        }
        self.0.extend_from_slice(b);
    }

    fn u8(&mut self, v: u8) {
        self.bytes(&[v]);
    }

    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_be_bytes());
    }

    fn i64(&mut self, v: i64) {
        self.bytes(&v.to_be_bytes());
    }

    fn opt_i64(&mut self, v: Option<i64>) {
        match v {
            None => self.u8(0),
            Some(v) => {
                self.u8(1);
                self.i64(v);
            }
        }
    }

    /// Unsigned LEB128, as protobuf's varints: 7 bits a byte, low bits first.
    fn varint(&mut self, mut v: u64) {
        let mut buf = [0u8; 10];
        let mut n = 0;
        loop {
            // Lossless: masked to 7 bits.
            let low = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                buf[n] = low;
                n += 1;
                break;
            }
            buf[n] = low | 0x80;
            n += 1;
        }
        self.bytes(&buf[..n]);
    }

    fn len(&mut self, len: usize) {
        self.varint(u64::try_from(len).unwrap_or(u64::MAX));
    }

    fn str(&mut self, s: &str) {
        self.len(s.len());
        self.bytes(s.as_bytes());
    }

    fn opt_str(&mut self, s: Option<&str>) {
        match s {
            None => self.u8(0),
            Some(s) => {
                self.u8(1);
                self.str(s);
            }
        }
    }

    fn list<T>(&mut self, items: &[T], mut each: impl FnMut(&mut Writer, &T)) {
        self.len(items.len());
        for item in items {
            each(self, item);
        }
    }

    fn code(&mut self, tag: Option<u8>) {
        self.u8(tag.unwrap_or(0));
    }

    fn uuid(&mut self, text: &str) -> Result<(), PlaintextError> {
        let id = uuid::Uuid::try_parse(text).map_err(|_| PlaintextError::Unencodable)?;
        self.bytes(id.as_bytes());
        Ok(())
    }

    fn fhir_date(&mut self, d: Option<FhirDate>) -> Result<(), PlaintextError> {
        let (precision, year, month, day) = match d {
            None => {
                self.u8(0);
                return Ok(());
            }
            Some(FhirDate::Year(y)) => (DATE_YEAR, y, 0, 0),
            Some(FhirDate::YearMonth(y, m)) => (DATE_YEAR_MONTH, y, m, 0),
            Some(FhirDate::Date(date)) => {
                let (y, m, d) = date.ymd();
                (DATE_FULL, y, m, d)
            }
        };
        // Every date a record holds has a four-digit year: it is parsed from YYYY text.
        let year = u16::try_from(year).ok().filter(|y| (1..=9999).contains(y)).ok_or(PlaintextError::Unencodable)?;
        self.u8(precision);
        self.bytes(&year.to_be_bytes());
        self.u8(month);
        self.u8(day);
        Ok(())
    }

    fn name(&mut self, n: &HumanName) {
        self.code(n.name_use.map(|t| t.tag()));
        self.str(&n.family);
        self.list(&n.given, |w, s| w.str(s));
        self.list(&n.prefix, |w, s| w.str(s));
        self.list(&n.suffix, |w, s| w.str(s));
    }

    fn contact_point(&mut self, c: &ContactPoint) {
        self.u8(c.system.tag());
        self.str(&c.value);
        self.code(c.contact_use.map(|t| t.tag()));
    }

    fn finish(self) -> Zeroizing<Vec<u8>> {
        self.0
    }
}

/// Reads a format-2 body front to back; every read checks what is left.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], PlaintextError> {
        if n > self.0.len() {
            return Err(PlaintextError::Malformed);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], PlaintextError> {
        self.take(N)?.try_into().map_err(|_| PlaintextError::Malformed)
    }

    fn u8(&mut self) -> Result<u8, PlaintextError> {
        Ok(self.array::<1>()?[0])
    }

    fn u64(&mut self) -> Result<u64, PlaintextError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn i64(&mut self) -> Result<i64, PlaintextError> {
        Ok(i64::from_be_bytes(self.array()?))
    }

    fn opt_i64(&mut self) -> Result<Option<i64>, PlaintextError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.i64()?)),
            _ => Err(PlaintextError::Malformed),
        }
    }

    /// A length or count: a varint of at most 4 bytes (below 2^28), in its
    /// shortest form, so each value has exactly one encoding.
    fn len(&mut self) -> Result<usize, PlaintextError> {
        let mut v: u32 = 0;
        for i in 0..4 {
            let b = self.u8()?;
            v |= u32::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                if b == 0 && i > 0 {
                    return Err(PlaintextError::Malformed);
                }
                return usize::try_from(v).map_err(|_| PlaintextError::Malformed);
            }
        }
        Err(PlaintextError::Malformed)
    }

    fn str(&mut self) -> Result<String, PlaintextError> {
        let n = self.len()?;
        let b = self.take(n)?;
        std::str::from_utf8(b).map(str::to_owned).map_err(|_| PlaintextError::Malformed)
    }

    fn opt_str(&mut self) -> Result<Option<String>, PlaintextError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.str()?)),
            _ => Err(PlaintextError::Malformed),
        }
    }

    fn list<T>(
        &mut self,
        mut each: impl FnMut(&mut Self) -> Result<T, PlaintextError>,
    ) -> Result<Vec<T>, PlaintextError> {
        let n = self.len()?;
        // Every item takes at least one byte, so a count beyond what is left
        // is malformed; checking first keeps a bad count from allocating.
        if n > self.0.len() {
            return Err(PlaintextError::Malformed);
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(each(self)?);
        }
        Ok(out)
    }

    fn code<T>(&mut self, from_tag: fn(u8) -> Option<T>) -> Result<T, PlaintextError> {
        from_tag(self.u8()?).ok_or(PlaintextError::Malformed)
    }

    fn opt_code<T>(&mut self, from_tag: fn(u8) -> Option<T>) -> Result<Option<T>, PlaintextError> {
        match self.u8()? {
            0 => Ok(None),
            tag => from_tag(tag).map(Some).ok_or(PlaintextError::Malformed),
        }
    }

    fn uuid(&mut self) -> Result<String, PlaintextError> {
        Ok(uuid::Uuid::from_bytes(self.array()?).hyphenated().to_string())
    }

    fn fhir_date(&mut self) -> Result<Option<FhirDate>, PlaintextError> {
        let precision = self.u8()?;
        if precision == 0 {
            return Ok(None);
        }
        let year = i32::from(u16::from_be_bytes(self.array()?));
        let month = self.u8()?;
        let day = self.u8()?;
        let date = match (precision, month, day) {
            (DATE_YEAR, 0, 0) => FhirDate::Year(year),
            (DATE_YEAR_MONTH, 1..=12, 0) => FhirDate::YearMonth(year, month),
            (DATE_FULL, _, _) => {
                FhirDate::Date(CalendarDate::from_ymd(year, month, day).ok_or(PlaintextError::Malformed)?)
            }
            _ => return Err(PlaintextError::Malformed),
        };
        if !(1..=9999).contains(&year) {
            return Err(PlaintextError::Malformed);
        }
        Ok(Some(date))
    }

    fn calendar_date(&mut self) -> Result<Option<CalendarDate>, PlaintextError> {
        match self.fhir_date()? {
            None => Ok(None),
            Some(FhirDate::Date(d)) => Ok(Some(d)),
            Some(_) => Err(PlaintextError::Malformed),
        }
    }

    fn name(&mut self) -> Result<HumanName, PlaintextError> {
        Ok(HumanName {
            name_use: self.opt_code(super::NameUse::from_tag)?,
            family: self.str()?,
            given: self.list(Reader::str)?,
            prefix: self.list(Reader::str)?,
            suffix: self.list(Reader::str)?,
        })
    }

    fn contact_point(&mut self) -> Result<ContactPoint, PlaintextError> {
        Ok(ContactPoint {
            system: self.code(super::ContactPointSystem::from_tag)?,
            value: self.str()?,
            contact_use: self.opt_code(super::ContactPointUse::from_tag)?,
        })
    }

    fn end(&self) -> Result<(), PlaintextError> {
        if self.0.is_empty() { Ok(()) } else { Err(PlaintextError::Malformed) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{
        AddressUse, ContactPointSystem, ContactPointUse, ContactRelationship, CoverageStatus, CoverageType, Gender,
        IdentifierType, NameUse, SubscriberRelationship,
    };

    const ID: &str = "01234567-89ab-cdef-0123-456789abcdef";

    fn date(s: &str) -> CalendarDate {
        CalendarDate::parse(s).unwrap()
    }

    fn name(family: &str) -> HumanName {
        HumanName {
            name_use: Some(NameUse::Official),
            family: family.into(),
            given: vec!["Jane".into()],
            prefix: vec![],
            suffix: vec![],
        }
    }

    fn small_patient() -> Patient {
        Patient {
            id: PatientIdText(ID.into()),
            version: 1,
            create_time: 1,
            update_time: 2,
            delete_time: None,
            data: PatientData {
                identifiers: vec![],
                names: vec![name("Doe")],
                gender: Some(Gender::Female),
                birth_date: Some(FhirDate::Date(date("1980-02-29"))),
                telecom: vec![],
                addresses: vec![],
                preferred_language: Some("en".into()),
                contacts: vec![],
            },
        }
    }

    fn full_patient() -> Patient {
        let phone = ContactPoint {
            system: ContactPointSystem::Phone,
            value: "+1 555 0100".into(),
            contact_use: Some(ContactPointUse::Mobile),
        };
        Patient {
            delete_time: Some(-5),
            version: u64::MAX,
            data: PatientData {
                identifiers: vec![
                    Identifier {
                        system: "urn:oid:2.16.840.1".into(),
                        value: "123-45-6789".into(),
                        r#type: Some(IdentifierType::Ss),
                    },
                    Identifier { system: "x".into(), value: "MRN 1".into(), r#type: None },
                ],
                names: vec![
                    HumanName {
                        name_use: None,
                        family: "Núñez-O'Brien".into(),
                        given: vec!["Ana".into(), "María".into()],
                        prefix: vec!["Dr.".into()],
                        suffix: vec!["III".into(), "".into()],
                    },
                    name(&"x".repeat(300)),
                ],
                gender: None,
                birth_date: Some(FhirDate::YearMonth(1961, 12)),
                telecom: vec![
                    phone.clone(),
                    ContactPoint { system: ContactPointSystem::Email, value: "a@b.example".into(), contact_use: None },
                ],
                addresses: vec![Address {
                    address_use: Some(AddressUse::Billing),
                    lines: vec!["1 Main St".into(), "Apt 2".into()],
                    city: "Springfield".into(),
                    state: "IL".into(),
                    postal_code: "62701".into(),
                    country: "US".into(),
                }],
                preferred_language: None,
                contacts: vec![PatientContact {
                    relationship: ContactRelationship::Guarantor,
                    name: name("Roe"),
                    telecom: vec![phone],
                }],
            },
            ..small_patient()
        }
    }

    fn coverage(subscriber: Option<Subscriber>) -> Coverage {
        Coverage {
            id: "0192e0a4-0000-7000-8000-000000000001".into(),
            patient_id: PatientIdText(ID.into()),
            version: 2,
            create_time: 10,
            update_time: 20,
            delete_time: None,
            data: CoverageData {
                status: CoverageStatus::Active,
                coverage_type: CoverageType::WorkersComp,
                payor: Payor { name: "Acme Health".into(), payer_id: "60054".into() },
                subscriber_id: "W123 456".into(),
                subscriber,
                relationship: SubscriberRelationship::Spouse,
                group_number: "G-1".into(),
                plan_name: "Gold".into(),
                period: Period { start: Some(date("2026-01-01")), end: None },
                order: 1,
            },
        }
    }

    #[test]
    fn a_small_patient_encodes_to_these_exact_bytes() {
        // The README's example ("Record plaintext"), byte for byte.
        let expected = concat!(
            "02",
            "0123456789abcdef0123456789abcdef",
            "0000000000000001",
            "0000000000000001",
            "0000000000000002",
            "00",
            "00",
            "01",
            "02",
            "03446f65",
            "01044a616e65",
            "00",
            "00",
            "02",
            "0307bc021d",
            "00",
            "00",
            "0102656e",
            "00",
        );
        let bytes = small_patient().to_plaintext().unwrap();
        assert_eq!(hex::encode(&*bytes), expected);
        assert_eq!(Patient::from_plaintext(&bytes).unwrap(), small_patient());
    }

    #[test]
    fn every_field_of_a_patient_round_trips_in_fewer_bytes_than_its_json() {
        let p = full_patient();
        let bytes = p.to_plaintext().unwrap();
        assert_eq!(Patient::from_plaintext(&bytes).unwrap(), p);
        let json = serde_json::to_vec(&p).unwrap();
        assert!(bytes.len() * 2 < json.len(), "{} bytes against {} of JSON", bytes.len(), json.len());
        let year = Patient { data: PatientData { birth_date: Some(FhirDate::Year(1850)), ..p.data.clone() }, ..p };
        assert_eq!(Patient::from_plaintext(&year.to_plaintext().unwrap()).unwrap(), year);
    }

    #[test]
    fn coverages_round_trip_with_and_without_a_subscriber() {
        for subscriber in [
            None,
            Some(Subscriber { name: name("Roe"), birth_date: None }),
            Some(Subscriber { name: name("Roe"), birth_date: Some(FhirDate::Year(1970)) }),
        ] {
            let c = coverage(subscriber);
            assert_eq!(Coverage::from_plaintext(&c.to_plaintext().unwrap()).unwrap(), c);
        }
        let mut c = coverage(None);
        c.delete_time = Some(30);
        c.data.period = Period { start: None, end: Some(date("2030-12-31")) };
        assert_eq!(Coverage::from_plaintext(&c.to_plaintext().unwrap()).unwrap(), c);
    }

    #[test]
    fn format_1_json_records_still_decode() {
        let p = full_patient();
        assert_eq!(Patient::from_plaintext(&serde_json::to_vec(&p).unwrap()).unwrap(), p);
        let c = coverage(Some(Subscriber { name: name("Roe"), birth_date: None }));
        assert_eq!(Coverage::from_plaintext(&serde_json::to_vec(&c).unwrap()).unwrap(), c);
        // As written by earlier releases: the field names of the serde derives.
        let old = br#"{"id":"01234567-89ab-cdef-0123-456789abcdef","version":1,"create_time":1,"update_time":2,"delete_time":null,"data":{"identifiers":[],"names":[{"name_use":"official","family":"Doe","given":["Jane"],"prefix":[],"suffix":[]}],"gender":"female","birth_date":"1980-02-29","telecom":[],"addresses":[],"preferred_language":"en","contacts":[]}}"#;
        assert_eq!(Patient::from_plaintext(old).unwrap(), small_patient());
        assert_eq!(serde_json::to_vec(&small_patient()).unwrap(), old, "the README's 336 bytes");
        assert_eq!(Patient::from_plaintext(b"{\"id\":1}"), Err(PlaintextError::Malformed));
    }

    #[test]
    fn every_truncation_and_any_trailing_byte_is_malformed() {
        let p = full_patient().to_plaintext().unwrap();
        for n in 1..p.len() {
            assert_eq!(Patient::from_plaintext(&p[..n]), Err(PlaintextError::Malformed), "cut at {n}");
        }
        let c = coverage(Some(Subscriber { name: name("Roe"), birth_date: Some(FhirDate::Year(1970)) }))
            .to_plaintext()
            .unwrap();
        for n in 1..c.len() {
            assert_eq!(Coverage::from_plaintext(&c[..n]), Err(PlaintextError::Malformed), "cut at {n}");
        }
        let mut longer = p.to_vec();
        longer.push(0);
        assert_eq!(Patient::from_plaintext(&longer), Err(PlaintextError::Malformed));
    }

    #[test]
    fn unknown_formats_codes_dates_lengths_and_utf8_are_refused() {
        assert_eq!(Patient::from_plaintext(b""), Err(PlaintextError::UnknownFormat));
        assert_eq!(Patient::from_plaintext(&[0x03]), Err(PlaintextError::UnknownFormat));
        let good = small_patient().to_plaintext().unwrap();
        let at = |offset: usize, byte: u8| {
            let mut b = good.to_vec();
            b[offset] = byte;
            Patient::from_plaintext(&b)
        };
        // Offsets in the example above: 41 delete presence, 44 the name's use,
        // 46 the family name's first byte, 57 gender, 58 the birth date's
        // precision, 61 its month, 62 its day, 65 the language's presence.
        assert_eq!(at(41, 2), Err(PlaintextError::Malformed));
        assert_eq!(at(44, 8), Err(PlaintextError::Malformed));
        assert_eq!(at(46, 0xff), Err(PlaintextError::Malformed));
        assert_eq!(at(57, 5), Err(PlaintextError::Malformed));
        assert_eq!(at(58, 4), Err(PlaintextError::Malformed));
        assert_eq!(at(61, 13), Err(PlaintextError::Malformed));
        assert_eq!(at(62, 30), Err(PlaintextError::Malformed));
        assert_eq!(at(65, 2), Err(PlaintextError::Malformed));
        let unnamed_use = HumanName { name_use: None, ..name("Doe") };
        let expected =
            Patient { data: PatientData { names: vec![unnamed_use], ..small_patient().data }, ..small_patient() };
        assert_eq!(at(44, 0), Ok(expected));
        // A length in more bytes than it needs (3 as 0x83 0x00) has another encoding: refused.
        let mut long_len = good[..45].to_vec();
        long_len.extend_from_slice(&[0x83, 0x00]);
        long_len.extend_from_slice(&good[46..]);
        assert_eq!(Patient::from_plaintext(&long_len), Err(PlaintextError::Malformed));
        // A count far beyond the bytes left is refused before anything is allocated.
        let mut huge = good[..42].to_vec();
        huge.extend_from_slice(&[0xff, 0xff, 0xff, 0x7f]);
        assert_eq!(Patient::from_plaintext(&huge), Err(PlaintextError::Malformed));
    }

    #[test]
    fn long_strings_take_multi_byte_lengths() {
        let p = full_patient();
        let bytes = p.to_plaintext().unwrap();
        // The 300-byte family name: 0xac 0x02 (300 = 0b10_0101100).
        let at = bytes.windows(3).position(|w| w == [0xac, 0x02, b'x']);
        assert!(at.is_some());
    }

    #[test]
    fn records_that_no_request_can_make_do_not_encode() {
        let mut p = small_patient();
        p.id = PatientIdText("not a uuid".into());
        assert_eq!(p.to_plaintext().err(), Some(PlaintextError::Unencodable));
        let mut p = small_patient();
        p.data.birth_date = Some(FhirDate::Year(10_000));
        assert_eq!(p.to_plaintext().err(), Some(PlaintextError::Unencodable));
    }

    #[test]
    fn enum_tags_are_nonzero_distinct_and_decode_to_their_variant() {
        fn check<T: Copy + PartialEq + std::fmt::Debug>(from_tag: fn(u8) -> Option<T>, tag: fn(T) -> u8) {
            assert_eq!(from_tag(0), None);
            let mut seen = 0;
            for t in 1..=255u8 {
                if let Some(v) = from_tag(t) {
                    assert_eq!(tag(v), t);
                    seen += 1;
                }
            }
            assert!(seen >= 4);
        }
        check(IdentifierType::from_tag, IdentifierType::tag);
        check(NameUse::from_tag, NameUse::tag);
        check(Gender::from_tag, Gender::tag);
        check(ContactPointSystem::from_tag, ContactPointSystem::tag);
        check(ContactPointUse::from_tag, ContactPointUse::tag);
        check(AddressUse::from_tag, AddressUse::tag);
        check(ContactRelationship::from_tag, ContactRelationship::tag);
        check(CoverageStatus::from_tag, CoverageStatus::tag);
        check(CoverageType::from_tag, CoverageType::tag);
        check(SubscriberRelationship::from_tag, SubscriberRelationship::tag);
    }
}
