//! Text that a sender or the server chose, made safe to print on a terminal.
//!
//! A terminal acts on control characters: a newline or carriage return in a message could forge
//! a line that seems to come from someone else, an ESC sequence could clear the screen, move the
//! cursor or rename the window, and a bidirectional override could show `exe.pdf` for `fdp.exe`.
//! Every human-readable line that quotes such text escapes it here, so that it shows what was
//! sent instead of acting. `--json` output is left alone: JSON escapes control characters itself,
//! and the programs that read it want the exact text.

use std::borrow::Cow;

/// What starts each continuation line of a multi-line body. No message, event or other line of
/// the CLI starts with it, so a sender's second line cannot pass for a new message.
pub(crate) const CONTINUATION: &str = "    ┆ ";

/// Whether `c` would act on the terminal or on the text's layout instead of showing.
fn is_active(c: char) -> bool {
    // `is_control` is the Unicode category Cc: C0 (newline, ESC, BEL, ...), DEL and C1 (CSI, ...).
    c.is_control()
        || matches!(
            c,
            '\u{061c}'
                | '\u{200e}'
                | '\u{200f}'
                | '\u{202a}'..='\u{202e}'
                | '\u{2066}'..='\u{2069}'
                | '\u{2028}'
                | '\u{2029}'
        )
}

/// One line of untrusted text (a name, a file name, a label, an error quoting either): every
/// control character shows as `\n`, `\r`, `\t` or `\u{1b}`, and nothing in the result acts.
pub(crate) fn line(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_active) {
        return Cow::Borrowed(text);
    }
    let mut escaped = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '\n' => escaped.push_str("\\n"),
            '\r' => escaped.push_str("\\r"),
            '\t' => escaped.push_str("\\t"),
            c if is_active(c) => escaped.extend(c.escape_unicode()),
            c => escaped.push(c),
        }
    }
    Cow::Owned(escaped)
}

/// A multi-line body (a message, a caption, a post): each line escaped as by [`line`], and every
/// line after the first behind [`CONTINUATION`]. A `\r` not followed by `\n` is escaped, since
/// it would return to the start of the line and overwrite the sender's name.
pub(crate) fn body(text: &str) -> String {
    text.replace("\r\n", "\n")
        .split('\n')
        .map(line)
        .collect::<Vec<_>>()
        .join(format!("\n{CONTINUATION}").as_str())
}

/// Progress whose labels and notes are escaped: they quote the sender's file name (not yet
/// sanitised while it downloads) and errors.
pub(crate) struct Escaped<P>(pub(crate) P);

impl<P: fumi_client::Progress> fumi_client::Progress for Escaped<P> {
    fn begin(&self, label: &str, total: u64) {
        self.0.begin(&line(label), total);
    }

    fn set(&self, done: u64) {
        self.0.set(done);
    }

    fn end(&self) {
        self.0.end();
    }

    fn note(&self, message: &str) {
        self.0.note(&line(message));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences_and_bell_show_instead_of_acting() {
        assert_eq!(line("\x1b[2J\x1b[Hhi\x07"), "\\u{1b}[2J\\u{1b}[Hhi\\u{7}");
        assert_eq!(line("a\0b\x7fc"), "a\\u{0}b\\u{7f}c");
        // U+009B is a one-character CSI on terminals that read C1 controls.
        assert_eq!(line("\u{9b}31mred"), "\\u{9b}31mred");
    }

    #[test]
    fn line_breaks_and_tabs_stay_on_one_line() {
        assert_eq!(line("one\ntwo\r\tthree"), "one\\ntwo\\r\\tthree");
        assert_eq!(line("one\u{2028}two\u{2029}"), "one\\u{2028}two\\u{2029}");
    }

    #[test]
    fn bidirectional_controls_are_visible() {
        assert_eq!(line("invoice\u{202e}fdp.exe"), "invoice\\u{202e}fdp.exe");
        assert_eq!(
            line("\u{61c}\u{200e}\u{200f}\u{202a}\u{2066}\u{2069}"),
            "\\u{61c}\\u{200e}\\u{200f}\\u{202a}\\u{2066}\\u{2069}"
        );
    }

    #[test]
    fn ordinary_text_is_borrowed_unchanged() {
        for text in ["hello", "こんにちは、世界", "👩‍👩‍👧 ok", "Ward 3 · ✓", "C:\\path"] {
            assert!(matches!(line(text), Cow::Borrowed(t) if t == text), "{text}");
            assert_eq!(body(text), text);
        }
    }

    #[test]
    fn continuation_lines_cannot_pass_for_messages() {
        let shown = body("hello\n[alice.33 · Alice E.] please send me the door code\x1b[2J\x07");
        assert_eq!(
            shown,
            format!("hello\n{CONTINUATION}[alice.33 · Alice E.] please send me the door code\\u{{1b}}[2J\\u{{7}}")
        );
        assert_eq!(body("a\r\nb\rc\n"), format!("a\n{CONTINUATION}b\\rc\n{CONTINUATION}"));
        assert_eq!(body("overwritten\r"), "overwritten\\r");
        for text in ["x\n\u{1b}[1A\r[bob.1] y", "\u{85}\u{2028}\n\n*"] {
            let shown = body(text);
            assert!(shown.lines().skip(1).all(|l| l.starts_with(CONTINUATION)), "{shown:?}");
            assert!(!shown.chars().any(|c| is_active(c) && c != '\n'), "{shown:?}");
        }
    }
}
