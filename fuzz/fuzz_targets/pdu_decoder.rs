//! One request header (and AHS) through the decoder.
#![no_main]
use dataplane::iscsi::pdu::{Bhs, Request};
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if data.len() < 48 {
        return;
    }
    let mut h = [0u8; 48];
    h.copy_from_slice(&data[..48]);
    let bhs = Bhs(h);
    let ahs = &data[48..];
    let _ = Request::parse(&bhs, &ahs[..ahs.len().min(bhs.total_ahs_len())]);
});
