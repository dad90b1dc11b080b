//! Pull cursors: opaque to agencies, a position in the agency's own stream
//! to credgate.
//!
//! Every pull delivery takes the next number of its agency's stream in the
//! transaction that creates it, under a lock on the agency's counter, so an
//! agency's stream has no gaps and is numbered in commit order on any
//! backend. (The earlier cursors were the global delivery sequence, which
//! is commit order only with one writer.) Cursors handed out are
//! base64url text; the plain integers that credgate handed out before are
//! still accepted, as [`Cursor::Legacy`], and translated by the store.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

/// Prefix inside the encoding: names the cursor's format version.
const TAG: &str = "p1:";

/// A cursor as an agency sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cursor {
    /// A position in the agency's stream (0: before the first notice).
    Position(i64),
    /// A cursor of the earlier format: the global delivery sequence number.
    Legacy(i64),
}

/// Encodes a stream position as the opaque cursor text.
pub fn encode(position: i64) -> String {
    URL_SAFE_NO_PAD.encode(format!("{TAG}{position}"))
}

/// Parses a cursor; `None` if it is neither format.
pub fn parse(text: &str) -> Option<Cursor> {
    if !text.is_empty() && text.len() <= 19 && text.bytes().all(|b| b.is_ascii_digit()) {
        return text.parse().ok().map(Cursor::Legacy);
    }
    if text.len() > 64 {
        return None;
    }
    let raw = URL_SAFE_NO_PAD.decode(text).ok()?;
    let raw = std::str::from_utf8(&raw).ok()?;
    let digits = raw.strip_prefix(TAG)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().map(Cursor::Position)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_and_old_cursors_are_recognised() {
        for p in [0, 1, 42, i64::MAX] {
            assert_eq!(parse(&encode(p)), Some(Cursor::Position(p)));
        }
        assert_eq!(parse("0"), Some(Cursor::Legacy(0)));
        assert_eq!(parse("1234"), Some(Cursor::Legacy(1234)));
        // Not digits, not ours, negative, too long: refused.
        for bad in [
            "",
            "-1",
            "abc",
            "cDE6LTE",
            "99999999999999999999",
            &"A".repeat(65),
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
        // Opaque: not a number an agency could do arithmetic on.
        assert!(encode(5).parse::<i64>().is_err());
    }
}
