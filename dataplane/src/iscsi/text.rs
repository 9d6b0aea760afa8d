//! Text key=value data segments (RFC 7143 §6.1): parsing with limits, and building.

use std::fmt;

/// Longest key name (RFC 7143 §6.1: 63 bytes).
pub const MAX_KEY_LEN: usize = 63;
/// Longest value we accept. RFC 7143 allows 255 for most keys and 8192 for a few; we take
/// the larger bound everywhere and let each key's own check narrow it.
pub const MAX_VALUE_LEN: usize = 8192;
/// Most pairs one Login or Text exchange may carry.
pub const MAX_PAIRS: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextError {
    /// A pair without '='.
    NoEquals,
    KeyTooLong,
    ValueTooLong,
    TooManyPairs,
    /// Bytes that are not UTF-8.
    NotUtf8,
    EmptyKey,
}

impl fmt::Display for TextError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            TextError::NoEquals => "key without '='",
            TextError::KeyTooLong => "key longer than 63 bytes",
            TextError::ValueTooLong => "value longer than 8192 bytes",
            TextError::TooManyPairs => "too many key=value pairs",
            TextError::NotUtf8 => "text is not UTF-8",
            TextError::EmptyKey => "empty key",
        };
        f.write_str(s)
    }
}

impl std::error::Error for TextError {}

/// Parses NUL-separated key=value pairs. A trailing NUL is optional; empty items (padding or
/// doubled NULs) are skipped.
pub fn parse(data: &[u8]) -> Result<Vec<(String, String)>, TextError> {
    let mut out = Vec::new();
    for item in data.split(|&b| b == 0) {
        if item.is_empty() {
            continue;
        }
        if out.len() == MAX_PAIRS {
            return Err(TextError::TooManyPairs);
        }
        let s = std::str::from_utf8(item).map_err(|_| TextError::NotUtf8)?;
        let (k, v) = s.split_once('=').ok_or(TextError::NoEquals)?;
        if k.is_empty() {
            return Err(TextError::EmptyKey);
        }
        if k.len() > MAX_KEY_LEN {
            return Err(TextError::KeyTooLong);
        }
        if v.len() > MAX_VALUE_LEN {
            return Err(TextError::ValueTooLong);
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

/// Appends `key=value\0`.
pub fn push(out: &mut Vec<u8>, key: &str, value: &str) {
    out.extend_from_slice(key.as_bytes());
    out.push(b'=');
    out.extend_from_slice(value.as_bytes());
    out.push(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pairs_and_skips_padding() {
        let d = b"InitiatorName=iqn.x\0SessionType=Normal\0\0\0";
        let p = parse(d).unwrap();
        assert_eq!(
            p,
            vec![
                ("InitiatorName".into(), "iqn.x".into()),
                ("SessionType".into(), "Normal".into())
            ]
        );
    }

    #[test]
    fn value_may_contain_equals_and_be_empty() {
        let p = parse(b"A=b=c\0B=\0").unwrap();
        assert_eq!(p[0], ("A".into(), "b=c".into()));
        assert_eq!(p[1], ("B".into(), String::new()));
    }

    #[test]
    fn errors() {
        assert_eq!(parse(b"novalue\0"), Err(TextError::NoEquals));
        assert_eq!(parse(b"=x\0"), Err(TextError::EmptyKey));
        let long = format!("{}=1", "k".repeat(64));
        assert_eq!(parse(long.as_bytes()), Err(TextError::KeyTooLong));
        assert_eq!(parse(b"a=\xff\0"), Err(TextError::NotUtf8));
        let many: Vec<u8> = (0..300)
            .flat_map(|i| format!("k{i}=v\0").into_bytes())
            .collect();
        assert_eq!(parse(&many), Err(TextError::TooManyPairs));
    }

    #[test]
    fn push_builds_nul_terminated() {
        let mut v = Vec::new();
        push(&mut v, "A", "1");
        push(&mut v, "B", "x");
        assert_eq!(v, b"A=1\0B=x\0");
    }
}
