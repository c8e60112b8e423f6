//! The kernel HTTP fast path: `http_verdict` (sk_skb stream verdict) classifies each skb a client
//! sends, `http_synthesize` (sk_msg) turns a marked request into its response on the way out. The
//! scheme and the maps are described in `khttpd_common::http`.
//!
//! Two rules keep a kernel answer from ever differing from user space's:
//! - the verdict answers only bytes user space has answered before (exact match in
//!   `HTTP_REQUESTS`), and only while user space owes no answer on the connection
//!   (`HTTP_ANSWERED` == `Connection::passed_bytes`);
//! - it answers only while the socket's unacknowledged output plus the response fits
//!   `MAX_UNACKNOWLEDGED`, so the kworker's send of the synthesized message cannot be partial
//!   (a partial send would put the marked request bytes on the wire; see docs/kernel-facts.md).

use core::{
    intrinsics::{atomic_xadd, AtomicOrdering},
    ptr::{read_volatile, write_volatile},
};

use aya_ebpf::{
    bindings::{
        sk_action::{SK_DROP, SK_PASS},
        BPF_F_INGRESS, BPF_RB_NO_WAKEUP,
    },
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_msg_pull_data,
        bpf_skb_load_bytes, bpf_skb_pull_data, bpf_skb_store_bytes,
    },
    macros::{map, sk_msg, stream_verdict},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf, SockHash},
    programs::{SkBuffContext, SkMsgContext},
};
use khttpd_common::{
    http::{
        self, AccessRecord, Answered, Connection, Counter, HttpDate, Marker, PassReason,
        RequestKey, ResponseBlock, ResponseMeta, Route, AF_INET6, BLOCK, BLOCKS_PER_RESPONSE,
        DATE_LEN, MAX_RESPONSE, MAX_UNACKNOWLEDGED, MIN_REQUEST, REQUEST_KEY_BYTES,
    },
    Handoff,
};

use crate::tcp::{socket_cookie, tcp_counts};

/// Set by the control plane at load time (random); a message must start with it to be
/// synthesized, so neither a client nor user space can forge a marker.
#[unsafe(no_mangle)]
static HTTP_SECRET: u64 = 0;

/// Set by the control plane at load time: the server's process id (see `sent_by_work_item`).
#[unsafe(no_mangle)]
static HTTP_TGID: u32 = 0;

/// Set by the control plane at load time: non-zero while access logging is on (`log_access`).
#[unsafe(no_mangle)]
static HTTP_ACCESS_LOG: u32 = 0;

#[map(name = "HTTP_SOCKETS")]
static HTTP_SOCKETS: SockHash<u64> = SockHash::with_max_entries(http::MAX_SOCKETS, 0);

#[map(name = "HTTP_CONNECTIONS")]
static HTTP_CONNECTIONS: HashMap<u64, Connection> = HashMap::with_max_entries(http::MAX_SOCKETS, 0);

#[map(name = "HTTP_ANSWERED")]
static HTTP_ANSWERED: HashMap<u64, Answered> = HashMap::with_max_entries(http::MAX_SOCKETS, 0);

#[map(name = "HTTP_REQUESTS")]
static HTTP_REQUESTS: LruHashMap<RequestKey, Route> =
    LruHashMap::with_max_entries(http::MAX_REQUESTS, 0);

#[map(name = "HTTP_RESPONSES")]
static HTTP_RESPONSES: Array<ResponseMeta> = Array::with_max_entries(http::MAX_RESPONSES, 0);

#[map(name = "HTTP_RESPONSE_BLOCKS")]
static HTTP_RESPONSE_BLOCKS: Array<ResponseBlock> =
    Array::with_max_entries(http::MAX_RESPONSES * BLOCKS_PER_RESPONSE, 0);

#[map(name = "HTTP_DATES")]
static HTTP_DATES: Array<HttpDate> = Array::with_max_entries(2, 0);

#[map(name = "HTTP_DATE_INDEX")]
static HTTP_DATE_INDEX: Array<u32> = Array::with_max_entries(1, 0);

#[map(name = "HTTP_COUNTERS")]
static HTTP_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

