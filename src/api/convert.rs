//! Proto <-> domain conversion. Requests are parsed here into domain types or
//! rejected with field violations naming each bad field; responses are built
//! from domain types. This is the only module that knows both worlds.

use pbjson_types::Timestamp;

use super::validate::{Checker, is_email, is_language_tag, is_phone};
use crate::domain::{self as d, CalendarDate, FhirDate};
use crate::proto::v1 as pb;

/// Microseconds -> protobuf Timestamp.
pub fn timestamp(micros: i64) -> Timestamp {
    Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: i32::try_from(micros.rem_euclid(1_000_000) * 1000).unwrap_or(0),
    }
}

/// Protobuf Timestamp -> microseconds, if in range.
pub fn micros(ts: &Timestamp) -> Option<i64> {
    if !(0..1_000_000_000).contains(&ts.nanos) {
        return None;
    }
    ts.seconds.checked_mul(1_000_000)?.checked_add(i64::from(ts.nanos / 1000))
}

fn record_id<T>(c: &mut Checker, field: &str, s: &str, parse: fn(&str) -> Option<T>) -> Option<T> {
    if s.is_empty() {
        c.bad(field, "is required");
        return None;
    }
    let id = parse(s);
    if id.is_none() {
        c.bad(field, "must be a UUID");
    }
    id
}

/// Parses a patient id field.
pub fn patient_id(c: &mut Checker, field: &str, s: &str) -> Option<d::PatientId> {
    record_id(c, field, s, d::PatientId::parse)
}

/// Parses a coverage id field.
pub fn coverage_id(c: &mut Checker, field: &str, s: &str) -> Option<d::CoverageId> {
    record_id(c, field, s, d::CoverageId::parse)
}

/// Parses a version the caller last read (must be >= 1).
pub fn version(c: &mut Checker, field: &str, v: i64) -> u64 {
    match u64::try_from(v) {
        Ok(v) if v >= 1 => v,
        _ => {
            c.bad(field, "must be the version last read (1 or more)");
            0
        }
    }
}

macro_rules! enum_codec {
    ($from:ident, $to:ident, $pb:ident, $dom:ty, { $($pv:ident <=> $dv:expr),+ $(,)? }) => {
        fn $from(c: &mut Checker, field: &str, v: i32, required: bool) -> Option<$dom> {
            match pb::$pb::try_from(v) {
                Ok(pb::$pb::Unspecified) => {
                    if required {
                        c.bad(field, "is required");
                    }
                    None
                }
                $(Ok(pb::$pb::$pv) => Some($dv),)+
                Err(_) => {
                    c.bad(field, "is not a known enum value");
                    None
                }
            }
        }

        #[allow(unreachable_patterns)]
        fn $to(v: Option<$dom>) -> i32 {
            match v {
                None => pb::$pb::Unspecified as i32,
                $(Some(x) if x == $dv => pb::$pb::$pv as i32,)+
                Some(_) => pb::$pb::Unspecified as i32,
            }
        }
    };
}

