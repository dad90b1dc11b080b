//! Identifier codes of the credit system and their check algorithms
//! (GB 32100-2015 unified social credit code, GB 11714 organisation code,
//! GB 11643-1999 resident identity number).
//!
//! Pure functions, no I/O. The catalog registers them as JSON Schema formats
//! (`uscc`, `cn-resident-id`); the warn-only findings of the USCC check are
//! reported separately so an accepted record can carry them as `warnings`.
//! Error messages here never include the checked value: an ID number is a
//! secret-class field and must not reach a log or an error body.

use time::Date;

/// The 31 symbols of the USCC alphabet; a symbol's value is its index.
pub const USCC_ALPHABET: &str = "0123456789ABCDEFGHJKLMNPQRTUWXY";

/// Weights of USCC positions 1..17: `3^(i-1) mod 31`.
const USCC_WEIGHTS: [u32; 17] = [
    1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28,
];

/// Weights of the 8-character organisation code body (GB 11714).
const ORG_WEIGHTS: [u32; 8] = [3, 7, 9, 10, 5, 8, 4, 2];

/// Weights of resident ID positions 1..17 (GB 11643).
const RID_WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];

/// Resident ID check characters indexed by `Σ mod 11`.
const RID_CHECK: &[u8; 11] = b"10X98765432";

/// Registration authorities (position 1) and the categories (position 2)
/// each one lists. An unknown authority is an error; an unlisted category
/// only a warning (codes with unusual categories have been issued).
const AUTHORITIES: &[(u8, &[u8])] = &[
    (b'1', b"1239"),
    (b'2', b"19"),
    (b'3', b"123459"),
    (b'4', b"19"),
    (b'5', b"1239"),
    (b'6', b"129"),
    (b'7', b"129"),
    (b'8', b"19"),
    (b'9', b"123"),
    (b'A', b"19"),
    (b'N', b"1239"),
    (b'Y', b"1"),
];

/// Why a code is invalid. Carries positions, never the value itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodeError {
    #[error("must be exactly 18 characters")]
    Length,
    #[error("character at position {0} is not allowed")]
    Character(usize),
    #[error("unknown registration authority (position 1)")]
    Authority,
    #[error("check character (position 18) does not match")]
    CheckCharacter,
    #[error("birth date (positions 7-14) is not a real date")]
    BirthDate,
    #[error("birth date (positions 7-14) is in the future")]
    FutureBirthDate,
    #[error("birth year (positions 7-10) is before 1900")]
    BirthYear,
    #[error("division code (positions 1-6) is not in a GB/T 2260 province")]
    Division,
    #[error("division code (positions 3-8) must be digits; character at position {0} is not")]
    DivisionCharacter(usize),
}

/// GB/T 2260 divisions at province and prefecture level, present and past
/// (`src/gb2260.tsv`: code, name), by code.
static DIVISIONS: std::sync::LazyLock<std::collections::HashMap<u32, &'static str>> =
    std::sync::LazyLock::new(|| {
        include_str!("gb2260.tsv")
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (code, name) = l.split_once('\t')?;
                Some((code.parse().ok()?, name))
            })
            .collect()
    });

/// The six-digit division code as a number, if it is six digits.
fn division_number(division: &str) -> Option<u32> {
    (division.len() == 6 && division.bytes().all(|b| b.is_ascii_digit()))
        .then(|| division.parse().ok())
        .flatten()
}

/// Whether a six-digit division code lies in a GB/T 2260 province,
/// autonomous region, municipality or special administrative region.
pub fn in_a_province(division: &str) -> bool {
    division_number(division).is_some_and(|n| DIVISIONS.contains_key(&(n / 10_000 * 10_000)))
}

/// Whether a six-digit division code lies in a GB/T 2260 prefecture that
/// exists or existed since 1980, or names a province itself (`XX00..`).
pub fn in_a_prefecture(division: &str) -> bool {
    division_number(division).is_some_and(|n| {
        in_a_province(division) && (n / 100 % 100 == 0 || DIVISIONS.contains_key(&(n / 100 * 100)))
    })
}