#[map(name = "HTTP_HANDOFFS")]
static HTTP_HANDOFFS: RingBuf = RingBuf::with_byte_size(http::HANDOFFS_BYTES, 0);

/// One page here; the control plane sizes it (`http::ACCESS_BYTES`) when access logging is on.
#[map(name = "HTTP_ACCESS")]
static HTTP_ACCESS: RingBuf = RingBuf::with_byte_size(4096, 0);

/// Room to assemble a request key (too big for the 512-byte stack next to everything else),
/// inside the access record that may be sent for it.
#[map(name = "HTTP_SCRATCH")]
static HTTP_SCRATCH: PerCpuArray<AccessRecord> = PerCpuArray::with_max_entries(1, 0);

#[stream_verdict]
pub fn http_verdict(ctx: SkBuffContext) -> u32 {
    try_http_verdict(&ctx)
}

fn try_http_verdict(ctx: &SkBuffContext) -> u32 {
    let len = ctx.len();
    if len == 0 {
        // The peer's FIN (no stream parser): nothing to answer, and TCP has recorded it already
        // (user space reads the end of the stream either way). Dropped, not passed: a pass could
        // be queued behind answers still on their way (see `pass`), and it holds no bytes.
        return SK_DROP;
    }
    // SAFETY: the context pointer is the program's own `__sk_buff`.
    let mut cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    // The control plane creates both entries before it puts the socket into the sockhash.
    let Some(connection) = HTTP_CONNECTIONS.get_ptr_mut(&cookie) else {
        count(Counter::Passed(PassReason::NoState));
        hand_off(cookie);
        return SK_PASS;
    };
    // SAFETY: a live map value; verdicts on one socket run one at a time (under its lock), and
    // user space does not write this entry while it exists.
    let connection = unsafe { &mut *connection };
    // Count the bytes as passed *before* reading what user space answered (an atomic add is a full
    // barrier): user space publishes its count and then reads ours, so at least one side sees the
    // other's update and a passed skb is never left unread (see `KernelHttp::release`).
    let passed = &raw mut connection.passed_bytes;
    // SAFETY: `passed` points into the live map value above.
    let passed_before = unsafe { read_volatile(passed) };
    add_atomic(passed, u64::from(len));
    // SAFETY: the value is copied out at once.
    let Some(answered) = (unsafe { HTTP_ANSWERED.get(&cookie) }).copied() else {
        count(Counter::Passed(PassReason::NoState));
        hand_off(cookie);
        return SK_PASS;
    };
    if answered.read_bytes != passed_before {
        // User space still owes answers on this connection and reads its socket.
        count(Counter::Passed(PassReason::UserOwned));
        return pass(ctx, connection, &mut cookie);
    }
    match answer(ctx, connection, answered.written_bytes, &mut cookie) {
        Ok(()) => {
            add_atomic(passed, u64::from(len).wrapping_neg());
            count(Counter::KernelResponses);
            SK_PASS
        }
        Err(reason) => {
            // User space may be parked (not reading): tell it.
            count(Counter::Passed(reason));
            hand_off(cookie);
            pass(ctx, connection, &mut cookie)
        }
    }
}

/// Leaves the skb to user space: directly (SK_PASS) on a connection the kernel has never answered.
/// Once it has, a pass could find answers still in the psock's queue, wait behind them and be
/// delivered by the psock's work item, whose charge for it (`sk_mem_charge` without the socket
/// lock) races with the socket's other users and leaves the socket's memory books wrong for good
/// (docs/kernel-facts.md, "The psock WARNING"). The verdict cannot see that queue, so from the
/// first answer on every pass goes the way of an answer instead — to the socket's egress, in order
/// behind the answers — and `http_synthesize`, which runs under the socket lock, turns it around
/// to the socket's ingress.
fn pass(ctx: &SkBuffContext, connection: &Connection, cookie: &mut u64) -> u32 {
    if connection.kernel_bytes != 0
        && HTTP_SOCKETS.redirect_skb(ctx, cookie, 0) != i64::from(SK_PASS)
    {
        count(Counter::RedirectFailures);
    }
    SK_PASS
}

/// `*to += n` as one locked add (BPF_ATOMIC), which is also a full memory barrier. The result is
/// unused, so it needs no BPF_FETCH (and no newer `-mcpu`).
fn add_atomic(to: *mut u64, n: u64) {
    // SAFETY: callers pass a pointer into a live map value.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(to, n) };
}

