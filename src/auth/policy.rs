//! What callers may do: roles, permissions, purposes of use, and the policy
//! file that maps principals to roles.
//!
//! A principal is described by its token subject, the `roles` claim of its
//! token, and the identity of the calling service's client certificate. The
//! policy maps each of those to roles (default deny: nothing matches, no
//! roles). A role holds permissions and says which purposes of use it serves.
//! For a PHI request, only the roles whose purpose rules admit the request's
//! purpose contribute permissions; that is how the minimum-necessary standard
//! and purpose enforcement become one decision ([`Policy::decide`]).
//!
//! The file format is TOML (see `default_policy.toml` and README.md). It is
//! validated once at start-up; an unknown permission, role or purpose is an
//! error naming the line.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use toml::Spanned;

/// A permission a role can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Permission {
    /// Read patient records (which fields: the `fields.*` permissions).
    PatientsRead,
    /// Create, update and delete patients.
    PatientsWrite,
    /// Read coverage (the "insurance" field group).
    CoverageRead,
    /// Create, update and delete coverage.
    CoverageWrite,
    /// Read the audit trail.
    AuditRead,
    /// List and review break-glass events.
    AuditReview,
    /// Flag patients as restricted and clear the flag.
    PatientsRestrict,
    /// Read and write restricted patients.
    RestrictedAccess,
    /// Emergency access to a patient otherwise out of reach (with ETREAT and a reason).
    BreakGlass,
    /// Key operations.
    KeysAdmin,
    /// Erase a patient by crypto-shredding (refused under legal hold).
    PatientsErase,
    /// Place and lift legal holds (which block erasure).
    PatientsLegalHold,
    /// Field group: names, gender, birth date, identifiers (SSN masked), language.
    FieldsIdentity,
    /// Field group: phones, e-mail, addresses, contacts.
    FieldsContact,
    /// Field group: the full SSN.
    FieldsSsn,
}

impl Permission {
    /// Every permission.
    pub const ALL: [Permission; 15] = [
        Permission::PatientsRead,
        Permission::PatientsWrite,
        Permission::CoverageRead,
        Permission::CoverageWrite,
        Permission::AuditRead,
        Permission::AuditReview,
        Permission::PatientsRestrict,
        Permission::RestrictedAccess,
        Permission::BreakGlass,
        Permission::KeysAdmin,
        Permission::PatientsErase,
        Permission::PatientsLegalHold,
        Permission::FieldsIdentity,
        Permission::FieldsContact,
        Permission::FieldsSsn,
    ];

