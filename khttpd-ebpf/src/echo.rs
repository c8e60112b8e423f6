//! kecho in the kernel: attached as the stream verdict of the echo sockhash, `echo_verdict` sends
//! every skb a client sends straight back out of the same socket, so the bytes never wake user
//! space — while the client reads them. Redirected skbs wait in the socket's psock queue until the
//! send queue has room, and nothing else bounds that queue (see `khttpd_common::echo`): once too
//! much waits there, the verdict asks user space to detach the connection, and goes on echoing
//! until it has.

use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    helpers::bpf_get_socket_cookie,
    macros::{map, stream_verdict},
    maps::{HashMap, PerCpuArray, RingBuf, SockHash},
    programs::SkBuffContext,
};
use aya_log_ebpf::{debug, warn};
use khttpd_common::{
    echo::{self, Connection, Counter, MAX_BACKLOG_BYTES, MAX_BACKLOG_SKBS},
    Handoff,
};

use crate::tcp::tcp_counts;

#[map(name = "ECHO_SOCKETS")]
static ECHO_SOCKETS: SockHash<u64> = SockHash::with_max_entries(echo::MAX_SOCKETS, 0);

#[map(name = "ECHO_DETACHED")]
static ECHO_DETACHED: SockHash<u64> = SockHash::with_max_entries(echo::MAX_SOCKETS, 0);

#[map(name = "ECHO_CONNECTIONS")]
static ECHO_CONNECTIONS: HashMap<u64, Connection> = HashMap::with_max_entries(echo::MAX_SOCKETS, 0);

#[map(name = "ECHO_COUNTERS")]
static ECHO_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

#[map(name = "ECHO_HANDOFFS")]
static ECHO_HANDOFFS: RingBuf = RingBuf::with_byte_size(echo::HANDOFFS_BYTES, 0);

#[stream_verdict]
pub fn echo_verdict(ctx: SkBuffContext) -> u32 {
    match try_echo_verdict(&ctx) {
        Ok(action) | Err(action) => action,
    }
}

fn try_echo_verdict(ctx: &SkBuffContext) -> Result<u32, u32> {
    let len = u64::from(ctx.len());
    // SAFETY: the context pointer is the program's own `__sk_buff`.
    let mut cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    if len == 0 {
        // Without a stream parser the verdict also runs once, empty, when the peer's FIN arrives.
        // TCP has recorded it already; dropped rather than passed, because a pass would wait behind
        // the echoes still in the psock's queue and be delivered by its work item without the
        // socket lock (docs/kernel-facts.md, "The psock WARNING"), and it holds no bytes.
        debug!(ctx, "echo: peer closed, cookie {}", cookie);
        return Ok(SK_DROP);
    }
    // The control plane creates the record before the socket enters the sockhash.
    let Some(connection) = ECHO_CONNECTIONS.get_ptr_mut(&cookie) else {
        return pass(cookie);
    };
    // SAFETY: a live map value; verdicts on one socket run one at a time (under its lock), and
    // user space does not write this entry while it exists.
    let connection = unsafe { &mut *connection };
    if connection.detaching == 0 {
        let waiting = tcp_counts(ctx.skb.skb).map_or(u64::MAX, |tcp| {
            connection.echoed_bytes.saturating_sub(tcp.queued)
        });
        if waiting == 0 {
            connection.waiting_skbs = 0;
        }
        if waiting.saturating_add(len) > MAX_BACKLOG_BYTES
            || connection.waiting_skbs >= MAX_BACKLOG_SKBS
        {
            if ask_user_space(cookie).is_ok() {
                connection.detaching = 1;
                count(Counter::Detached, 1);
            } else {
                count(Counter::HandoffsLost, 1);
            }
        }
    }
    // Flags 0: the skb goes to the egress of the socket found under our own cookie, i.e. back to
    // the client. On success the helper returns SK_PASS. While user space detaches the socket it is
    // in the other map, or in both.
    if ECHO_SOCKETS.redirect_skb(ctx, &mut cookie, 0) == i64::from(SK_PASS)
        || ECHO_DETACHED.redirect_skb(ctx, &mut cookie, 0) == i64::from(SK_PASS)
    {
        connection.echoed_bytes += len;
        connection.waiting_skbs += 1;
        count(Counter::Messages, 1);
        count(Counter::Bytes, len);
        return Ok(SK_PASS);
    }
    // Only possible if the socket left both maps under us (it is closing).
    count(Counter::RedirectFailures, 1);
    warn!(
        ctx,
        "echo: redirect failed, handing cookie {} to user space", cookie
    );
    pass(cookie)
}

/// Leaves the skb in the psock for user space, and tells it to take the connection.
fn pass(cookie: u64) -> Result<u32, u32> {
    count(Counter::Passes, 1);
    // Without the record user space would never read these bytes; dropping them makes the loss
    // visible to TCP's peer as a stall instead of silently keeping them.
    ask_user_space(cookie).map_err(|()| SK_DROP)?;
    Ok(SK_PASS)
}

/// Asks user space (hand-off ring) to detach the connection and echo it from then on.
fn ask_user_space(cookie: u64) -> Result<(), ()> {
    ECHO_HANDOFFS.output(Handoff { cookie }, 0).map_err(|_| ())
}

fn count(counter: Counter, n: u64) {
    if let Some(slot) = ECHO_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *slot += n };
    }
}
