//! What agencies do with notices, as use cases: read their stream
//! (long-polling), acknowledge a position, report feedback on a measure.
//! The HTTP handlers parse and answer; the rules live here.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::cursor::Cursor;
use crate::store::{Feedback, FeedbackStored, NoticeKind, Outbound, Store, StoreError};

/// The stream position a cursor stands for (`None`: the acknowledged one).
pub async fn position(
    store: &dyn Store,
    agency: &str,
    cursor: Option<Cursor>,
) -> Result<i64, StoreError> {
    match cursor {
        None => store.pull_position(agency).await,
        Some(Cursor::Position(p)) => Ok(p),
        Some(Cursor::Legacy(seq)) => store.legacy_position(agency, seq).await,
    }
}

/// Up to `limit` notices of the agency's stream after `after`; when there
/// are none, waits up to `wait` for a commit (of any instance) that brings
/// some. Empty at the deadline or at shutdown.
pub async fn read(
    store: &dyn Store,
    agency: &str,
    after: i64,
    limit: usize,
    wait: Duration,
    shutdown: &CancellationToken,
) -> Result<Vec<Outbound>, StoreError> {
    // Subscribe before reading so a commit in between is not missed.
    let mut changes = store.changes();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let batch = store.pull(agency, after, limit).await?;
        if !batch.is_empty() || tokio::time::Instant::now() >= deadline {
            return Ok(batch);
        }
        tokio::select! {
            _ = changes.changed() => {}
            _ = tokio::time::sleep_until(deadline) => {}
            _ = shutdown.cancelled() => return Ok(Vec::new()),
        }
    }
}

/// Stores the agency's acknowledged position (never backwards, never past
/// its last notice); returns the position now in force.
pub async fn acknowledge(
    store: &dyn Store,
    agency: &str,
    cursor: Cursor,
) -> Result<i64, StoreError> {
    let wanted = position(store, agency, Some(cursor)).await?;
    store.ack(agency, wanted).await?;
    store.pull_position(agency).await
}

/// Why feedback was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedbackRefused {
    /// No such notice, or it was not sent to the agency: the same answer,
    /// so nothing about other agencies' notices is revealed.
    NotFound,
    /// Lift notices carry no measures to report on.
    Lift,
    /// The measure is not one of the notice's.
    UnknownMeasure,
}

/// Stores an agency's feedback on a measure of a notice it received.
pub async fn give_feedback(
    store: &dyn Store,
    feedback: Feedback,
) -> Result<Result<(), FeedbackRefused>, StoreError> {
    let Some(notice) = store
        .received_notice(&feedback.notice_id, &feedback.agency)
        .await?
    else {
        return Ok(Err(FeedbackRefused::NotFound));
    };
    if notice.kind == NoticeKind::Lift {
        return Ok(Err(FeedbackRefused::Lift));
    }
    if !notice.measures.contains(&feedback.measure) {
        return Ok(Err(FeedbackRefused::UnknownMeasure));
    }
    Ok(match store.add_feedback(feedback).await? {
        FeedbackStored::Stored => Ok(()),
        FeedbackStored::UnknownNotice | FeedbackStored::NotRecipient => {
            Err(FeedbackRefused::NotFound)
        }
    })
}