enum_codec!(identifier_type, identifier_type_pb, IdentifierType, d::IdentifierType, {
    Mr <=> d::IdentifierType::Mr, Ss <=> d::IdentifierType::Ss, Dl <=> d::IdentifierType::Dl,
    Mb <=> d::IdentifierType::Mb, Ppn <=> d::IdentifierType::Ppn, Pi <=> d::IdentifierType::Pi,
    Other <=> d::IdentifierType::Other,
});
enum_codec!(name_use, name_use_pb, NameUse, d::NameUse, {
    Usual <=> d::NameUse::Usual, Official <=> d::NameUse::Official, Temp <=> d::NameUse::Temp,
    Nickname <=> d::NameUse::Nickname, Anonymous <=> d::NameUse::Anonymous, Old <=> d::NameUse::Old,
    Maiden <=> d::NameUse::Maiden,
});
enum_codec!(gender, gender_pb, AdministrativeGender, d::Gender, {
    Male <=> d::Gender::Male, Female <=> d::Gender::Female, Other <=> d::Gender::Other, Unknown <=> d::Gender::Unknown,
});
enum_codec!(cp_system, cp_system_pb, ContactPointSystem, d::ContactPointSystem, {
    Phone <=> d::ContactPointSystem::Phone, Fax <=> d::ContactPointSystem::Fax, Email <=> d::ContactPointSystem::Email,
    Pager <=> d::ContactPointSystem::Pager, Url <=> d::ContactPointSystem::Url, Sms <=> d::ContactPointSystem::Sms,
    Other <=> d::ContactPointSystem::Other,
});
enum_codec!(cp_use, cp_use_pb, ContactPointUse, d::ContactPointUse, {
    Home <=> d::ContactPointUse::Home, Work <=> d::ContactPointUse::Work, Temp <=> d::ContactPointUse::Temp,
    Old <=> d::ContactPointUse::Old, Mobile <=> d::ContactPointUse::Mobile,
});
enum_codec!(address_use, address_use_pb, AddressUse, d::AddressUse, {
    Home <=> d::AddressUse::Home, Work <=> d::AddressUse::Work, Temp <=> d::AddressUse::Temp,
    Old <=> d::AddressUse::Old, Billing <=> d::AddressUse::Billing,
});
enum_codec!(contact_rel, contact_rel_pb, ContactRelationship, d::ContactRelationship, {
    Emergency <=> d::ContactRelationship::Emergency, NextOfKin <=> d::ContactRelationship::NextOfKin,
    Guarantor <=> d::ContactRelationship::Guarantor, Employer <=> d::ContactRelationship::Employer,
    Other <=> d::ContactRelationship::Other,
});
enum_codec!(coverage_status, coverage_status_pb, CoverageStatus, d::CoverageStatus, {
    Active <=> d::CoverageStatus::Active, Cancelled <=> d::CoverageStatus::Cancelled,
    Draft <=> d::CoverageStatus::Draft, EnteredInError <=> d::CoverageStatus::EnteredInError,
});
enum_codec!(coverage_type, coverage_type_pb, CoverageType, d::CoverageType, {
    Hmo <=> d::CoverageType::Hmo, Ppo <=> d::CoverageType::Ppo, Epo <=> d::CoverageType::Epo,
    Pos <=> d::CoverageType::Pos, Hdhp <=> d::CoverageType::Hdhp, Medicare <=> d::CoverageType::Medicare,
    Medicaid <=> d::CoverageType::Medicaid, Tricare <=> d::CoverageType::Tricare,
    WorkersComp <=> d::CoverageType::WorkersComp, SelfPay <=> d::CoverageType::SelfPay, Other <=> d::CoverageType::Other,
});
enum_codec!(subscriber_rel, subscriber_rel_pb, SubscriberRelationship, d::SubscriberRelationship, {
    Patient <=> d::SubscriberRelationship::Patient, Spouse <=> d::SubscriberRelationship::Spouse,
    Child <=> d::SubscriberRelationship::Child, Other <=> d::SubscriberRelationship::Other,
});

/// Parses an audit outcome filter.
pub fn outcome(c: &mut Checker, field: &str, v: i32) -> Option<d::Outcome> {
    use pb::AuditOutcome as O;
    match O::try_from(v) {
        Ok(O::Unspecified) => None,
        Ok(O::Ok) => Some(d::Outcome::Ok),
        Ok(O::InvalidArgument) => Some(d::Outcome::InvalidArgument),
        Ok(O::Unauthenticated) => Some(d::Outcome::Unauthenticated),
        Ok(O::PermissionDenied) => Some(d::Outcome::PermissionDenied),
        Ok(O::NotFound) => Some(d::Outcome::NotFound),
        Ok(O::Aborted) => Some(d::Outcome::Aborted),
        Ok(O::FailedPrecondition) => Some(d::Outcome::FailedPrecondition),
        Ok(O::DataLoss) => Some(d::Outcome::DataLoss),
        Ok(O::Internal) => Some(d::Outcome::Internal),
        Ok(O::ResourceExhausted) => Some(d::Outcome::ResourceExhausted),
        Err(_) => {
            c.bad(field, "is not a known enum value");
            None
        }
    }
}

