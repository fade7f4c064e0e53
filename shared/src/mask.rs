//! Secret values replaced by `***` in text, whole or as it streams (sans-IO).
//!
//! [`mask`] masks one text. [`StreamMask`] masks text that arrives in pieces: it holds back
//! the tail that could be the start of a secret (at most the longest secret's length, less
//! one byte) until the next piece or [`StreamMask::finish`] says how it goes on, so a secret
//! cut across two pieces is masked like one that is not.

/// What replaces a secret value.
pub const MASK: &str = "***";

/// Non-empty secrets, longest first (a secret containing another is masked whole), once each.
pub fn ordered(secrets: &[String]) -> Vec<String> {
    let mut values: Vec<String> = secrets.iter().filter(|s| !s.is_empty()).cloned().collect();
    values.sort_by_key(|v| std::cmp::Reverse(v.len()));
    values.dedup();
    values
}

/// Replaces every occurrence of a secret value in `text` by [`MASK`].
pub fn mask(text: &str, secrets: &[String]) -> String {
    secrets
        .iter()
        .filter(|s| !s.is_empty())
        .fold(text.to_owned(), |t, s| t.replace(s.as_str(), MASK))
}

/// Masks text that arrives in pieces.
#[derive(Debug, Clone)]
pub struct StreamMask {
    secrets: Vec<String>,
    /// The longest secret's length less one: what may be held back.
    hold: usize,
    carry: String,
}

impl StreamMask {
    pub fn new(secrets: &[String]) -> Self {
        let secrets = ordered(secrets);
        let hold = secrets.first().map_or(0, |s| s.len() - 1);
        StreamMask {
            secrets,
            hold,
            carry: String::new(),
        }
    }

    /// The next piece: answers the masked text that can be let out now.
    pub fn push(&mut self, text: &str) -> String {
        self.carry.push_str(text);
        let mut cut = self.carry.len().saturating_sub(self.hold);
        while !self.carry.is_char_boundary(cut) {
            cut -= 1;
        }
        // No secret may straddle the cut: move it back to the start of any that does.
        loop {
            let straddling = self.secrets.iter().find_map(|s| {
                self.carry
                    .match_indices(s.as_str())
                    .map(|(i, _)| i)
                    .find(|&i| i < cut && cut < i + s.len())
            });
            match straddling {
                Some(i) => cut = i,
                None => break,
            }
        }
        let rest = self.carry.split_off(cut);
        let out = mask(&self.carry, &self.secrets);
        self.carry = rest;
        out
    }

    /// The text ended: what was held back, masked.
    pub fn finish(&mut self) -> String {
        mask(&std::mem::take(&mut self.carry), &self.secrets)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_cut_anywhere_is_masked_like_a_whole_one() {
        let secrets = vec![
            "hunter2".to_owned(),
            "hunter2-long".to_owned(),
            String::new(),
        ];
        let text = "pw=hunter2 and hunter2-long, then hunter2hunter2 é end";
        let whole = mask(text, &ordered(&secrets));
        assert_eq!(whole, "pw=*** and ***, then ****** é end");
        for a in 0..=text.len() {
            for b in a..=text.len() {
                if !(text.is_char_boundary(a) && text.is_char_boundary(b)) {
                    continue;
                }
                let mut m = StreamMask::new(&secrets);
                let mut out = m.push(&text[..a]);
                out += &m.push(&text[a..b]);
                out += &m.push(&text[b..]);
                out += &m.finish();
                assert_eq!(out, whole, "cut at {a} and {b}");
            }
        }
    }

    #[test]
    fn without_secrets_nothing_is_held_back() {
        let mut m = StreamMask::new(&[]);
        assert_eq!(m.push("abc"), "abc");
        assert_eq!(m.finish(), "");
    }
}
