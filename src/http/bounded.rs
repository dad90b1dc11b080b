//! JSON parsing with structural limits enforced *while* parsing: nesting
//! depth and items per array. A body within `limits.max_body_bytes` can
//! still describe a million-item array whose parsed form costs 30 times
//! its size in memory; this parser stops at the first array that is too
//! long, before building it, and says where it is.

use std::cell::RefCell;
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// Which limit a document broke, and where (JSON pointer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exceeded {
    /// Nested deeper than allowed.
    Depth,
    /// An array with more items than allowed, at this pointer.
    ArrayItems(String),
}

/// One step of the path to the value being parsed.
enum Step {
    Key(String),
    Index(usize),
}

/// Parsing state shared by the nested seeds.
struct Limits {
    max_depth: usize,
    max_items: usize,
    /// Path to the value being parsed (no allocation per array item).
    path: RefCell<Vec<Step>>,
    exceeded: RefCell<Option<Exceeded>>,
}

impl Limits {
    fn exceed<E: de::Error>(&self, what: Exceeded) -> E {
        *self.exceeded.borrow_mut() = Some(what);
        E::custom("structural limit exceeded")
    }

    fn pointer(&self) -> String {
        self.path
            .borrow()
            .iter()
            .map(|p| match p {
                Step::Key(k) => format!("/{}", k.replace('~', "~0").replace('/', "~1")),
                Step::Index(i) => format!("/{i}"),
            })
            .collect()
    }
}

/// Parses `raw`; `Err(Ok(limit))` when a limit was exceeded, `Err(Err(e))`
/// when it is not JSON.
pub fn parse(
    raw: &[u8],
    max_depth: usize,
    max_items: usize,
) -> Result<Value, Result<Exceeded, serde_json::Error>> {
    let limits = Limits {
        max_depth,
        max_items,
        path: RefCell::new(Vec::new()),
        exceeded: RefCell::new(None),
    };
    let mut de = serde_json::Deserializer::from_slice(raw);
    let parsed = Seed {
        limits: &limits,
        depth: 1,
    }
    .deserialize(&mut de)
    .and_then(|v| de.end().map(|()| v));
    match parsed {
        Ok(v) => Ok(v),
        Err(e) => match limits.exceeded.into_inner() {
            Some(what) => Err(Ok(what)),
            None => Err(Err(e)),
        },
    }
}

/// Builds one value at `depth` (the document itself is at depth 1).
struct Seed<'a> {
    limits: &'a Limits,
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for Seed<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Seed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let l = self.limits;
        if self.depth > l.max_depth {
            return Err(l.exceed(Exceeded::Depth));
        }
        let mut items = Vec::new();
        loop {
            l.path.borrow_mut().push(Step::Index(items.len()));
            let next = seq.next_element_seed(Seed {
                limits: l,
                depth: self.depth + 1,
            })?;
            let Some(v) = next else {
                l.path.borrow_mut().pop();
                break;
            };
            l.path.borrow_mut().pop();
            if items.len() == l.max_items {
                return Err(l.exceed(Exceeded::ArrayItems(l.pointer())));
            }
            items.push(v);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let l = self.limits;
        if self.depth > l.max_depth {
            return Err(l.exceed(Exceeded::Depth));
        }
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            l.path.borrow_mut().push(Step::Key(key));
            let v = map.next_value_seed(Seed {
                limits: l,
                depth: self.depth + 1,
            })?;
            if let Some(Step::Key(key)) = l.path.borrow_mut().pop() {
                out.insert(key, v);
            }
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_like_serde_json_within_limits() {
        let doc = br#"{"a": [1, -2, 3.5, "x", null, true, {"b": []}], "c~/d": {}}"#;
        let ours = parse(doc, 32, 100).expect("valid");
        let theirs: Value = serde_json::from_slice(doc).expect("valid");
        assert_eq!(ours, theirs);
        assert!(parse(b"[1, 2", 32, 100).expect_err("eof").is_err());
        assert!(parse(b"[1] x", 32, 100).expect_err("trailing").is_err());
    }

    #[test]
    fn stops_at_the_first_long_array_and_says_where() {
        let doc = br#"{"records": [{"tags/x": [1, 2, 3, 4]}]}"#;
        assert_eq!(
            parse(doc, 32, 3).expect_err("too long").ok(),
            Some(Exceeded::ArrayItems("/records/0/tags~1x".into()))
        );
        assert!(parse(doc, 32, 4).is_ok());
    }

    #[test]
    fn depth_counts_containers() {
        assert!(parse(br#"{"a":[[1]]}"#, 3, 10).is_ok());
        assert_eq!(
            parse(br#"{"a":[[[1]]]}"#, 3, 10).expect_err("deep").ok(),
            Some(Exceeded::Depth)
        );
        assert!(parse(br#"{"a":"[[[[[["}"#, 2, 10).is_ok());
    }
}
