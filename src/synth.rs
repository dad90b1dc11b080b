//! Synthetic records for tests, load tests and demos: realistic in shape
//! and length, with codes computed by the real check algorithms, and never
//! a real person's or organisation's identifiers.
//!
//! Deterministic: the same `n` gives the same record.

use serde_json::{json, Value};

use crate::codes;

/// A splitmix64 step: cheap, deterministic, well mixed.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A valid USCC with the given 8-character head (authority, category,
/// division), derived from `n`.
pub fn uscc(head: &str, n: u64) -> String {
    const BODY: &[u8] = b"0123456789ABCDEFGHJKLMNPQRTUWXY";
    let mut x = mix(n);
    let body: String = (0..8)
        .map(|_| {
            let c = BODY[(x % 31) as usize] as char;
            x /= 31;
            c
        })
        .collect();
    let org_check = codes::org_code_check_char(&body).unwrap_or('0');
    let first17 = format!("{head}{body}{org_check}");
    let check = codes::uscc_check_char(&first17).unwrap_or('0');
    format!("{first17}{check}")
}

/// A valid synthetic resident ID number (born 1950-2004), derived from `n`.
pub fn resident_id(n: u64) -> String {
    let x = mix(n ^ 0xA5A5);
    let year = 1950 + (x % 55) as i32;
    let month = 1 + (x / 55 % 12) as u8;
    let day = 1 + (x / 660 % 28) as u8;
    let seq = x / 18480 % 1000;
    let body = format!("320102{year:04}{month:02}{day:02}{seq:03}");
    let check = codes::resident_id_check_char(&body).unwrap_or('0');
    format!("{body}{check}")
}

const SURNAMES: &[&str] = &[
    "王", "李", "张", "刘", "陈", "杨", "黄", "赵", "吴", "周", "林", "郑",
];
const GIVEN: &[&str] = &[
    "伟", "芳", "娜", "敏", "静", "强", "磊", "洋", "艳", "勇", "军", "杰",
];
const FIRMS: &[&str] = &[
    "金陵", "秦淮", "钟山", "玄武", "鼓楼", "建邺", "栖霞", "江宁",
];
const TRADES: &[&str] = &[
    "食品", "建材", "物流", "贸易", "科技", "餐饮", "医药", "环保",
];

fn person(n: u64) -> String {
    let x = mix(n ^ 0x77);
    format!(
        "{}{}{}",
        SURNAMES[(x % 12) as usize],
        GIVEN[(x / 12 % 12) as usize],
        GIVEN[(x / 144 % 12) as usize]
    )
}

fn firm(n: u64) -> String {
    let x = mix(n ^ 0x55);
    format!(
        "南京{}{}{}有限公司",
        FIRMS[(x % 8) as usize],
        TRADES[(x / 8 % 8) as usize],
        x % 1000
    )
}

/// The authority used as deciding/listing department in synthetic records.
pub fn authority() -> (String, String) {
    ("南京市市场监督管理局".into(), uscc("11320100", 1))
}

/// The subject block of a record about a legal entity, an individual
/// business or a natural person, chosen by `n`.
pub fn subject(n: u64) -> Value {
    subject_of(n, true)
}

fn subject_of(n: u64, persons: bool) -> Value {
    match mix(n ^ 0x11) % 10 {
        0 if persons => json!({
            "subject_name": person(n),
            "subject_type": "natural_person",
            "id_type": "resident_id",
            "id_number": resident_id(n),
        }),
        1 => json!({
            "subject_name": format!("南京市秦淮区{}小吃店", person(n)),
            "subject_type": "individual_business",
            "uscc": uscc("92320104", n),
            "legal_representative": person(n + 1),
        }),
        _ => json!({
            "subject_name": firm(n),
            "subject_type": "legal_entity",
            "uscc": uscc("91320100", n),
            "legal_representative": person(n + 1),
            "legal_representative_id_type": "resident_id",
            "legal_representative_id_number": resident_id(n + 1),
        }),
    }
}

fn merge(mut a: Value, b: Value) -> Value {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
    a
}

