//! The small HTTP clients tests and benches need — one request until the server closes, one
//! answer on a kept-alive connection — and the one way to compare answers whose `Date` differs.

use std::{
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
};

use crate::IO_TIMEOUT;

/// A connection with Nagle off and every read and write bounded by [`IO_TIMEOUT`].
pub fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

/// Sends `request` on a new connection and returns every byte until the server closes.
pub fn exchange(addr: SocketAddr, request: &[u8]) -> io::Result<Vec<u8>> {
    let mut stream = connect(addr)?;
    stream.write_all(request)?;
    read_to_close(&mut stream)
}

/// Sends `request` on a new connection and reads its one answer, whose body is every byte until
/// the server closes (an HTTP/1.0 request or `Connection: close`).
pub fn answer_until_close(addr: SocketAddr, request: &[u8]) -> io::Result<Answer> {
    let bytes = exchange(addr, request)?;
    let at = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| invalid("an answer without the end of its head"))?;
    let mut answer = Answer::from_head(&bytes[..at])?;
    answer.body = bytes[at + 4..].to_vec();
    Ok(answer)
}

/// Every byte until the server closes (or resets after sending them).
fn read_to_close(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    Ok(answer)
}

/// One answer read from a kept-alive connection.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    /// The status line and headers, without the blank line.
    pub head: String,
    pub body: Vec<u8>,
}

impl Answer {
    /// An answer without its body yet, from its status line and headers.
    fn from_head(head: &[u8]) -> io::Result<Self> {
        let head = String::from_utf8(head.to_vec()).map_err(|_| invalid("a head not in UTF-8"))?;
        let status = head
            .get(9..12)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| invalid("no status code"))?;
        Ok(Self {
            status,
            head,
            body: Vec::new(),
        })
    }

    /// The value of the first header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }
}

/// Sends `request` and reads one answer. Its body is `Content-Length` bytes (0 without one:
/// every answer of khttpd has it, except to HEAD and 304, which have no body).
pub fn ask(stream: &mut TcpStream, request: &[u8]) -> io::Result<Answer> {
    stream.write_all(request)?;
    read_answer(stream, !request.starts_with(b"HEAD "))
}

/// Reads one answer; its body only when `with_body`.
fn read_answer(stream: &mut TcpStream, with_body: bool) -> io::Result<Answer> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte)?;
        head.push(byte[0]);
    }
    let mut answer = Answer::from_head(&head[..head.len() - 4])?;
    let length = match answer.header("Content-Length") {
        Some(value) if with_body && answer.status != 304 => {
            value.parse().map_err(|_| invalid("a bad Content-Length"))?
        }
        _ => 0,
    };
    answer.body = vec![0u8; length];
    stream.read_exact(&mut answer.body)?;
    Ok(answer)
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// Blanks the value of every `Date` header with `#`s, keeping the length: answers that differ
/// only in their dates are then equal, and a truncated date is blanked as far as it goes.
pub fn blank_dates(mut bytes: Vec<u8>) -> Vec<u8> {
    const PREFIX: &[u8] = b"\r\nDate: ";
    const DATE_LEN: usize = "Sun, 06 Nov 1994 08:49:37 GMT".len();
    let mut at = 0;
    while let Some(found) = bytes[at..].windows(PREFIX.len()).position(|w| w == PREFIX) {
        let start = at + found + PREFIX.len();
        let end = (start + DATE_LEN).min(bytes.len());
        bytes[start..end].fill(b'#');
        at = end;
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::blank_dates;

    #[test]
    fn dates_are_blanked_in_place_also_when_cut() {
        let two = b"HTTP/1.1 200 OK\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\n\r\n\
                    HTTP/1.1 200 OK\r\nDate: Mon, 07 Nov 1994 08:49:37 GMT\r\n\r\n";
        let blanked = blank_dates(two.to_vec());
        assert_eq!(blanked.len(), two.len());
        assert_eq!(blanked.iter().filter(|&&b| b == b'#').count(), 58);
        assert_eq!(
            blank_dates(b"x\r\nDate: Sun, 06".to_vec()),
            b"x\r\nDate: #######"
        );
    }
}
