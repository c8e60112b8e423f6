//! The kernel HTTP fast path: what the classifier (sk_skb verdict), the synthesizer (sk_msg) and the
//! control plane agree on.
//!
//! The kernel answers a request only when user space has already answered **these exact bytes**
//! with a response that depends on nothing else: the control plane learns `(request bytes →
//! response)` pairs from its own answers ([`REQUESTS_MAP`]) and stores each distinct response once
//! ([`RESPONSES_MAP`], [`RESPONSE_BLOCKS_MAP`]). Exact matching is what keeps the fast path
//! invisible: there is no second HTTP parser in the kernel that could disagree with user space's
//! about a header, a version or a path; the kernel only recognises bytes user space has judged.
//!
//! Data path of a request the kernel answers:
//! 1. the verdict loads the skb's bytes into a [`RequestKey`], checks [`RequestKey::is_candidate`]
//!    and looks the key up;
//! 2. on a hit it overwrites the request's first bytes with a [`Marker`] (the skb keeps its length,
//!    so the socket's read sequence stays right) and redirects the skb to the socket's own egress;
//! 3. the sk_msg program sees the marked message, pushes the response in front of it, fills it
//!    from [`RESPONSE_BLOCKS_MAP`], patches the current `Date`, and pops the request bytes.

/// Sockhash of HTTP connections, keyed by socket cookie; the verdict and the sk_msg program are
/// attached to it.
pub const SOCKETS_MAP: &str = "HTTP_SOCKETS";
/// Connections the kernel serves at once; past it new connections are served in user space.
pub const MAX_SOCKETS: u32 = 65_536;

/// Hash of [`Connection`] by socket cookie. Only the kernel writes it; user space creates, reads
/// and deletes entries.
pub const CONNECTIONS_MAP: &str = "HTTP_CONNECTIONS";
/// Hash of [`Answered`] by socket cookie. Only user space writes it.
pub const ANSWERED_MAP: &str = "HTTP_ANSWERED";

/// LRU hash of [`RequestKey`] → [`Route`]: the requests user space taught the kernel.
pub const REQUESTS_MAP: &str = "HTTP_REQUESTS";
/// Distinct requests remembered; the least recently used leave first.
pub const MAX_REQUESTS: u32 = 4_096;

/// Array of [`ResponseMeta`], indexed by response slot.
pub const RESPONSES_MAP: &str = "HTTP_RESPONSES";
/// Response slots (at 16 blocks of 1 KiB each, 4 MiB of kernel memory).
pub const MAX_RESPONSES: u32 = 256;
/// Array of [`ResponseBlock`]s: slot `s` owns indices `s * BLOCKS_PER_RESPONSE ..`.
pub const RESPONSE_BLOCKS_MAP: &str = "HTTP_RESPONSE_BLOCKS";
/// Bytes per block: the synthesizer copies whole blocks (a fixed-size copy the verifier accepts).
pub const BLOCK: usize = 1024;
/// Blocks per response slot.
pub const BLOCKS_PER_RESPONSE: u32 = 16;
/// Largest response the kernel sends: one `bpf_msg_push_data` of at most 16 KiB (see
/// docs/kernel-facts.md for why that is the limit).
pub const MAX_RESPONSE: u32 = BLOCK as u32 * BLOCKS_PER_RESPONSE;

/// Array of two [`HttpDate`]s; [`DATE_INDEX_MAP`] says which one is current. User space writes
/// the other one, then flips the index, so the kernel never copies a half-written date.
pub const DATES_MAP: &str = "HTTP_DATES";
/// Array of one `u32`: the index of the current date in [`DATES_MAP`].
pub const DATE_INDEX_MAP: &str = "HTTP_DATE_INDEX";
/// Length of an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
pub const DATE_LEN: usize = 29;

/// Per-CPU array of `u64` counters, indexed by [`Counter`].
pub const COUNTERS_MAP: &str = "HTTP_COUNTERS";

/// Ring buffer of [`crate::Handoff`]s: connections whose data went to user space.
pub const HANDOFFS_MAP: &str = "HTTP_HANDOFFS";
/// Size of [`HANDOFFS_MAP`] in bytes.
pub const HANDOFFS_BYTES: u32 = 256 * 1024;

/// Ring buffer of [`AccessRecord`]s: one for each request the kernel answered, while access logging
/// is on (`--access-log`), so the log has the kernel's answers too.
pub const ACCESS_MAP: &str = "HTTP_ACCESS";
/// Size of [`ACCESS_MAP`] with access logging on: about 80,000 records of a wrk-sized request
/// ([`AccessRecord::sent_len`] plus the ring's 8-byte header), 200 ms of the kernel's fastest
/// answering. The object declares one page, so a server without a log holds no more.
pub const ACCESS_BYTES: u32 = 8 * 1024 * 1024;
/// The global that turns the [`AccessRecord`]s on (non-zero); 0, the verdict writes none.
pub const ACCESS_LOG_GLOBAL: &str = "HTTP_ACCESS_LOG";

