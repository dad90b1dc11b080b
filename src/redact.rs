//! The egress choke point: the only way record data becomes something that
//! can leave the gateway.
//!
//! A [`RecordView`] can only be made here, from a record, its catalog item
//! and the audience; HTTP handlers serialize views, never stored records.
//! Fields above the audience's clearance are dropped; a field the catalog
//! does not annotate counts as `secret`. Only the originator of a record
//! (the department that submitted it) sees it whole.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::catalog::{CatalogItem, FieldClass, SubjectType};

/// Who will receive the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    /// The department that submitted the record: it already holds every field.
    Originator,
    /// Anyone else, with the highest class they may see.
    Cleared(FieldClass),
}

/// A record body fit for one audience. Constructed only by [`view`].
#[derive(Debug, Clone, Serialize)]
#[serde(transparent)]
pub struct RecordView(Map<String, Value>);

impl RecordView {
    /// Field names present in the view.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.keys()
    }
}

/// Redacts `record` for `audience`. With no catalog item (the item was
/// removed), nothing is known about the fields, so a non-originator gets
/// nothing.
pub fn view(item: Option<&CatalogItem>, record: &Value, audience: Audience) -> RecordView {
    let Some(obj) = record.as_object() else {
        return RecordView(Map::new());
    };
    let clearance = match audience {
        Audience::Originator => return RecordView(obj.clone()),
        Audience::Cleared(c) => c,
    };
    let Some(item) = item else {
        return RecordView(Map::new());
    };
    let subject_type = obj
        .get("subject_type")
        .cloned()
        .and_then(|v| serde_json::from_value::<SubjectType>(v).ok());
    let kept = obj
        .iter()
        .filter(|(k, _)| {
            let class = item.class_of(k, subject_type);
            class != FieldClass::Secret && class <= clearance
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    RecordView(kept)
}