/// Marks the skb as a request for a known response and sends it to the socket's egress, or says why
/// not. On `Err` the skb's bytes are as they arrived.
fn answer(
    ctx: &SkBuffContext,
    connection: &mut Connection,
    user_written: u64,
    cookie: &mut u64,
) -> Result<(), PassReason> {
    let skb = ctx.skb.skb;
    let len = ctx.len();
    if len < MIN_REQUEST as u32 || len > REQUEST_KEY_BYTES as u32 {
        return Err(PassReason::NotCandidate);
    }
    let record = HTTP_SCRATCH.get_ptr_mut(0).ok_or(PassReason::NoState)?;
    // SAFETY: this CPU's scratch slot; programs do not migrate while they run.
    let record = unsafe { &mut *record };
    let key = &mut record.request;
    zero_key(key);
    key.len = len;
    // SAFETY: `len` is within 1..=REQUEST_KEY_BYTES, the size of `bytes`.
    if unsafe { bpf_skb_load_bytes(skb.cast(), 0, key.bytes.as_mut_ptr().cast(), len) } != 0 {
        return Err(PassReason::NotCandidate);
    }
    key.is_candidate()?;
    // SAFETY: the value is copied out at once.
    let route = *unsafe { HTTP_REQUESTS.get(&*key) }.ok_or(PassReason::Unknown)?;
    if route.close != 0 {
        return Err(PassReason::Close);
    }
    let response = *HTTP_RESPONSES
        .get(route.response)
        .ok_or(PassReason::Unknown)?;
    if response.len == 0 || response.len > MAX_RESPONSE {
        return Err(PassReason::Unknown);
    }
    // Everything ever written on the socket: the kernel's responses, and what user space wrote
    // or is writing (it publishes its count before its last write, so a fast client's next
    // request can find the kernel ready).
    let written = connection.kernel_bytes + user_written;
    let tcp = tcp_counts(skb).ok_or(PassReason::Backpressure)?;
    let unacknowledged = written.saturating_sub(tcp.acked);
    if unacknowledged + u64::from(response.len) > u64::from(MAX_UNACKNOWLEDGED) {
        return Err(PassReason::Backpressure);
    }
    if connection.user_bytes_queued != user_written {
        // User space wrote (or is writing) since the kernel last looked: answer only once all of
        // it is in the send queue, or the answer could overtake it. Kernel answers still on their
        // way are fine: they go out in order on the psock.
        if tcp.queued < written {
            return Err(PassReason::UserOwned);
        }
        connection.user_bytes_queued = user_written;
    }
    // One linear buffer goes out in one sendmsg, so the sk_msg program sees the whole request.
    // SAFETY: plain helper call on our skb.
    if unsafe { bpf_skb_pull_data(skb.cast(), len) } != 0 {
        return Err(PassReason::NotCandidate);
    }
    let marker = Marker {
        // SAFETY: a global the loader fills in; volatile so it is not folded to its initial 0.
        secret: unsafe { read_volatile(&HTTP_SECRET) },
        response: route.response,
        request_len: len,
    };
    let marker_len = size_of::<Marker>() as u32;
    // SAFETY: writes `marker_len` bytes from a stack value into the skb, which is at least that long.
    if unsafe { bpf_skb_store_bytes(skb.cast(), 0, (&raw const marker).cast(), marker_len, 0) } != 0
    {
        return Err(PassReason::NotCandidate);
    }
    connection.kernel_bytes += u64::from(response.len);
    if HTTP_SOCKETS.redirect_skb(ctx, &mut *cookie, 0) != i64::from(SK_PASS) {
        // Put the request back as it came, for user space.
        // SAFETY: as above; the key holds the original first bytes.
        unsafe { bpf_skb_store_bytes(skb.cast(), 0, key.bytes.as_ptr().cast(), marker_len, 0) };
        connection.kernel_bytes -= u64::from(response.len);
        count(Counter::RedirectFailures);
        return Err(PassReason::NoState);
    }
    // SAFETY: a global the loader fills in; volatile so it is not folded to its initial 0.
    if unsafe { read_volatile(&HTTP_ACCESS_LOG) } != 0 {
        log_access(ctx, record, *cookie, &response);
    }
    Ok(())
}

