//! ClientHello / HTTP sniffer: `classify` on the first bytes of a connection never panics, a
//! full buffer is always classified, and the verdict only depends on the bytes: once a prefix
//! is classified, the whole buffer gets the same verdict (class, SNI, Host), as `sniff` stops at
//! the first verdict it gets while the client's bytes trickle in.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::connection::sniff::{classify, Verdict, SNIFF_MAX};

fuzz_target!(|data: &[u8]| {
    let data = &data[..data.len().min(SNIFF_MAX)];
    let Verdict::Done(whole) = classify(data, true) else {
        // An empty buffer has nothing to classify; anything else is decided when full.
        assert!(data.is_empty(), "a full buffer was left undecided");
        return;
    };
    // The first prefix that is decided (as `sniff` would see it peeking a growing buffer).
    let step = (data.len() / 64).max(1);
    let mut n = 1;
    while n <= data.len() {
        if let Verdict::Done(first) = classify(&data[..n], n == data.len()) {
            assert_eq!(first, whole, "prefix of {n} bytes classified {first:?}, whole {whole:?}");
            break;
        }
        n += step;
    }
});