/// The name of a province- or prefecture-level division (`320100` →
/// 南京市), present or past.
pub fn division_name(code: &str) -> Option<&'static str> {
    division_number(code).and_then(|n| DIVISIONS.get(&n).copied())
}

/// Findings that do not reject a code but are worth telling the submitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeWarning {
    /// Position 17, the embedded organisation code's own check character,
    /// does not match. Some really issued codes have this.
    OrganisationCodeCheck,
    /// Position 2 is not a category listed for the authority in position 1.
    UnlistedCategory,
    /// A resident ID's positions 1-4 are no GB/T 2260 prefecture, present
    /// or past (its province is real).
    UnknownPrefecture,
}

impl CodeWarning {
    /// Stable machine code, used in API `warnings`.
    pub fn code(self) -> &'static str {
        match self {
            CodeWarning::OrganisationCodeCheck => "uscc_org_code_check",
            CodeWarning::UnlistedCategory => "uscc_unlisted_category",
            CodeWarning::UnknownPrefecture => "unknown_prefecture",
        }
    }

    /// Human explanation without the value.
    pub fn message(self) -> &'static str {
        match self {
            CodeWarning::OrganisationCodeCheck => {
                "the embedded organisation code check character (position 17) does not match; accepted, please verify the code"
            }
            CodeWarning::UnlistedCategory => {
                "the organisation category (position 2) is not listed for this registration authority; accepted, please verify the code"
            }
            CodeWarning::UnknownPrefecture => {
                "the division code (positions 1-4) is no GB/T 2260 prefecture, present or past; accepted, please verify the number"
            }
        }
    }
}

fn uscc_value(c: u8) -> Option<u32> {
    USCC_ALPHABET.bytes().position(|a| a == c).map(|i| i as u32)
}

/// The USCC check character (position 18) for the first 17 characters, or
/// `None` if they are not 17 symbols of the alphabet.
pub fn uscc_check_char(first17: &str) -> Option<char> {
    let b = first17.as_bytes();
    if b.len() != 17 {
        return None;
    }
    let mut sum = 0u32;
    for (c, w) in b.iter().zip(USCC_WEIGHTS) {
        sum += uscc_value(*c)? * w;
    }
    let c = (31 - sum % 31) % 31;
    USCC_ALPHABET.chars().nth(c as usize)
}

/// The organisation code check character for an 8-character body
/// (digits and upper-case letters, A=10 … Z=35).
pub fn org_code_check_char(body: &str) -> Option<char> {
    let b = body.as_bytes();
    if b.len() != 8 {
        return None;
    }
    let mut sum = 0u32;
    for (c, w) in b.iter().zip(ORG_WEIGHTS) {
        let v = match c {
            b'0'..=b'9' => u32::from(c - b'0'),
            b'A'..=b'Z' => u32::from(c - b'A') + 10,
            _ => return None,
        };
        sum += v * w;
    }
    Some(match 11 - sum % 11 {
        10 => 'X',
        11 => '0',
        n => char::from_digit(n, 10)?,
    })
}

/// Checks a unified social credit code. `Ok` carries the warn-only findings.
pub fn check_uscc(code: &str) -> Result<Vec<CodeWarning>, CodeError> {
    let b = code.as_bytes();
    if code.chars().count() != 18 || b.len() != 18 {
        return Err(CodeError::Length);
    }
    if let Some(i) = b.iter().position(|c| uscc_value(*c).is_none()) {
        return Err(CodeError::Character(i + 1));
    }
    let Some((_, categories)) = AUTHORITIES.iter().find(|(a, _)| *a == b[0]) else {
        return Err(CodeError::Authority);
    };
    if let Some(i) = b[2..8].iter().position(|c| !c.is_ascii_digit()) {
        return Err(CodeError::DivisionCharacter(i + 3));
    }
    if uscc_check_char(&code[..17]).map(|c| c as u8) != Some(b[17]) {
        return Err(CodeError::CheckCharacter);
    }
    let mut warnings = Vec::new();
    if !categories.contains(&b[1]) {
        warnings.push(CodeWarning::UnlistedCategory);
    }
    if org_code_check_char(&code[8..16]).map(|c| c as u8) != Some(b[16]) {
        warnings.push(CodeWarning::OrganisationCodeCheck);
    }
    Ok(warnings)
}