/// The stream-verdict program.
pub const VERDICT_PROGRAM: &str = "http_verdict";
/// The sk_msg program.
pub const SYNTHESIZER_PROGRAM: &str = "http_synthesize";
/// The global holding the per-load secret of [`Marker`]s.
pub const SECRET_GLOBAL: &str = "HTTP_SECRET";
/// The global holding the server's process id (thread group): the sk_msg program tells the psock's
/// work item, which sends the kernel's answers and passed-through requests, from user space by it.
pub const TGID_GLOBAL: &str = "HTTP_TGID";
/// Bytes of request a [`RequestKey`] holds. htstress's, wrk's and curl's requests are 40–80 bytes.
pub const REQUEST_KEY_BYTES: usize = 252;
/// Shortest request the kernel answers: the marker must fit in it.
pub const MIN_REQUEST: usize = size_of::<Marker>();

/// The most bytes user space may have written and not yet seen acknowledged, together with the
/// response, for the kernel to answer. Past it the send queue might not take the whole response at
/// once, and a partial send of a synthesized message would put the marked request on the wire.
pub const MAX_UNACKNOWLEDGED: u32 = MAX_RESPONSE;

/// A request's exact bytes, zero-padded: the key of [`REQUESTS_MAP`].
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RequestKey {
    pub len: u32,
    pub bytes: [u8; REQUEST_KEY_BYTES],
}

impl RequestKey {
    /// The key for `request`, if it can be one.
    pub fn new(request: &[u8]) -> Option<RequestKey> {
        if request.len() > REQUEST_KEY_BYTES {
            return None;
        }
        let mut key = RequestKey {
            len: request.len() as u32,
            bytes: [0; REQUEST_KEY_BYTES],
        };
        key.bytes[..request.len()].copy_from_slice(request);
        Some(key)
    }

    /// The classifier's check on the bytes themselves, before the table lookup: one `GET` or `HEAD`
    /// request head, short enough for a key and long enough for a marker, ending with the blank
    /// line. Whether *these* bytes may be answered is the table's to say; this only keeps the
    /// lookup (and its counters) to bytes that could be in it. The same function runs in the
    /// kernel and in the tests.
    #[inline(always)]
    pub fn is_candidate(&self) -> Result<(), PassReason> {
        let len = self.len as usize;
        if !(MIN_REQUEST..=REQUEST_KEY_BYTES).contains(&len) {
            return Err(PassReason::NotCandidate);
        }
        let b = &self.bytes;
        let get = b[0] == b'G' && b[1] == b'E' && b[2] == b'T' && b[3] == b' ';
        let head = b[0] == b'H' && b[1] == b'E' && b[2] == b'A' && b[3] == b'D' && b[4] == b' ';
        // Checked again on an opaque copy: LLVM would otherwise fold this check into the one
        // above and index with a register the BPF verifier has no bounds for.
        let end = core::hint::black_box(len.wrapping_sub(4));
        if end > REQUEST_KEY_BYTES - 4 {
            return Err(PassReason::NotCandidate);
        }
        let blank_line =
            b[end] == b'\r' && b[end + 1] == b'\n' && b[end + 2] == b'\r' && b[end + 3] == b'\n';
        if (get || head) && blank_line {
            Ok(())
        } else {
            Err(PassReason::NotCandidate)
        }
    }
}

/// What user space answered a learned request with.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// Response slot.
    pub response: u32,
    /// Non-zero when the answer closes the connection; the kernel passes those to user space,
    /// which answers and closes (see the README for the measurement behind this).
    pub close: u32,
}

/// One response slot's header.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ResponseMeta {
    /// Response length in bytes; 0 = empty slot.
    pub len: u32,
    /// Where the `Date` value starts (within the first block); 0 = no date to patch.
    pub date_offset: u32,
    /// The response's status code and body length, for [`AccessRecord`]s.
    pub status: u32,
    pub body_bytes: u32,
}

/// What the verdict tells user space of a request it answered (on [`ACCESS_MAP`]): everything a
/// log line needs, so the line does not depend on the connection still being open when it is
/// read.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct AccessRecord {
    /// When it was answered: CLOCK_MONOTONIC (`bpf_ktime_get_ns`).
    pub time_ns: u64,
    /// The connection's socket cookie.
    pub cookie: u64,
    /// `AF_INET` or `AF_INET6`.
    pub family: u32,
    /// The client's port as `__sk_buff.remote_port` holds it: network byte order, in the upper 16
    /// bits on a little-endian machine (see [`AccessRecord::remote`]).
    pub remote_port: u32,
    /// The client's address in network byte order: `[remote_ip4, 0, 0, 0]` or `remote_ip6`.
    pub remote_ip: [u32; 4],
    /// From the answer's [`ResponseMeta`].
    pub status: u32,
    pub body_bytes: u32,
    /// The request's exact bytes.
    pub request: RequestKey,
}