/// The proto enum for an audit outcome string.
pub fn outcome_pb(s: &str) -> i32 {
    use pb::AuditOutcome as O;
    let o = match d::Outcome::parse(s) {
        Some(d::Outcome::Ok) => O::Ok,
        Some(d::Outcome::InvalidArgument) => O::InvalidArgument,
        Some(d::Outcome::Unauthenticated) => O::Unauthenticated,
        Some(d::Outcome::PermissionDenied) => O::PermissionDenied,
        Some(d::Outcome::NotFound) => O::NotFound,
        Some(d::Outcome::Aborted) => O::Aborted,
        Some(d::Outcome::FailedPrecondition) => O::FailedPrecondition,
        Some(d::Outcome::DataLoss) => O::DataLoss,
        Some(d::Outcome::Internal) => O::Internal,
        Some(d::Outcome::ResourceExhausted) => O::ResourceExhausted,
        None => O::Unspecified,
    };
    o as i32
}

/// A FHIR date field (optional when empty).
pub fn fhir_date(c: &mut Checker, field: &str, s: &str, today: CalendarDate) -> Option<FhirDate> {
    if s.is_empty() {
        return None;
    }
    match FhirDate::parse(s, today) {
        Ok(date) => Some(date),
        Err(d::date::DateError::Syntax) => {
            c.bad(field, "must be a real date as YYYY, YYYY-MM or YYYY-MM-DD");
            None
        }
        Err(d::date::DateError::Future) => {
            c.bad(field, "must not be in the future");
            None
        }
        Err(d::date::DateError::TooOld) => {
            c.bad(field, "must not be before 1850");
            None
        }
    }
}

/// A full calendar date field (optional when empty).
pub fn calendar_date(c: &mut Checker, field: &str, s: &str) -> Option<CalendarDate> {
    if s.is_empty() {
        return None;
    }
    let date = CalendarDate::parse(s);
    if date.is_none() {
        c.bad(field, "must be a real date as YYYY-MM-DD");
    }
    date
}