    /// The name used in policy files and audit entries.
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::PatientsRead => "patients.read",
            Permission::PatientsWrite => "patients.write",
            Permission::CoverageRead => "coverage.read",
            Permission::CoverageWrite => "coverage.write",
            Permission::AuditRead => "audit.read",
            Permission::AuditReview => "audit.review",
            Permission::PatientsRestrict => "patients.restrict",
            Permission::RestrictedAccess => "restricted.access",
            Permission::BreakGlass => "break_glass",
            Permission::KeysAdmin => "keys.admin",
            Permission::PatientsErase => "patients.erase",
            Permission::PatientsLegalHold => "patients.legal_hold",
            Permission::FieldsIdentity => "fields.identity",
            Permission::FieldsContact => "fields.contact",
            Permission::FieldsSsn => "fields.ssn",
        }
    }

    /// Parses a permission name.
    pub fn parse(s: &str) -> Option<Permission> {
        Permission::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

/// HL7 v3 PurposeOfUse codes (value set v3-PurposeOfUse) accepted in
/// `x-purpose-of-use`.
pub const PURPOSE_CODES: &[&str] = &[
    "BIORCH",
    "BTG",
    "CAREMGT",
    "CLINTRCH",
    "CLINTRCHNPC",
    "CLINTRCHPC",
    "CLINTRL",
    "CLMATTCH",
    "COC",
    "COVAUTH",
    "COVERAGE",
    "DISASTER",
    "DONAT",
    "DSRCH",
    "ELIGDTRM",
    "ELIGVER",
    "ENROLLM",
    "ERTREAT",
    "ETREAT",
    "FAMRQT",
    "FRAUD",
    "GOV",
    "HACCRED",
    "HCOMPL",
    "HDECD",
    "HDIRECT",
    "HDM",
    "HLEGAL",
    "HMARKT",
    "HOPERAT",
    "HOUTCOMS",
    "HPAYMT",
    "HPRGRP",
    "HQUALIMP",
    "HRESCH",
    "HSYSADMIN",
    "HTEST",
    "LABELING",
    "MEMADMIN",
    "METAMGT",
    "MILCDM",
    "MILDCRG",
    "PATADMIN",
    "PATRQT",
    "PATSFTY",
    "PERFMSR",
    "POARCH",
    "POPHLTH",
    "PRECLINTRCH",
    "PUBHLTH",
    "PWATRNY",
    "RECORDMGT",
    "REMITADV",
    "SUPNWK",
    "SYSDEV",
    "THREAT",
    "TRAIN",
    "TRANSRCH",
    "TREAT",
];

/// A purpose of use: one of [`PURPOSE_CODES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Purpose(&'static str);

impl Purpose {
    /// Emergency treatment: the purpose that break-glass requires.
    pub const ETREAT: Purpose = Purpose("ETREAT");

    /// Parses a code (exact, upper case).
    pub fn parse(s: &str) -> Option<Purpose> {
        PURPOSE_CODES.iter().find(|c| **c == s).map(|c| Purpose(c))
    }

    /// The code.
    pub fn as_str(self) -> &'static str {
        self.0
    }
}

/// One role: permissions and the purposes it serves.
#[derive(Debug, Clone)]
struct Role {
    permissions: BTreeSet<Permission>,
    /// `None`: any purpose.
    purposes: Option<BTreeSet<Purpose>>,
    forbidden: BTreeSet<Purpose>,
    /// `None`: the policy-wide setting.
    require_purpose: Option<bool>,
}

/// What a principal rule matches on.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Match {
    Subject(String),
    TokenRole(String),
    Service(String),
}

#[derive(Debug, Clone)]
struct PrincipalRule {
    on: Match,
    roles: Vec<String>,
}

/// Who is asking, as the policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct Identity<'a> {
    /// Token subject.
    pub subject: &'a str,
    /// The token's `roles` claim.
    pub token_roles: &'a [String],
    /// The client certificate identity, if any.
    pub service: Option<&'a str>,
}

/// Why a request is denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// No role grants the permission.
    Missing(Permission),
    /// A role would grant it, but the request states no purpose of use.
    PurposeRequired(Permission),
    /// A role would grant it, but not for this purpose.
    PurposeNotAllowed(Permission, Purpose),
}

/// The permissions a request holds under its purpose.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grant {
    /// Union of the admitted roles' permissions.
    pub permissions: BTreeSet<Permission>,
}

impl Grant {
    /// True when the grant includes `p`.
    pub fn has(&self, p: Permission) -> bool {
        self.permissions.contains(&p)
    }
}

/// A validated access policy.
#[derive(Debug, Clone)]
pub struct Policy {
    roles: BTreeMap<String, Role>,
    rules: Vec<PrincipalRule>,
    /// Service identity -> the roles a caller through it may use at most.
    services: BTreeMap<String, BTreeSet<String>>,
    require_purpose: bool,
}

