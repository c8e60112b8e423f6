//! The request classifier the kernel runs on every skb (`RequestKey`, `RequestKey::is_candidate`),
//! checked against a plain reference written from its documentation.
//!
//! Input: `flags`, `split`, then bytes. The bytes are cut in two at `split`; each half, and the
//! whole, is a request. The low and high nibble of `flags` decorate the two halves (bit 0: prefix
//! `GET `, bit 1: prefix `HEAD `, bit 2: suffix CRLFCRLF, bit 3: pad to the key's size with `a`s), so most
//! executions reach the interesting side of each check.
#![no_main]

use khttpd_common::http::{PassReason, RequestKey, MIN_REQUEST, REQUEST_KEY_BYTES};
use libfuzzer_sys::fuzz_target;

/// What `is_candidate` documents: one `GET` or `HEAD` request head (method, then a space), of
/// `MIN_REQUEST..=REQUEST_KEY_BYTES` bytes, ending with the blank line.
fn reference_is_candidate(request: &[u8]) -> bool {
    (MIN_REQUEST..=REQUEST_KEY_BYTES).contains(&request.len())
        && (request.starts_with(b"GET ") || request.starts_with(b"HEAD "))
        && request.ends_with(b"\r\n\r\n")
}

/// The key as the kernel builds it (`answer` in khttpd-ebpf): zeroed, the length, the bytes. These
/// are the bytes the BPF hash map hashes and compares.
fn reference_key(request: &[u8]) -> Option<[u8; 4 + REQUEST_KEY_BYTES]> {
    if request.len() > REQUEST_KEY_BYTES {
        return None;
    }
    let mut key = [0; 4 + REQUEST_KEY_BYTES];
    key[..4].copy_from_slice(&(request.len() as u32).to_ne_bytes());
    key[4..4 + request.len()].copy_from_slice(request);
    Some(key)
}

/// A key's bytes, as the map sees them.
fn raw(key: &RequestKey) -> [u8; 4 + REQUEST_KEY_BYTES] {
    const { assert!(size_of::<RequestKey>() == 4 + REQUEST_KEY_BYTES) };
    let mut bytes = [0; 4 + REQUEST_KEY_BYTES];
    bytes[..4].copy_from_slice(&key.len.to_ne_bytes());
    bytes[4..].copy_from_slice(&key.bytes);
    // No padding: the struct's memory is exactly these bytes (a padding byte would be hashed
    // too, and two keys of the same request could then differ).
    // SAFETY: RequestKey is repr(C), Copy, 256 bytes (asserted above) with no padding, so every
    // byte is initialised.
    let memory = unsafe {
        std::slice::from_raw_parts(
            (key as *const RequestKey).cast::<u8>(),
            size_of::<RequestKey>(),
        )
    };
    assert_eq!(memory, &bytes[..]);
    bytes
}

fn decorate(flags: u8, bytes: &[u8]) -> Vec<u8> {
    let mut request = Vec::with_capacity(bytes.len() + 16);
    if flags & 1 != 0 {
        request.extend_from_slice(b"GET ");
    }
    if flags & 2 != 0 {
        request.extend_from_slice(b"HEAD ");
    }
    request.extend_from_slice(bytes);
    if flags & 8 != 0 {
        // Reach the upper length bound exactly (one more input byte passes it) without 250 input
        // bytes.
        let full = REQUEST_KEY_BYTES - if flags & 4 != 0 { 4 } else { 0 };
        if request.len() < full {
            request.resize(full, b'a');
        }
    }
    if flags & 4 != 0 {
        request.extend_from_slice(b"\r\n\r\n");
    }
    request
}

/// Checks one request on its own; returns its key's bytes, if it has a key.
fn check(request: &[u8]) -> Option<[u8; 4 + REQUEST_KEY_BYTES]> {
    let key = RequestKey::new(request);
    assert_eq!(key.is_some(), request.len() <= REQUEST_KEY_BYTES);
    let key = key?;
    assert_eq!(key.len as usize, request.len());
    let bytes = raw(&key);
    assert_eq!(
        Some(bytes),
        reference_key(request),
        "key differs from the kernel's"
    );
    let verdict = key.is_candidate();
    assert!(
        matches!(verdict, Ok(()) | Err(PassReason::NotCandidate)),
        "{verdict:?}"
    );
    assert_eq!(
        verdict.is_ok(),
        reference_is_candidate(request),
        "is_candidate disagrees with the reference on {:?}",
        String::from_utf8_lossy(request)
    );
    // A copy classifies the same (the kernel's key is a copy in a per-CPU scratch slot).
    let copy = key;
    assert_eq!(copy.is_candidate(), verdict);
    Some(bytes)
}

fuzz_target!(|data: &[u8]| {
    let [flags, split, rest @ ..] = data else {
        if let Some(key) = check(data) {
            assert_eq!(check(&data.to_vec()), Some(key));
        }
        return;
    };
    let split = usize::from(*split).min(rest.len());
    let a = decorate(flags & 0x0f, &rest[..split]);
    let b = decorate(flags >> 4, &rest[split..]);
    let (key_a, key_b) = (check(&a), check(&b));
    check(rest);
    // Equal bytes give equal keys (built again from another buffer); different bytes, different
    // keys, even when they differ only by trailing zeros the padding would hide.
    assert_eq!(check(&a.clone()), key_a);
    if let (Some(key_a), Some(key_b)) = (key_a, key_b) {
        assert_eq!(
            key_a == key_b,
            a == b,
            "keys of {:?} and {:?}",
            String::from_utf8_lossy(&a),
            String::from_utf8_lossy(&b)
        );
    }
    // The same request, with a zero byte appended, is another key.
    let mut zero = a.clone();
    zero.push(0);
    if let (Some(key_a), Some(key_zero)) = (key_a, check(&zero)) {
        assert_ne!(key_a, key_zero);
    }
});