/// Sends user space what its access log says of this answer; a full ring is counted, never waited
/// for.
fn log_access(
    ctx: &SkBuffContext,
    record: &mut AccessRecord,
    cookie: u64,
    response: &ResponseMeta,
) {
    // SAFETY: plain helper call.
    record.time_ns = unsafe { bpf_ktime_get_ns() };
    record.cookie = cookie;
    let skb = ctx.skb.skb;
    // SAFETY: fields of the program's own context. Each is read on its own (volatile): the
    // verifier accepts context loads only at a constant offset from the context pointer, which
    // LLVM's merged loads would move.
    unsafe {
        record.family = read_volatile(&raw const (*skb).family);
        record.remote_port = read_volatile(&raw const (*skb).remote_port);
        record.remote_ip = if record.family == AF_INET6 {
            [
                read_volatile(&raw const (*skb).remote_ip6[0]),
                read_volatile(&raw const (*skb).remote_ip6[1]),
                read_volatile(&raw const (*skb).remote_ip6[2]),
                read_volatile(&raw const (*skb).remote_ip6[3]),
            ]
        } else {
            [read_volatile(&raw const (*skb).remote_ip4), 0, 0, 0]
        };
    }
    record.status = response.status;
    record.body_bytes = response.body_bytes;
    // Only as much of the request as there is; checked again on an opaque copy so the verifier
    // sees the bound on the very value the helper gets.
    let len = core::hint::black_box(AccessRecord::sent_len(record.request.len as usize));
    if len > size_of::<AccessRecord>() {
        return;
    }
    // SAFETY: `len` bytes of the record, which is `size_of::<AccessRecord>()` long.
    let bytes = unsafe { core::slice::from_raw_parts((&raw const *record).cast::<u8>(), len) };
    // Nobody is woken: user space reads the ring on a timer (`access_log::TICK`).
    if HTTP_ACCESS
        .output::<[u8]>(bytes, u64::from(BPF_RB_NO_WAKEUP))
        .is_err()
    {
        count(Counter::AccessRecordsLost);
    }
}

/// Zeroes a key with word stores (a `memset` call would not link for BPF).
fn zero_key(key: &mut RequestKey) {
    let words = (&raw mut *key).cast::<u64>();
    for i in 0..size_of::<RequestKey>() / 8 {
        // SAFETY: `RequestKey` is a multiple of 8 bytes long and 8-byte aligned in the map.
        unsafe { write_volatile(words.add(i), 0) };
    }
}

/// Tells user space that data on `cookie` waits in its receive queue.
fn hand_off(cookie: u64) {
    if HTTP_HANDOFFS.output(Handoff { cookie }, 0).is_err() {
        count(Counter::HandoffsLost);
    }
}

#[sk_msg]
pub fn http_synthesize(ctx: SkMsgContext) -> u32 {
    match try_http_synthesize(&ctx) {
        Ok(action) => action,
        Err(()) => {
            // A marked request must never reach the client; dropping it is the lesser harm.
            count(Counter::SynthesisErrors);
            SK_DROP
        }
    }
}

fn try_http_synthesize(ctx: &SkMsgContext) -> Result<u32, ()> {
    let Some(marker) = marker(ctx) else {
        // Not an answer. User space's own writes go out untouched; what the psock's work item
        // sends unmarked is a passed skb on its way to user space (the verdict's `pass`).
        return if sent_by_work_item() {
            pass_through(ctx)
        } else {
            Ok(SK_PASS)
        };
    };
    if marker.request_len != ctx.size() {
        return Err(());
    }
    let response = *HTTP_RESPONSES.get(marker.response).ok_or(())?;
    let len = response.len;
    if len == 0 || len > MAX_RESPONSE {
        return Err(());
    }
    let padded = (len + BLOCK as u32 - 1) & !(BLOCK as u32 - 1);
    ctx.push_data(0, padded, 0).map_err(drop)?;
    let first_block = marker.response * BLOCKS_PER_RESPONSE;
    for i in 0..BLOCKS_PER_RESPONSE {
        let offset = i * BLOCK as u32;
        if offset >= len {
            break;
        }
        // SAFETY: plain helper call; the range lies inside the one element push_data made.
        if unsafe { bpf_msg_pull_data(ctx.msg, offset, offset + BLOCK as u32, 0) } != 0 {
            return Err(());
        }
        let (data, end) = (ctx.data(), ctx.data_end());
        if data + BLOCK > end {
            return Err(());
        }
        let block = HTTP_RESPONSE_BLOCKS.get(first_block + i).ok_or(())?;
        copy_block(data as *mut u8, block);
        if i == 0 && response.date_offset != 0 {
            patch_date(ctx, response.date_offset as usize)?;
        }
    }
    ctx.pop_data(len, padded - len + marker.request_len, 0)
        .map_err(drop)?;
    Ok(SK_PASS)
}

