//! kecho in the kernel: attached as the stream verdict of the echo sockhash, `echo_verdict` sends
//! every skb a client sends straight back out of the same socket, so the bytes never wake user space.

use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    helpers::bpf_get_socket_cookie,
    macros::{map, stream_verdict},
    maps::{PerCpuArray, RingBuf, SockHash},
    programs::SkBuffContext,
};
use aya_log_ebpf::{debug, warn};
use khttpd_common::{
    echo::{self, Counter},
    Handoff,
};

#[map(name = "ECHO_SOCKETS")]
static ECHO_SOCKETS: SockHash<u64> = SockHash::with_max_entries(echo::MAX_SOCKETS, 0);

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
    let len = ctx.len();
    // SAFETY: the context pointer is the program's own `__sk_buff`.
    let mut cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    if len == 0 {
        // Without a stream parser the verdict also runs once, empty, when the peer's FIN arrives.
        debug!(ctx, "echo: peer closed, cookie {}", cookie);
        return Ok(SK_PASS);
    }
    // Flags 0: the skb goes to the egress of the socket found under our own cookie, i.e. back to
    // the client. On success the helper returns SK_PASS.
    if ECHO_SOCKETS.redirect_skb(ctx, &mut cookie, 0) == i64::from(SK_PASS) {
        count(Counter::Messages, 1);
        count(Counter::Bytes, u64::from(len));
        return Ok(SK_PASS);
    }
    // Only possible if the socket left the map under us. Leave the bytes in the receive queue and
    // tell user space to take the connection over, so nothing is lost.
    count(Counter::RedirectFailures, 1);
    count(Counter::Passes, 1);
    warn!(
        ctx,
        "echo: redirect failed, handing cookie {} to user space", cookie
    );
    if ECHO_HANDOFFS.output(Handoff { cookie }, 0).is_err() {
        // Without the record user space would never read these bytes; dropping them makes the
        // loss visible to TCP's peer as a stall instead of silently keeping them.
        return Err(SK_DROP);
    }
    Ok(SK_PASS)
}

fn count(counter: Counter, n: u64) {
    if let Some(slot) = ECHO_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *slot += n };
    }
}
