//! Names for the errno values a client sees on connect/read, so reports say
//! `ECONNREFUSED` rather than a locale-dependent message.

use std::io;

/// The symbolic name of a Linux errno value, for the values networking code
/// can plausibly return (the agent's table, so lab reports and kha agree).
pub fn errno_name(errno: i32) -> Option<&'static str> {
    kha_common::errno::name(errno)
}

/// A short, stable key for an I/O error: the errno name when the kernel gave
/// one, otherwise a name for the error kind (`EOF` for a peer that closed early,
/// `ETIMEDOUT` for our own deadlines).
pub fn io_error_key(err: &io::Error) -> String {
    if let Some(errno) = err.raw_os_error() {
        return match errno_name(errno) {
            Some(name) => name.to_owned(),
            None => format!("errno{errno}"),
        };
    }
    match err.kind() {
        io::ErrorKind::UnexpectedEof => "EOF".to_owned(),
        io::ErrorKind::TimedOut => "ETIMEDOUT".to_owned(),
        io::ErrorKind::ConnectionRefused => "ECONNREFUSED".to_owned(),
        io::ErrorKind::ConnectionReset => "ECONNRESET".to_owned(),
        io::ErrorKind::BrokenPipe => "EPIPE".to_owned(),
        io::ErrorKind::InvalidData => "invalid_data".to_owned(),
        other => format!("io_{other:?}").to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_common_connect_errors() {
        assert_eq!(errno_name(libc::ECONNREFUSED), Some("ECONNREFUSED"));
        assert_eq!(errno_name(libc::EHOSTUNREACH), Some("EHOSTUNREACH"));
        assert_eq!(errno_name(9999), None);
        assert_eq!(io_error_key(&io::Error::from_raw_os_error(libc::ETIMEDOUT)), "ETIMEDOUT");
        assert_eq!(io_error_key(&io::Error::from_raw_os_error(9999)), "errno9999");
        assert_eq!(io_error_key(&io::Error::from(io::ErrorKind::UnexpectedEof)), "EOF");
    }
}
