//! A step's output as it is read from its pipes, turned into the chunks that are sent
//! (sans-IO).
//!
//! Bytes become text per pipe (a character cut between two reads is joined, invalid UTF-8
//! becomes U+FFFD), secrets are masked even when cut between reads ([`StreamMask`]), the text
//! is cut into chunks of at most [`CHUNK_BYTES`] and capped at [`MAX_STEP_OUTPUT`] with
//! [`OUTPUT_TRUNCATED`]; `::output` lines of stdout are parsed on the side ([`OutputLines`]).

use tether_shared::mask::StreamMask;
use tether_shared::protocol::{MAX_STEP_OUTPUT, OUTPUT_TRUNCATED};
use tether_shared::utf8_stream::Utf8Stream;

use super::outputs::{OutputLines, Outputs};

/// Largest output chunk.
pub const CHUNK_BYTES: usize = 16 * 1024;

/// The capture of one step's output.
#[derive(Debug)]
pub struct Capture {
    stdout: Utf8Stream,
    stderr: Utf8Stream,
    mask: StreamMask,
    /// Masked text not yet cut into a chunk.
    pending: String,
    /// Raw text taken so far (the cap counts this).
    total: usize,
    capped: bool,
    lines: OutputLines,
}

impl Capture {
    pub fn new(secrets: &[String]) -> Self {
        Capture {
            stdout: Utf8Stream::default(),
            stderr: Utf8Stream::default(),
            mask: StreamMask::new(secrets),
            pending: String::new(),
            total: 0,
            capped: false,
            lines: OutputLines::default(),
        }
    }

    /// Bytes read from stdout (`is_stdout`) or stderr: answers the full chunks now ready.
    pub fn absorb(&mut self, bytes: &[u8], is_stdout: bool) -> Vec<String> {
        let text = if is_stdout {
            self.lines.feed(bytes);
            self.stdout.decode(bytes)
        } else {
            self.stderr.decode(bytes)
        };
        self.take_text(&text);
        self.chunks(false)
    }

    /// A pause in the output: answers what is pending, even short of a full chunk.
    pub fn flush(&mut self) -> Vec<String> {
        self.chunks(true)
    }

    /// The step ended: the last chunks, and the outputs its stdout set.
    pub fn finish(mut self) -> (Vec<String>, Outputs) {
        let (out, err) = (self.stdout.finish(), self.stderr.finish());
        self.take_text(&out);
        self.take_text(&err);
        let rest = self.mask.finish();
        self.pending.push_str(&rest);
        let chunks = self.chunks(true);
        (chunks, self.lines.finish())
    }

    fn take_text(&mut self, text: &str) {
        if self.capped || text.is_empty() {
            return;
        }
        if self.total + text.len() > MAX_STEP_OUTPUT {
            self.capped = true;
            let rest = self.mask.finish();
            self.pending.push_str(&rest);
            self.pending.push_str(OUTPUT_TRUNCATED);
            return;
        }
        self.total += text.len();
        let masked = self.mask.push(text);
        self.pending.push_str(&masked);
    }

    fn chunks(&mut self, force: bool) -> Vec<String> {
        let mut out = Vec::new();
        while self.pending.len() >= CHUNK_BYTES || (force && !self.pending.is_empty()) {
            let mut cut = CHUNK_BYTES.min(self.pending.len());
            while !self.pending.is_char_boundary(cut) {
                cut -= 1;
            }
            let rest = self.pending.split_off(cut);
            out.push(std::mem::replace(&mut self.pending, rest));
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn all(c: &mut Capture, pieces: &[(&[u8], bool)]) -> (String, Outputs) {
        let mut text = String::new();
        for (bytes, is_stdout) in pieces {
            text.extend(c.absorb(bytes, *is_stdout));
        }
        let c = std::mem::replace(c, Capture::new(&[]));
        let (last, outputs) = c.finish();
        text.extend(last);
        (text, outputs)
    }

    #[test]
    fn characters_and_secrets_cut_between_reads_come_out_whole() {
        let text = "é pw=hunter2 ok\n::output v=ü\n".as_bytes();
        for cut in 0..text.len() {
            let mut c = Capture::new(&["hunter2".to_owned()]);
            let (out, outputs) = all(&mut c, &[(&text[..cut], true), (&text[cut..], true)]);
            assert_eq!(out, "é pw=*** ok\n::output v=ü\n", "cut at {cut}");
            assert_eq!(outputs.refusal(), None);
        }
        let mut c = Capture::new(&[]);
        let (out, _) = all(&mut c, &[(b"a\xffb", false)]);
        assert_eq!(out, "a\u{FFFD}b");
    }

    #[test]
    fn chunks_are_bounded_and_the_cap_leaves_one_marker() {
        let mut c = Capture::new(&[]);
        let mut sent = String::new();
        let mut chunks = 0usize;
        let block = vec![b'x'; 60_000];
        for _ in 0..200 {
            for chunk in c.absorb(&block, false) {
                assert!(chunk.len() <= CHUNK_BYTES);
                sent.push_str(&chunk);
                chunks += 1;
            }
        }
        let (last, _) = c.finish();
        chunks += last.len();
        sent.extend(last);
        assert!(sent.ends_with(OUTPUT_TRUNCATED));
        assert_eq!(sent.matches("[output truncated").count(), 1);
        assert!(sent.len() <= MAX_STEP_OUTPUT + OUTPUT_TRUNCATED.len());
        assert_eq!(chunks, sent.len().div_ceil(CHUNK_BYTES));
    }
}