/// A valid record of `item` (one of the six shipped items), derived from
/// `n`; `severity` applies to penalties. Unknown items give `null`.
pub fn record(item: &str, n: u64, severity: &str) -> Value {
    let (auth, auth_uscc) = authority();
    let facts = "经查，当事人于2026年3月至9月期间在其经营场所销售超过保质期的预包装食品共计十二批次，货值金额合计人民币三千六百元，违法所得人民币八百元。上述事实有现场检查笔录、询问笔录、进货票据等证据证实。";
    let body = match item {
        "administrative_penalty" => json!({
            "decision_number": format!("宁市监罚〔2026〕{}号", 100 + n),
            "violation_type": "销售超过保质期的食品",
            "violation_facts": facts,
            "legal_basis": "《中华人民共和国食品安全法》第三十四条第（十）项、第一百二十四条第一款第（五）项",
            "penalty_categories": ["warning", "fine", "confiscation_of_illegal_gains"],
            "penalty_content": "一、警告；二、没收违法所得人民币捌佰元；三、罚款人民币伍万元。",
            "fine_amount": 5.0,
            "confiscation_amount": 0.08,
            "decision_date": "2026-10-15",
            "valid_until": "2027-10-14",
            "publicity_end": "2027-10-14",
            "authority_name": auth,
            "authority_uscc": auth_uscc,
            "source_unit": auth,
            "source_unit_uscc": auth_uscc,
            "severity": severity,
        }),
        "administrative_licence" => json!({
            "decision_title": "食品经营许可决定书",
            "decision_number": format!("JY1320102{n:07}"),
            "licence_category": "ordinary",
            "certificate_name": "食品经营许可证",
            "licence_number": format!("JY1320102{n:07}"),
            "content": "预包装食品（含冷藏冷冻食品）销售，散装食品（不含熟食）销售",
            "decision_date": "2026-09-01",
            "valid_from": "2026-09-01",
            "valid_to": "2031-08-31",
            "authority_name": auth,
            "authority_uscc": auth_uscc,
            "status": "valid",
            "source_unit": auth,
            "source_unit_uscc": auth_uscc,
        }),
        "abnormal_operations" => json!({
            "decision_number": format!("宁市监异〔2026〕{n}号"),
            "listing_reason": "annual_report_not_filed",
            "listing_reason_detail": "未依照《企业信息公示暂行条例》第八条规定的期限公示2025年度年度报告",
            "listing_date": "2026-07-01",
            "listing_authority": auth,
            "listing_authority_uscc": auth_uscc,
        }),
        "serious_dishonesty" => json!({
            "list_kind": "serious_illegal_dishonest_enterprise",
            "legal_basis": "《市场监督管理严重违法失信名单管理办法》第九条",
            "facts": facts,
            "deciding_department": auth,
            "deciding_department_uscc": auth_uscc,
            "decision_number": format!("宁市监严失〔2026〕{n}号"),
            "listing_date": "2026-11-02",
            "planned_removal_date": "2029-11-01",
            "removal_conditions": "列入之日起满三年且已履行行政处罚义务，未再发生违法行为的，可申请移出。",
        }),
        "credit_commitment" => json!({
            "commitment_type": "notification_approval",
            "commitment_content": "本单位承诺所提交材料真实有效，已符合食品经营许可条件，如有不实愿承担相应法律责任。",
            "commitment_date": "2026-08-20",
            "accepting_department": auth,
            "accepting_department_uscc": auth_uscc,
            "commitment_number": format!("CN-2026-{n:08}"),
            "fulfilment_status": "fulfilled",
        }),
        "red_list" => json!({
            "list_kind": "a_grade_taxpayer",
            "basis": "《纳税信用管理办法》",
            "awarding_department": "国家税务总局江苏省税务局",
            "awarding_department_uscc": uscc("11320000", 2),
            "document_number": format!("苏税信〔2026〕{n}号"),
            "award_date": "2026-04-30",
            "valid_until": "2027-04-30",
        }),
        _ => return Value::Null,
    };
    merge(subject_of(n, item != "abnormal_operations"), body)
}

/// The six shipped catalog item ids.
pub const ITEMS: [&str; 6] = [
    "administrative_licence",
    "administrative_penalty",
    "abnormal_operations",
    "serious_dishonesty",
    "credit_commitment",
    "red_list",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_codes_are_valid() {
        for n in 0..500 {
            assert_eq!(codes::check_uscc(&uscc("91320100", n)), Ok(vec![]));
            assert_eq!(
                codes::check_resident_id(&resident_id(n), codes::today_cst()),
                Ok(())
            );
        }
    }
}
