//! Redaction of credentials from text that leaves the service: every known credential value,
//! and the user-info of any URL (`scheme://user:pass@host` becomes `scheme://[redacted]@host`).
//!
//! Build output arrives in pieces cut wherever a pipe read ended, so [`StreamRedactor`] works
//! on a stream: it redacts whole lines, and cuts a line that grows past a bound only where no
//! credential value and no URL authority spans the cut. A credential split across two reads is
//! redacted as if it had come in one.

use std::sync::Arc;

use memchr::memmem;

/// What a redacted value is replaced with.
const REDACTED: &[u8] = b"[redacted]";

/// An incomplete line longer than this is redacted and passed on in pieces.
pub const MAX_PENDING: usize = 64 * 1024;

/// A URL authority longer than this is not waited for when a long line is cut.
const MAX_AUTHORITY: usize = 4096;

/// Bytes that end a URL authority (besides the end of the text).
const AUTHORITY_END: &[u8] = b"/ '\"\n";

/// The values to remove, each with what replaces it, in the order they are applied. Cheap to
/// clone.
#[derive(Clone, Debug, Default)]
pub struct Redactions {
    values: Arc<Vec<(Vec<u8>, Vec<u8>)>>,
}

impl Redactions {
    /// Replaces each of `values` (empty ones are ignored) with `[redacted]`.
    pub fn new(values: impl IntoIterator<Item = String>) -> Self {
        Self::default().replacing(values, REDACTED)
    }

    /// These needles, then each of `values` replaced with `replacement`.
    pub fn replacing(self, values: impl IntoIterator<Item = String>, replacement: &[u8]) -> Self {
        let mut all = Arc::unwrap_or_clone(self.values);
        all.extend(
            values
                .into_iter()
                .filter(|v| !v.is_empty())
                .map(|v| (v.into_bytes(), replacement.to_vec())),
        );
        Self {
            values: Arc::new(all),
        }
    }

    /// Appends `text` to `out` with every value and URL user-info removed. One pass: at each
    /// point the earliest value found (the longest of those starting there) is replaced, and
    /// nothing a replacement wrote is searched again.
    pub fn redact_into(&self, text: &[u8], out: &mut Vec<u8>) {
        let mut next: Vec<Option<usize>> = self
            .values
            .iter()
            .map(|(value, _)| memmem::find(text, value))
            .collect();
        if next.iter().all(Option::is_none) {
            return strip_userinfo(text, out);
        }
        let mut replaced = Vec::with_capacity(text.len());
        let mut done = 0;
        loop {
            let earliest = next
                .iter()
                .enumerate()
                .filter_map(|(i, at)| {
                    at.map(|at| (at, std::cmp::Reverse(self.values[i].0.len()), i))
                })
                .min();
            let Some((at, _, i)) = earliest else { break };
            let (value, replacement) = &self.values[i];
            replaced.extend_from_slice(&text[done..at]);
            replaced.extend_from_slice(replacement);
            done = at + value.len();
            for (j, slot) in next.iter_mut().enumerate() {
                if slot.is_some_and(|at| at < done) {
                    let needle = &self.values[j].0;
                    *slot = memmem::find(&text[done..], needle).map(|at| at + done);
                }
            }
        }
        replaced.extend_from_slice(&text[done..]);
        strip_userinfo(&replaced, out);
    }

    /// `text` redacted, as a new buffer.
    pub fn redact(&self, text: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(text.len());
        self.redact_into(text, &mut out);
        out
    }

    /// Where `text` may be cut so that no value and no URL authority spans the cut: at
    /// `want` or before it.
    fn safe_cut(&self, text: &[u8], want: usize) -> usize {
        let mut cut = want.min(text.len());
        // A value that starts before the cut and ends after it moves the cut to its start.
        for (value, _) in self.values.iter() {
            let from = cut.saturating_sub(value.len() - 1);
            let to = (cut + value.len() - 1).min(text.len());
            if let Some(at) = memmem::find(&text[from..to], value) {
                let start = from + at;
                if start < cut && start + value.len() > cut {
                    cut = start;
                }
            }
        }
        // A URL authority still open at the cut moves it to the authority's `://`.
        let window = cut.saturating_sub(MAX_AUTHORITY);
        if let Some(at) = memmem::rfind(&text[window..cut], b"://") {
            let scheme_end = window + at;
            let open = !text[scheme_end + 3..cut]
                .iter()
                .any(|b| AUTHORITY_END.contains(b));
            if open {
                cut = scheme_end;
            }
        }
        cut
    }
}

/// Appends `text` to `out` with the user-info of every URL replaced.
fn strip_userinfo(text: &[u8], out: &mut Vec<u8>) {
    let mut rest = text;
    while let Some(i) = memmem::find(rest, b"://") {
        let (head, tail) = rest.split_at(i + 3);
        out.extend_from_slice(head);
        let authority_end = tail
            .iter()
            .position(|b| AUTHORITY_END.contains(b))
            .unwrap_or(tail.len());
        match memchr::memrchr(b'@', &tail[..authority_end]) {
            Some(at) => {
                out.extend_from_slice(REDACTED);
                out.extend_from_slice(&tail[at..authority_end]);
            }
            None => out.extend_from_slice(&tail[..authority_end]),
        }
        rest = &tail[authority_end..];
    }
    out.extend_from_slice(rest);
}