fn human_name(c: &mut Checker, f: &str, n: &pb::HumanName) -> d::HumanName {
    d::HumanName {
        name_use: name_use(c, &format!("{f}.use"), n.r#use, false),
        family: c.text(&format!("{f}.family"), &n.family, 100, true),
        given: c.texts(&format!("{f}.given"), &n.given, 5, 100),
        prefix: c.texts(&format!("{f}.prefix"), &n.prefix, 5, 40),
        suffix: c.texts(&format!("{f}.suffix"), &n.suffix, 5, 40),
    }
}

fn contact_point(c: &mut Checker, f: &str, t: &pb::ContactPoint) -> Option<d::ContactPoint> {
    let system = cp_system(c, &format!("{f}.system"), t.system, true);
    let field = format!("{f}.value");
    let value = c.text(&field, &t.value, 256, true);
    if !value.is_empty() {
        let ok = match system {
            Some(
                d::ContactPointSystem::Phone
                | d::ContactPointSystem::Fax
                | d::ContactPointSystem::Sms
                | d::ContactPointSystem::Pager,
            ) => is_phone(&value),
            Some(d::ContactPointSystem::Email) => is_email(&value),
            Some(d::ContactPointSystem::Url) => {
                (value.starts_with("https://") || value.starts_with("http://")) && !value.contains(char::is_whitespace)
            }
            _ => true,
        };
        if !ok {
            c.bad(field, match system {
                Some(d::ContactPointSystem::Email) => "must be an e-mail address (local@domain)",
                Some(d::ContactPointSystem::Url) => "must be an http(s) URL",
                _ => "must be a phone number: 7 to 15 digits, optional +, spaces, dots, dashes, parentheses and extension",
            });
        }
    }
    Some(d::ContactPoint { system: system?, value, contact_use: cp_use(c, &format!("{f}.use"), t.r#use, false) })
}

fn telecoms(c: &mut Checker, f: &str, items: &[pb::ContactPoint], max: usize) -> Vec<d::ContactPoint> {
    if !c.count(f, items.len(), 0, max) {
        return Vec::new();
    }
    items.iter().enumerate().filter_map(|(i, t)| contact_point(c, &format!("{f}[{i}]"), t)).collect()
}

/// Parses a patient's client-supplied content. `prefix` is the field path, e.g. "patient".
pub fn patient_data(c: &mut Checker, prefix: &str, p: &pb::Patient, today: CalendarDate) -> Option<d::PatientData> {
    let f = |s: &str| format!("{prefix}.{s}");
    let identifiers = if c.count(&f("identifiers"), p.identifiers.len(), 0, 20) {
        p.identifiers
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let g = format!("{prefix}.identifiers[{i}]");
                d::Identifier {
                    system: c.text(&format!("{g}.system"), &id.system, 256, true),
                    value: c.text(&format!("{g}.value"), &id.value, 128, true),
                    r#type: identifier_type(c, &format!("{g}.type"), id.r#type, false),
                }
            })
            .collect()
    } else {
        Vec::new()
    };
    let names = if c.count(&f("names"), p.names.len(), 1, 10) {
        p.names.iter().enumerate().map(|(i, n)| human_name(c, &format!("{prefix}.names[{i}]"), n)).collect()
    } else {
        Vec::new()
    };
    let gender = gender(c, &f("gender"), p.gender, false);
    let birth_date = fhir_date(c, &f("birth_date"), &p.birth_date, today);
    let telecom = telecoms(c, &f("telecom"), &p.telecom, 20);
    let addresses = if c.count(&f("addresses"), p.addresses.len(), 0, 10) {
        p.addresses
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let g = format!("{prefix}.addresses[{i}]");
                let addr = d::Address {
                    address_use: address_use(c, &format!("{g}.use"), a.r#use, false),
                    lines: c.texts(&format!("{g}.lines"), &a.lines, 4, 200),
                    city: c.text(&format!("{g}.city"), &a.city, 100, false),
                    state: c.text(&format!("{g}.state"), &a.state, 100, false),
                    postal_code: c.text(&format!("{g}.postal_code"), &a.postal_code, 20, false),
                    country: c.text(&format!("{g}.country"), &a.country, 100, false),
                };
                if addr.lines.is_empty() && addr.city.is_empty() && addr.postal_code.is_empty() && addr.state.is_empty()
                {
                    c.bad(g, "an address needs at least a line, city, state or postal code");
                }
                addr
            })
            .collect()
    } else {
        Vec::new()
    };
    let lang = c.text(&f("preferred_language"), &p.preferred_language, 35, false);
    if !lang.is_empty() && !is_language_tag(&lang) {
        c.bad(f("preferred_language"), "must be a BCP 47 language tag such as en or es-MX");
    }
    let contacts = if c.count(&f("contacts"), p.contacts.len(), 0, 10) {
        p.contacts
            .iter()
            .enumerate()
            .filter_map(|(i, k)| {
                let g = format!("{prefix}.contacts[{i}]");
                let relationship = contact_rel(c, &format!("{g}.relationship"), k.relationship, true);
                let name = match &k.name {
                    Some(n) => Some(human_name(c, &format!("{g}.name"), n)),
                    None => {
                        c.bad(format!("{g}.name"), "is required");
                        None
                    }
                };
                let telecom = telecoms(c, &format!("{g}.telecom"), &k.telecom, 5);
                Some(d::PatientContact { relationship: relationship?, name: name?, telecom })
            })
            .collect()
    } else {
        Vec::new()
    };
    c.ok().then(|| d::PatientData {
        identifiers,
        names,
        gender,
        birth_date,
        telecom,
        addresses,
        preferred_language: (!lang.is_empty()).then_some(lang),
        contacts,
    })
}

/// Parses a coverage's client-supplied content.
pub fn coverage_data(c: &mut Checker, prefix: &str, p: &pb::Coverage, today: CalendarDate) -> Option<d::CoverageData> {
    let f = |s: &str| format!("{prefix}.{s}");
    let status = coverage_status(c, &f("status"), p.status, true);
    let ctype = coverage_type(c, &f("type"), p.r#type, true);
    let payor = match &p.payor {
        Some(py) => Some(d::Payor {
            name: c.text(&f("payor.name"), &py.name, 200, true),
            payer_id: c.text(&f("payor.payer_id"), &py.payer_id, 64, false),
        }),
        None => {
            c.bad(f("payor"), "is required");
            None
        }
    };
    let self_pay = ctype == Some(d::CoverageType::SelfPay);
    let subscriber_id = c.text(&f("subscriber_id"), &p.subscriber_id, 64, !self_pay);
    if !subscriber_id.chars().all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, ' ' | '-' | '.')) {
        c.bad(f("subscriber_id"), "may contain only letters, digits, spaces, dashes and dots");
    }
    let relationship = subscriber_rel(c, &f("relationship"), p.relationship, true);
    let subscriber = match (&p.subscriber, relationship) {
        (Some(_), Some(d::SubscriberRelationship::Patient)) => {
            c.bad(f("subscriber"), "must be empty when relationship is PATIENT (the patient is the subscriber)");
            None
        }
        (Some(s), _) => {
            let name = match &s.name {
                Some(n) => Some(human_name(c, &f("subscriber.name"), n)),
                None => {
                    c.bad(f("subscriber.name"), "is required");
                    None
                }
            };
            let birth_date = fhir_date(c, &f("subscriber.birth_date"), &s.birth_date, today);
            name.map(|name| d::Subscriber { name, birth_date })
        }
        (None, Some(r)) if r != d::SubscriberRelationship::Patient => {
            c.bad(f("subscriber"), "is required when the patient is not the subscriber");
            None
        }
        (None, _) => None,
    };
    let group_number = c.text(&f("group_number"), &p.group_number, 64, false);
    let plan_name = c.text(&f("plan_name"), &p.plan_name, 200, false);
    let period = match &p.period {
        Some(pd) => {
            let start = calendar_date(c, &f("period.start"), &pd.start);
            let end = calendar_date(c, &f("period.end"), &pd.end);
            if let (Some(s), Some(e)) = (start, end)
                && s > e
            {
                c.bad(f("period.end"), "must not be before period.start");
            }
            d::Period { start, end }
        }
        None => d::Period::default(),
    };
    let order = match u8::try_from(p.order) {
        Ok(o) if (1..=10).contains(&o) => o,
        _ => {
            c.bad(f("order"), "must be 1 (primary) to 10");
            0
        }
    };
    if !c.ok() {
        return None;
    }
    Some(d::CoverageData {
        status: status?,
        coverage_type: ctype?,
        payor: payor?,
        subscriber_id,
        subscriber,
        relationship: relationship?,
        group_number,
        plan_name,
        period,
        order,
    })
}

