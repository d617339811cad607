//! Standard output of the one-shot commands.

use std::io::Write as _;

use anyhow::Context as _;

/// Writes to standard output; a reader that went away (`sensor ... | head -1`) ends the
/// command quietly, as Unix tools do, instead of a panic (`println!` panics on a closed pipe:
/// Rust ignores SIGPIPE, so the write fails with EPIPE).
pub fn print_out(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        result => result.context("writing to standard output"),
    }
}

/// [`print_out`] with `println!`'s arguments.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::stdout::print_out(&format!("{}\n", format_args!($($arg)*)))
    };
}
pub(crate) use outln;

/// A progress line of a command that has work to finish (`uninstall` removing files): a
/// standard output that fails for any reason must not stop it halfway, so errors are dropped.
pub fn note(text: &str) {
    let _ = print_out(text);
}

/// [`note`] with `println!`'s arguments.
macro_rules! noteln {
    ($($arg:tt)*) => {
        $crate::stdout::note(&format!("{}\n", format_args!($($arg)*)))
    };
}
pub(crate) use noteln;
