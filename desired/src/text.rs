//! Text that came from somewhere else (a host's heartbeat, a hook's output, a commit) made safe
//! to print on an operator's terminal.

/// `s` with every control character but newline and tab — C0, DEL and C1, among them ESC and
/// CSI, which drive terminals — shown as a visible `\u{..}` escape instead.
pub fn printable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() && c != '\n' && c != '\t' {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_controls_are_made_visible() {
        assert_eq!(printable("ok\tline\n"), "ok\tline\n");
        assert_eq!(printable("\x1b]0;owned\x07"), "\\u{1b}]0;owned\\u{7}");
        assert_eq!(printable("a\u{9b}31mb\r"), "a\\u{9b}31mb\\u{d}");
        assert_eq!(printable("héllo ✓"), "héllo ✓");
    }
}
