//! On-disk encoding of journal keys and values, with our own checksum and sequence number.
//!
//! Pure functions, no I/O: [`record_key`] / [`meta_key`] build sled keys, [`encode_record`] /
//! [`decode_record`] and [`encode_meta`] / [`decode_meta`] build and validate values. A record's
//! checksum covers its log name, sequence number and payload, so a value that ends up under the
//! wrong key, or a torn or bit-flipped value, is detected at recovery.

use crate::journal::JournalError;
use crate::protocol::Seq;

/// First byte of every value: the encoding version.
const FORMAT: u8 = 1;
/// Key prefix of log records.
pub(crate) const RECORD_PREFIX: u8 = b'L';
/// Key prefix of metadata entries.
pub(crate) const META_PREFIX: u8 = b'M';
/// Bytes before a record's payload: format, seq, crc.
const RECORD_HEADER: usize = 1 + 8 + 4;
/// Bytes before a meta value's payload: format, crc.
const META_HEADER: usize = 1 + 4;

/// The name of one append-only log in the journal (e.g. `out/commands/agent-7`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LogName(String);

impl LogName {
    /// Names are 1 to 200 bytes of printable ASCII (no NUL: it ends the name inside a key).
    pub fn new(name: impl Into<String>) -> Result<Self, JournalError> {
        let name = name.into();
        let ok =
            !name.is_empty() && name.len() <= 200 && name.bytes().all(|b| b.is_ascii_graphic());
        if !ok {
            return Err(JournalError::BadName {
                name: name.chars().take(64).collect(),
            });
        }
        Ok(LogName(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for LogName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The key prefix shared by every record of `log`.
pub(crate) fn log_prefix(log: &LogName) -> Vec<u8> {
    let mut k = Vec::with_capacity(log.0.len() + 2);
    k.push(RECORD_PREFIX);
    k.extend_from_slice(log.0.as_bytes());
    k.push(0);
    k
}

/// The store's key for record `seq` of `log` (public for benchmarks that write the same rows).
pub fn record_key(log: &LogName, seq: Seq) -> Vec<u8> {
    let mut k = log_prefix(log);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

pub(crate) fn meta_key(key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(META_PREFIX);
    k.extend_from_slice(key.as_bytes());
    k
}

fn record_crc(log: &[u8], seq: Seq, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(log);
    h.update(&seq.to_be_bytes());
    h.update(payload);
    h.finalize()
}

/// The store's value for a record: format, seq, CRC, payload.
pub fn encode_record(log: &LogName, seq: Seq, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(RECORD_HEADER + payload.len());
    v.push(FORMAT);
    v.extend_from_slice(&seq.to_be_bytes());
    v.extend_from_slice(&record_crc(log.0.as_bytes(), seq, payload).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// Split a record key into its log name and sequence number.
pub(crate) fn parse_record_key(key: &[u8]) -> Result<(&[u8], Seq), String> {
    if key.len() < 1 + 1 + 1 + 8 || key[0] != RECORD_PREFIX {
        return Err("record key too short".into());
    }
    let (head, seq_bytes) = key.split_at(key.len() - 8);
    let log = &head[1..head.len() - 1];
    if head[head.len() - 1] != 0 {
        return Err("record key lacks its separator".into());
    }
    let mut b = [0u8; 8];
    b.copy_from_slice(seq_bytes);
    Ok((log, Seq(u64::from_be_bytes(b))))
}

/// Validate a record value against its key; returns its payload.
pub(crate) fn decode_record<'v>(key: &[u8], value: &'v [u8]) -> Result<(Seq, &'v [u8]), String> {
    let (log, key_seq) = parse_record_key(key)?;
    if value.len() < RECORD_HEADER {
        return Err(format!(
            "record value of {} bytes is shorter than its header",
            value.len()
        ));
    }
    if value[0] != FORMAT {
        return Err(format!("unknown record format {}", value[0]));
    }
    let mut b = [0u8; 8];
    b.copy_from_slice(&value[1..9]);
    let seq = Seq(u64::from_be_bytes(b));
    if seq != key_seq {
        return Err(format!(
            "record says seq {seq} under the key of seq {key_seq}"
        ));
    }
    let mut c = [0u8; 4];
    c.copy_from_slice(&value[9..13]);
    let crc = u32::from_be_bytes(c);
    let payload = &value[RECORD_HEADER..];
    let actual = record_crc(log, seq, payload);
    if crc != actual {
        return Err(format!(
            "checksum {crc:#010x} does not match the content ({actual:#010x})"
        ));
    }
    Ok((seq, payload))
}

pub(crate) fn encode_meta(key: &str, payload: &[u8]) -> Vec<u8> {
    let mut h = crc32fast::Hasher::new();
    h.update(key.as_bytes());
    h.update(payload);
    let mut v = Vec::with_capacity(META_HEADER + payload.len());
    v.push(FORMAT);
    v.extend_from_slice(&h.finalize().to_be_bytes());
    v.extend_from_slice(payload);
    v
}

pub(crate) fn decode_meta<'v>(key: &[u8], value: &'v [u8]) -> Result<&'v [u8], String> {
    if value.len() < META_HEADER || value[0] != FORMAT {
        return Err("meta value too short or of an unknown format".into());
    }
    let name = key.get(1..).unwrap_or_default();
    let payload = &value[META_HEADER..];
    let mut h = crc32fast::Hasher::new();
    h.update(name);
    h.update(payload);
    let mut c = [0u8; 4];
    c.copy_from_slice(&value[1..5]);
    if u32::from_be_bytes(c) != h.finalize() {
        return Err("meta checksum does not match the content".into());
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_detect_damage() {
        let log = LogName::new("out/commands/a1").unwrap();
        let key = record_key(&log, Seq(42));
        let value = encode_record(&log, Seq(42), b"hello");
        assert_eq!(
            decode_record(&key, &value).unwrap(),
            (Seq(42), &b"hello"[..])
        );
        for i in 0..value.len() {
            let mut bad = value.clone();
            bad[i] ^= 0x40;
            assert!(
                decode_record(&key, &bad).is_err(),
                "flip at byte {i} undetected"
            );
        }
        assert!(decode_record(&key, &value[..value.len() - 1]).is_err());
        assert!(decode_record(&key, &value[..5]).is_err());
        let other = record_key(&LogName::new("out/commands/a2").unwrap(), Seq(42));
        assert!(
            decode_record(&other, &value).is_err(),
            "moved under another log"
        );
        assert!(
            decode_record(&record_key(&log, Seq(43)), &value).is_err(),
            "moved to another seq"
        );
    }

    #[test]
    fn meta_round_trips_and_detects_damage() {
        let key = meta_key("incarnation");
        let v = encode_meta("incarnation", b"abc");
        assert_eq!(decode_meta(&key, &v).unwrap(), b"abc");
        let mut bad = v.clone();
        bad[6] ^= 1;
        assert!(decode_meta(&key, &bad).is_err());
        assert!(decode_meta(&meta_key("other"), &v).is_err());
    }

    #[test]
    fn log_names_are_checked() {
        assert!(LogName::new("").is_err());
        assert!(LogName::new("a\0b").is_err());
        assert!(LogName::new("a b").is_err());
        assert!(LogName::new("x".repeat(201)).is_err());
        assert!(LogName::new("in/events/agent-1").is_ok());
    }
}