/// The resident ID check character for the first 17 digits.
pub fn resident_id_check_char(first17: &str) -> Option<char> {
    let b = first17.as_bytes();
    if b.len() != 17 {
        return None;
    }
    let mut sum = 0u32;
    for (c, w) in b.iter().zip(RID_WEIGHTS) {
        if !c.is_ascii_digit() {
            return None;
        }
        sum += u32::from(c - b'0') * w;
    }
    Some(RID_CHECK[(sum % 11) as usize] as char)
}

/// Checks an 18-character resident identity number: digits, a division
/// code in a GB/T 2260 province, a real birth date from 1900 and not after
/// `today`, and the check character (upper-case `X`).
pub fn check_resident_id(id: &str, today: Date) -> Result<(), CodeError> {
    let b = id.as_bytes();
    if id.chars().count() != 18 || b.len() != 18 {
        return Err(CodeError::Length);
    }
    if let Some(i) = b[..17].iter().position(|c| !c.is_ascii_digit()) {
        return Err(CodeError::Character(i + 1));
    }
    if !(b[17].is_ascii_digit() || b[17] == b'X') {
        return Err(CodeError::Character(18));
    }
    if !in_a_province(&id[..6]) {
        return Err(CodeError::Division);
    }
    let birth = parse_compact_date(&id[6..14]).ok_or(CodeError::BirthDate)?;
    if birth > today {
        return Err(CodeError::FutureBirthDate);
    }
    if birth.year() < 1900 {
        return Err(CodeError::BirthYear);
    }
    if resident_id_check_char(&id[..17]).map(|c| c as u8) != Some(b[17]) {
        return Err(CodeError::CheckCharacter);
    }
    Ok(())
}

/// Warn-only findings of a valid resident ID number: a prefecture that
/// no GB/T 2260 edition since 1980 lists.
pub fn resident_id_warnings(id: &str) -> Vec<CodeWarning> {
    match id.get(..6) {
        Some(division) if !in_a_prefecture(division) => vec![CodeWarning::UnknownPrefecture],
        _ => Vec::new(),
    }
}

fn parse_compact_date(s: &str) -> Option<Date> {
    let year: i32 = s.get(0..4)?.parse().ok()?;
    let month: u8 = s.get(4..6)?.parse().ok()?;
    let day: u8 = s.get(6..8)?.parse().ok()?;
    let month = time::Month::try_from(month).ok()?;
    Date::from_calendar_date(year, month, day).ok()
}

/// Parses a strict ISO `YYYY-MM-DD` calendar date.
pub fn parse_iso_date(s: &str) -> Option<Date> {
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    if !b
        .iter()
        .enumerate()
        .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
    {
        return None;
    }
    let number =
        |r: std::ops::Range<usize>| b[r].iter().fold(0u16, |n, c| n * 10 + u16::from(c - b'0'));
    let month = time::Month::try_from(number(5..7) as u8).ok()?;
    Date::from_calendar_date(i32::from(number(0..4)), month, number(8..10) as u8).ok()
}

/// Serde for `Option<Date>` as ISO `YYYY-MM-DD` (the API's date format).
pub mod iso_date_opt {
    use serde::{Deserialize, Deserializer, Serializer};
    use time::Date;

