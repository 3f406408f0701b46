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

/// The width in columns of the terminal standard output is, or `None` when it is not a
/// terminal (a pipe or a file: no width to fit). `COLUMNS`, then 80, when the size is unknown.
pub fn terminal_width() -> Option<usize> {
    use std::io::IsTerminal;
    if !std::io::stdout().is_terminal() {
        return None;
    }
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the struct it is given.
    let r = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) };
    if r == 0 && ws.ws_col > 0 {
        return Some(ws.ws_col as usize);
    }
    Some(
        std::env::var("COLUMNS")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(80),
    )
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