impl AccessRecord {
    /// Bytes of a record sent for a request of `request_len` bytes: the ring gets only as much of
    /// [`AccessRecord::request`] as the request filled.
    pub const fn sent_len(request_len: usize) -> usize {
        core::mem::offset_of!(AccessRecord, request)
            + core::mem::offset_of!(RequestKey, bytes)
            + request_len
    }

    /// The client's address and port.
    pub fn remote(&self) -> core::net::SocketAddr {
        let ip = if self.family == AF_INET6 {
            let mut bytes = [0u8; 16];
            for (to, word) in bytes.chunks_exact_mut(4).zip(self.remote_ip) {
                to.copy_from_slice(&word.to_ne_bytes());
            }
            core::net::IpAddr::from(bytes)
        } else {
            core::net::IpAddr::from(self.remote_ip[0].to_ne_bytes())
        };
        // `__sk_buff.remote_port`: network byte order in the upper 16 bits on little-endian.
        let port = if cfg!(target_endian = "little") {
            u16::from_be((self.remote_port >> 16) as u16)
        } else {
            self.remote_port as u16
        };
        core::net::SocketAddr::new(ip, port)
    }
}

/// `AF_INET6` (linux/socket.h): an [`AccessRecord::family`] of IPv6.
pub const AF_INET6: u32 = 10;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct ResponseBlock {
    pub bytes: [u8; BLOCK],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpDate {
    pub bytes: [u8; 32],
}

/// Per-connection state, written by the kernel only (after user space created it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Connection {
    /// Bytes the kernel passed to user space on the connection.
    pub passed_bytes: u64,
    /// Bytes of responses the kernel queued on the connection.
    pub kernel_bytes: u64,
    /// The user-space written count ([`Answered::written_bytes`]) the kernel has seen in the send
    /// queue: once user space's bytes are there, kernel answers cannot overtake them, and only
    /// the kernel's own answers (in order on the psock) can still be on their way.
    pub user_bytes_queued: u64,
}

/// What user space has done on a connection, as of when it last stopped reading it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Answered {
    /// Bytes of those the kernel passed that user space has read and answered. The kernel answers
    /// on a connection only while this equals [`Connection::passed_bytes`], i.e. while user space
    /// owes nothing on it, so responses cannot overtake one another.
    pub read_bytes: u64,
    /// Bytes user space has written on the connection (for the kernel's unacknowledged count).
    pub written_bytes: u64,
}

/// Written over a request's first bytes by the verdict, read by the sk_msg program.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Marker {
    /// Random per load: a message that starts with anything else passes untouched.
    pub secret: u64,
    pub response: u32,
    pub request_len: u32,
}

/// Why the kernel left a request to user space (each has its slot: [`Counter::Passed`]).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PassReason {
    /// Not one GET/HEAD head of [`MIN_REQUEST`]..=[`REQUEST_KEY_BYTES`] bytes (also: split
    /// requests, pipelined batches, bodies).
    NotCandidate,
    /// User space has not answered these exact bytes (yet).
    Unknown,
    /// The answer closes the connection.
    Close,
    /// User space has not answered everything passed to it on the connection yet.
    UserOwned,
    /// Too much sent and not yet acknowledged.
    Backpressure,
    /// No room for the connection's state.
    NoState,
}

impl PassReason {
    pub const ALL: [PassReason; 6] = [
        PassReason::NotCandidate,
        PassReason::Unknown,
        PassReason::Close,
        PassReason::UserOwned,
        PassReason::Backpressure,
        PassReason::NoState,
    ];

    /// The `reason` label in /metrics.
    pub fn label(self) -> &'static str {
        match self {
            PassReason::NotCandidate => "not_candidate",
            PassReason::Unknown => "unknown_request",
            PassReason::Close => "close",
            PassReason::UserOwned => "user_space_busy",
            PassReason::Backpressure => "backpressure",
            PassReason::NoState => "no_state",
        }
    }

    pub const COUNT: u32 = Self::ALL.len() as u32;
}

/// What [`COUNTERS_MAP`] counts, one slot each ([`Counter::slot`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Requests answered in the kernel.
    KernelResponses,
    /// Requests left to user space, by reason.
    Passed(PassReason),
    /// Marked requests the synthesizer could not turn into their response (dropped).
    SynthesisErrors,
    /// Redirects the kernel refused (the request was restored and passed).
    RedirectFailures,
    /// Hand-off records the ring buffer had no room for.
    HandoffsLost,
    /// [`AccessRecord`]s the ring buffer had no room for.
    AccessRecordsLost,
}

