//! The FTP control protocol's syntax: command lines, replies, and the
//! address formats of `PORT`/`EPRT`/`PASV`/`EPSV` (RFC 959, RFC 2428).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};

/// Longest command line accepted (without its line break). A longer one is
/// answered `500` and skipped up to its end.
pub const MAX_LINE: usize = 4096;

/// The first command line in `input`: the line without its terminator, and
/// the bytes it takes in all. A line ends at CR, LF or CRLF: a client that
/// sends `ABOR` with its last byte (the LF) as TCP urgent data has it
/// delivered inline, but a read stops right before an urgent byte, so the
/// CR can come without its LF. An LF left over from a CRLF split across
/// reads is an empty line, which is ignored.
pub fn next_line(input: &[u8]) -> Option<(&[u8], usize)> {
    let end = input.iter().position(|b| *b == b'\r' || *b == b'\n')?;
    let crlf = input[end] == b'\r' && input.get(end + 1) == Some(&b'\n');
    Some((&input[..end], end + 1 + usize::from(crlf)))
}

/// A parsed command line.
#[derive(Debug, PartialEq, Eq)]
pub struct Command<'a> {
    /// Upper-cased.
    pub verb: String,
    /// Everything after the first space, unchanged (file names may hold
    /// spaces).
    pub arg: &'a str,
}

/// Why a line is not a command.
#[derive(Debug, PartialEq, Eq)]
pub enum BadLine {
    NotUtf8,
    NoVerb,
}

/// Telnet `IAC IP` / `IAC DM` bytes some clients put before `ABOR`.
fn strip_telnet(line: &[u8]) -> &[u8] {
    let n = line
        .iter()
        .take_while(|b| matches!(b, 0xff | 0xf4 | 0xf2))
        .count();
    &line[n..]
}

pub fn parse(line: &[u8]) -> Result<Command<'_>, BadLine> {
    let line = std::str::from_utf8(strip_telnet(line)).map_err(|_| BadLine::NotUtf8)?;
    let (verb, arg) = line.split_once(' ').unwrap_or((line, ""));
    if verb.is_empty() || verb.len() > 8 || !verb.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(BadLine::NoVerb);
    }
    Ok(Command {
        verb: verb.to_ascii_uppercase(),
        arg,
    })
}

/// One reply line, `CODE text\r\n`; line breaks in `text` (a file name) are
/// flattened so they cannot forge a reply.
pub fn reply(code: u16, text: &str) -> String {
    format!("{code} {}\r\n", text.replace(['\r', '\n'], " "))
}

/// A path in a `257` reply: quoted, inner quotes doubled (RFC 959).
pub fn quote(path: &str) -> String {
    format!("\"{}\"", path.replace('"', "\"\""))
}

/// `PORT h1,h2,h3,h4,p1,p2`.
pub fn parse_port(arg: &str) -> Option<SocketAddr> {
    let n: Vec<u8> = arg
        .trim()
        .split(',')
        .map(|f| f.trim().parse().ok())
        .collect::<Option<_>>()?;
    let [a, b, c, d, p1, p2] = n[..] else {
        return None;
    };
    Some(SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::new(a, b, c, d),
        u16::from(p1) << 8 | u16::from(p2),
    )))
}

/// `EPRT |proto|address|port|` (any printable delimiter).
pub fn parse_eprt(arg: &str) -> Option<SocketAddr> {
    let arg = arg.trim();
    let delim = arg.chars().next().filter(|c| c.is_ascii_graphic())?;
    let f: Vec<&str> = arg.split(delim).collect();
    let ["", proto, addr, port, ""] = f[..] else {
        return None;
    };
    let ip: IpAddr = addr.parse().ok()?;
    match (proto, ip) {
        ("1", IpAddr::V4(_)) | ("2", IpAddr::V6(_)) => {}
        _ => return None,
    }
    Some(SocketAddr::new(ip, port.parse().ok()?))
}

/// The `227` reply to `PASV`.
pub fn pasv_reply(a: SocketAddrV4) -> String {
    let [h1, h2, h3, h4] = a.ip().octets();
    reply(
        227,
        &format!(
            "Entering Passive Mode ({h1},{h2},{h3},{h4},{},{}).",
            a.port() >> 8,
            a.port() & 0xff
        ),
    )
}

/// The `229` reply to `EPSV`.
pub fn epsv_reply(port: u16) -> String {
    reply(229, &format!("Entering Extended Passive Mode (|||{port}|)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn lines_end_at_cr_lf_or_crlf() {
        assert_eq!(next_line(b"NOOP\r\nX"), Some((&b"NOOP"[..], 6)));
        assert_eq!(next_line(b"NOOP\nX"), Some((&b"NOOP"[..], 5)));
        assert_eq!(next_line(b"ABOR\r"), Some((&b"ABOR"[..], 5)));
        assert_eq!(next_line(b"\n"), Some((&b""[..], 1)));
        assert_eq!(next_line(b"NOOP"), None);
    }

    #[test]
    fn commands() {
        let c = parse(b"retr my file.txt").unwrap();
        assert_eq!((c.verb.as_str(), c.arg), ("RETR", "my file.txt"));
        let c = parse(b"\xff\xf4\xff\xf2ABOR").unwrap();
        assert_eq!((c.verb.as_str(), c.arg), ("ABOR", ""));
        assert_eq!(parse(b"RETR \xff\xfe"), Err(BadLine::NotUtf8));
        assert_eq!(parse(b""), Err(BadLine::NoVerb));
        assert_eq!(parse(b" NOOP"), Err(BadLine::NoVerb));
        assert_eq!(parse(b"N0OP"), Err(BadLine::NoVerb));
    }

    #[test]
    fn addresses() {
        assert_eq!(
            parse_port("127,0,0,1,4,1"),
            Some("127.0.0.1:1025".parse().unwrap())
        );
        assert_eq!(parse_port("127,0,0,1,4"), None);
        assert_eq!(parse_port("127,0,0,1,4,256"), None);
        assert_eq!(
            parse_eprt("|1|10.0.0.1|2121|"),
            Some("10.0.0.1:2121".parse().unwrap())
        );
        assert_eq!(parse_eprt("!2!::1!21!"), Some("[::1]:21".parse().unwrap()));
        assert_eq!(parse_eprt("|1|::1|21|"), None);
        assert_eq!(parse_eprt("|3|10.0.0.1|21|"), None);
        assert_eq!(parse_eprt(""), None);
        assert_eq!(
            pasv_reply("10.1.2.3:1025".parse().unwrap()),
            "227 Entering Passive Mode (10,1,2,3,4,1).\r\n"
        );
        assert_eq!(reply(550, "a\r\nb"), "550 a  b\r\n");
        assert_eq!(quote("/a\"b"), "\"/a\"\"b\"");
    }

    proptest! {
        #[test]
        fn parsers_never_panic(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = next_line(&b);
            if let Ok(c) = parse(&b) {
                let _ = parse_port(c.arg);
                let _ = parse_eprt(c.arg);
            }
        }
    }
}