/// A policy file problem, with the 1-based line it is on (0 if unknown).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("policy line {line}: {message}")]
pub struct PolicyError {
    /// Line number.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// The built-in roles, always present.
pub const BUILTIN_ROLES: &str = include_str!("builtin_roles.toml");
/// The embedded default policy.
pub const DEFAULT_POLICY: &str = include_str!("default_policy.toml");

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFormat {
    #[serde(default)]
    settings: Option<SettingsFormat>,
    #[serde(default)]
    roles: BTreeMap<String, Spanned<RoleFormat>>,
    #[serde(default)]
    principals: Vec<Spanned<PrincipalFormat>>,
    #[serde(default)]
    services: BTreeMap<String, Spanned<ServiceFormat>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SettingsFormat {
    require_purpose: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoleFormat {
    permissions: Vec<Spanned<String>>,
    purposes: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    forbidden_purposes: Vec<Spanned<String>>,
    require_purpose: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PrincipalFormat {
    subject: Option<String>,
    token_role: Option<String>,
    service: Option<String>,
    roles: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceFormat {
    may_act_as: Vec<Spanned<String>>,
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset).map(|s| s.bytes().filter(|b| *b == b'\n').count() + 1).unwrap_or(0)
}

fn valid_role_name(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

impl Policy {
    /// The embedded default policy.
    pub fn default_policy() -> Result<Policy, PolicyError> {
        Policy::from_toml(DEFAULT_POLICY)
    }

    /// Parses and validates a policy file (the built-in roles are added first).
    pub fn from_toml(text: &str) -> Result<Policy, PolicyError> {
        let builtin = parse_file(BUILTIN_ROLES)?;
        let mut policy =
            Policy { roles: BTreeMap::new(), rules: Vec::new(), services: BTreeMap::new(), require_purpose: true };
        add_roles(&mut policy, BUILTIN_ROLES, builtin.roles, false)?;
        let file = parse_file(text)?;
        if let Some(s) = file.settings {
            policy.require_purpose = s.require_purpose.unwrap_or(true);
        }
        add_roles(&mut policy, text, file.roles, true)?;
        let known = |policy: &Policy, r: &Spanned<String>| -> Result<String, PolicyError> {
            if policy.roles.contains_key(r.get_ref()) {
                Ok(r.get_ref().clone())
            } else {
                Err(PolicyError {
                    line: line_of(text, r.span().start),
                    message: format!("unknown role {:?}", r.get_ref()),
                })
            }
        };
        for p in file.principals {
            let line = line_of(text, p.span().start);
            let p = p.into_inner();
            let on = match (p.subject, p.token_role, p.service) {
                (Some(s), None, None) => Match::Subject(s),
                (None, Some(r), None) => Match::TokenRole(r),
                (None, None, Some(s)) => Match::Service(s),
                _ => {
                    return Err(PolicyError {
                        line,
                        message: "a principal needs exactly one of subject, token_role, service".into(),
                    });
                }
            };
            let roles = p.roles.iter().map(|r| known(&policy, r)).collect::<Result<Vec<_>, _>>()?;
            policy.rules.push(PrincipalRule { on, roles });
        }
        for (identity, s) in file.services {
            let roles = s.get_ref().may_act_as.iter().map(|r| known(&policy, r)).collect::<Result<_, _>>()?;
            policy.services.insert(identity, roles);
        }
        Ok(policy)
    }

    /// The roles a principal holds: every matching rule's roles, limited by
    /// the calling service's `may_act_as` when the policy names that service.
    pub fn roles_for(&self, who: Identity<'_>) -> BTreeSet<String> {
        let mut roles = BTreeSet::new();
        for rule in &self.rules {
            let hit = match &rule.on {
                Match::Subject(s) => s == who.subject,
                Match::TokenRole(r) => who.token_roles.iter().any(|t| t == r),
                Match::Service(s) => who.service == Some(s.as_str()),
            };
            if hit {
                roles.extend(rule.roles.iter().cloned());
            }
        }
        if let Some(ceiling) = who.service.and_then(|s| self.services.get(s)) {
            roles.retain(|r| ceiling.contains(r));
        }
        roles
    }

    /// Decides whether `roles` may use `needed` for a request with `purpose`.
    /// For a PHI request (`phi`), only roles whose purpose rules admit the
    /// purpose contribute; the grant lists everything those roles hold (so
    /// field groups follow the same purpose).
    pub fn decide(
        &self,
        roles: &BTreeSet<String>,
        purpose: Option<Purpose>,
        needed: Permission,
        phi: bool,
    ) -> Result<Grant, Denial> {
        let mut grant = Grant::default();
        let mut refused_for_purpose = false;
        for role in roles.iter().filter_map(|r| self.roles.get(r)) {
            if !phi || self.admits(role, purpose) {
                grant.permissions.extend(role.permissions.iter().copied());
            } else if role.permissions.contains(&needed) {
                refused_for_purpose = true;
            }
        }
        if grant.has(needed) {
            return Ok(grant);
        }
        match (refused_for_purpose, purpose) {
            (true, None) => Err(Denial::PurposeRequired(needed)),
            (true, Some(p)) => Err(Denial::PurposeNotAllowed(needed, p)),
            (false, _) => Err(Denial::Missing(needed)),
        }
    }

    fn admits(&self, role: &Role, purpose: Option<Purpose>) -> bool {
        match purpose {
            None => !role.require_purpose.unwrap_or(self.require_purpose),
            Some(p) => {
                !role.forbidden.contains(&p) && role.purposes.as_ref().is_none_or(|allowed| allowed.contains(&p))
            }
        }
    }

    /// Role names, for documentation and tests.
    pub fn role_names(&self) -> Vec<String> {
        self.roles.keys().cloned().collect()
    }

    /// The permissions of one role.
    pub fn role_permissions(&self, role: &str) -> Option<&BTreeSet<Permission>> {
        self.roles.get(role).map(|r| &r.permissions)
    }
}

fn parse_file(text: &str) -> Result<FileFormat, PolicyError> {
    toml::from_str::<FileFormat>(text).map_err(|e| PolicyError {
        line: e.span().map(|s| line_of(text, s.start)).unwrap_or(0),
        message: e.message().trim().to_string(),
    })
}

fn add_roles(
    policy: &mut Policy,
    text: &str,
    roles: BTreeMap<String, Spanned<RoleFormat>>,
    from_file: bool,
) -> Result<(), PolicyError> {
    for (name, spanned) in roles {
        let line = line_of(text, spanned.span().start);
        if !valid_role_name(&name) {
            return Err(PolicyError { line, message: format!("role name {name:?} must be 1-64 of a-z, 0-9, _") });
        }
        if from_file && policy.roles.contains_key(&name) {
            return Err(PolicyError {
                line,
                message: format!("role {name:?} is built in and cannot be redefined; define a role with another name"),
            });
        }
        let r = spanned.into_inner();
        let perm = |s: &Spanned<String>| {
            Permission::parse(s.get_ref()).ok_or_else(|| PolicyError {
                line: line_of(text, s.span().start),
                message: format!("unknown permission {:?}", s.get_ref()),
            })
        };
        let purpose = |s: &Spanned<String>| {
            Purpose::parse(s.get_ref()).ok_or_else(|| PolicyError {
                line: line_of(text, s.span().start),
                message: format!("unknown purpose of use {:?} (HL7 v3 PurposeOfUse codes)", s.get_ref()),
            })
        };
        let role = Role {
            permissions: r.permissions.iter().map(perm).collect::<Result<_, _>>()?,
            purposes: r.purposes.as_ref().map(|v| v.iter().map(purpose).collect::<Result<_, _>>()).transpose()?,
            forbidden: r.forbidden_purposes.iter().map(purpose).collect::<Result<_, _>>()?,
            require_purpose: r.require_purpose,
        };
        policy.roles.insert(name, role);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roles(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn purpose(s: &str) -> Option<Purpose> {
        Purpose::parse(s)
    }

    #[test]
    fn the_embedded_policy_and_builtin_roles_load() {
        let p = Policy::default_policy().unwrap();
        assert_eq!(p.role_names(), vec!["billing", "clinician", "compliance", "front_desk", "key_admin"]);
        let who = Identity { subject: "x", token_roles: &["clinician".into(), "nonsense".into()], service: None };
        assert_eq!(p.roles_for(who), roles(&["clinician"]));
    }

    #[test]
    fn default_deny_when_nothing_matches() {
        let p = Policy::from_toml("").unwrap();
        let who = Identity { subject: "x", token_roles: &["front_desk".into()], service: None };
        assert!(p.roles_for(who).is_empty());
        assert_eq!(
            p.decide(&BTreeSet::new(), purpose("TREAT"), Permission::PatientsRead, true),
            Err(Denial::Missing(Permission::PatientsRead))
        );
    }

    #[test]
    fn purposes_admit_or_refuse_a_role() {
        let p = Policy::default_policy().unwrap();
        let desk = roles(&["front_desk"]);
        assert!(p.decide(&desk, purpose("TREAT"), Permission::PatientsRead, true).is_ok());
        assert_eq!(
            p.decide(&desk, None, Permission::PatientsRead, true),
            Err(Denial::PurposeRequired(Permission::PatientsRead))
        );
        assert_eq!(
            p.decide(&desk, purpose("HMARKT"), Permission::PatientsRead, true),
            Err(Denial::PurposeNotAllowed(Permission::PatientsRead, Purpose::parse("HMARKT").unwrap()))
        );
        // Non-PHI permissions ignore the purpose.
        assert!(p.decide(&roles(&["compliance"]), None, Permission::AuditRead, false).is_ok());
    }

    #[test]
    fn field_groups_follow_the_purpose_that_admitted_the_role() {
        let p = Policy::default_policy().unwrap();
        let both = roles(&["front_desk", "billing"]);
        let treat = p.decide(&both, purpose("TREAT"), Permission::PatientsRead, true).unwrap();
        assert!(!treat.has(Permission::FieldsSsn), "billing does not serve TREAT");
        let pay = p.decide(&both, purpose("HPAYMT"), Permission::PatientsRead, true).unwrap();
        assert!(pay.has(Permission::FieldsSsn));
    }

    #[test]
    fn principals_match_subjects_token_roles_and_services_within_a_service_ceiling() {
        let text = r#"
[roles.scheduler]
permissions = ["patients.read", "fields.identity"]
purposes = ["TREAT"]

[[principals]]
subject = "alice"
roles = ["front_desk"]

[[principals]]
service = "spiffe://clinic/scheduling"
roles = ["scheduler"]

[[principals]]
token_role = "billing"
roles = ["billing"]

[services."spiffe://clinic/portal"]
may_act_as = ["clinician"]
"#;
        let p = Policy::from_toml(text).unwrap();
        let alice = Identity { subject: "alice", token_roles: &[], service: None };
        assert_eq!(p.roles_for(alice), roles(&["front_desk"]));
        let svc =
            Identity { subject: "bob", token_roles: &["billing".into()], service: Some("spiffe://clinic/scheduling") };
        assert_eq!(p.roles_for(svc), roles(&["billing", "scheduler"]));
        let portal =
            Identity { subject: "alice", token_roles: &["billing".into()], service: Some("spiffe://clinic/portal") };
        assert!(p.roles_for(portal).is_empty(), "the portal may act only as clinician");
    }

    #[test]
    fn errors_name_the_line() {
        let bad_perm = "[roles.x]\npermissions = [\n  \"patients.read\",\n  \"patients.reed\",\n]\n";
        let e = Policy::from_toml(bad_perm).unwrap_err();
        assert_eq!(e.line, 4, "{e}");
        assert!(e.message.contains("patients.reed"));

        let bad_role = "[[principals]]\nsubject = \"a\"\nroles = [\"front_desk\", \"frontdesk\"]\n";
        let e = Policy::from_toml(bad_role).unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        assert!(e.message.contains("frontdesk"));

        let bad_purpose = "[roles.x]\npermissions = []\npurposes = [\"TREET\"]\n";
        assert_eq!(Policy::from_toml(bad_purpose).unwrap_err().line, 3);

        let unknown_key = "[settings]\nrequire_purpose = true\nallow_everything = true\n";
        assert_eq!(Policy::from_toml(unknown_key).unwrap_err().line, 3);

        let redefine = "\n[roles.billing]\npermissions = []\n";
        assert_eq!(Policy::from_toml(redefine).unwrap_err().line, 2);

        let two_matchers = "[[principals]]\nsubject = \"a\"\ntoken_role = \"b\"\nroles = []\n";
        assert_eq!(Policy::from_toml(two_matchers).unwrap_err().line, 1);
    }
}