/// Redacts a stream of bytes that may cut anywhere; see the module's doc.
#[derive(Debug, Default)]
pub struct StreamRedactor {
    needles: Redactions,
    pending: Vec<u8>,
}

impl StreamRedactor {
    /// A redactor removing `needles`.
    pub fn new(needles: Redactions) -> Self {
        Self {
            needles,
            pending: Vec::new(),
        }
    }

    /// Takes `input`; appends to `out` what can be passed on safely, redacted. Holds back at
    /// most [`MAX_PENDING`] bytes of an incomplete line (a little more around a value or URL
    /// that spans the bound).
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) {
        self.pending.extend_from_slice(input);
        if let Some(nl) = memchr::memrchr(b'\n', &self.pending) {
            self.needles.redact_into(&self.pending[..=nl], out);
            self.pending.drain(..=nl);
        }
        while self.pending.len() > MAX_PENDING {
            let mut cut = self.needles.safe_cut(&self.pending, MAX_PENDING);
            if cut == 0 {
                // One value or authority longer than the bound: cut anyway, for progress.
                cut = MAX_PENDING;
            }
            self.needles.redact_into(&self.pending[..cut], out);
            self.pending.drain(..cut);
        }
    }

    /// Appends whatever is held back, redacted: the stream has ended.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if !self.pending.is_empty() {
            self.needles.redact_into(&self.pending, out);
            self.pending.clear();
        }
    }

    /// Bytes held back, waiting for the rest of their line.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn redact(text: &str, values: &[&str]) -> String {
        let needles = Redactions::new(values.iter().map(std::string::ToString::to_string));
        String::from_utf8(needles.redact(text.as_bytes())).unwrap()
    }

    #[test]
    fn values_and_url_userinfo_are_removed() {
        assert_eq!(
            redact("token s3cret-value here s3cret-value", &["s3cret-value"]),
            "token [redacted] here [redacted]"
        );
        assert_eq!(
            redact("fetch https://bob:pw@git.example/r.git now", &[]),
            "fetch https://[redacted]@git.example/r.git now"
        );
        assert_eq!(
            redact(
                "fatal: 'https://bob:pw@git.example.com/r.git' not found",
                &[]
            ),
            "fatal: 'https://[redacted]@git.example.com/r.git' not found"
        );
        assert_eq!(redact("see http://host/path", &[]), "see http://host/path");
        assert_eq!(redact("a b c", &["b", "c"]), "a [redacted] [redacted]");
    }

    fn stream(input: &[&[u8]], values: &[&str]) -> Vec<u8> {
        let mut redactor = StreamRedactor::new(Redactions::new(
            values.iter().map(std::string::ToString::to_string),
        ));
        let mut out = Vec::new();
        for piece in input {
            redactor.push(piece, &mut out);
        }
        redactor.finish(&mut out);
        out
    }

    #[test]
    fn a_value_split_across_two_reads_is_redacted() {
        let out = stream(&[b"password is hun", b"ter2 ok\n"], &["hunter2"]);
        assert_eq!(out, b"password is [redacted] ok\n");
    }

    #[test]
    fn a_value_across_the_cut_of_a_long_line_is_redacted() {
        let secret = "0123456789-secret-abcdef";
        for shift in 0..secret.len() {
            // The long line's cut at MAX_PENDING falls inside the secret.
            let mut line = vec![b'x'; MAX_PENDING - shift];
            line.extend_from_slice(secret.as_bytes());
            line.extend_from_slice(&[b'y'; 1000]);
            let out = stream(&[&line[..MAX_PENDING], &line[MAX_PENDING..]], &[secret]);
            assert!(
                memmem::find(&out, secret.as_bytes()).is_none(),
                "shift {shift}"
            );
            assert_eq!(out.len(), line.len() - secret.len() + REDACTED.len());
        }
    }

    #[test]
    fn a_url_across_the_cut_of_a_long_line_loses_its_userinfo() {
        let mut line = vec![b'x'; MAX_PENDING - 12];
        line.extend_from_slice(b" https://user:pw-long@host/r.git");
        line.extend_from_slice(&[b'y'; 100]);
        let out = stream(&[&line], &[]);
        assert!(memmem::find(&out, b"pw-long").is_none());
        assert!(memmem::find(&out, b"https://[redacted]@host/r.git").is_some());
    }

    #[test]
    fn a_line_without_a_newline_is_passed_on_in_bounded_pieces() {
        let mut redactor = StreamRedactor::new(Redactions::default());
        let mut out = Vec::new();
        for _ in 0..100 {
            redactor.push(&[b'z'; 10_000], &mut out);
            assert!(redactor.pending() <= MAX_PENDING);
        }
        redactor.finish(&mut out);
        assert_eq!(out.len(), 1_000_000);
    }

    proptest! {
        #[test]
        fn cutting_the_input_anywhere_gives_the_output_of_one_piece(
            text in "[a-z:/@ \\n]{0,300}",
            cuts in proptest::collection::vec(0usize..300, 0..6),
        ) {
            let values = ["s3cr", "a:b"];
            let whole = stream(&[text.as_bytes()], &values);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(text.len())).collect();
            cuts.sort_unstable();
            let mut pieces = Vec::new();
            let mut last = 0;
            for c in cuts {
                pieces.push(&text.as_bytes()[last..c]);
                last = c;
            }
            pieces.push(&text.as_bytes()[last..]);
            prop_assert_eq!(stream(&pieces, &values), whole);
        }
    }
}
