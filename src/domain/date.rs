//! FHIR dates: partial dates for birth dates, full calendar dates for periods.

use serde::{Deserialize, Serialize};

/// A full calendar date (YYYY-MM-DD).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CalendarDate(time::Date);

impl CalendarDate {
    /// Parses `YYYY-MM-DD`, a real calendar date with a four-digit year.
    pub fn parse(s: &str) -> Option<CalendarDate> {
        let b = s.as_bytes();
        if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
            return None;
        }
        let year: i32 = digits(&s[0..4])?;
        let month: u8 = digits(&s[5..7])?;
        let day: u8 = digits(&s[8..10])?;
        let month = time::Month::try_from(month).ok()?;
        time::Date::from_calendar_date(year, month, day).ok().map(CalendarDate)
    }

    /// Today's date in UTC for a time in microseconds since the epoch.
    pub fn from_micros(micros: i64) -> CalendarDate {
        let secs = micros.div_euclid(1_000_000);
        let dt = time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        CalendarDate(dt.date())
    }

    /// A calendar date from its year, month (1-12) and day, if it exists.
    pub fn from_ymd(year: i32, month: u8, day: u8) -> Option<CalendarDate> {
        let month = time::Month::try_from(month).ok()?;
        time::Date::from_calendar_date(year, month, day).ok().map(CalendarDate)
    }

    /// Year, month (1-12) and day.
    pub fn ymd(&self) -> (i32, u8, u8) {
        (self.0.year(), u8::from(self.0.month()), self.0.day())
    }
}

impl std::fmt::Display for CalendarDate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (y, m, d) = self.ymd();
        write!(f, "{y:04}-{m:02}-{d:02}")
    }
}

impl TryFrom<String> for CalendarDate {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        CalendarDate::parse(&s).ok_or_else(|| "invalid date".to_string())
    }
}

impl From<CalendarDate> for String {
    fn from(d: CalendarDate) -> String {
        d.to_string()
    }
}

fn digits<T: std::str::FromStr>(s: &str) -> Option<T> {
    if s.bytes().all(|c| c.is_ascii_digit()) { s.parse().ok() } else { None }
}

/// A FHIR `date`: YYYY, YYYY-MM or YYYY-MM-DD.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum FhirDate {
    /// Year only.
    Year(i32),
    /// Year and month (1-12).
    YearMonth(i32, u8),
    /// A full date.
    Date(CalendarDate),
}

/// Why a FHIR date was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DateError {
    /// Not YYYY, YYYY-MM or YYYY-MM-DD, or not a real calendar date.
    Syntax,
    /// After today.
    Future,
    /// Before 1850: almost certainly a typing error.
    TooOld,
}

impl FhirDate {
    /// Parses a FHIR date and checks it is a real date, not after `today` and not before 1850.
    pub fn parse(s: &str, today: CalendarDate) -> Result<FhirDate, DateError> {
        let d = match s.len() {
            4 => FhirDate::Year(digits(s).ok_or(DateError::Syntax)?),
            7 if s.as_bytes()[4] == b'-' => {
                let y = digits(&s[0..4]).ok_or(DateError::Syntax)?;
                let m: u8 = digits(&s[5..7]).ok_or(DateError::Syntax)?;
                if !(1..=12).contains(&m) {
                    return Err(DateError::Syntax);
                }
                FhirDate::YearMonth(y, m)
            }
            10 => FhirDate::Date(CalendarDate::parse(s).ok_or(DateError::Syntax)?),
            _ => return Err(DateError::Syntax),
        };
        let (ty, tm, _) = today.ymd();
        let future = match d {
            FhirDate::Year(y) => y > ty,
            FhirDate::YearMonth(y, m) => (y, m) > (ty, tm),
            FhirDate::Date(date) => date > today,
        };
        if future {
            return Err(DateError::Future);
        }
        let year = match d {
            FhirDate::Year(y) | FhirDate::YearMonth(y, _) => y,
            FhirDate::Date(date) => date.ymd().0,
        };
        if year < 1850 {
            return Err(DateError::TooOld);
        }
        Ok(d)
    }
}

impl std::fmt::Display for FhirDate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FhirDate::Year(y) => write!(f, "{y:04}"),
            FhirDate::YearMonth(y, m) => write!(f, "{y:04}-{m:02}"),
            FhirDate::Date(d) => d.fmt(f),
        }
    }
}

impl TryFrom<String> for FhirDate {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        // Stored dates were validated when written; re-parse without the "future" check.
        let far = CalendarDate::parse("9999-12-31").ok_or("unreachable")?;
        FhirDate::parse(&s, far).map_err(|_| "invalid date".to_string())
    }
}

impl From<FhirDate> for String {
    fn from(d: FhirDate) -> String {
        d.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn today() -> CalendarDate {
        CalendarDate::parse("2026-11-24").unwrap()
    }

    #[test]
    fn fhir_dates_accept_year_month_and_full_dates() {
        assert_eq!(FhirDate::parse("1980", today()).unwrap().to_string(), "1980");
        assert_eq!(FhirDate::parse("1980-02", today()).unwrap().to_string(), "1980-02");
        assert_eq!(FhirDate::parse("2024-02-29", today()).unwrap().to_string(), "2024-02-29");
    }

    #[test]
    fn fhir_dates_reject_impossible_future_and_malformed_values() {
        assert_eq!(FhirDate::parse("2023-02-29", today()), Err(DateError::Syntax));
        assert_eq!(FhirDate::parse("1980-13", today()), Err(DateError::Syntax));
        assert_eq!(FhirDate::parse("1980-1-1", today()), Err(DateError::Syntax));
        assert_eq!(FhirDate::parse("+980", today()), Err(DateError::Syntax));
        assert_eq!(FhirDate::parse("2026-11-25", today()), Err(DateError::Future));
        assert_eq!(FhirDate::parse("2027", today()), Err(DateError::Future));
        assert_eq!(FhirDate::parse("1700-01-01", today()), Err(DateError::TooOld));
        assert_eq!(FhirDate::parse("", today()), Err(DateError::Syntax));
    }

    #[test]
    fn calendar_dates_order_chronologically() {
        assert!(CalendarDate::parse("2025-01-31").unwrap() < CalendarDate::parse("2025-02-01").unwrap());
        assert_eq!(CalendarDate::from_micros(0).to_string(), "1970-01-01");
    }
}