    /// Serializes as `"YYYY-MM-DD"` or `null`.
    pub fn serialize<S: Serializer>(d: &Option<Date>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.collect_str(d),
            None => s.serialize_none(),
        }
    }

    /// Parses `"YYYY-MM-DD"` or `null`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Date>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(s) => super::parse_iso_date(&s)
                .map(Some)
                .ok_or_else(|| serde::de::Error::custom("expected a date as YYYY-MM-DD")),
        }
    }
}

/// A JSON number that is a whole non-negative number, written `3` or
/// `3.0` alike (RFC 8259 does not tell them apart; JSON Schema's `integer`
/// takes both).
pub fn json_whole_number(v: &serde_json::Value) -> Option<u64> {
    v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= u32::MAX as f64)
            .map(|f| f as u64)
    })
}

/// Serde: a `u32` written as a whole JSON number, `3` or `3.0`.
pub fn whole_u32<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let v = <serde_json::Value as serde::Deserialize>::deserialize(d)?;
    json_whole_number(&v)
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| serde::de::Error::custom("expected a whole number"))
}

/// Today's date in China Standard Time (UTC+8), the calendar the records use.
pub fn today_cst() -> Date {
    let offset = time::UtcOffset::from_hms(8, 0, 0).unwrap_or(time::UtcOffset::UTC);
    time::OffsetDateTime::now_utc().to_offset(offset).date()
}

/// The same day `months` months earlier (the month's last day when the
/// day does not exist there: 31 March less one month is 28/29 February).
pub fn months_before(date: Date, months: u32) -> Date {
    shift_months(date, -(months as i32))
}

/// The same day `months` months later (the month's last day when the day
/// does not exist there).
pub fn months_after(date: Date, months: u32) -> Date {
    shift_months(date, months as i32)
}

