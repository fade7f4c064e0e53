//! A step's output properties, held to limits that keep every step result inside one frame
//! (sans-IO).
//!
//! [`Outputs`] accepts a property at a time and refuses what would break a limit: more than
//! [`MAX_OUTPUTS`] properties, a name that is not `[A-Za-z0-9_.-]{1,128}`, or more than
//! [`MAX_OUTPUTS_BYTES`] of names and values as they travel (JSON-encoded). NUL bytes, which
//! no environment variable can carry, become U+FFFD. [`OutputLines`] finds
//! `::output name=value` lines in a step's standard output as it streams, whatever the read
//! boundaries, keeping at most one line of [`MAX_LINE`] bytes in memory. [`fit`] holds any
//! step result to the same limits: a result that does not fit fails the step with a reason
//! that names what was refused, instead of losing the whole result.

use std::collections::BTreeMap;

use tether_shared::protocol::StepStatus;

use super::step::StepResult;

/// Most output properties of one step.
pub const MAX_OUTPUTS: usize = tether_shared::plugin::MAX_OUTPUTS;
/// Longest output name.
pub const MAX_NAME: usize = 128;
/// Most bytes of names and values of one step, JSON-encoded (a frame is 256 KiB).
pub const MAX_OUTPUTS_BYTES: usize = 128 * 1024;
/// Longest stdout line looked at for `::output` (longer ones are refused, not parsed).
pub const MAX_LINE: usize = MAX_OUTPUTS_BYTES + MAX_NAME + 16;
/// Longest step message (bytes).
pub const MAX_MESSAGE: usize = 4 * 1024;
/// Names of refused outputs listed in the reason (the rest are counted).
const LISTED: usize = 8;

const PREFIX: &[u8] = b"::output ";

/// Output properties within the limits, and what was refused.
#[derive(Debug, Default)]
pub struct Outputs {
    map: BTreeMap<String, String>,
    bytes: usize,
    refused: Vec<String>,
    refused_count: usize,
}

fn encoded_len(text: &str) -> usize {
    serde_json::to_string(text).map_or(usize::MAX / 4, |s| s.len())
}

