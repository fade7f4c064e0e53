//! Bytes that arrive in pieces (pipe reads, pages of a stored log) decoded as UTF-8 text
//! (sans-IO): a character cut between two pieces is joined, invalid bytes become U+FFFD.

/// Bytes that arrive in pieces, to text.
#[derive(Debug, Default)]
pub struct Utf8Stream {
    partial: Vec<u8>,
}

impl Utf8Stream {
    /// The text of `bytes` after what came before; an incomplete character at the end
    /// waits for the next piece.
    pub fn decode(&mut self, bytes: &[u8]) -> String {
        self.partial.extend_from_slice(bytes);
        let keep = match std::str::from_utf8(&self.partial) {
            Ok(_) => 0,
            // An incomplete character at the very end waits for the next read.
            Err(e) if e.error_len().is_none() => self.partial.len() - e.valid_up_to(),
            Err(_) => {
                // Invalid in the middle: decode lossily up to a possibly incomplete tail.
                let tail = incomplete_tail(&self.partial);
                tail.min(self.partial.len())
            }
        };
        let rest = self.partial.split_off(self.partial.len() - keep);
        let text = String::from_utf8_lossy(&self.partial).into_owned();
        self.partial = rest;
        text
    }

    /// What is held back, at the end of the stream.
    pub fn finish(&mut self) -> String {
        String::from_utf8_lossy(&std::mem::take(&mut self.partial)).into_owned()
    }
}

/// Length of an incomplete UTF-8 sequence at the end of `bytes` (0 to 3).
fn incomplete_tail(bytes: &[u8]) -> usize {
    for back in 1..=3.min(bytes.len()) {
        let b = bytes[bytes.len() - back];
        if b & 0xC0 == 0x80 {
            continue; // a continuation byte: look further back
        }
        let need = match b {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => return 0,
        };
        return if need > back { back } else { 0 };
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_character_cut_between_pieces_comes_out_whole_and_invalid_bytes_are_replaced() {
        let mut s = Utf8Stream::default();
        let euro = "€".as_bytes();
        assert_eq!(s.decode(&[b'a', euro[0]]), "a");
        assert_eq!(s.decode(&euro[1..]), "€");
        assert_eq!(s.decode(&[0xff, b'b', euro[0], euro[1]]), "\u{fffd}b");
        assert_eq!(s.finish(), "\u{fffd}");
    }
}