/// The message's marker, if it starts with one (this load's secret).
fn marker(ctx: &SkMsgContext) -> Option<Marker> {
    let marker_len = size_of::<Marker>() as u32;
    if ctx.size() < marker_len {
        return None;
    }
    // SAFETY: plain helper call on our message.
    if unsafe { bpf_msg_pull_data(ctx.msg, 0, marker_len, 0) } != 0 {
        return None;
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + marker_len as usize > end {
        return None;
    }
    // SAFETY: bounds checked just above.
    let marker = unsafe { core::ptr::read_unaligned(data as *const Marker) };
    // SAFETY: see `answer`.
    (marker.secret == unsafe { read_volatile(&HTTP_SECRET) }).then_some(marker)
}

/// Whether the message is sent by the psock's work item rather than by user space (the server's
/// threads, which the loader names by their thread group).
fn sent_by_work_item() -> bool {
    // SAFETY: a global the loader fills in; volatile so it is not folded to its initial 0.
    (bpf_get_current_pid_tgid() >> 32) as u32 != unsafe { read_volatile(&HTTP_TGID) }
}

/// Hands a passed skb that came through the psock's queue to the socket's ingress, where user
/// space reads it; the kernel does that under the socket lock (`bpf_tcp_ingress`).
fn pass_through(ctx: &SkMsgContext) -> Result<u32, ()> {
    // SAFETY: the context's socket pointer, checked by the helpers `socket_cookie` calls.
    let mut cookie = socket_cookie(unsafe { (*ctx.msg).__bindgen_anon_3.sk }).ok_or(())?;
    // A request must never reach the client: dropped if it cannot be turned around.
    if HTTP_SOCKETS.redirect_msg(ctx, &mut cookie, u64::from(BPF_F_INGRESS)) == i64::from(SK_PASS) {
        Ok(SK_PASS)
    } else {
        Err(())
    }
}

/// Copies one block into message data known to have `BLOCK` bytes at `to`.
fn copy_block(to: *mut u8, block: &ResponseBlock) {
    let (to, from) = (to.cast::<u64>(), block.bytes.as_ptr().cast::<u64>());
    for i in 0..BLOCK / 8 {
        // SAFETY: both sides hold `BLOCK` bytes; volatile keeps LLVM from emitting a memcpy call.
        unsafe { write_volatile(to.add(i), read_volatile(from.add(i))) };
    }
}

/// Writes the current date at `offset` of the message's data (the first block).
fn patch_date(ctx: &SkMsgContext, offset: usize) -> Result<(), ()> {
    if offset > BLOCK - DATE_LEN {
        return Err(());
    }
    let index = *HTTP_DATE_INDEX.get(0).ok_or(())?;
    let date = HTTP_DATES.get(index & 1).ok_or(())?;
    // Bounds checked on the very pointer written through, as the verifier wants.
    let to = ctx.data() + offset;
    if to + DATE_LEN > ctx.data_end() {
        return Err(());
    }
    for (i, byte) in date.bytes[..DATE_LEN].iter().enumerate() {
        // SAFETY: `to + DATE_LEN <= data_end`, checked above.
        unsafe { write_volatile((to as *mut u8).add(i), *byte) };
    }
    Ok(())
}

fn count(counter: Counter) {
    if let Some(slot) = HTTP_COUNTERS.get_ptr_mut(counter.slot()) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *slot += 1 };
    }
}