fn shift_months(date: Date, months: i32) -> Date {
    let total = date.year() * 12 + i32::from(u8::from(date.month())) - 1 + months;
    let (year, month) = (total.div_euclid(12), (total.rem_euclid(12) + 1) as u8);
    let month = time::Month::try_from(month).unwrap_or(time::Month::January);
    let day = date.day().min(month.length(year));
    Date::from_calendar_date(year, month, day).unwrap_or(date)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use time::macros::date;

    #[test]
    fn uscc_examples_from_the_standard() {
        assert_eq!(check_uscc("91350100M000100Y43"), Ok(vec![]));
        assert_eq!(check_uscc("914403001922038216"), Ok(vec![]));
        assert_eq!(
            check_uscc("914403001922038217"),
            Err(CodeError::CheckCharacter)
        );
        assert_eq!(
            check_uscc("91350100I000100Y43"),
            Err(CodeError::Character(9))
        );
    }

    #[test]
    fn uscc_structure_errors() {
        assert_eq!(check_uscc("91350100M000100Y4"), Err(CodeError::Length));
        assert_eq!(check_uscc(""), Err(CodeError::Length));
        assert_eq!(
            check_uscc("91350100m000100Y43"),
            Err(CodeError::Character(9))
        );
        // Authority 'B' does not exist; fix the check so only that fails.
        let body = "B1350100M000100Y4";
        let code = format!("{body}{}", uscc_check_char(body).expect("valid body"));
        assert_eq!(check_uscc(&code), Err(CodeError::Authority));
    }

    #[test]
    fn uscc_warn_only_cases() {
        // Bad organisation-code check character (position 17), good position 18.
        let body = "91350100M000100Y5";
        let code = format!("{body}{}", uscc_check_char(body).expect("valid body"));
        assert_eq!(
            check_uscc(&code),
            Ok(vec![CodeWarning::OrganisationCodeCheck])
        );
        // Category 8 is not listed for market regulation (9).
        let body = "98350100M000100Y4";
        let code = format!("{body}{}", uscc_check_char(body).expect("valid body"));
        assert_eq!(check_uscc(&code), Ok(vec![CodeWarning::UnlistedCategory]));
    }

    #[test]
    fn org_code_check() {
        assert_eq!(org_code_check_char("M000100Y"), Some('4'));
        assert_eq!(org_code_check_char("19220382"), Some('1'));
    }

    #[test]
    fn resident_id_examples() {
        let today = date!(2026 - 11 - 27);
        assert_eq!(check_resident_id("11010519491231002X", today), Ok(()));
        assert_eq!(
            check_resident_id("110105194912310021", today),
            Err(CodeError::CheckCharacter)
        );
        assert_eq!(
            check_resident_id("11010519491231002x", today),
            Err(CodeError::Character(18))
        );
        assert_eq!(
            check_resident_id("11010519490231002X", today),
            Err(CodeError::BirthDate)
        );
        let future = "11010520991231002";
        let id = format!(
            "{future}{}",
            resident_id_check_char(future).expect("digits")
        );
        assert_eq!(
            check_resident_id(&id, today),
            Err(CodeError::FutureBirthDate)
        );
    }

    #[test]
    fn division_codes_and_birth_years_are_checked() {
        let today = date!(2026 - 11 - 27);
        let id = |body: &str| format!("{body}{}", resident_id_check_char(body).expect("digits"));
        // A Jiangsu (32) number passes; 00 and 99 are no province.
        assert_eq!(check_resident_id(&id("32010219900307123"), today), Ok(()));
        assert_eq!(
            check_resident_id(&id("00000019900307123"), today),
            Err(CodeError::Division)
        );
        assert_eq!(
            check_resident_id(&id("99000019900307123"), today),
            Err(CodeError::Division)
        );
        assert_eq!(
            check_resident_id(&id("32010218890307123"), today),
            Err(CodeError::BirthYear)
        );
        // USCC positions 3-8 are a division code: digits only.
        let uscc = |body: &str| format!("{body}{}", uscc_check_char(body).expect("alphabet"));
        assert!(check_uscc(&uscc("91320100MA1MXXXX0")).is_ok());
        assert_eq!(
            check_uscc(&uscc("9132A100MA1MXXXX0")),
            Err(CodeError::DivisionCharacter(5))
        );
    }

    fn provinces() -> Vec<String> {
        let mut p: Vec<String> = DIVISIONS
            .keys()
            .map(|c| format!("{:02}", c / 10_000))
            .collect();
        p.sort();
        p.dedup();
        p
    }

    #[test]
    fn the_division_table_holds_provinces_and_prefectures_past_and_present() {
        // Every province of domain.md, and nothing else, is a province.
        let listed: Vec<String> = [
            11, 12, 13, 14, 15, 21, 22, 23, 31, 32, 33, 34, 35, 36, 37, 41, 42, 43, 44, 45, 46, 50,
            51, 52, 53, 54, 61, 62, 63, 64, 65, 71, 81, 82, 83,
        ]
        .iter()
        .map(|p| p.to_string())
        .collect();
        assert_eq!(provinces(), listed);
        assert_eq!(division_name("320000"), Some("江苏省"));
        assert_eq!(division_name("320500"), Some("苏州市"));
        // A prefecture merged away in 1983 still names old ID numbers.
        assert_eq!(division_name("322700"), Some("苏州地区"));
        assert!(in_a_prefecture("322701"));
        assert!(in_a_prefecture("320102") && in_a_prefecture("429004"));
        assert!(in_a_prefecture("810000"), "a province-level code");
        assert!(!in_a_prefecture("329900") && in_a_province("329900"));
        assert!(!in_a_province("990000") && !in_a_province("000000"));
        assert!(!in_a_province("32010") && !in_a_province("32010a"));
    }

    #[test]
    fn an_unknown_prefecture_warns() {
        let today = date!(2026 - 11 - 27);
        let id = |body: &str| format!("{body}{}", resident_id_check_char(body).expect("digits"));
        let known = id("32010219900307123");
        assert_eq!(check_resident_id(&known, today), Ok(()));
        assert!(resident_id_warnings(&known).is_empty());
        let unknown = id("32990019900307123");
        assert_eq!(check_resident_id(&unknown, today), Ok(()));
        assert_eq!(
            resident_id_warnings(&unknown),
            vec![CodeWarning::UnknownPrefecture]
        );
    }

    #[test]
    fn iso_dates() {
        assert_eq!(parse_iso_date("2024-02-29"), Some(date!(2024 - 02 - 29)));
        assert_eq!(parse_iso_date("2023-02-29"), None);
        assert_eq!(parse_iso_date("2024/02/28"), None);
        assert_eq!(parse_iso_date("2024-2-28"), None);
        assert_eq!(parse_iso_date("+024-02-28"), None);
    }

    fn uscc_body() -> impl Strategy<Value = String> {
        let symbols: Vec<char> = USCC_ALPHABET.chars().collect();
        (
            prop::sample::select(vec!['1', '5', '9', 'N', 'Y']),
            prop::sample::select(symbols.clone()),
            100000u32..999999,
            prop::collection::vec(prop::sample::select(symbols), 9),
        )
            .prop_map(|(a, category, division, rest)| {
                format!(
                    "{a}{category}{division}{}",
                    rest.into_iter().collect::<String>()
                )
            })
    }

    proptest! {
        #[test]
        fn generated_uscc_passes(body in uscc_body()) {
            let code = format!("{body}{}", uscc_check_char(&body).expect("alphabet"));
            prop_assert!(check_uscc(&code).is_ok());
        }

        #[test]
        fn single_changed_character_in_uscc_is_caught(
            body in uscc_body(),
            pos in 0usize..18,
            replacement in prop::sample::select(USCC_ALPHABET.chars().chain("IOSVZa-".chars()).collect::<Vec<_>>()),
        ) {
            let code = format!("{body}{}", uscc_check_char(&body).expect("alphabet"));
            let mut chars: Vec<char> = code.chars().collect();
            prop_assume!(chars[pos] != replacement);
            chars[pos] = replacement;
            let changed: String = chars.into_iter().collect();
            prop_assert!(check_uscc(&changed).is_err(), "not caught: {changed}");
        }

        #[test]
        fn single_changed_character_in_resident_id_is_caught(
            province in prop::sample::select(provinces()),
            area in 0u32..10000,
            days in 0i64..30000,
            seq in 0u32..1000,
            pos in 0usize..18,
            replacement in prop::sample::select("0123456789X".chars().collect::<Vec<_>>()),
        ) {
            let today = date!(2026 - 11 - 27);
            let birth = date!(1940 - 01 - 01) + time::Duration::days(days);
            let body = format!(
                "{province}{area:04}{:04}{:02}{:02}{seq:03}",
                birth.year(), u8::from(birth.month()), birth.day()
            );
            let id = format!("{body}{}", resident_id_check_char(&body).expect("digits"));
            prop_assert_eq!(check_resident_id(&id, today), Ok(()));
            let mut chars: Vec<char> = id.chars().collect();
            prop_assume!(chars[pos] != replacement);
            chars[pos] = replacement;
            let changed: String = chars.into_iter().collect();
            prop_assert!(check_resident_id(&changed, today).is_err(), "not caught: {changed}");
        }
    }

    #[test]
    fn months_before_keeps_the_day_or_takes_the_months_last() {
        use time::macros::date;
        assert_eq!(
            months_before(date!(2026 - 10 - 15), 12),
            date!(2025 - 10 - 15)
        );
        assert_eq!(
            months_before(date!(2026 - 03 - 31), 1),
            date!(2026 - 02 - 28)
        );
        assert_eq!(
            months_before(date!(2024 - 03 - 31), 1),
            date!(2024 - 02 - 29)
        );
        assert_eq!(
            months_before(date!(2026 - 01 - 10), 2),
            date!(2025 - 11 - 10)
        );
        assert_eq!(
            months_before(date!(2026 - 01 - 10), 0),
            date!(2026 - 01 - 10)
        );
    }
}