fn human_name_pb(n: &d::HumanName) -> pb::HumanName {
    pb::HumanName {
        r#use: name_use_pb(n.name_use),
        family: n.family.clone(),
        given: n.given.clone(),
        prefix: n.prefix.clone(),
        suffix: n.suffix.clone(),
    }
}

fn contact_point_pb(t: &d::ContactPoint) -> pb::ContactPoint {
    pb::ContactPoint { system: cp_system_pb(Some(t.system)), value: t.value.clone(), r#use: cp_use_pb(t.contact_use) }
}

/// Domain patient -> proto.
pub fn patient_pb(p: &d::Patient) -> pb::Patient {
    let data = &p.data;
    pb::Patient {
        id: p.id.0.clone(),
        version: i64::try_from(p.version).unwrap_or(i64::MAX),
        create_time: Some(timestamp(p.create_time)),
        update_time: Some(timestamp(p.update_time)),
        active: p.active(),
        delete_time: p.delete_time.map(timestamp),
        identifiers: data
            .identifiers
            .iter()
            .map(|i| pb::Identifier {
                system: i.system.clone(),
                value: i.value.clone(),
                r#type: identifier_type_pb(i.r#type),
            })
            .collect(),
        names: data.names.iter().map(human_name_pb).collect(),
        gender: gender_pb(data.gender),
        birth_date: data.birth_date.map(|b| b.to_string()).unwrap_or_default(),
        telecom: data.telecom.iter().map(contact_point_pb).collect(),
        addresses: data
            .addresses
            .iter()
            .map(|a| pb::Address {
                r#use: address_use_pb(a.address_use),
                lines: a.lines.clone(),
                city: a.city.clone(),
                state: a.state.clone(),
                postal_code: a.postal_code.clone(),
                country: a.country.clone(),
            })
            .collect(),
        preferred_language: data.preferred_language.clone().unwrap_or_default(),
        contacts: data
            .contacts
            .iter()
            .map(|k| pb::PatientContact {
                relationship: contact_rel_pb(Some(k.relationship)),
                name: Some(human_name_pb(&k.name)),
                telecom: k.telecom.iter().map(contact_point_pb).collect(),
            })
            .collect(),
    }
}

/// Domain coverage -> proto.
pub fn coverage_pb(c: &d::Coverage) -> pb::Coverage {
    let data = &c.data;
    pb::Coverage {
        id: c.id.clone(),
        version: i64::try_from(c.version).unwrap_or(i64::MAX),
        patient_id: c.patient_id.0.clone(),
        create_time: Some(timestamp(c.create_time)),
        update_time: Some(timestamp(c.update_time)),
        delete_time: c.delete_time.map(timestamp),
        status: coverage_status_pb(Some(data.status)),
        r#type: coverage_type_pb(Some(data.coverage_type)),
        payor: Some(pb::Payor { name: data.payor.name.clone(), payer_id: data.payor.payer_id.clone() }),
        subscriber_id: data.subscriber_id.clone(),
        subscriber: data.subscriber.as_ref().map(|s| pb::Subscriber {
            name: Some(human_name_pb(&s.name)),
            birth_date: s.birth_date.map(|b| b.to_string()).unwrap_or_default(),
        }),
        relationship: subscriber_rel_pb(Some(data.relationship)),
        group_number: data.group_number.clone(),
        plan_name: data.plan_name.clone(),
        period: Some(pb::Period {
            start: data.period.start.map(|s| s.to_string()).unwrap_or_default(),
            end: data.period.end.map(|s| s.to_string()).unwrap_or_default(),
        }),
        order: i32::from(data.order),
    }
}

/// Audit entry -> proto event.
pub fn audit_event_pb(e: &crate::audit::AuditEntry, hash: &[u8; 32]) -> pb::AuditEvent {
    pb::AuditEvent {
        sequence: e.sequence,
        time: Some(timestamp(e.time_micros)),
        actor: e.actor.clone(),
        scopes: e.scopes.clone(),
        client_address: e.client_address.clone(),
        request_id: e.request_id.clone(),
        action: e.action.clone(),
        resource_type: e.resource_type.clone(),
        resource_id: e.resource_id.clone(),
        patient_id: e.patient_id.clone(),
        record_version: e.record_version,
        outcome: outcome_pb(&e.outcome),
        result_count: e.result_count,
        returned_patient_ids: e.returned_patient_ids.clone(),
        key_version: e.key_version,
        previous_hash: e.previous_hash.to_vec(),
        hash: hash.to_vec(),
        format_version: u32::from(e.format),
        service: e.service.clone(),
        roles: e.roles.clone(),
        purpose: e.purpose.clone(),
        disclosed: e.disclosed.clone(),
        break_glass_grant_id: e.break_glass.clone(),
        details: e.details.clone(),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn today() -> CalendarDate {
        CalendarDate::parse("2026-11-24").unwrap()
    }

    proptest! {
        /// Nothing a client sends can panic the parser: arbitrary text (any
        /// Unicode) and arbitrary enum numbers in every field.
        #[test]
        fn arbitrary_patients_never_panic_and_valid_ones_round_trip(
            family in "\\PC{0,120}",
            given in proptest::collection::vec("\\PC{0,30}", 0..7),
            birth in "[0-9\\-]{0,11}|\\PC{0,12}",
            phone in "[0-9+()\\-. x]{0,25}|\\PC{0,20}",
            email in "[a-z@.\\-]{0,30}|\\PC{0,20}",
            lang in "[a-zA-Z\\-]{0,12}|\\PC{0,12}",
            enums in proptest::collection::vec(any::<i32>(), 6),
            ids in proptest::collection::vec(("\\PC{0,40}", "\\PC{0,20}"), 0..25),
        ) {
            let p = pb::Patient {
                names: vec![pb::HumanName { family, given, r#use: enums[0], ..Default::default() }],
                gender: enums[1],
                birth_date: birth,
                telecom: vec![
                    pb::ContactPoint { system: enums[2], value: phone, r#use: enums[3] },
                    pb::ContactPoint { system: pb::ContactPointSystem::Email as i32, value: email, r#use: 0 },
                ],
                preferred_language: lang,
                identifiers: ids.into_iter().map(|(system, value)| pb::Identifier { system, value, r#type: enums[4] }).collect(),
                addresses: vec![pb::Address { r#use: enums[5], city: "x".into(), ..Default::default() }],
                ..Default::default()
            };
            let mut c = Checker::default();
            let parsed = patient_data(&mut c, "patient", &p, today());
            if let Ok(data) = c.into_result(parsed) {
                let stored = d::Patient {
                    id: d::PatientId::new_v7().into(),
                    version: 1,
                    create_time: 0,
                    update_time: 0,
                    delete_time: None,
                    data,
                };
                // What was accepted survives both plaintext formats (the binary one
                // written now, the JSON one still read) and comes back as proto.
                use crate::domain::plaintext::Plaintext;
                let json = serde_json::to_vec(&stored).unwrap();
                prop_assert_eq!(&d::Patient::from_plaintext(&json).unwrap(), &stored);
                let back = d::Patient::from_plaintext(&stored.to_plaintext().unwrap()).unwrap();
                prop_assert_eq!(&back, &stored);
                let again = patient_pb(&back);
                let mut c2 = Checker::default();
                let reparsed = patient_data(&mut c2, "patient", &again, today());
                prop_assert_eq!(c2.into_result(reparsed).ok(), Some(stored.data));
            }
        }

        #[test]
        fn arbitrary_coverages_never_panic(
            text in proptest::collection::vec("\\PC{0,70}", 6),
            ints in proptest::collection::vec(any::<i32>(), 5),
            with_subscriber in any::<bool>(),
        ) {
            let cv = pb::Coverage {
                status: ints[0],
                r#type: ints[1],
                relationship: ints[2],
                order: ints[3],
                payor: Some(pb::Payor { name: text[0].clone(), payer_id: text[1].clone() }),
                subscriber_id: text[2].clone(),
                subscriber: with_subscriber.then(|| pb::Subscriber { name: Some(pb::HumanName { family: text[3].clone(), ..Default::default() }), birth_date: text[4].clone() }),
                period: Some(pb::Period { start: text[5].clone(), end: text[4].clone() }),
                ..Default::default()
            };
            let mut c = Checker::default();
            let parsed = coverage_data(&mut c, "coverage", &cv, today());
            if let Ok(data) = c.into_result(parsed) {
                use crate::domain::plaintext::Plaintext;
                let stored = d::Coverage {
                    id: d::CoverageId::new_v7().to_string(),
                    patient_id: d::PatientId::new_v7().into(),
                    version: 3,
                    create_time: 1,
                    update_time: 2,
                    delete_time: Some(2),
                    data,
                };
                let back = d::Coverage::from_plaintext(&stored.to_plaintext().unwrap()).unwrap();
                prop_assert_eq!(back, stored);
            }
        }
    }
}