impl Counter {
    /// Its index in [`COUNTERS_MAP`]: the pass reasons take one slot each, in their order.
    pub const fn slot(self) -> u32 {
        match self {
            Counter::KernelResponses => 0,
            Counter::Passed(reason) => 1 + reason as u32,
            Counter::SynthesisErrors => 1 + PassReason::COUNT,
            Counter::RedirectFailures => 2 + PassReason::COUNT,
            Counter::HandoffsLost => 3 + PassReason::COUNT,
            Counter::AccessRecordsLost => 4 + PassReason::COUNT,
        }
    }

    /// Number of slots in [`COUNTERS_MAP`]: one past the last.
    pub const COUNT: u32 = Counter::AccessRecordsLost.slot() + 1;
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for RequestKey {}
    unsafe impl aya::Pod for Route {}
    unsafe impl aya::Pod for ResponseMeta {}
    unsafe impl aya::Pod for ResponseBlock {}
    unsafe impl aya::Pod for HttpDate {}
    unsafe impl aya::Pod for Connection {}
    unsafe impl aya::Pod for Answered {}
    unsafe impl aya::Pod for AccessRecord {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_has_a_slot_of_its_own() {
        let mut counters = vec![
            Counter::KernelResponses,
            Counter::SynthesisErrors,
            Counter::RedirectFailures,
            Counter::HandoffsLost,
            Counter::AccessRecordsLost,
        ];
        counters.extend(PassReason::ALL.map(Counter::Passed));
        let mut slots: Vec<u32> = counters.iter().map(|counter| counter.slot()).collect();
        slots.sort_unstable();
        assert_eq!(slots, (0..Counter::COUNT).collect::<Vec<_>>());
        for (i, reason) in PassReason::ALL.into_iter().enumerate() {
            assert_eq!(
                reason as usize, i,
                "PassReason::ALL is in declaration order"
            );
        }
    }

    fn candidate(request: &[u8]) -> Result<(), PassReason> {
        RequestKey::new(request)
            .ok_or(PassReason::NotCandidate)?
            .is_candidate()
    }

    #[test]
    fn benchmark_requests_are_candidates() {
        for request in [
            &b"GET / HTTP/1.0\r\nHost: localhost:8081\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8081\r\n\r\n",
            b"HEAD /index.html HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET / HTTP/1.0\r\n\r\n",
        ] {
            assert_eq!(candidate(request), Ok(()), "{request:?}");
        }
    }

    #[test]
    fn everything_else_is_not() {
        let long = [b'a'; REQUEST_KEY_BYTES - 17];
        let mut too_long = b"GET /".to_vec();
        too_long.extend_from_slice(&long);
        too_long.extend_from_slice(b" HTTP/1.1\r\n\r\n");
        for request in [
            &b"POST / HTTP/1.1\r\nHost: a\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: a\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\nX",
            b"GET / HTTP/1.1\n\n",
            b"get / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"HEAD/ HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET /\r\n\r\n",
            b"",
            &too_long,
        ] {
            assert_eq!(
                candidate(request),
                Err(PassReason::NotCandidate),
                "{:?}",
                String::from_utf8_lossy(request)
            );
        }
    }

    #[test]
    fn keys_differ_by_length_even_when_bytes_are_zero() {
        let a = RequestKey::new(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let b = RequestKey::new(b"GET / HTTP/1.0\r\n\r\n\0").unwrap();
        assert_eq!(a.bytes, b.bytes);
        assert_ne!(a.len, b.len);
    }

    #[test]
    fn access_records_say_where_the_client_is() {
        let mut record = AccessRecord {
            time_ns: 0,
            cookie: 0,
            family: 2,
            // Port 40000 as __sk_buff.remote_port holds it on a little-endian machine.
            remote_port: u32::from(40000u16.to_be()) << 16,
            remote_ip: [u32::from_ne_bytes([127, 0, 0, 1]), 0, 0, 0],
            status: 200,
            body_bytes: 0,
            request: RequestKey::new(b"").unwrap(),
        };
        assert_eq!(record.remote(), "127.0.0.1:40000".parse().unwrap());
        record.family = AF_INET6;
        record.remote_ip = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
        assert_eq!(record.remote(), "[::1]:40000".parse().unwrap());
    }

    #[test]
    fn marker_fits_the_shortest_request() {
        assert_eq!(MIN_REQUEST, 16);
        assert!(MIN_REQUEST <= b"GET / HTTP/1.0\r\n\r\n".len());
    }
}