fn valid_name(name: &str) -> bool {
    (1..=MAX_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

impl Outputs {
    /// Sets `name` to `value` (replacing an earlier value) unless that breaks a limit.
    pub fn set(&mut self, name: &str, value: &str) {
        let name = name.trim();
        if !valid_name(name) {
            let shown: String = name.chars().take(32).collect();
            self.refuse(format!("{shown:?} (not a valid name)"));
            return;
        }
        let value = value.replace('\0', "\u{FFFD}");
        let size = encoded_len(name) + encoded_len(&value) + 2;
        let old = self
            .map
            .get(name)
            .map_or(0, |v| encoded_len(name) + encoded_len(v) + 2);
        let count = self.map.len() + usize::from(old == 0);
        if count > MAX_OUTPUTS || self.bytes - old + size > MAX_OUTPUTS_BYTES {
            self.refuse(name.to_owned());
            return;
        }
        self.bytes = self.bytes - old + size;
        self.map.insert(name.to_owned(), value);
    }

    fn refuse(&mut self, what: String) {
        self.refused_count += 1;
        if self.refused.len() < LISTED && !self.refused.contains(&what) {
            self.refused.push(what);
        }
    }

    /// Why some outputs were refused, if any were.
    pub fn refusal(&self) -> Option<String> {
        if self.refused_count == 0 {
            return None;
        }
        let more = self.refused_count.saturating_sub(self.refused.len());
        let tail = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        Some(format!(
            "outputs refused (at most {MAX_OUTPUTS} names of [A-Za-z0-9_.-], {} KiB in all): {}{tail}",
            MAX_OUTPUTS_BYTES / 1024,
            self.refused.join(", ")
        ))
    }

    /// Puts the accepted outputs in `result`; if any were refused, a succeeded step fails and
    /// the reason joins its message.
    pub fn into_result(self, result: &mut StepResult) {
        if let Some(reason) = self.refusal() {
            if result.status == StepStatus::Succeeded {
                result.status = StepStatus::Failed;
            }
            result.message = if result.message.is_empty() {
                reason
            } else {
                format!("{}; {reason}", result.message)
            };
        }
        result.outputs = self.map;
    }
}

/// Holds `result` to the limits: outputs as [`Outputs`] accepts them, the message cut to
/// [`MAX_MESSAGE`] bytes without NULs. The result then always fits one event frame.
pub fn fit(result: &mut StepResult) {
    let mut outputs = Outputs::default();
    for (name, value) in std::mem::take(&mut result.outputs) {
        outputs.set(&name, &value);
    }
    outputs.into_result(result);
    if result.message.contains('\0') {
        result.message = result.message.replace('\0', "\u{FFFD}");
    }
    if result.message.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE - 3;
        while !result.message.is_char_boundary(cut) {
            cut -= 1;
        }
        result.message.truncate(cut);
        result.message.push_str("...");
    }
}

/// Cuts `text` so that it takes at most `max` bytes JSON-encoded (quotes excluded); NULs
/// become U+FFFD first. Answers whether anything was cut.
pub fn truncate_encoded(text: &mut String, max: usize) -> bool {
    if text.contains('\0') {
        *text = text.replace('\0', "\u{FFFD}");
    }
    let mut used = 0;
    for (i, c) in text.char_indices() {
        used += match c {
            '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
            c if u32::from(c) < 0x20 => 6,
            c => c.len_utf8(),
        };
        if used > max {
            text.truncate(i);
            return true;
        }
    }
    false
}

/// Finds `::output name=value` lines in a stream of stdout bytes.
#[derive(Debug, Default)]
pub struct OutputLines {
    line: Vec<u8>,
    /// The current line outgrew [`MAX_LINE`]: it is skipped to its end.
    overlong: bool,
    pub outputs: Outputs,
}

impl OutputLines {
    /// The next bytes of stdout.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let (part, rest, ended) = match bytes.iter().position(|b| *b == b'\n') {
                Some(i) => (&bytes[..i], &bytes[i + 1..], true),
                None => (bytes, &[][..], false),
            };
            if !self.overlong {
                if self.line.len() + part.len() > MAX_LINE {
                    self.overlong = true;
                    if self.line.starts_with(PREFIX) || part.starts_with(PREFIX) {
                        self.outputs.refuse(format!("a line over {MAX_LINE} bytes"));
                    }
                    self.line.clear();
                } else {
                    self.line.extend_from_slice(part);
                }
            }
            if ended {
                self.end_line();
            }
            bytes = rest;
        }
    }

    /// Stdout ended: a last line without a newline counts too.
    pub fn finish(mut self) -> Outputs {
        self.end_line();
        self.outputs
    }

    fn end_line(&mut self) {
        if !self.overlong {
            if let Some(rest) = self.line.strip_prefix(PREFIX) {
                let text = String::from_utf8_lossy(rest);
                let text = text.strip_suffix('\r').unwrap_or(&text);
                if let Some((name, value)) = text.split_once('=') {
                    self.outputs.set(name, value);
                }
            }
        }
        self.line.clear();
        self.overlong = false;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tether_shared::protocol::{EventBody, Frame, MAX_FRAME_BYTES};

    fn parse(chunks: &[&[u8]]) -> Outputs {
        let mut lines = OutputLines::default();
        for c in chunks {
            lines.feed(c);
        }
        lines.finish()
    }

    #[test]
    fn lines_split_anywhere_parse_the_same() {
        let text = b"log\n::output a=1\r\n::output b=x=y\nnoise ::output c=3\n::output d=last";
        let whole = parse(&[text]);
        for cut in 0..text.len() {
            let split = parse(&[&text[..cut], &text[cut..]]);
            assert_eq!(split.map, whole.map, "cut at {cut}");
        }
        let expect: BTreeMap<String, String> = [("a", "1"), ("b", "x=y"), ("d", "last")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(whole.map, expect);
        assert!(whole.refusal().is_none());
    }

    #[test]
    fn nul_bytes_and_invalid_utf8_become_replacement_characters() {
        let o = parse(&[b"::output a=x\0y\xff\n::output bad name=1\n"]);
        assert_eq!(o.map["a"], "x\u{FFFD}y\u{FFFD}");
        assert!(
            o.refusal().unwrap().contains("bad name"),
            "{:?}",
            o.refusal()
        );
    }

    #[test]
    fn count_and_size_are_capped_and_a_refusal_fails_the_step() {
        let mut lines = OutputLines::default();
        for i in 0..400 {
            lines.feed(format!("::output k{i}={}\n", "v".repeat(1024)).as_bytes());
        }
        let outputs = lines.finish();
        assert!(outputs.map.len() <= MAX_OUTPUTS);
        assert!(outputs.bytes <= MAX_OUTPUTS_BYTES);
        let mut r = StepResult {
            status: StepStatus::Succeeded,
            exit_code: Some(0),
            outputs: BTreeMap::new(),
            message: String::new(),
        };
        outputs.into_result(&mut r);
        assert_eq!(r.status, StepStatus::Failed);
        assert!(
            r.message.contains("outputs refused") && r.message.contains("more"),
            "{}",
            r.message
        );
    }

    #[test]
    fn an_overlong_line_is_skipped_whole_and_memory_stays_bounded() {
        let mut lines = OutputLines::default();
        lines.feed(b"::output huge=");
        for _ in 0..64 {
            lines.feed(&[b'x'; 64 * 1024]);
            assert!(lines.line.len() <= MAX_LINE);
        }
        lines.feed(b"\n::output after=ok\n");
        let o = lines.finish();
        assert_eq!(o.map.get("after").map(String::as_str), Some("ok"));
        assert!(!o.map.contains_key("huge"));
        assert!(o.refusal().unwrap().contains("a line over"));
    }

    #[test]
    fn truncation_counts_encoded_bytes() {
        let mut t = "\0\u{1}ab\"".repeat(1000);
        assert!(truncate_encoded(&mut t, 100));
        assert!(encoded_len(&t) - 2 <= 100, "{}", encoded_len(&t));
        assert!(!t.contains('\0'));
        let mut short = "fits".to_owned();
        assert!(!truncate_encoded(&mut short, 100));
        assert_eq!(short, "fits");
    }

    #[test]
    fn the_worst_fitted_result_still_fits_a_frame() {
        // Values of control characters cost six bytes each once encoded.
        let mut r = StepResult {
            status: StepStatus::Succeeded,
            exit_code: Some(0),
            outputs: (0..200)
                .map(|i| (format!("{i:0>128}"), "\u{1}".repeat(64 * 1024)))
                .collect(),
            message: "\u{1}".repeat(1 << 20),
        };
        fit(&mut r);
        assert_eq!(r.status, StepStatus::Failed);
        let event = EventBody::StepFinished {
            job_id: "j".repeat(200),
            step: u32::MAX,
            status: r.status,
            exit_code: r.exit_code,
            outputs: r.outputs,
            message: r.message,
        };
        let event =
            tether_shared::protocol::Event::new(tether_shared::protocol::Seq(1), event).unwrap();
        let bytes = Frame::Event(event).encode().unwrap();
        assert!(bytes.len() <= MAX_FRAME_BYTES);
    }
}
